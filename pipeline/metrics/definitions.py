"""The metrics of a report, defined once: each one's key in ``report_<split>.json``, its labels,
which way is better, its format, its note, and how it is computed from a group of images'
sufficient statistics. Everything that computes, reads, shows or compares metrics reads this
list: ``masks.aggregate`` (the report's METRICS blocks), the report's parser, its tables,
figures and headline, the CLI's lines after stage 3, `runs` and its HTML page. Adding a
metric is one ``Metric`` here (and its test).

Definitions (all values are floats in [0, 1]; a block also holds ``n_images``):

- ``fg_iou``, ``bg_iou``, ``accuracy``, ``precision``, ``recall`` come from ONE confusion
  matrix summed over all pixels of the group's images (not from averaged per-image values);
  precision and recall are of the object class; ``miou = (fg_iou + bg_iou) / 2``.
- ``j_mean``: mean over images of the per-image object IoU (DAVIS J).
- ``boundary_f``: mean over images of the DAVIS 2016 boundary F-measure (``seg2bmap``
  boundaries, match tolerance ``ceil(0.008 * image diagonal)`` pixels, disk neighbourhood).

Zero denominators (a ratio whose denominator is zero is given the value that is "right by
default", never NaN):

- ``fg_iou`` = tp / (tp + fp + fn): 1.0 when there is no object in the prediction nor in
  the annotation (tp + fp + fn == 0). Same rule for the per-image ``j`` (as in DAVIS).
- ``bg_iou`` = tn / (tn + fp + fn): 1.0 when every pixel is object in both.
- ``accuracy`` = (tp + tn) / all pixels: 1.0 when there are no pixels at all.
- ``precision`` = tp / (tp + fp): when nothing is predicted as object, 1.0 if there is also
  no annotated object (tp + fn == 0), else 0.0.
- ``recall`` = tp / (tp + fn): when there is no annotated object, 1.0 if nothing is
  predicted as object either (fp == 0), else 0.0.
- boundary F (DAVIS rules): both boundaries empty -> P = R = 1 (F = 1); predicted boundary
  empty, annotated not -> P = 1, R = 0; annotated empty, predicted not -> P = 0, R = 1;
  F = 2PR / (P + R), 0 when P + R == 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..core.variants import BASELINE, CANDIDATE

__all__ = [
    "Pooled",
    "Metric",
    "METRICS",
    "KEYS",
    "BLOCK_KEYS",
    "HEADLINE",
    "OVERALL_TABLE",
    "RUNS_COLUMNS",
    "metric",
    "ratio",
    "mean",
    "fg_iou",
    "bg_iou",
    "precision",
    "recall",
    "headline_names",
]


@dataclass(frozen=True)
class Pooled:
    """A group of images' sufficient statistics: the object class's confusion matrix summed
    over their pixels, and the per-image object IoU ``j`` and boundary F ``f`` of each."""

    tp: int
    fp: int
    fn: int
    tn: int
    j: Sequence[float]
    f: Sequence[float]


def ratio(num: int, den: int, if_zero: float) -> float:
    """num / den kept in [0, 1]; `if_zero` when den is 0."""
    return min(1.0, max(0.0, num / den)) if den else float(if_zero)


def mean(values: Sequence[float]) -> float:
    """The mean of per-image scores (math.fsum: exact), kept in [0, 1]."""
    return min(1.0, max(0.0, math.fsum(values) / len(values)))


def fg_iou(tp: int, fp: int, fn: int) -> float:
    return ratio(tp, tp + fp + fn, 1.0)


def bg_iou(tn: int, fp: int, fn: int) -> float:
    return ratio(tn, tn + fp + fn, 1.0)


def precision(tp: int, fp: int, fn: int) -> float:
    return ratio(tp, tp + fp, 1.0 if tp + fn == 0 else 0.0)


def recall(tp: int, fp: int, fn: int) -> float:
    return ratio(tp, tp + fn, 1.0 if fp == 0 else 0.0)


@dataclass(frozen=True)
class Metric:
    """One metric of the report's METRICS blocks."""

    key: str  # its key in report_<split>.json's blocks (and in `runs --json`)
    label: str  # a table column's or a figure's title: "J mean"
    short: str  # in a line of text or a narrow column: "J"
    compute: Callable[[Pooled], float]  # its value for a group of images
    note: str  # what it means, as the report explains it (equal notes are shown once)
    higher_is_better: bool = True
    format: str = ".3f"  # a value as shown: format(value, format)
    headline: bool = False  # one of the headline metrics: the report's headline, `runs`
    per_image: str | None = None  # the mean over images of this per-image score ("j", "f")

    def text(self, value: float) -> str:
        """`value` as the report shows it: "0.812"."""
        return format(value, self.format)


