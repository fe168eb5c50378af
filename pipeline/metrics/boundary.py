"""The DAVIS 2016 boundary F-measure of a predicted mask against its annotation
(``seg2bmap`` boundaries, matched within ``ceil(0.008 * image diagonal)`` pixels in a disk
neighbourhood), computed on the masks' bounding boxes only. The rules for empty boundaries
are in ``definitions``. Masks are bool, or numbers where > 0 is object; a negative or NaN
value is refused (ValueError), as is a tolerance >= 1 pixel that is not an integer."""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "as_bool",
    "mask_2d",
    "mask_pair",
    "boundary_map",
    "boundary_f",
    "boundary_radius",
    "disk",
    "dilate_disk",
]


def as_bool(a: np.ndarray) -> np.ndarray:
    """`a` as a bool array: itself when bool, else `a > 0`. ValueError on a negative or NaN
    value, for which DAVIS has no one rule (its J and F functions count any non-zero value
    as object, its mask reader only the object's label), and on a non-numeric array."""
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return a
    if a.dtype.kind not in "uif":
        raise ValueError(f"a mask must be bool or numbers, got dtype {a.dtype}")
    if a.dtype.kind != "u" and a.size:
        bad = np.isnan(a) | (a < 0) if a.dtype.kind == "f" else a < 0
        if bad.any():
            at = np.unravel_index(int(np.argmax(bad)), a.shape)
            raise ValueError(
                f"mask value {a[at]!r} at {tuple(int(i) for i in at)}: mask "
                "values must be >= 0 and not NaN (> 0 is object)"
            )
    return a > 0


def mask_2d(mask: np.ndarray) -> np.ndarray:
    """`mask` as a 2-D bool array (``as_bool``); ValueError for another number of axes."""
    m = as_bool(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {m.shape}")
    return m


def mask_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A prediction and its annotation as bool arrays (``as_bool``); ValueError unless both
    are 2-D of the same shape."""
    p = as_bool(pred)
    g = as_bool(gt)
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(
            f"prediction and annotation must be 2-D arrays of the same shape; "
            f"got prediction {p.shape} and annotation {g.shape}"
        )
    return p, g


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask by the DAVIS ``seg2bmap`` rule (same size, bool).

    A pixel is boundary when it differs from its east, south or south-east neighbour. In the
    last row only the east neighbour is compared, in the last column only the south one, and
    the bottom-right pixel is never boundary (so the image border itself is no boundary).
    """
    m = mask_2d(mask)
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
    ``ceil(bound_th * sqrt(H^2 + W^2))``. ValueError on a negative or NaN ``bound_th``, and
    on a non-integer one >= 1: DAVIS rounds a fraction of the diagonal up to whole pixels
    but takes a tolerance >= 1 as it is, and its disk of radius 1.5 is a 4x4 element holding
    an off-centre 2x2 square (less than its disk of radius 1)."""
    if not bound_th >= 0:
        raise ValueError(f"bound_th must be >= 0, got {bound_th!r}")
    if bound_th >= 1:
        if not float(bound_th).is_integer():
            raise ValueError(
                f"bound_th >= 1 is a tolerance in pixels and must be an integer, got {bound_th!r}"
            )
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
        k[dy + top, top - w : top + w + 1] = True
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
    np.cumsum(crop, axis=1, dtype=np.int32, out=out[:, pad + 1 : pad + 1 + wc])
    out[:, pad + 1 + wc :] = out[:, pad + wc : pad + wc + 1]
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
            runs[w] = prefix[:, top + w + 1 : top + w + 1 + wo] > prefix[:, top - w : top - w + wo]
        # a target pixel in crop row i reaches output row i + top - dy
        out[top - dy : top - dy + hc] |= runs[w]
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
    crop = target[y0 : y1 + 1, x0 : x1 + 1]
    hc, wc = crop.shape
    # only queries within the box grown by R can hit anything
    sel = np.flatnonzero((ys >= y0 - top) & (ys <= y1 + top) & (xs >= x0 - top) & (xs <= x1 + top))
    if sel.size == 0:
        return hit
    qy = ys[sel].astype(np.intp) - y0  # in [-top, hc + top)
    qx = xs[sel].astype(np.intp) - x0  # in [-top, wc + top)
    if sel.size * len(rows) > crop.size:  # measured crossover of the two ways, roughly
        hit[sel] = _dilate_crop(crop, radius)[qy + top, qx + top]
        return hit
    # sparse: prefix table with 2R zero rows above and below and 2R margin columns, so that
    # every (query + offset) index is in range without a bounds check; flat indexing
    pad = 2 * top
    prefix = np.zeros((hc + 2 * pad, wc + 1 + 2 * pad), dtype=np.int32)
    prefix[pad : pad + hc] = _run_prefix(crop, pad)
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
    m = mask_2d(mask)
    out = np.zeros(m.shape, dtype=bool)
    box = _bbox(m)
    if box is None:
        return out
    y0, y1, x0, x1 = box
    top = len(_half_widths(radius)) // 2
    grown = _dilate_crop(m[y0 : y1 + 1, x0 : x1 + 1], radius)
    # grown[v, u] is image pixel (y0 - top + v, x0 - top + u); paste what lies inside
    h, w = m.shape
    a, b = max(0, y0 - top), min(h, y1 + top + 1)
    c, d = max(0, x0 - top), min(w, x1 + top + 1)
    out[a:b, c:d] = grown[a - (y0 - top) : b - (y0 - top), c - (x0 - top) : d - (x0 - top)]
    return out


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """DAVIS 2016 boundary F-measure of ``pred`` against ``gt`` (same HxW shape).

    Boundaries by :func:`boundary_map`; a predicted boundary pixel is matched when an
    annotated boundary pixel lies within the disk of radius :func:`boundary_radius`, and
    vice versa; P = matched predicted / predicted, R = matched annotated / annotated.
    Empty boundaries follow the DAVIS rules (see the module docstring).
    """
    p, g = mask_pair(pred, gt)
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
