"""pipeline.refine: the box mean and the guided filter against direct window references, the
dense CRF against a literal mean-field loop over its offsets, and what refinement must do on
synthetic images (keep a clean edge, remove salt noise, follow a colour edge), its
determinism, batch independence, shapes and dtypes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.models.refine import (
    EPS,
    REFINERS,
    box_mean,
    crf_offsets,
    dense_crf,
    guided_filter,
    refine_logits,
)

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny tensors: extra threads only add synchronisation on a loaded machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rand_image(B, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=g)


def two_colours(H, W, split, left=(30, 60, 200), right=(200, 180, 40)):
    """uint8 (1, 3, H, W): one colour left of column `split`, another from it on."""
    img = torch.empty((1, 3, H, W), dtype=torch.uint8)
    img[..., :split] = torch.tensor(left, dtype=torch.uint8).view(1, 3, 1, 1)
    img[..., split:] = torch.tensor(right, dtype=torch.uint8).view(1, 3, 1, 1)
    return img


# ----------------------------------------------------------------------------- references


def window(n, i, r):
    return range(max(0, i - r), min(n, i + r + 1))


def reference_box_mean(x, r):
    H, W = x.shape[-2:]
    out = torch.empty_like(x)
    for u in range(H):
        for v in range(W):
            out[..., u, v] = x[..., window(H, u, r), :][..., window(W, v, r)].mean((-2, -1))
    return out


def reference_guided(p, image, r, eps):
    """He et al.'s algorithm 1 with explicit windows: a linear model per window, solved with
    numpy, then each pixel's output the mean of the models of the windows that contain it."""
    img = image[0].to(F64).numpy() / 255.0  # (3, H, W)
    P = p[0, 0].to(F64).numpy()
    H, W = P.shape
    a = np.zeros((H, W, 3))
    b = np.zeros((H, W))
    for u in range(H):
        for v in range(W):
            rows, cols = window(H, u, r), window(W, v, r)
            Iw = img[:, rows][:, :, cols].reshape(3, -1)
            pw = P[rows][:, cols].reshape(-1)
            mu = Iw.mean(1)
            cov = (Iw - mu[:, None]) @ (Iw - mu[:, None]).T / Iw.shape[1]
            cov_ip = (Iw * pw).mean(1) - mu * pw.mean()
            a[u, v] = np.linalg.solve(cov + eps * np.eye(3), cov_ip)
            b[u, v] = pw.mean() - a[u, v] @ mu
    q = np.zeros((H, W))
    for u in range(H):
        for v in range(W):
            rows, cols = window(H, u, r), window(W, v, r)
            q[u, v] = (
                a[rows][:, cols].reshape(-1, 3).mean(0) @ img[:, u, v] + b[rows][:, cols].mean()
            )
    return torch.from_numpy(np.clip(q, 0, 1))[None, None]


def reference_crf(prob, image, iterations, w_app, xy_app, rgb_app, w_sm, xy_sm, k, dilations):
    """Mean field for the documented energy, literally: every pixel, every offset."""
    P = prob[0, 0].to(F64)
    img = image[0].to(F64)
    H, W = P.shape
    offsets = crf_offsets(k, dilations)
    z_app = sum(a * math.exp(-0.5 * (dy * dy + dx * dx) / xy_app**2) for dy, dx, a in offsets)
    r = max(1, math.ceil(3 * xy_sm))
    sm = [
        (dy, dx, math.exp(-0.5 * (dy * dy + dx * dx) / xy_sm**2))
        for dy in range(-r, r + 1)
        for dx in range(-r, r + 1)
        if (dy, dx) != (0, 0)
    ]
    z_sm = sum(g for _, _, g in sm)
    p = P.clamp(EPS, 1 - EPS)
    unary = torch.log(p) - torch.log1p(-p)
    q = torch.sigmoid(unary)
    for _ in range(iterations):
        m = 2 * q - 1
        msg = torch.zeros_like(m)
        for u in range(H):
            for v in range(W):
                acc_a = acc_s = 0.0
                for dy, dx, area in offsets:
                    y, x = u + dy, v + dx
                    if 0 <= y < H and 0 <= x < W:
                        kern = math.exp(
                            -0.5 * (dy * dy + dx * dx) / xy_app**2
                            - 0.5 * float(((img[:, y, x] - img[:, u, v]) ** 2).sum()) / rgb_app**2
                        )
                        acc_a += area * kern * float(m[y, x])
                for dy, dx, g in sm:
                    y, x = u + dy, v + dx
                    if 0 <= y < H and 0 <= x < W:
                        acc_s += g * float(m[y, x])
                msg[u, v] = w_app * acc_a / z_app + w_sm * acc_s / z_sm
        q = torch.sigmoid(unary + msg)
    return q[None, None]


