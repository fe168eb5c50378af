"""Metrics: hand-derived values on tiny masks, and the fast boundary code against slow
reference implementations written here (explicit loops, brute-force distances)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.metrics import boundary as metrics
from pipeline.metrics.boundary import (
    boundary_f,
    boundary_map,
    boundary_radius,
    dilate_disk,
    disk,
)
from pipeline.metrics.definitions import BLOCK_KEYS as METRICS
from pipeline.metrics.masks import (
    ImageStats,
    aggregate,
    image_stats,
    summarize,
    sweep_counts,
)


def mask(shape, *boxes):
    """A bool mask with the given (y0, y1, x0, x1) boxes (inclusive) set."""
    m = np.zeros(shape, dtype=bool)
    for y0, y1, x0, x1 in boxes:
        m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def arr(text: str) -> np.ndarray:
    return np.array([[c == "1" for c in line.split()] for line in text.strip().splitlines()])


def check_metrics(m: dict) -> None:
    assert set(m) == METRICS
    assert type(m["n_images"]) is int
    for k in METRICS - {"n_images"}:
        assert isinstance(m[k], float) and 0.0 <= m[k] <= 1.0, (k, m[k])
    assert m["miou"] == pytest.approx((m["fg_iou"] + m["bg_iou"]) / 2)


# ----------------------------------------------------------------------------- slow references


def ref_boundary_map(seg: np.ndarray) -> np.ndarray:
    """DAVIS seg2bmap phrased as in its source, one pixel at a time: neighbours outside the
    image are 0; b = seg^e | seg^s | seg^se; then the last row is seg^e only, the last
    column seg^s only, and the bottom-right pixel 0."""
    h, w = seg.shape
    s = seg.astype(bool)

    def at(i, j):
        return bool(s[i, j]) if i < h and j < w else False

    b = np.zeros((h, w), dtype=bool)
    for i in range(h):
        for j in range(w):
            v = at(i, j)
            b[i, j] = (v ^ at(i, j + 1)) or (v ^ at(i + 1, j)) or (v ^ at(i + 1, j + 1))
    for j in range(w):
        b[h - 1, j] = at(h - 1, j) ^ at(h - 1, j + 1)
    for i in range(h):
        b[i, w - 1] = at(i, w - 1) ^ at(i + 1, w - 1)
    b[h - 1, w - 1] = False
    return b


def ref_radius(bound_th: float, shape) -> float:
    return bound_th if bound_th >= 1 else float(np.ceil(bound_th * np.linalg.norm(shape)))


def ref_boundary_f(pred, gt, bound_th=0.008) -> float:
    """Brute force: every pair of boundary pixels, matched when dy^2 + dx^2 <= r^2."""
    r = ref_radius(bound_th, gt.shape)
    pb = np.argwhere(ref_boundary_map(pred))
    gb = np.argwhere(ref_boundary_map(gt))
    if len(pb) == 0 and len(gb) == 0:
        p, rc = 1.0, 1.0
    elif len(pb) == 0:
        p, rc = 1.0, 0.0
    elif len(gb) == 0:
        p, rc = 0.0, 1.0
    else:
        d2 = ((pb[:, None, :] - gb[None, :, :]) ** 2).sum(-1)
        close = d2 <= r * r
        p = close.any(1).sum() / len(pb)
        rc = close.any(0).sum() / len(gb)
    return 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)


def ref_dilate(m: np.ndarray, radius: float) -> np.ndarray:
    """Explicit loops over the pixels and the disk offsets."""
    h, w = m.shape
    R = int(math.floor(radius))
    out = np.zeros_like(m, dtype=bool)
    for i, j in np.argwhere(m):
        for dy in range(-R, R + 1):
            for dx in range(-R, R + 1):
                if dy * dy + dx * dx <= radius * radius and 0 <= i + dy < h and 0 <= j + dx < w:
                    out[i + dy, j + dx] = True
    return out


def blobby(rng: np.random.Generator, shape, noise: float = 0.0) -> np.ndarray:
    """A union of a few random ellipses (some touching the border), optional speckle."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(-0.1, 1.1) * h, rng.uniform(-0.1, 1.1) * w
        ry, rx = rng.uniform(0.5, max(1.0, h / 2.5)), rng.uniform(0.5, max(1.0, w / 2.5))
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    if noise:
        m ^= rng.random(shape) < noise
    return m


