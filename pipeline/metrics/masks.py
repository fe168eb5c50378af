"""Evaluation of binary masks against the full-resolution annotation.

Per image, :func:`image_stats` keeps sufficient statistics (the pixel confusion matrix, the
object IoU ``j`` and the DAVIS boundary F-measure ``f``, ``boundary``); :func:`aggregate`
turns a group of them into a METRICS block (the metrics of ``definitions.METRICS``, their
definitions and zero-denominator rules, and ``n_images``) and :func:`summarize` does so
overall and per category; the threshold sweep counts and summarises the same per threshold.
The DAVIS aggregation over sequences (mean, recall, decay, J&F) is :mod:`pipeline.metrics.davis`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from .boundary import as_bool, boundary_f, mask_pair
from .definitions import METRICS, Pooled, bg_iou, fg_iou, mean, precision, recall

__all__ = [
    "ImageStats",
    "image_stats",
    "ious",
    "miou",
    "aggregate",
    "summarize",
    "SWEEP_THRESHOLDS",
    "sweep_thresholds",
    "sweep_counts",
    "sweep_summary",
]


# ----------------------------------------------------------------------------- per image


@dataclass
class ImageStats:
    """Sufficient statistics of one image: pixel confusion matrix of the object class
    (tp, fp, fn, tn), the image's object IoU ``j`` and boundary F-measure ``f``."""

    tp: int
    fp: int
    fn: int
    tn: int
    j: float
    f: float
    category: str = ""
    stem: str = ""

    def __post_init__(self) -> None:
        for name in ("tp", "fp", "fn", "tn"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"ImageStats.{name} must be a non-negative integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("j", "f"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"ImageStats.{name} must lie in [0, 1], got {value!r}")
            setattr(self, name, value)
        self.category = str(self.category)
        self.stem = str(self.stem)

    @property
    def n_pixels(self) -> int:
        """Number of pixels of the image."""
        return self.tp + self.fp + self.fn + self.tn

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (plain ints, floats and strings)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ImageStats:
        """The inverse of :meth:`to_dict`; ``category`` and ``stem`` may be missing."""
        return cls(
            tp=d["tp"],
            fp=d["fp"],
            fn=d["fn"],
            tn=d["tn"],
            j=d["j"],
            f=d["f"],
            category=d.get("category", ""),
            stem=d.get("stem", ""),
        )


def image_stats(pred: np.ndarray, gt: np.ndarray, category: str = "", stem: str = "") -> ImageStats:
    """Statistics of one predicted mask against its annotation.

    ``pred``: HxW bool, or numbers where > 0 means object (0/1, 0/255). ``gt``: HxW bool
    (numbers are converted with > 0 as well). Raises ValueError when the shapes differ or
    are not 2-D and non-empty.
    """
    p, g = mask_pair(pred, gt)
    if p.size == 0:
        raise ValueError(f"empty image: prediction {p.shape} and annotation {g.shape}")
    n_pred = int(np.count_nonzero(p))
    n_gt = int(np.count_nonzero(g))
    tp = int(np.count_nonzero(p & g)) if n_pred and n_gt else 0
    fp = n_pred - tp
    fn = n_gt - tp
    tn = p.size - tp - fp - fn
    union = tp + fp + fn
    j = tp / union if union else 1.0
    return ImageStats(
        tp=tp, fp=fp, fn=fn, tn=tn, j=j, f=boundary_f(p, g), category=category, stem=stem
    )


# ----------------------------------------------------------------------------- groups


def ious(tp: int, fp: int, fn: int, tn: int) -> tuple[float, float]:
    """(fg_iou, bg_iou) of one confusion matrix (the rules: ``definitions``)."""
    return fg_iou(tp, fp, fn), bg_iou(tn, fp, fn)


def miou(tp: int, fp: int, fn: int, tn: int) -> float:
    """The ``miou`` of one confusion matrix: the mean of its object and background IoU."""
    fg, bg = ious(tp, fp, fn, tn)
    return (fg + bg) / 2


def aggregate(stats: Iterable[ImageStats]) -> dict:
    """The METRICS block of a group of images: each metric of ``definitions.METRICS`` (in
    its order) and ``n_images``.

    Raises ValueError on an empty group.
    """
    stats = list(stats)
    if not stats:
        raise ValueError("cannot aggregate metrics over zero images")
    pooled = Pooled(
        tp=sum(s.tp for s in stats),
        fp=sum(s.fp for s in stats),
        fn=sum(s.fn for s in stats),
        tn=sum(s.tn for s in stats),
        j=[s.j for s in stats],
        f=[s.f for s in stats],
    )
    return {**{m.key: m.compute(pooled) for m in METRICS}, "n_images": len(stats)}


def summarize(stats: list[ImageStats]) -> dict:
    """``{"overall": block, "per_category": {category: block}}`` (aggregate's blocks),
    categories sorted by name. Raises ValueError on an empty list."""
    stats = list(stats)
    groups: dict[str, list[ImageStats]] = defaultdict(list)
    for s in stats:
        groups[s.category].append(s)
    return {
        "overall": aggregate(stats),
        "per_category": {c: aggregate(groups[c]) for c in sorted(groups)},
    }


# ----------------------------------------------------------------------------- threshold sweep

# the probability thresholds of the report's threshold sweep: 0.05, 0.10, ..., 0.95
SWEEP_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))