# ----------------------------------------------------------------------------- box mean


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_box_mean_matches_explicit_windows(radius):
    x = rand(2, 3, 7, 9, dtype=F64)
    torch.testing.assert_close(box_mean(x, radius), reference_box_mean(x, radius))


def test_box_mean_radius_zero_is_identity_and_constant_stays():
    x = rand(1, 1, 5, 6)
    assert torch.equal(box_mean(x, 0), x)
    torch.testing.assert_close(
        box_mean(torch.full((1, 1, 30, 40), 0.7), 6), torch.full((1, 1, 30, 40), 0.7)
    )


# ----------------------------------------------------------------------------- guided filter


@pytest.mark.parametrize(("radius", "eps"), [(1, 1e-2), (2, 1e-3), (3, 0.1)])
def test_guided_filter_matches_direct_reference(radius, eps):
    img = rand_image(1, 9, 11, seed=radius)
    p = rand(1, 1, 9, 11, seed=radius + 10, dtype=F64)
    out = guided_filter(p, img, radius=radius, eps=eps)
    assert out.dtype == F64
    torch.testing.assert_close(out, reference_guided(p, img, radius, eps))


def test_guided_filter_keeps_an_edge_that_the_image_has():
    img = two_colours(24, 32, 16)
    p = torch.zeros((1, 1, 24, 32))
    p[..., :16] = 1.0
    out = guided_filter(p, img, radius=4, eps=1e-4)
    assert torch.equal(out > 0.5, p > 0.5)
    assert (out[..., :14] > 0.95).all() and (out[..., 18:] < 0.05).all()


def test_guided_filter_smooths_what_the_image_does_not_have():
    img = torch.full((1, 3, 24, 32), 128, dtype=torch.uint8)
    p = torch.zeros((1, 1, 24, 32))
    p[..., 10, 10] = 1.0  # an isolated speck on a flat image
    out = guided_filter(p, img, radius=3, eps=1e-3)
    assert out.max() < 0.1


def test_fast_guided_filter_is_close_to_the_exact_one_on_a_smooth_guide():
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(96.0), indexing="ij")
    img = torch.stack([xx * 2, yy * 3, (xx + yy)], 0)[None].clamp(0, 255)
    p = torch.sigmoid((xx - 40) / 6)[None, None]
    exact = guided_filter(p, img, radius=8, eps=1e-3)
    fast = guided_filter(p, img, radius=8, eps=1e-3, subsample=4)
    assert (fast - exact).abs().max() < 0.05


# ----------------------------------------------------------------------------- dense CRF


def test_crf_offsets_cover_each_ring_once_with_its_area():
    offs = crf_offsets(5, (1, 4, 16))
    assert len({(dy, dx) for dy, dx, _ in offs}) == len(offs) == 72
    assert (0, 0) not in {(dy, dx) for dy, dx, _ in offs}
    # the areas add up to the whole window less the centre
    assert math.isclose(sum(a for _, _, a in offs), 65**2 - 1)
    assert all(a == 1 for dy, dx, a in offs if max(abs(dy), abs(dx)) <= 2)
    assert len(crf_offsets(3, (1, 2))) == 16
    for bad in [
        dict(kernel_size=4, dilations=(1,)),
        dict(kernel_size=5, dilations=()),
        dict(kernel_size=5, dilations=(4, 1)),
        dict(kernel_size=5, dilations=(0,)),
    ]:
        with pytest.raises(ValueError):
            crf_offsets(**bad)


