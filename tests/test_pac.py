"""Pixel-adaptive convolution: both implementations against a literal loop reference, gradients,
the plain-convolution special case, the border convention, the module, and saved memory."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.pac import PacConv2d, pac_conv2d, pac_conv2d_unfold

IMPLS = [pac_conv2d, pac_conv2d_unfold]
F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The tensors here are tiny: extra threads only add synchronisation, which stalls for
    milliseconds per op on a loaded machine (gradcheck runs thousands of ops)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reference_pac(
    x, f, w, b=None, stride=1, padding=0, dilation=1, normalize=False, guide_pad_value=0.0
):
    """The defining formula, literally: Python loops over output pixels and kernel offsets.

    Neighbours outside the image are skipped (K = 0); a window with none inside normalises
    to 0. ``guide_pad_value`` is what the guide is
    padded with; it only matters if a window centre lies in the padding."""
    B, Ci, H, W = x.shape
    Co, _, k, _ = w.shape
    s, p, d = stride, padding, dilation
    m = (k - 1) // 2
    xp = F.pad(x, (p, p, p, p))
    fp = F.pad(f, (p, p, p, p), value=guide_pad_value)
    Ho = (H + 2 * p - d * (k - 1) - 1) // s + 1
    Wo = (W + 2 * p - d * (k - 1) - 1) // s + 1
    rows = []
    for u in range(Ho):
        cols = []
        for v in range(Wo):
            cu, cv = u * s + m * d, v * s + m * d
            acc = x.new_zeros(B, Co)
            norm = x.new_zeros(B)
            for i in range(k):
                for j in range(k):
                    r, q = u * s + i * d, v * s + j * d
                    if not (p <= r < p + H and p <= q < p + W):
                        continue  # outside the image: K = 0
                    kern = torch.exp(-0.5 * ((fp[:, :, r, q] - fp[:, :, cu, cv]) ** 2).sum(1))
                    acc = acc + kern[:, None] * (xp[:, :, r, q] @ w[:, :, i, j].T)
                    norm = norm + kern
            if normalize:  # a window without any neighbour inside the image keeps 0
                acc = acc / torch.where(norm > 0, norm, torch.ones_like(norm))[:, None]
            if b is not None:
                acc = acc + b
            cols.append(acc)
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


def make_inputs(B=2, Ci=3, Co=2, Cg=2, H=7, W=9, k=3, dtype=F64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Ci, H, W, generator=g, dtype=dtype)
    f = 0.7 * torch.randn(B, Cg, H, W, generator=g, dtype=dtype)
    w = torch.randn(Co, Ci, k, k, generator=g, dtype=dtype)
    b = torch.randn(Co, generator=g, dtype=dtype)
    if requires_grad:
        for t in (x, f, w, b):
            t.requires_grad_(True)
    return x, f, w, b


GRID = list(itertools.product([1, 2], [1, 2], [0, 1, 2], [False, True]))


@pytest.mark.parametrize("stride,dilation,padding,normalize", GRID)
def test_forward_matches_reference(stride, dilation, padding, normalize):
    x, f, w, b = make_inputs(seed=stride + 3 * dilation + 7 * padding)
    ref = reference_pac(x, f, w, b, stride, padding, dilation, normalize)
    Ho = (7 + 2 * padding - 2 * dilation - 1) // stride + 1
    Wo = (9 + 2 * padding - 2 * dilation - 1) // stride + 1
    assert ref.shape == (2, 2, Ho, Wo)
    for fn in IMPLS:
        out = fn(x, f, w, b, stride=stride, padding=padding, dilation=dilation, normalize=normalize)
        assert out.shape == ref.shape and out.dtype == F64
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=fn.__name__)


@pytest.mark.parametrize(
    "k,stride,padding,dilation",
    [(1, 1, 0, 1), (1, 2, 1, 1), (5, 1, 2, 1), (5, 2, 3, 1), (5, 1, 1, 2)],
)
def test_other_kernel_sizes(k, stride, padding, dilation):
    x, f, w, b = make_inputs(k=k, H=8, W=7, seed=k)
    for normalize in (False, True):
        ref = reference_pac(x, f, w, b, stride, padding, dilation, normalize)
        for fn in IMPLS:
            out = fn(x, f, w, b, stride, padding, dilation, normalize)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_no_bias():
    x, f, w, _ = make_inputs()
    ref = reference_pac(x, f, w, None, 1, 1, 1, True)
    for fn in IMPLS:
        torch.testing.assert_close(fn(x, f, w, None, padding=1, normalize=True), ref)


@pytest.mark.parametrize(
    "stride,dilation,padding,normalize",
    [
        (1, 1, 1, False),
        (1, 1, 1, True),
        (2, 1, 2, True),
        (1, 2, 1, False),
        (2, 2, 2, True),
        (2, 1, 0, False),
    ],
)
def test_gradients_match_reference(stride, dilation, padding, normalize):
    x, f, w, b = make_inputs(requires_grad=True, seed=11)
    kw = dict(stride=stride, padding=padding, dilation=dilation, normalize=normalize)
    ref = reference_pac(x, f, w, b, **kw)
    gout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    expected = torch.autograd.grad(ref, (x, f, w, b), gout)
    for fn in IMPLS:
        got = torch.autograd.grad(fn(x, f, w, b, **kw), (x, f, w, b), gout)
        for name, g_got, g_exp in zip("xfwb", got, expected, strict=True):
            torch.testing.assert_close(
                g_got, g_exp, rtol=1e-9, atol=1e-10, msg=f"{fn.__name__}: d/d{name}"
            )


def test_partial_requires_grad():
    """Only the tensors that need a gradient get one (e.g. an RGB guide without grad)."""
    x, f, w, b = make_inputs(seed=3)
    x.requires_grad_(True)
    w.requires_grad_(True)
    ref = reference_pac(x, f, w, b, padding=1, normalize=True)
    gx, gw = torch.autograd.grad(ref.sum(), (x, w))
    out = pac_conv2d(x, f, w, b, padding=1, normalize=True)
    ox, ow = torch.autograd.grad(out.sum(), (x, w))
    torch.testing.assert_close(ox, gx)
    torch.testing.assert_close(ow, gw)
    # guide only
    f2 = f.clone().requires_grad_(True)
    (gf,) = torch.autograd.grad(
        reference_pac(x.detach(), f2, w.detach(), None, 2, 1, 1, True).sum(), f2
    )
    (of,) = torch.autograd.grad(
        pac_conv2d(x.detach(), f2, w.detach(), None, 2, 1, 1, True).sum(), f2
    )
    torch.testing.assert_close(of, gf)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 2, 1), (1, 2, 2)])
def test_gradcheck(normalize, stride, padding, dilation):
    x, f, w, b = make_inputs(B=1, Ci=2, Co=2, Cg=2, H=5, W=6, requires_grad=True, seed=2)
    assert torch.autograd.gradcheck(
        lambda *t: pac_conv2d(
            *t, stride=stride, padding=padding, dilation=dilation, normalize=normalize
        ),
        (x, f, w, b),
    )


@pytest.mark.parametrize(
    "stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 0, 2), (2, 2, 2), (1, 2, 1)]
)
def test_constant_guide_is_plain_convolution(stride, padding, dilation):
    """A constant guide makes K = 1 inside the image; without normalisation PAC is conv2d.
    A zero guide keeps that true even when a window centre falls in the padding."""
    x, _, w, b = make_inputs(seed=4)
    expected = F.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation)
    const = 0.0 if padding > dilation else 0.7
    f = torch.full((2, 3, 7, 9), const, dtype=F64)
    for fn in IMPLS:
        out = fn(x, f, w, b, stride=stride, padding=padding, dilation=dilation)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # and in float32 (the compute path used in practice)
    out32 = pac_conv2d(x.float(), f.float(), w.float(), b.float(), stride, padding, dilation)
    torch.testing.assert_close(out32, expected.float(), rtol=1e-4, atol=1e-4)


def test_border_neighbours_get_zero_weight():
    """Outside neighbours are excluded, also from the normaliser: with a constant guide,
    constant input and an all-ones filter the normalised output is Ci everywhere, borders
    included (a guide padded like the image would give 4/9 * Ci in the corners)."""
    x = torch.ones(1, 3, 6, 5, dtype=F64)
    f = torch.full((1, 2, 6, 5), 0.3, dtype=F64)
    w = torch.ones(1, 3, 3, 3, dtype=F64)
    for fn in IMPLS:
        out = fn(x, f, w, padding=1, normalize=True)
        torch.testing.assert_close(out, torch.full_like(out, 3.0))


@pytest.mark.parametrize("normalize", [False, True])
def test_guide_padding_value_is_irrelevant(normalize):
    """Whatever the guide would be padded with, the result (and its gradient) is the same."""
    x, f, w, b = make_inputs(seed=8, requires_grad=True)
    for stride, padding, dilation in [(1, 1, 1), (2, 1, 1), (1, 2, 2), (1, 1, 2)]:
        kw = dict(stride=stride, padding=padding, dilation=dilation, normalize=normalize)
        refs = [reference_pac(x, f, w, b, **kw, guide_pad_value=v) for v in (0.0, 5.0, -1e3)]
        torch.testing.assert_close(refs[1], refs[0])
        torch.testing.assert_close(refs[2], refs[0])
        out = pac_conv2d(x, f, w, b, **kw)
        torch.testing.assert_close(out, refs[1], rtol=1e-10, atol=1e-10)
        (g_ref,) = torch.autograd.grad(refs[2].sum(), f)
        (g_out,) = torch.autograd.grad(out.sum(), f)
        torch.testing.assert_close(g_out, g_ref, rtol=1e-9, atol=1e-10)


def test_window_without_inside_neighbours_gives_bias():
    """padding > dilation * (k - 1): the corner window sees only padding; normalised, it
    outputs the bias (and nothing is NaN, in forward or backward)."""
    x, f, w, b = make_inputs(H=5, W=6, requires_grad=True)
    for fn in IMPLS:
        out = fn(x, f, w, b, padding=3, normalize=True)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:, :, 0, 0], b.detach().expand(2, -1))
        grads = torch.autograd.grad(out.sum(), (x, f, w, b))
        assert all(torch.isfinite(g).all() for g in grads)
    ref = reference_pac(x.detach(), f.detach(), w.detach(), b.detach(), padding=2, normalize=True)
    torch.testing.assert_close(pac_conv2d(x, f, w, b, padding=2, normalize=True), ref)


def test_non_contiguous_and_channels_last():
    x, f, w, b = make_inputs(seed=6)
    ref = reference_pac(x, f, w, b, 1, 1, 1, True)
    xc = x.to(memory_format=torch.channels_last)
    ft = f.transpose(-1, -2).contiguous().transpose(-1, -2)
    for fn in IMPLS:
        torch.testing.assert_close(fn(xc, ft, w, b, 1, 1, 1, True), ref)


def test_float32_and_bfloat16():
    x, f, w, b = make_inputs(Ci=4, Co=3, H=12, W=10, seed=9)
    ref = reference_pac(x, f, w, b, 1, 1, 1, True)
    out32 = pac_conv2d(x.float(), f.float(), w.float(), b.float(), 1, 1, 1, True)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, ref.float(), rtol=1e-5, atol=1e-5)
    xb, fb = x.bfloat16().requires_grad_(True), f.bfloat16().requires_grad_(True)
    outb = pac_conv2d(xb, fb, w.bfloat16(), b.bfloat16(), 1, 1, 1, True)
    assert outb.dtype == torch.bfloat16
    torch.testing.assert_close(outb.float(), ref.float(), rtol=0.05, atol=0.1)
    outb.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and fb.grad.dtype == torch.bfloat16
    assert torch.isfinite(xb.grad.float()).all() and torch.isfinite(fb.grad.float()).all()


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(w=(2, 3, 2, 2)), "odd"),
        (dict(w=(2, 3, 3, 5)), "square"),
        (dict(w=(2, 4, 3, 3)), "channel"),
        (dict(f=(2, 2, 7, 8)), "size"),
        (dict(f=(1, 2, 7, 9)), "batch"),
        (dict(b=(3,)), "bias"),
        (dict(stride=0), "stride"),
        (dict(padding=-1), "padding"),
        (dict(dilation=0), "dilation"),
        (dict(H=2), "smaller"),
    ],
)
def test_argument_validation(bad, match):
    shapes = dict(
        x=(2, 3, bad.get("H", 7), 9), f=(2, 2, bad.get("H", 7), 9), w=(2, 3, 3, 3), b=(2,)
    )
    shapes.update({k: v for k, v in bad.items() if k in shapes})
    t = {k: torch.randn(v) for k, v in shapes.items()}
    kw = {k: v for k, v in bad.items() if k in ("stride", "padding", "dilation")}
    for fn in IMPLS:
        with pytest.raises(ValueError, match=match):
            fn(t["x"], t["f"], t["w"], t["b"], **kw)
    with pytest.raises(ValueError, match="odd"):
        PacConv2d(3, 2, 4)


def test_module():
    torch.manual_seed(0)
    m = PacConv2d(3, 5, 3, stride=2, padding=1, normalize=True)
    names = dict(m.named_parameters())
    assert set(names) == {"weight", "bias"}
    assert names["weight"].shape == (5, 3, 3, 3) and names["bias"].shape == (5,)
    # nn.Conv2d's initialisation bounds
    bound = 1 / math.sqrt(3 * 9)
    assert m.weight.abs().max() <= bound + 1e-7 and m.bias.abs().max() <= bound + 1e-7
    assert "normalize=True" in repr(m) and "padding=1" in repr(m) and "stride=2" in repr(m)
    x, f = torch.randn(2, 3, 11, 13), torch.randn(2, 3, 11, 13)
    out = m(x, f)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    assert out.shape == conv(x).shape == (2, 5, 6, 7)
    out.sum().backward()
    assert m.weight.grad is not None and m.bias.grad is not None
    torch.testing.assert_close(out, pac_conv2d(x, f, m.weight, m.bias, 2, 1, 1, True))
    assert PacConv2d(3, 2, 1, bias=False).bias is None
    assert "bias=False" in repr(PacConv2d(3, 2, 1, bias=False))


def test_module_bfloat16():
    m = PacConv2d(4, 2, 3, padding=1)
    x, f = (
        torch.randn(1, 4, 9, 7, dtype=torch.bfloat16),
        torch.randn(1, 3, 9, 7, dtype=torch.bfloat16),
    )
    out = m(x, f)  # float32 parameters, bfloat16 activations
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, 9, 7)
    ref = m(x.float(), f.float())
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    m_bf = PacConv2d(4, 2, 3, padding=1).to(torch.bfloat16)
    out_bf = m_bf(x, f)
    assert out_bf.dtype == torch.bfloat16 and torch.isfinite(out_bf.float()).all()
    out_bf.float().sum().backward()
    assert m_bf.weight.grad.dtype == torch.bfloat16


def _saved_bytes(fn, *args, **kwargs) -> int:
    """Bytes of every tensor autograd saves for backward while running ``fn``."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return total


@pytest.mark.parametrize("normalize", [False, True])
def test_saved_memory_does_not_grow_with_kernel_area(normalize):
    """pac_conv2d saves (about) its inputs, never per-offset kernels; the unfold formulation
    saves k^2-sized tensors. Counted exactly with saved-tensor hooks, not timed."""
    k = 5
    x, f, w, b = make_inputs(
        B=2, Ci=4, Co=4, Cg=3, H=40, W=48, k=k, dtype=torch.float32, requires_grad=True
    )
    inputs = sum(t.numel() * t.element_size() for t in (x, f, w))
    kw = dict(padding=2, normalize=normalize)
    lean = _saved_bytes(pac_conv2d, x, f, w, b, **kw)
    naive = _saved_bytes(pac_conv2d_unfold, x, f, w, b, **kw)
    assert lean > 0  # the hooks do see the custom function's tensors
    assert lean < 2.5 * inputs
    # the bound is discriminating: the naive version is far above it
    assert naive >= k * k * (inputs - w.numel() * 4)
    assert naive > 10 * 2.5 * inputs
    # and so is a per-offset cache of K alone, (B, k^2, H, W)
    assert 2 * 40 * 48 * k * k * 4 + inputs > 2.5 * inputs