def sweep_thresholds(threshold: float) -> tuple[float, ...]:
    """SWEEP_THRESHOLDS with the configured ``threshold`` added (in order) when it is not one
    of them, so that the sweep always holds the point the masks were made at."""
    return tuple(sorted({*SWEEP_THRESHOLDS, float(threshold)}))


def sweep_counts(levels: np.ndarray, gt: np.ndarray, n_thresholds: int) -> dict[str, list[int]]:
    """Object-class confusion counts of one image at each sweep threshold.

    ``levels``: per pixel, how many of the (ascending) thresholds its object probability
    exceeds (0 .. n_thresholds); the pixel is object at threshold k iff ``levels > k``.
    ``gt``: the annotation (bool, same shape). Returns ``{"tp": [...], "fp": [...]}``, one
    count per threshold (fn and tn follow from the image's object and background pixel
    counts). One bincount over (class, level): O(pixels)."""
    lv = np.asarray(levels)
    g = as_bool(gt)
    if lv.shape != g.shape:
        raise ValueError(f"levels {lv.shape} and annotation {g.shape} differ in shape")
    n = int(n_thresholds) + 1
    if n > 127:
        raise ValueError(f"{n_thresholds} thresholds: at most 126")
    if lv.size and int(lv.max()) >= n:
        raise ValueError(f"a level exceeds the {n_thresholds} thresholds")
    hist = np.bincount(
        (lv.astype(np.uint8, copy=False) + g.view(np.uint8) * np.uint8(n)).ravel(), minlength=2 * n
    )
    above = np.cumsum(hist.reshape(2, n)[:, ::-1], axis=1)[:, ::-1]  # pixels at level >= k
    return {"tp": [int(x) for x in above[1, 1:]], "fp": [int(x) for x in above[0, 1:]]}


def sweep_summary(thresholds: Iterable[float], images: Iterable[tuple[dict, int]]) -> list[dict]:
    """The sweep of a group of images: per threshold ``{"threshold", "j_mean", "precision",
    "recall"}``. ``images``: per image its ``sweep_counts`` and its number of object pixels
    (annotated). ``j_mean``: the mean of the images' object IoU (1 for an empty
    prediction of an empty annotation), precision and recall from the summed counts, by the
    rules of ``aggregate``: at the threshold the masks were made at, the values equal the
    group's METRICS exactly. [] for no image."""
    thresholds = [float(t) for t in thresholds]
    images = list(images)
    if not images:
        return []
    out = []
    for k, t in enumerate(thresholds):
        js, tp, fp, fn = [], 0, 0, 0
        for counts, n_obj in images:
            a, b = counts["tp"][k], counts["fp"][k]
            c = n_obj - a
            union = a + b + c
            js.append(a / union if union else 1.0)
            tp, fp, fn = tp + a, fp + b, fn + c
        out.append(
            {
                "threshold": t,
                "j_mean": mean(js),
                "precision": precision(tp, fp, fn),
                "recall": recall(tp, fp, fn),
            }
        )
    return out