# ----------------------------------------------------------------------------- hand-made cases


def test_confusion_matrix_4x4_one_pixel_overlap():
    # GT object rows 1-2 x cols 1-2; prediction rows 2-3 x cols 2-3: they share (2, 2).
    gt = mask((4, 4), (1, 2, 1, 2))
    pred = mask((4, 4), (2, 3, 2, 3))
    s = image_stats(pred, gt, "cat", "x")
    # tp = 1; fp = 4 - 1 = 3; fn = 4 - 1 = 3; tn = 16 - 7 = 9
    assert (s.tp, s.fp, s.fn, s.tn) == (1, 3, 3, 9)
    assert s.j == pytest.approx(1 / 7)  # 1 / (1 + 3 + 3)
    m = aggregate([s])
    check_metrics(m)
    assert m["fg_iou"] == pytest.approx(1 / 7)
    assert m["bg_iou"] == pytest.approx(9 / 15)  # 9 / (9 + 3 + 3)
    assert m["miou"] == pytest.approx((1 / 7 + 9 / 15) / 2)
    assert m["accuracy"] == pytest.approx(10 / 16)
    assert m["precision"] == pytest.approx(1 / 4)
    assert m["recall"] == pytest.approx(1 / 4)
    assert m["j_mean"] == pytest.approx(1 / 7)
    assert m["n_images"] == 1
    # Boundaries (seg2bmap), tolerance ceil(0.008 * sqrt(32)) = ceil(0.045) = 1 (a plus):
    #   GT:  1 1 1 0    pred: 0 0 0 0
    #        1 0 1 0          0 1 1 1      (the pred object touches the right / bottom
    #        1 1 1 0          0 1 0 0       border: no boundary on the border itself,
    #        0 0 0 0          0 1 0 0       but (1,3) differs from its south (2,3))
    assert np.array_equal(boundary_map(gt), arr("1 1 1 0\n1 0 1 0\n1 1 1 0\n0 0 0 0"))
    assert np.array_equal(boundary_map(pred), arr("0 0 0 0\n0 1 1 1\n0 1 0 0\n0 1 0 0"))
    # every pred boundary pixel has a GT one at distance <= 1: P = 5/5; of the 8 GT
    # boundary pixels only (0,0) has no pred one within distance 1: R = 7/8;
    # F = 2 * 1 * 7/8 / (1 + 7/8) = 14/15
    assert boundary_radius(0.008, (4, 4)) == 1
    assert s.f == pytest.approx(14 / 15)


def test_boundary_map_filled_rectangle():
    m = mask((5, 6), (1, 3, 1, 4))
    # a pixel is boundary if it differs from its E, S or SE neighbour: the ring just above /
    # left of the object plus the object's own bottom row and right column; the last row
    # (compared east only) and last column (compared south only) of the image stay 0.
    expected = arr("""
        1 1 1 1 1 0
        1 0 0 0 1 0
        1 0 0 0 1 0
        1 1 1 1 1 0
        0 0 0 0 0 0""")
    assert np.array_equal(boundary_map(m), expected)
    assert boundary_map(m).dtype == bool
    # uint8 0/255 gives the same
    assert np.array_equal(boundary_map(m.astype(np.uint8) * 255), expected)
    # a full or empty image has no boundary; an object filling the right half only has a
    # boundary on the column left of it (the image border is no boundary)
    assert not boundary_map(np.ones((4, 5), bool)).any()
    assert not boundary_map(np.zeros((4, 5), bool)).any()
    half = mask((3, 4), (0, 2, 2, 3))
    assert np.array_equal(boundary_map(half), arr("0 1 0 0\n0 1 0 0\n0 1 0 0"))


