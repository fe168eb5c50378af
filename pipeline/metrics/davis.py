"""The DAVIS evaluation protocol's aggregation of per-frame J and F (as davis2017-evaluation
computes it), so that a split's numbers can be set beside published DAVIS results.

Per sequence (a category of the split, its frames ordered by stem, as the official code
orders the sorted file names), the frames evaluated are all but the first and the last
(the semi-supervised protocol; ``exclude_ends=False``: every frame, as its unsupervised
task). Of the per-frame values ``v[0..n-1]`` of the evaluated frames:

- ``mean``: their mean;
- ``recall``: the fraction strictly above ``RECALL_THRESHOLD`` (0.5);
- ``decay``: the mean of the first of ``DECAY_BINS`` (4) time bins minus the mean of the
  last. The bins' edges are ``e_k = round(1 + k (n - 1) / 4) - 1`` (k = 0..4, halves rounded
  up: ``e_k = (k (n - 1) + 2) // 4``), bin k holds ``v[e_k .. e_(k+1)]`` inclusive (adjacent
  bins share their edge frame). The official code casts the edges to uint8, so there they
  wrap for a sequence of more than 256 evaluated frames; here they do not (the two agree
  up to 256 frames, and every DAVIS sequence is shorter).

Over sequences (DAVIS 2016 is single-object, so the 2017 code's objects are the sequences):
each statistic is the plain mean of the sequences' values, and ``J&F`` is the mean of the
J mean and the F mean. A sequence with no frame left to evaluate (fewer than 3 frames in
the split with the ends excluded) is not in the means; it is listed in ``skipped`` with its
number of frames (the official code fails on one).

The split decides the frame list: on a split that holds every 2nd frame of each sequence,
the protocol is applied to those frames (first and last of that list excluded), which is
what the official code computes when given the same frames, not its value on the full
sequences. Pure numpy, no torch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DECAY_BINS",
    "RECALL_THRESHOLD",
    "FRAMES_EXCLUDED_ENDS",
    "FRAMES_ALL",
    "SequenceStats",
    "statistics",
    "decay_edges",
    "evaluated",
    "davis_protocol",
    "per_variant",
]

DECAY_BINS = 4
RECALL_THRESHOLD = 0.5
# what the report's "frames" field says of the frame list
FRAMES_EXCLUDED_ENDS = "every frame of the split except each sequence's first and last"
FRAMES_ALL = "every frame of the split"


@dataclass(frozen=True)
class SequenceStats:
    """The DAVIS statistics of one sequence's per-frame values."""

    mean: float
    recall: float
    decay: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "recall": self.recall, "decay": self.decay}


def _checked(values: Sequence[float], what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(
            f"{what}: need a non-empty 1-D list of per-frame values, got shape {v.shape}"
        )
    bad = ~((v >= 0.0) & (v <= 1.0))  # also NaN
    if bad.any():
        raise ValueError(
            f"{what}: per-frame values must lie in [0, 1], got "
            f"{v[bad][0]!r} at frame {int(np.flatnonzero(bad)[0])}"
        )
    return v


def decay_edges(n: int) -> list[int]:
    """The DECAY_BINS + 1 bin edges (frame indices) of `n` evaluated frames."""
    if n < 1:
        raise ValueError(f"decay bins need at least one frame, got {n}")
    return [(k * (n - 1) + 2) // DECAY_BINS for k in range(DECAY_BINS + 1)]


def statistics(values: Sequence[float], what: str = "sequence") -> SequenceStats:
    """Mean, recall and decay of one sequence's per-frame values (in frame order, each in
    [0, 1]; ValueError otherwise, naming `what`)."""
    v = _checked(values, what)
    e = decay_edges(v.size)
    first = v[e[0] : e[1] + 1]
    last = v[e[DECAY_BINS - 1] : e[DECAY_BINS] + 1]
    return SequenceStats(
        mean=math.fsum(v) / v.size,
        recall=int(np.count_nonzero(v > RECALL_THRESHOLD)) / v.size,
        decay=math.fsum(first) / first.size - math.fsum(last) / last.size,
    )


def evaluated(stems: Iterable[str], exclude_ends: bool = True) -> list[str]:
    """The frames of one sequence that the protocol evaluates: `stems` sorted (as file
    names), without the first and the last when `exclude_ends`."""
    ordered = sorted(stems)
    if len(set(ordered)) != len(ordered):
        raise ValueError("a sequence lists a frame twice")
    return ordered[1:-1] if exclude_ends else ordered


def _mean_of(per_sequence: dict[str, dict], measure: str, stat: str) -> float | None:
    vals = [s[measure][stat] for s in per_sequence.values()]
    return math.fsum(vals) / len(vals) if vals else None


def davis_protocol(
    frames: Iterable[tuple[str, str, float, float]], exclude_ends: bool = True
) -> dict:
    """The DAVIS aggregate of per-frame values ``(sequence, frame stem, j, f)``.

    Returns ``{"J": {"mean", "recall", "decay"}, "F": {...}, "J&F", "n_sequences",
    "per_sequence": {sequence: {"J": {...}, "F": {...}, "n_frames"}}, "skipped":
    {sequence: frames in the split}, "frames"}``, sequences sorted by name; ``n_frames``
    counts the frames evaluated. With no sequence left to evaluate, the means are None.
    ValueError on a frame listed twice or a value outside [0, 1] (NaN included)."""
    by_seq: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    for seq, stem, j, f in frames:
        if stem in by_seq[seq]:
            raise ValueError(f"sequence {seq!r}: frame {stem!r} listed twice")
        for name, value in (("J", j), ("F", f)):
            if not 0.0 <= float(value) <= 1.0:  # also NaN
                raise ValueError(
                    f"sequence {seq!r} frame {stem!r}: {name} must lie in [0, 1], got {value!r}"
                )
        by_seq[seq][stem] = (float(j), float(f))
    per_sequence: dict[str, dict] = {}
    skipped: dict[str, int] = {}
    for seq in sorted(by_seq):
        rows = by_seq[seq]
        kept = evaluated(rows, exclude_ends)
        if not kept:
            skipped[seq] = len(rows)
            continue
        per_sequence[seq] = {
            "J": statistics([rows[s][0] for s in kept], f"sequence {seq!r} J").to_dict(),
            "F": statistics([rows[s][1] for s in kept], f"sequence {seq!r} F").to_dict(),
            "n_frames": len(kept),
        }
    out: dict = {
        m: {s: _mean_of(per_sequence, m, s) for s in ("mean", "recall", "decay")}
        for m in ("J", "F")
    }
    jm, fm = out["J"]["mean"], out["F"]["mean"]
    out["J&F"] = None if jm is None or fm is None else (jm + fm) / 2
    out["n_sequences"] = len(per_sequence)
    out["per_sequence"] = per_sequence
    out["skipped"] = skipped
    out["frames"] = FRAMES_EXCLUDED_ENDS if exclude_ends else FRAMES_ALL
    return out


def per_variant(
    per_image: Iterable[dict], variants: Iterable[str], exclude_ends: bool = True
) -> dict[str, dict]:
    """{variant: davis_protocol(...)} from a report's ``per_image`` rows (``category`` is the
    sequence, ``stem`` the frame, ``j`` and ``f`` per variant): what stage 3 already keeps,
    so nothing is recomputed."""
    rows = list(per_image)
    return {
        v: davis_protocol(
            ((r["category"], r["stem"], r["j"][v], r["f"][v]) for r in rows), exclude_ends
        )
        for v in variants
    }