@pytest.mark.parametrize(
    ("dilations", "kernel_size"), [((1,), 3), ((1, 3), 3), ((1, 2), 5), ((1, 16), 3)]
)
def test_dense_crf_matches_the_literal_mean_field_loop(dilations, kernel_size):
    img = rand_image(1, 8, 10, seed=3)
    p = rand(1, 1, 8, 10, seed=4, dtype=F64)
    args = dict(
        iterations=3,
        appearance_weight=3.0,
        appearance_xy=4.0,
        appearance_rgb=60.0,
        smoothness_weight=1.5,
        smoothness_xy=1.0,
    )
    out = dense_crf(p, img, kernel_size=kernel_size, dilations=dilations, **args)
    ref = reference_crf(
        p,
        img,
        args["iterations"],
        args["appearance_weight"],
        args["appearance_xy"],
        args["appearance_rgb"],
        args["smoothness_weight"],
        args["smoothness_xy"],
        kernel_size,
        dilations,
    )
    torch.testing.assert_close(out, ref)


CRF = dict(
    iterations=5,
    appearance_weight=6.0,
    appearance_xy=20.0,
    appearance_rgb=13.0,
    smoothness_weight=2.0,
    smoothness_xy=2.0,
    kernel_size=5,
    dilations=(1, 4),
)


def test_crf_keeps_a_clean_step_edge():
    img = two_colours(32, 48, 20)
    p = torch.full((1, 1, 32, 48), 0.1)
    p[..., :20] = 0.9
    out = dense_crf(p, img, **CRF)
    assert torch.equal(out > 0.5, p > 0.5)
    assert (out[..., :20] > 0.9).all() and (out[..., 20:] < 0.1).all()  # more certain


def test_crf_removes_salt_noise():
    img = torch.full((1, 3, 40, 40), 90, dtype=torch.uint8)
    p = torch.full((1, 1, 40, 40), 0.25)
    g = torch.Generator().manual_seed(1)
    salt = torch.rand((1, 1, 40, 40), generator=g) < 0.05
    p[salt] = 0.75
    assert (p > 0.5).sum() > 50
    out = dense_crf(p, img, **CRF)
    assert not (out > 0.5).any()


def test_crf_moves_an_uncertain_boundary_to_the_colour_edge():
    img = two_colours(32, 64, 32)
    p = torch.full((1, 1, 32, 64), 0.1)
    p[..., :24] = 0.9
    p[..., 24:32] = 0.4  # the object's colour, weakly background
    p[..., 32:40] = 0.6  # the background's colour, weakly object
    assert not torch.equal(p > 0.5, img[:, :1] < 100)
    out = dense_crf(p, img, **CRF)
    assert torch.equal(out > 0.5, img[:, :1] < 100)  # object exactly where its colour is


def test_crf_without_pairwise_terms_returns_the_clipped_input():
    p = rand(1, 1, 6, 7)
    p[..., 0, 0] = 0.0
    img = rand_image(1, 6, 7)
    for kw in (dict(iterations=0), dict(appearance_weight=0.0, smoothness_weight=0.0)):
        torch.testing.assert_close(dense_crf(p, img, **kw), p.clamp(EPS, 1 - EPS))


def test_refiners_are_deterministic():
    img = rand_image(1, 40, 56, seed=5)
    p = rand(1, 1, 40, 56, seed=6)
    for fn in (
        lambda: dense_crf(p, img, **CRF),
        lambda: dense_crf(p, img, scale=2),
        lambda: guided_filter(p, img, radius=4, eps=1e-3, subsample=2),
    ):
        assert torch.equal(fn(), fn())


