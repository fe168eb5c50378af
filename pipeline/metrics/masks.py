"""Evaluation of binary masks against the full-resolution annotation.

Per image, :func:`image_stats` keeps sufficient statistics (the pixel confusion matrix, the
object IoU ``j`` and the DAVIS boundary F-measure ``f``); :func:`aggregate` turns a group of
them into the ``METRICS`` dict and :func:`summarize` does so overall and per category.

Definitions (all values are floats in [0, 1], except ``n_images``):

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
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["METRICS", "ImageStats", "image_stats", "ious", "miou", "aggregate", "summarize",
           "boundary_map", "boundary_f", "boundary_radius", "disk", "dilate_disk",
           "SWEEP_THRESHOLDS", "sweep_thresholds", "sweep_counts", "sweep_summary"]

METRICS = frozenset({"miou", "fg_iou", "bg_iou", "accuracy", "precision", "recall", "j_mean",
                     "boundary_f", "n_images"})


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
        return cls(tp=d["tp"], fp=d["fp"], fn=d["fn"], tn=d["tn"], j=d["j"], f=d["f"],
                   category=d.get("category", ""), stem=d.get("stem", ""))


def _as_bool(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype == np.bool_ else a > 0


def image_stats(pred: np.ndarray, gt: np.ndarray, category: str = "",
                stem: str = "") -> ImageStats:
    """Statistics of one predicted mask against its annotation.

    ``pred``: HxW bool, or numbers where > 0 means object (0/1, 0/255). ``gt``: HxW bool
    (numbers are converted with > 0 as well). Raises ValueError when the shapes differ or
    are not 2-D and non-empty.
    """
    p = _as_bool(pred)
    g = _as_bool(gt)
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"prediction and annotation must be 2-D arrays of the same shape; "
                         f"got prediction {p.shape} and annotation {g.shape}")
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
    return ImageStats(tp=tp, fp=fp, fn=fn, tn=tn, j=j, f=boundary_f(p, g),
                      category=category, stem=stem)


# ----------------------------------------------------------------------------- groups

def _ratio(num: int, den: int, if_zero: float) -> float:
    return min(1.0, max(0.0, num / den)) if den else float(if_zero)


def _mean(values: list[float]) -> float:
    return min(1.0, max(0.0, math.fsum(values) / len(values)))


def ious(tp: int, fp: int, fn: int, tn: int) -> tuple[float, float]:
    """(fg_iou, bg_iou) of one confusion matrix (see the module docstring for the rules)."""
    return _ratio(tp, tp + fp + fn, 1.0), _ratio(tn, tn + fp + fn, 1.0)


def miou(tp: int, fp: int, fn: int, tn: int) -> float:
    """The ``miou`` of one confusion matrix: the mean of its object and background IoU."""
    fg_iou, bg_iou = ious(tp, fp, fn, tn)
    return (fg_iou + bg_iou) / 2


def aggregate(stats: Iterable[ImageStats]) -> dict:
    """The METRICS dict of a group of images (see the module docstring for the rules).

    Raises ValueError on an empty group.
    """
    stats = list(stats)
    if not stats:
        raise ValueError("cannot aggregate metrics over zero images")
    tp = sum(s.tp for s in stats)
    fp = sum(s.fp for s in stats)
    fn = sum(s.fn for s in stats)
    tn = sum(s.tn for s in stats)
    fg_iou, bg_iou = ious(tp, fp, fn, tn)
    return {
        "miou": (fg_iou + bg_iou) / 2,
        "fg_iou": fg_iou,
        "bg_iou": bg_iou,
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn, 1.0),
        "precision": _ratio(tp, tp + fp, 1.0 if tp + fn == 0 else 0.0),
        "recall": _ratio(tp, tp + fn, 1.0 if fp == 0 else 0.0),
        "j_mean": _mean([s.j for s in stats]),
        "boundary_f": _mean([s.f for s in stats]),
        "n_images": len(stats),
    }


def summarize(stats: list[ImageStats]) -> dict:
    """``{"overall": METRICS, "per_category": {category: METRICS}}``, categories sorted by
    name. Raises ValueError on an empty list."""
    stats = list(stats)
    groups: dict[str, list[ImageStats]] = defaultdict(list)
    for s in stats:
        groups[s.category].append(s)
    return {"overall": aggregate(stats),
            "per_category": {c: aggregate(groups[c]) for c in sorted(groups)}}


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
    g = _as_bool(gt)
    if lv.shape != g.shape:
        raise ValueError(f"levels {lv.shape} and annotation {g.shape} differ in shape")
    n = int(n_thresholds) + 1
    if n > 127:
        raise ValueError(f"{n_thresholds} thresholds: at most 126")
    if lv.size and int(lv.max()) >= n:
        raise ValueError(f"a level exceeds the {n_thresholds} thresholds")
    hist = np.bincount((lv.astype(np.uint8, copy=False) + g.view(np.uint8) * np.uint8(n)).ravel(),
                       minlength=2 * n)
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
        out.append({"threshold": t, "j_mean": _mean(js),
                    "precision": _ratio(tp, tp + fp, 1.0 if tp + fn == 0 else 0.0),
                    "recall": _ratio(tp, tp + fn, 1.0 if fp == 0 else 0.0)})
    return out


# ----------------------------------------------------------------------------- boundaries

def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask by the DAVIS ``seg2bmap`` rule (same size, bool).

    A pixel is boundary when it differs from its east, south or south-east neighbour. In the
    last row only the east neighbour is compared, in the last column only the south one, and
    the bottom-right pixel is never boundary (so the image border itself is no boundary).
    """
    m = _as_bool(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {m.shape}")
    b = np.zeros(m.shape, dtype=bool)
    if m.size == 0:
        return b
    c = m[:-1, :-1]
    b[:-1, :-1] = (c != m[:-1, 1:]) | (c != m[1:, :-1]) | (c != m[1:, 1:])
    b[-1, :-1] = m[-1, :-1] != m[-1, 1:]
    b[:-1, -1] = m[:-1, -1] != m[1:, -1]
    return b


def boundary_radius(bound_th: float, shape: tuple[int, int]) -> float:
    """Match tolerance in pixels, as in DAVIS: ``bound_th`` itself when >= 1, else
    ``ceil(bound_th * sqrt(H^2 + W^2))``."""
    if not bound_th >= 0:
        raise ValueError(f"bound_th must be >= 0, got {bound_th!r}")
    if bound_th >= 1:
        return float(bound_th)
    h, w = shape
    return float(math.ceil(bound_th * math.sqrt(h * h + w * w)))


def _half_widths(radius: float) -> list[tuple[int, int]]:
    """(dy, w) rows of the disk {x^2 + y^2 <= radius^2}: offset dy spans dx in [-w, w]."""
    if not radius >= 0:
        raise ValueError(f"radius must be >= 0, got {radius!r}")
    r2 = radius * radius
    rows = []
    top = int(math.floor(radius))
    for dy in range(-top, top + 1):
        rest = r2 - dy * dy
        if float(rest).is_integer():
            w = math.isqrt(int(rest))
        else:
            w = int(math.floor(math.sqrt(rest)))
            while (w + 1) ** 2 <= rest:
                w += 1
            while w * w > rest:
                w -= 1
        rows.append((dy, w))
    return rows


def disk(radius: float) -> np.ndarray:
    """The disk structuring element {(x, y): x^2 + y^2 <= radius^2}, (2R+1)^2 bool,
    R = floor(radius)."""
    rows = _half_widths(radius)
    top = len(rows) // 2
    k = np.zeros((2 * top + 1, 2 * top + 1), dtype=bool)
    for dy, w in rows:
        k[dy + top, top - w: top + w + 1] = True
    return k


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), inclusive, of the True pixels of a 2-D mask; None when there are none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _run_prefix(crop: np.ndarray, pad: int) -> np.ndarray:
    """Row-wise prefix counts of ``crop`` with ``pad`` columns of margin on each side:
    ``out[i, pad + k] = count(crop[i, :k])`` for every k, clamped to 0 / the row total
    outside [0, W]. A run crop[i, a:b] (a, b may stick out) is non-empty iff
    ``out[i, pad + b] > out[i, pad + a]``."""
    hc, wc = crop.shape
    out = np.zeros((hc, wc + 1 + 2 * pad), dtype=np.int32)
    np.cumsum(crop, axis=1, dtype=np.int32, out=out[:, pad + 1:pad + 1 + wc])
    out[:, pad + 1 + wc:] = out[:, pad + wc:pad + wc + 1]
    return out