def test_empty_gt_and_empty_prediction():
    z = np.zeros((8, 8), dtype=bool)
    s = image_stats(z, z)
    assert (s.tp, s.fp, s.fn, s.tn) == (0, 0, 0, 64)
    assert s.j == 1.0 and s.f == 1.0
    m = aggregate([s])
    check_metrics(m)
    # no object anywhere: fg_iou, precision and recall are 1 by definition
    assert m["fg_iou"] == 1.0 and m["bg_iou"] == 1.0 and m["miou"] == 1.0
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["accuracy"] == 1.0
    assert m["j_mean"] == 1.0 and m["boundary_f"] == 1.0


def test_full_object_everywhere():
    o = np.ones((6, 7), dtype=bool)
    s = image_stats(o, o)
    assert (s.tp, s.fp, s.fn, s.tn) == (42, 0, 0, 0)
    m = aggregate([s])
    check_metrics(m)
    # no background anywhere: bg_iou = 1 by definition; no boundary in either: F = 1
    assert m["bg_iou"] == 1.0 and m["fg_iou"] == 1.0 and s.f == 1.0


def test_object_predicted_where_there_is_none():
    gt = np.zeros((8, 8), dtype=bool)
    pred = mask((8, 8), (2, 3, 2, 3))
    s = image_stats(pred, gt)
    assert (s.tp, s.fp, s.fn, s.tn) == (0, 4, 0, 60)
    assert s.j == 0.0 and s.f == 0.0  # GT boundary empty, pred not: P = 0, R = 1 -> F = 0
    m = aggregate([s])
    check_metrics(m)
    assert m["fg_iou"] == 0.0 and m["precision"] == 0.0
    assert m["recall"] == 0.0  # no GT object, but something predicted
    assert m["bg_iou"] == pytest.approx(60 / 64)


# 120 x 160: the diagonal is exactly 200, 0.008 * 200 = 1.6 -> tolerance radius 2
SHAPE = (120, 160)


def test_tolerance_is_two_pixels_here():
    assert boundary_radius(0.008, SHAPE) == 2
    assert boundary_radius(0.008, (480, 854)) == 8  # DAVIS 480p: ceil(7.84)
    assert boundary_radius(3, SHAPE) == 3  # >= 1: pixels, as in DAVIS


def test_one_pixel_object_found_and_missed():
    gt = mask(SHAPE, (50, 50, 50, 50))
    s = image_stats(gt.copy(), gt)
    assert (s.tp, s.fp, s.fn) == (1, 0, 0) and s.j == 1.0 and s.f == 1.0
    s = image_stats(np.zeros(SHAPE, bool), gt)
    # pred boundary empty, GT not: P = 1, R = 0 -> F = 0
    assert (s.tp, s.fp, s.fn) == (0, 0, 1) and s.j == 0.0 and s.f == 0.0
    m = aggregate([s])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["fg_iou"] == 0.0


def test_shift_within_tolerance_gives_f1_but_j_below_1():
    gt = mask(SHAPE, (40, 59, 60, 79))  # a 20 x 20 square
    pred = mask(SHAPE, (40, 59, 62, 81))  # moved 2 px right
    s = image_stats(pred, gt)
    # every boundary pixel of one is the other's moved by exactly 2 <= r: F = 1
    assert s.f == 1.0
    assert s.j == pytest.approx(20 * 18 / (20 * 22))  # 9/11
    pred = mask(SHAPE, (41, 60, 61, 80))  # moved (1, 1): distance sqrt(2) <= 2
    s = image_stats(pred, gt)
    assert s.f == 1.0 and s.j == pytest.approx(19 * 19 / (800 - 19 * 19))