@pytest.mark.parametrize(
    "refine",
    [
        lambda p, i: dense_crf(p, i, **CRF),
        lambda p, i: dense_crf(p, i, scale=2, dilations=(1, 3)),
        lambda p, i: guided_filter(p, i, radius=3, eps=1e-2),
        lambda p, i: guided_filter(p, i, radius=4, eps=1e-2, subsample=2),
    ],
)
def test_each_image_of_a_batch_is_refined_on_its_own(refine):
    img = rand_image(3, 24, 30, seed=7)
    p = rand(3, 1, 24, 30, seed=8)
    together = refine(p, img)
    alone = torch.cat([refine(p[b : b + 1], img[b : b + 1]) for b in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, F64])
def test_refiners_keep_shape_and_dtype_and_range(dtype):
    img = rand_image(2, 21, 35, seed=9)
    p = rand(2, 1, 21, 35, seed=10).to(dtype)
    for out in (
        dense_crf(p, img, **CRF),
        dense_crf(p, img, scale=3, dilations=(1, 2)),
        guided_filter(p, img, radius=5, eps=1e-2, subsample=2),
    ):
        assert out.shape == p.shape and out.dtype == dtype
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_a_float_image_gives_what_its_uint8_gives():
    img = rand_image(1, 20, 24, seed=11)
    p = rand(1, 1, 20, 24, seed=12)
    torch.testing.assert_close(dense_crf(p, img.float(), **CRF), dense_crf(p, img, **CRF))
    torch.testing.assert_close(guided_filter(p, img.float()), guided_filter(p, img))


def test_refiners_run_on_the_meta_device():
    p = torch.empty((2, 1, 48, 64), device="meta")
    img = torch.empty((2, 3, 48, 64), dtype=torch.uint8, device="meta")
    for out in (
        dense_crf(p, img, **CRF),
        dense_crf(p, img, scale=2, **CRF),
        guided_filter(p, img, radius=6, subsample=2),
    ):
        assert out.shape == p.shape and out.device.type == "meta"


def test_bad_arguments_are_refused():
    p, img = rand(1, 1, 8, 8), rand_image(1, 8, 8)
    for call in (
        lambda: dense_crf(p[0], img),
        lambda: dense_crf(p, img[:, :2]),
        lambda: dense_crf(p, img[..., :7]),
        lambda: dense_crf(p, img, iterations=-1),
        lambda: dense_crf(p, img, appearance_rgb=0.0),
        lambda: dense_crf(p, img, smoothness_weight=float("nan")),
        lambda: dense_crf(p, img, scale=0),
        lambda: dense_crf((p > 0.5).to(torch.uint8), img),
        lambda: guided_filter(p, img, radius=0),
        lambda: guided_filter(p, img, eps=0),
        lambda: guided_filter(p, img, subsample=0),
        lambda: dense_crf(p, img, unary_scale=0.0),
        lambda: refine_logits("bilateral", p, img),
    ):
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize(
    ("refiner", "kwargs"), [("crf", {"iterations": 3}), ("guided", {"radius": 3, "eps": 1e-2})]
)
def test_refine_logits_is_the_refiner_on_the_probabilities(refiner, kwargs):
    """The variants' entry point: logits in, the named refiner on their probabilities, its
    result as finite logits out (a certain pixel stays certain, not infinite)."""
    img = rand_image(2, 20, 26, seed=9)
    logits = (rand(2, 1, 20, 26, seed=10) - 0.5) * 8
    logits[0, 0, 0, 0] = 40.0
    out = refine_logits(refiner, logits, img, **kwargs)
    expected = REFINERS[refiner](torch.sigmoid(logits), img, **kwargs)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(torch.sigmoid(out), expected.clamp(EPS, 1 - EPS))