def _dilate_crop(crop: np.ndarray, radius: float) -> np.ndarray:
    """Disk dilation of ``crop`` onto the crop grown by R = floor(radius) on every side,
    shape (hc + 2R, wc + 2R). O(area * R): one horizontal-run pass per distinct run
    half-width (slices of the row prefix counts), then one shifted OR per row offset."""
    rows = _half_widths(radius)
    top = len(rows) // 2
    hc, wc = crop.shape
    wo = wc + 2 * top
    prefix = _run_prefix(crop, 2 * top)
    out = np.zeros((hc + 2 * top, wo), dtype=bool)
    runs: dict[int, np.ndarray] = {}
    for dy, w in rows:
        if w not in runs:
            # output column u is crop column u - top; run [u - top - w, u - top + w]
            runs[w] = prefix[:, top + w + 1:top + w + 1 + wo] > prefix[:, top - w:top - w + wo]
        # a target pixel in crop row i reaches output row i + top - dy
        out[top - dy:top - dy + hc] |= runs[w]
    return out


def _near(target: np.ndarray, ys: np.ndarray, xs: np.ndarray, radius: float) -> np.ndarray:
    """For each query pixel (ys[i], xs[i]): is there a True pixel of ``target`` within the
    disk of ``radius`` around it, i.e. is the query in the disk dilation of ``target``?
    Queries may lie outside the image.

    Only the bounding box of ``target``'s True pixels is scanned. The disk is a stack of
    horizontal runs, one per row offset; with the row-wise prefix counts of ``target`` a run
    is tested in O(1). Few queries (the usual case: boundary pixels) are tested run by run,
    O(box area + queries * R); many queries use the dense dilation of the box, O(area * R).
    """
    hit = np.zeros(ys.shape, dtype=bool)
    box = _bbox(target)
    if box is None or ys.size == 0:
        return hit
    rows = _half_widths(radius)
    top = len(rows) // 2
    y0, y1, x0, x1 = box
    crop = target[y0:y1 + 1, x0:x1 + 1]
    hc, wc = crop.shape
    # only queries within the box grown by R can hit anything
    sel = np.flatnonzero((ys >= y0 - top) & (ys <= y1 + top) & (xs >= x0 - top) & (xs <= x1 + top))
    if sel.size == 0:
        return hit
    qy = ys[sel].astype(np.intp) - y0   # in [-top, hc + top)
    qx = xs[sel].astype(np.intp) - x0   # in [-top, wc + top)
    if sel.size * len(rows) > crop.size:  # measured crossover of the two ways, roughly
        hit[sel] = _dilate_crop(crop, radius)[qy + top, qx + top]
        return hit
    # sparse: prefix table with 2R zero rows above and below and 2R margin columns, so that
    # every (query + offset) index is in range without a bounds check; flat indexing
    pad = 2 * top
    prefix = np.zeros((hc + 2 * pad, wc + 1 + 2 * pad), dtype=np.int32)
    prefix[pad:pad + hc] = _run_prefix(crop, pad)
    ncol = prefix.shape[1]
    flat = prefix.ravel()
    base = (qy + pad) * ncol + (qx + pad)
    found = np.zeros(sel.shape, dtype=bool)
    for dy, w in rows:
        # run crop[qy + dy, qx - w : qx + w + 1]
        lo = base + (dy * ncol - w)
        found |= flat[lo + (2 * w + 1)] > flat[lo]
    hit[sel] = found
    return hit