_POOLED_IOU = "IoU of the object class / of the background class over the pooled pixels."
_PIXEL_RATES = "pixel accuracy, and the precision / recall of the object pixels."

# in the order of report_<split>.json's blocks
METRICS: tuple[Metric, ...] = (
    Metric(
        "miou",
        "mIoU",
        "mIoU",
        lambda p: (fg_iou(p.tp, p.fp, p.fn) + bg_iou(p.tn, p.fp, p.fn)) / 2,
        "mean of the object IoU and the background IoU, each computed over all pixels of "
        "the group pooled together (the course convention).",
        headline=True,
    ),
    Metric("fg_iou", "FG IoU", "FG IoU", lambda p: fg_iou(p.tp, p.fp, p.fn), _POOLED_IOU),
    Metric("bg_iou", "BG IoU", "BG IoU", lambda p: bg_iou(p.tn, p.fp, p.fn), _POOLED_IOU),
    Metric(
        "accuracy",
        "Accuracy",
        "Accuracy",
        lambda p: ratio(p.tp + p.tn, p.tp + p.fp + p.fn + p.tn, 1.0),
        _PIXEL_RATES,
    ),
    Metric(
        "precision", "Precision", "Precision", lambda p: precision(p.tp, p.fp, p.fn), _PIXEL_RATES
    ),
    Metric("recall", "Recall", "Recall", lambda p: recall(p.tp, p.fp, p.fn), _PIXEL_RATES),
    Metric(
        "j_mean",
        "J mean",
        "J",
        lambda p: mean(p.j),
        "mean over images of the per-image object IoU (DAVIS region similarity J): every "
        "image counts equally, whatever the size of its object.",
        headline=True,
        per_image="j",
    ),
    Metric(
        "boundary_f",
        "Boundary F",
        "F",
        lambda p: mean(p.f),
        "DAVIS boundary F-measure: precision/recall of the predicted vs. ground-truth "
        "object contours, matched within 0.008 x the image diagonal; averaged over images.",
        headline=True,
        per_image="f",
    ),
)
KEYS = tuple(m.key for m in METRICS)
BLOCK_KEYS = frozenset({*KEYS, "n_images"})  # the keys of one METRICS block
_BY_KEY = {m.key: m for m in METRICS}


def metric(key: str) -> Metric:
    """The Metric of `key` (KeyError for no metric)."""
    return _BY_KEY[key]


# the headline metrics, in METRICS' order: the report's headline (PAC's gain over bilinear),
# the dot plots and per-category tables, the CLI's lines, `runs`; a report read strictly
# must hold them
HEADLINE = tuple(m for m in METRICS if m.headline)
# the report's overall table, in reading order: the pooled IoUs, the per-image means, the
# pixel rates
OVERALL_TABLE = tuple(
    metric(k)
    for k in ("miou", "fg_iou", "bg_iou", "j_mean", "boundary_f", "accuracy", "precision", "recall")
)
# the metric columns of `runs` and of its HTML page: (title, variant, metric)
RUNS_COLUMNS = tuple(
    (f"{name} {m.short}", v, m)
    for v, name in ((CANDIDATE, "pac"), (BASELINE, "bilinear"))
    for m in HEADLINE
)


def headline_names() -> str:
    """The headline metrics named in prose: "mIoU, J and F"."""
    names = [m.short for m in HEADLINE]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
