"""The threshold that ``predict.threshold = "auto"`` takes, per variant, from the validation
split's threshold sweep (``report_<val split>.json``'s ``threshold_sweep``), never from the
split being scored.

Objective: the variant's mean per-image object IoU (``j_mean``, DAVIS J) on the validation
split, maximised over the fixed sweep grid ``metrics.SWEEP_THRESHOLDS`` (0.05 ... 0.95; a
point the validation masks themselves were made at, when off the grid, is not a candidate,
so the choice does not depend on it). Ties go to the threshold nearest 0.5, then to the
lower one. Pure functions on the report's JSON; no torch.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..core.fingerprints import fingerprint
from .masks import SWEEP_THRESHOLDS

__all__ = ["OBJECTIVE", "choose_threshold", "choose_thresholds", "sweep_fingerprint"]

OBJECTIVE = "j_mean"  # what the choice maximises on the validation split
TIE_CENTRE = 0.5


def _grid_points(sweep: object, what: str) -> dict[float, float]:
    """{grid threshold: objective} of one variant's sweep; ValueError when a grid point is
    missing or a value is not a number in [0, 1]."""
    if not isinstance(sweep, list):
        raise ValueError(f"{what}: the threshold sweep is not a list")
    found: dict[float, float] = {}
    for point in sweep:
        if not isinstance(point, dict):
            raise ValueError(f"{what}: a sweep point is not an object")
        t, v = point.get("threshold"), point.get(OBJECTIVE)
        if (
            isinstance(t, bool)
            or not isinstance(t, (int, float))
            or isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not 0.0 <= v <= 1.0
        ):  # also NaN
            raise ValueError(f"{what}: bad sweep point {point!r}")
        found[float(t)] = float(v)
    missing = [t for t in SWEEP_THRESHOLDS if t not in found]
    if missing:
        raise ValueError(f"{what}: the sweep lacks threshold {missing[0]}")
    return {t: found[t] for t in SWEEP_THRESHOLDS}


def choose_threshold(sweep: list[dict], what: str = "sweep") -> float:
    """The grid threshold of highest ``j_mean`` in one variant's sweep (ties: nearest 0.5,
    then lower)."""
    points = _grid_points(sweep, what)
    best = max(points.values())
    return min(
        (t for t, v in points.items() if v == best),
        key=lambda t: (round(abs(t - TIE_CENTRE), 9), t),
    )  # 0.4 and 0.6 tie exactly


def choose_thresholds(val_report: dict, variants: Iterable[str]) -> dict[str, float]:
    """{variant: threshold} chosen on the validation report's sweep; ValueError naming what
    is missing or bad."""
    sweeps = val_report.get("threshold_sweep") if isinstance(val_report, dict) else None
    if not isinstance(sweeps, dict):
        raise ValueError("no threshold_sweep")
    out = {}
    for v in variants:
        if v not in sweeps:
            raise ValueError(f"no threshold sweep of variant {v!r}")
        out[v] = choose_threshold(sweeps[v], f"variant {v!r}")
    return out


def sweep_fingerprint(val_report: dict, variants: Iterable[str]) -> str:
    """The content fingerprint of what the choice reads: the variants' sweeps at the grid
    points (the dependency of a stage that predicts with "auto")."""
    sweeps = val_report["threshold_sweep"]
    return fingerprint(
        {v: [[t, o] for t, o in _grid_points(sweeps[v], v).items()] for v in variants}
    )