def dilate_disk(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation of ``mask`` by :func:`disk` (``radius``); pixels outside the image
    count as False. Same size, bool. O(H W R)."""
    m = _as_bool(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {m.shape}")
    out = np.zeros(m.shape, dtype=bool)
    box = _bbox(m)
    if box is None:
        return out
    y0, y1, x0, x1 = box
    top = len(_half_widths(radius)) // 2
    grown = _dilate_crop(m[y0:y1 + 1, x0:x1 + 1], radius)
    # grown[v, u] is image pixel (y0 - top + v, x0 - top + u); paste what lies inside
    h, w = m.shape
    a, b = max(0, y0 - top), min(h, y1 + top + 1)
    c, d = max(0, x0 - top), min(w, x1 + top + 1)
    out[a:b, c:d] = grown[a - (y0 - top):b - (y0 - top), c - (x0 - top):d - (x0 - top)]
    return out


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """DAVIS 2016 boundary F-measure of ``pred`` against ``gt`` (same HxW shape).

    Boundaries by :func:`boundary_map`; a predicted boundary pixel is matched when an
    annotated boundary pixel lies within the disk of radius :func:`boundary_radius`, and
    vice versa; P = matched predicted / predicted, R = matched annotated / annotated.
    Empty boundaries follow the DAVIS rules (see the module docstring).
    """
    p = _as_bool(pred)
    g = _as_bool(gt)
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"prediction and annotation must be 2-D arrays of the same shape; "
                         f"got prediction {p.shape} and annotation {g.shape}")
    radius = boundary_radius(bound_th, p.shape)
    pb = boundary_map(p)
    gb = boundary_map(g)
    py, px = np.divmod(np.flatnonzero(pb), p.shape[1])  # much faster than np.nonzero (2-D)
    gy, gx = np.divmod(np.flatnonzero(gb), p.shape[1])
    n_p, n_g = py.size, gy.size
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0:
        precision, recall = 1.0, 0.0
    elif n_g == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = int(np.count_nonzero(_near(gb, py, px, radius))) / n_p
        recall = int(np.count_nonzero(_near(pb, gy, gx, radius))) / n_g
    if precision + recall == 0:
        return 0.0
    return min(1.0, 2 * precision * recall / (precision + recall))