def test_shift_beyond_tolerance():
    # a one-pixel object at (50, 50) has the 2x2 boundary {49, 50} x {49, 50}
    gt = mask(SHAPE, (50, 50, 50, 50))
    # moved 4 right: boundary {49, 50} x {53, 54}; closest pair 3 apart > 2: F = 0
    assert image_stats(mask(SHAPE, (50, 50, 54, 54)), gt).f == 0.0
    # moved 3 right: boundary columns 52, 53 vs 49, 50: column 52 of pred matches column 50
    # (2 apart), column 53 does not (3); likewise column 50 of GT matches, 49 does not:
    # P = R = 2/4 -> F = 1/2
    s = image_stats(mask(SHAPE, (50, 50, 53, 53)), gt)
    assert s.f == pytest.approx(0.5) and s.j == 0.0
    # moved (1, 2): pred boundary {50, 51} x {51, 52}; (51, 52) is sqrt(5) > 2 from the
    # nearest GT boundary pixel (50, 50) -- a square window would have matched it -- the
    # other 3 match: P = 3/4; symmetrically (49, 49) misses: R = 3/4 -> F = 3/4
    assert image_stats(mask(SHAPE, (51, 51, 52, 52)), gt).f == pytest.approx(0.75)


def test_disk_and_dilation_radius():
    expected = arr("""
        0 0 1 0 0
        0 1 1 1 0
        1 1 1 1 1
        0 1 1 1 0
        0 0 1 0 0""")  # x^2 + y^2 <= 4
    assert np.array_equal(disk(2), expected)
    assert disk(8).shape == (17, 17) and disk(8).sum() == 197  # lattice points, r = 8
    assert disk(0).shape == (1, 1) and disk(0).all()
    m = mask((9, 9), (4, 4, 4, 4))
    out = np.zeros((9, 9), bool)
    out[2:7, 2:7] = expected
    assert np.array_equal(dilate_disk(m, 2), out)
    # at the corner the disk is clipped by the image
    assert np.array_equal(
        dilate_disk(mask((9, 9), (0, 0, 0, 0)), 2)[:3, :3], arr("1 1 1\n1 1 0\n1 0 0")
    )
    assert not dilate_disk(np.zeros((5, 5), bool), 3).any()


def test_aggregate_sums_pixels_instead_of_averaging_images():
    # image A: a 10x10 image entirely object, predicted exactly: tp = 100, IoU 1
    a = image_stats(np.ones((10, 10), bool), np.ones((10, 10), bool), "c", "a")
    # image B: one object pixel, missed: fn = 1, tn = 99, IoU 0
    b = image_stats(np.zeros((10, 10), bool), mask((10, 10), (3, 3, 3, 3)), "c", "b")
    m = aggregate([a, b])
    check_metrics(m)
    # mean of per-image IoUs would be 0.5; pixel-summed: 100 / (100 + 0 + 1)
    assert m["j_mean"] == pytest.approx(0.5)
    assert m["fg_iou"] == pytest.approx(100 / 101)
    assert m["bg_iou"] == pytest.approx(99 / 100)  # tn 0 + 99, fp 0, fn 1
    assert m["accuracy"] == pytest.approx(199 / 200)
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(100 / 101)
    assert m["boundary_f"] == pytest.approx(0.5)  # A: no boundaries, F 1; B: F 0
    assert m["n_images"] == 2
    # any iterable works; an empty group does not
    assert aggregate(iter([a, b])) == m
    with pytest.raises(ValueError):
        aggregate([])
    with pytest.raises(ValueError):
        summarize([])


def test_summarize_per_category():
    rng = np.random.default_rng(5)
    stats = []
    for cat, n in (("zebra", 2), ("apple", 3), ("mango", 1)):
        for i in range(n):
            gt = blobby(rng, (30, 40))
            stats.append(image_stats(blobby(rng, (30, 40)), gt, cat, f"{i:03d}"))
    rng.shuffle(stats)
    out = summarize(stats)
    assert list(out["per_category"]) == ["apple", "mango", "zebra"]
    assert out["overall"] == aggregate(stats)
    for cat, m in out["per_category"].items():
        check_metrics(m)
        assert m == aggregate([s for s in stats if s.category == cat])
    assert [m["n_images"] for m in out["per_category"].values()] == [3, 1, 2]
    check_metrics(out["overall"])
    assert out["overall"]["n_images"] == 6
    # JSON round trip, as the report does it
    back = [ImageStats.from_dict(json.loads(json.dumps(s.to_dict()))) for s in stats]
    assert back == stats and summarize(back) == out


def test_values_in_range_on_random_masks():
    rng = np.random.default_rng(0)
    stats = []
    for k in range(40):
        shape = (int(rng.integers(1, 30)), int(rng.integers(1, 30)))
        kind = k % 4
        gt = blobby(rng, shape) if kind else np.zeros(shape, bool)
        pred = blobby(rng, shape, noise=0.05 * (k % 3)) if kind != 1 else np.zeros(shape, bool)
        s = image_stats(pred, gt, f"c{k % 3}")
        assert 0 <= s.j <= 1 and 0 <= s.f <= 1
        assert s.n_pixels == shape[0] * shape[1]
        stats.append(s)
    out = summarize(stats)
    check_metrics(out["overall"])
    for m in out["per_category"].values():
        check_metrics(m)


def test_input_types_and_shape_checks():
    rng = np.random.default_rng(1)
    gt = blobby(rng, (20, 30))
    pred = blobby(rng, (20, 30))
    ref = image_stats(pred, gt, "k", "s")
    assert image_stats(pred.astype(np.uint8) * 255, gt, "k", "s") == ref
    assert image_stats(pred.astype(np.uint8), gt, "k", "s") == ref
    assert ref.category == "k" and ref.stem == "s"
    d = ref.to_dict()
    assert all(type(d[k]) is int for k in ("tp", "fp", "fn", "tn"))
    assert type(d["j"]) is float and type(d["f"]) is float
    with pytest.raises(ValueError, match=r"\(20, 30\).*\(30, 20\)"):
        image_stats(pred, gt.T)
    with pytest.raises(ValueError, match=r"\(20, 31\).*\(20, 30\)"):
        image_stats(np.zeros((20, 31), bool), gt)
    with pytest.raises(ValueError):
        boundary_f(pred, gt[:, :-1])
    with pytest.raises(ValueError):
        image_stats(pred[None], gt[None])
    with pytest.raises(ValueError):
        ImageStats(tp=-1, fp=0, fn=0, tn=0, j=1.0, f=1.0)
    with pytest.raises(ValueError):
        ImageStats(tp=1, fp=0, fn=0, tn=0, j=1.5, f=1.0)


# ----------------------------------------------------------------------------- vs references


def test_boundary_map_matches_reference():
    rng = np.random.default_rng(2)
    shapes = [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (17, 23), (31, 29)]
    for shape in shapes:
        for noise in (0.0, 0.1, 0.5):
            m = blobby(rng, shape, noise)
            assert np.array_equal(boundary_map(m), ref_boundary_map(m)), (shape, noise)


@pytest.mark.parametrize("radius", [0, 1, 2, 2.5, 3, 5, 8])
def test_dilate_disk_matches_reference(radius):
    rng = np.random.default_rng(3)
    for noise in (0.0, 0.02, 0.3):
        m = blobby(rng, (37, 53), noise) & (rng.random((37, 53)) < 0.5)
        assert np.array_equal(dilate_disk(m, radius), ref_dilate(m, radius)), noise
    assert np.array_equal(
        disk(radius), ref_dilate(mask(disk(radius).shape, (len(disk(radius)) // 2,) * 4), radius)
    )


def test_near_sparse_and_dense_paths_agree():
    # few queries go run by run, many through the dense dilation: same answers
    rng = np.random.default_rng(4)
    target = blobby(rng, (40, 60), 0.01) & (rng.random((40, 60)) < 0.3)
    # queries on and around the image (outside it too): brute-force distances
    ys, xs = np.mgrid[-6:46, -6:66]
    ys, xs = ys.ravel(), xs.ravel()
    ty, tx = np.nonzero(target)
    d2 = (ys[:, None] - ty[None, :]) ** 2 + (xs[:, None] - tx[None, :]) ** 2
    expected = (d2 <= 9).any(axis=1)
    assert expected.any() and not expected.all()
    dense = metrics._near(target, ys, xs, 3)  # many queries
    assert np.array_equal(dense, expected)
    pick = rng.choice(ys.size, 20, replace=False)  # few queries
    assert np.array_equal(metrics._near(target, ys[pick], xs[pick], 3), expected[pick])


@pytest.mark.parametrize("bound_th", [0.008, 0.05, 0.1, 3, 4])
def test_boundary_f_matches_brute_force(bound_th):
    rng = np.random.default_rng(int(bound_th * 1000))
    for k in range(12):
        shape = [(48, 64), (33, 71), (90, 20)][k % 3]
        gt = blobby(rng, shape, noise=0.02 if k % 4 == 3 else 0.0)
        if k % 5 == 4:
            pred = np.zeros(shape, bool)
        else:
            pred = np.roll(gt, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), (0, 1))
            pred ^= blobby(rng, shape) & (rng.random(shape) < (0.3 if k % 2 else 0.0))
        got = boundary_f(pred, gt, bound_th)
        assert got == pytest.approx(ref_boundary_f(pred, gt, bound_th), abs=1e-12), (k, got)
        assert got == pytest.approx(boundary_f(pred.astype(np.uint8) * 255, gt, bound_th))


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("bound_th", [1.5, 2.25, math.inf])
def test_non_integer_pixel_tolerance_refused(bound_th):
    gt = mask((16, 16), (4, 9, 4, 9))
    with pytest.raises(ValueError, match="must be an integer") as e:
        boundary_f(gt, gt, bound_th)
    assert "\n" not in str(e.value) and repr(bound_th) in str(e.value)
    with pytest.raises(ValueError, match="must be an integer"):
        boundary_radius(bound_th, (16, 16))


def test_integer_valued_tolerance_accepted():
    # 2.0 is the integer 2 (a float from TOML or a division); fractions < 1 of the diagonal
    # are rounded up to whole pixels as in DAVIS
    assert boundary_radius(2.0, SHAPE) == 2 == boundary_radius(2, SHAPE)
    gt = blobby(np.random.default_rng(7), (40, 50))
    pred = np.roll(gt, 2, axis=1)
    assert boundary_f(pred, gt, 2.0) == boundary_f(pred, gt, 2)
    for bad in (-0.5, math.nan):
        with pytest.raises(ValueError, match="bound_th must be >= 0"):
            boundary_f(pred, gt, bad)


@pytest.mark.parametrize("bad", [-1, -0.5, math.nan])
@pytest.mark.parametrize("where", ["pred", "gt"])
def test_negative_or_nan_mask_values_refused(bad, where):
    good = mask((6, 7), (1, 3, 2, 4)).astype(np.float64)
    broken = good.copy()
    broken[2, 5] = bad
    dtype = np.int16 if float(bad).is_integer() else np.float32
    broken = broken.astype(dtype)
    pred, gt = (broken, good) if where == "pred" else (good, broken)
    for call in (
        lambda: image_stats(pred, gt),
        lambda: boundary_f(pred, gt),
        lambda: boundary_map(broken),
        lambda: dilate_disk(broken, 1),
    ):
        with pytest.raises(ValueError, match=r"at \(2, 5\): mask values must be >= 0") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="must be >= 0 and not NaN"):
        sweep_counts(np.zeros((6, 7), np.uint8), broken, 19)


def test_non_negative_numbers_are_masks():
    # 0/1 floats, 0/255 uint8 and 0/7 int64 are the same mask; an object mask of strings is no mask
    m = mask((9, 9), (2, 6, 1, 5))
    ref = image_stats(m, m[::-1])
    for pred in (m.astype(np.float32), m.astype(np.uint8) * 255, m.astype(np.int64) * 7):
        assert image_stats(pred, m[::-1]) == ref
    with pytest.raises(ValueError, match="bool or numbers"):
        boundary_map(np.array([["1", "0"], ["0", "1"]]))
