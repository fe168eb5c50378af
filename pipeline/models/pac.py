"""Pixel-adaptive convolution (PAC, Su et al., CVPR 2019).

A k x k convolution whose spatially shared filter is modulated, at every output pixel, by a
Gaussian kernel on a guidance image:

    y[b, o, u, v] = bias[o] + sum_{c, i, j} weight[o, c, i, j] * K[b, u, v, i, j]
                                          * x_pad[b, c, u*s + i*d, v*s + j*d]
    K[b, u, v, i, j] = exp(-1/2 * || f_pad[b, :, u*s + i*d, v*s + j*d]
                                    - f_pad[b, :, u*s + m*d, v*s + m*d] ||^2),   m = (k - 1) // 2

with s the stride, d the dilation, x_pad / f_pad the zero-padded input / guide.

Border convention (shared by every function here): the input is zero-padded, and a
neighbour that falls outside the image gets kernel weight K = 0, so it contributes neither to
the sum nor, with ``normalize=True``, to the normaliser. Hence the guide's padding value never
matters as long as every window centre lies inside the image, which holds whenever
``padding <= dilation * (k - 1) // 2`` (e.g. "same" padding). With a larger padding a window
centre can fall in the padding; its guide value is then taken as zero. A window with no
neighbour inside the image (possible only with such a padding) has K = 0 everywhere; with
``normalize=True`` its output is just the bias.

Public API, following the torch.nn.functional / torch.nn split:

* :func:`pac_conv2d` -- the memory-lean op (custom autograd function; peak memory grows with
  C x H x W, not with k^2).
* :func:`pac_conv2d_unfold` -- the straightforward ``F.unfold`` formulation (plain autograd,
  materialises B x C x k^2 x H x W tensors); the baseline and a second reference.
* :class:`PacConv2d` -- the module.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["pac_conv2d", "pac_conv2d_unfold", "PacConv2d"]


# --------------------------------------------------------------------------- helpers


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_placement(
    input: torch.Tensor, guide: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """ValueError unless the tensors are on one device and floating-point."""
    devices = {t.device for t in (input, guide, weight) + ((bias,) if bias is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    given: tuple[tuple[str, torch.Tensor | None], ...] = (
        ("input", input),
        ("guide", guide),
        ("weight", weight),
        ("bias", bias),
    )
    for name, tensor in given:
        if tensor is not None and not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def _validate(
    input: torch.Tensor,
    guide: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    padding: int,
    dilation: int,
) -> tuple[int, int]:
    """Check shapes and hyper-parameters; return the output size (Ho, Wo)."""
    _check_int("stride", stride, 1)
    _check_int("padding", padding, 0)
    _check_int("dilation", dilation, 1)
    for name, t in (("input", input), ("guide", guide), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"{name} must be a 4-D tensor, got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}"
            )
    B, Ci, H, W = input.shape
    Co, Ciw, kh, kw = weight.shape
    if kh != kw:
        raise ValueError(f"weight must have a square kernel, got {kh} x {kw}")
    if kh % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {kh}")
    if Ciw != Ci:
        raise ValueError(f"channel mismatch: input has {Ci} channels, weight expects {Ciw}")
    if guide.shape[0] != B:
        raise ValueError(f"batch mismatch: input has {B} images, guide {guide.shape[0]}")
    if guide.shape[-2:] != input.shape[-2:]:
        raise ValueError(
            f"guide size {tuple(guide.shape[-2:])} does not match input size "
            f"{tuple(input.shape[-2:])}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != Co):
        raise ValueError(f"bias must have shape ({Co},), got {tuple(bias.shape)}")
    _check_placement(input, guide, weight, bias)
    span = dilation * (kh - 1) + 1
    Ho = (H + 2 * padding - span) // stride + 1
    Wo = (W + 2 * padding - span) // stride + 1
    if Ho <= 0 or Wo <= 0:
        raise ValueError(
            f"input {H} x {W} (padding {padding}) is smaller than the dilated "
            f"kernel ({span} x {span})"
        )
    return Ho, Wo


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype the arithmetic runs in: the promoted dtype, at least float32."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Disable autocast inside the op (it does its own dtype handling)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _valid_range(n_out: int, size: int, stride: int, padding: int, offset: int) -> tuple[int, int]:
    """Output indices [lo, hi) whose neighbour at padded position ``u*stride + offset`` lies
    inside the image, i.e. padding <= u*stride + offset < padding + size."""
    lo = max(0, -((offset - padding) // stride))  # ceil((padding - offset) / s)
    hi = min(n_out, -((offset - padding - size) // stride))  # ceil((padding+size-offset)/s)
    return lo, max(lo, hi)


def _zero_outside(t: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> None:
    """Zero the last two dims of ``t`` outside the rectangle rows x cols (in place)."""
    (r0, r1), (c0, c1) = rows, cols
    if r0 > 0:
        t[..., :r0, :] = 0
    if r1 < t.shape[-2]:
        t[..., r1:, :] = 0
    if c0 > 0:
        t[..., :, :c0] = 0
    if c1 < t.shape[-1]:
        t[..., :, c1:] = 0


class _Geometry:
    """Where every kernel offset reads, for one PAC call.

    Padded tensors are stored as (B, C, Hq, Wp). Every per-offset quantity lives in a
    "layout" of shape (B, C, Ho, Wl). With stride 1 the layout is *wide*: Wl = Wp, and the
    window of offset (i, j) is a flat, contiguous slice of each padded channel, usable as a
    matrix without copying; the columns Wo..Wp-1 of a row are junk that every kernel weight
    zeroes (the padded tensors get spare zero rows at the bottom so these slices stay in
    bounds). With stride > 1 the layout is the output itself (Wl = Wo) and windows are
    strided views, copied when a matrix is needed.
    """

    def __init__(
        self,
        B: int,
        H: int,
        W: int,
        Ho: int,
        Wo: int,
        k: int,
        stride: int,
        padding: int,
        dilation: int,
    ):
        self.B, self.H, self.W, self.Ho, self.Wo = B, H, W, Ho, Wo
        self.k, self.s, self.p, self.d = k, stride, padding, dilation
        self.centre = (k - 1) // 2
        self.Wp = W + 2 * padding
        self.wide = stride == 1
        self.Wl = self.Wp if self.wide else Wo
        spare = -(-(k - 1) * dilation // self.Wp) if self.wide else 0  # ceil
        self.Hq = H + 2 * padding + spare
        self.L = Ho * self.Wl
        rows = [_valid_range(Ho, H, stride, padding, i * dilation) for i in range(k)]
        cols = [_valid_range(Wo, W, stride, padding, j * dilation) for j in range(k)]
        # (i, j, row range, col range) for every offset with at least one neighbour inside.
        self.offsets = [
            (i, j, rows[i], cols[j])
            for i in range(k)
            for j in range(k)
            if rows[i][1] > rows[i][0] and cols[j][1] > cols[j][0]
        ]
        # Every window centre inside the image: the kernel can be shared by opposite offsets.
        self.symmetric = self.wide and padding <= self.centre * dilation

    def pad(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Zero-padded contiguous copy (B, C, Hq, Wp) of ``t`` in ``dtype``."""
        B, C, H, W = t.shape
        out = t.new_zeros((B, C, self.Hq, self.Wp), dtype=dtype)
        out[:, :, self.p : self.p + H, self.p : self.p + W] = t
        return out

    def crop(self, tp: torch.Tensor) -> torch.Tensor:
        """The image part of a padded tensor."""
        return tp[:, :, self.p : self.p + self.H, self.p : self.p + self.W]

    def layout(self, C: int, like: torch.Tensor, zero: bool = False) -> torch.Tensor:
        shape = (self.B, C, self.Ho, self.Wl)
        return like.new_zeros(shape) if zero else like.new_empty(shape)

    def window(self, tp: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """(B, C, Ho, Wl) view of padded ``tp`` seen by offset (i, j) at every output pixel."""
        B, C = tp.shape[:2]
        n = self.Hq * self.Wp
        return tp.as_strided(
            (B, C, self.Ho, self.Wl),
            (C * n, n, self.s * self.Wp, self.s),
            tp.storage_offset() + (i * self.Wp + j) * self.d,
        )

    def matrix(self, tp: torch.Tensor, i: int, j: int, buf: torch.Tensor | None) -> torch.Tensor:
        """The window as a (B, C, L) matrix: a view (wide layout: ``buf`` None) or a copy into
        ``buf`` (a layout of the window's channels, needed when the layout is not wide)."""
        win = self.window(tp, i, j)
        if buf is None:
            return win.view(win.shape[0], win.shape[1], self.L)
        buf.copy_(win)
        return buf.view(buf.shape[0], buf.shape[1], self.L)

    def to_layout(self, t: torch.Tensor) -> torch.Tensor:
        """(B, C, Ho, Wo) -> layout, junk columns zero."""
        if not self.wide:
            return t.contiguous()
        out = self.layout(t.shape[1], t, zero=True)
        out[..., : self.Wo] = t
        return out


def _kernel(
    f_n: torch.Tensor,
    f_c: torch.Tensor,
    diff: torch.Tensor,
    out: torch.Tensor,
    rows: tuple[int, int],
    cols: tuple[int, int],
    sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """K = exp(-|f_n - f_c|^2 / 2) into ``out`` (B, 1, Ho, Wl), zero outside the valid
    rectangle. ``diff`` receives f_n - f_c, or its square when no ``sq`` buffer is given."""
    torch.sub(f_n, f_c, out=diff)
    if sq is None:
        sq = diff.square_()
    else:
        torch.mul(diff, diff, out=sq)
    torch.sum(sq, 1, keepdim=True, out=out)
    out.mul_(-0.5).exp_()
    _zero_outside(out, rows, cols)
    return out


def _mm(a: torch.Tensor, m3: torch.Tensor, out3: torch.Tensor) -> torch.Tensor:
    """out3 (B, M, L) = a (M, N) @ m3 (B, N, L)."""
    if m3.shape[0] == 1:
        torch.mm(a, m3[0], out=out3[0])
    else:
        torch.bmm(a.expand(m3.shape[0], -1, -1), m3, out=out3)
    return out3


def _safe_reciprocal(S: torch.Tensor) -> torch.Tensor:
    """1 / S where S is a usable normaliser, 0 where the window had no weight."""
    tiny = torch.finfo(S.dtype).tiny
    return torch.where(S > tiny, S.reciprocal(), torch.zeros((), dtype=S.dtype, device=S.device))


def _accumulate(
    geo: _Geometry,
    xp: torch.Tensor,
    fp: torch.Tensor,
    f_c: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    S: torch.Tensor | None,
) -> None:
    """out += sum_n K_n W_n x_n (and S += sum_n K_n), one offset n at a time."""
    B, Co = out.shape[:2]
    diff, K, Z = geo.layout(fp.shape[1], xp), geo.layout(1, xp), geo.layout(Co, xp)
    xbuf = None if geo.wide else geo.layout(xp.shape[1], xp)
    Z3 = Z.view(B, Co, geo.L)
    for i, j, rows, cols in geo.offsets:
        _kernel(geo.window(fp, i, j), f_c, diff, K, rows, cols)
        _mm(w[i, j], geo.matrix(xp, i, j, xbuf), Z3)  # Z = W_n x_n
        out.addcmul_(Z, K)
        if S is not None:
            S.add_(K)


def _accumulate_symmetric(
    geo: _Geometry,
    xp: torch.Tensor,
    fp: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    S: torch.Tensor | None,
) -> None:
    """`_accumulate` for stride 1 with every window centre inside the image, with half the
    kernel arithmetic. The kernel is symmetric: the weight of neighbour c + delta at centre c,
    exp(-|f(c + delta) - f(c)|^2 / 2), is also the weight of neighbour c at centre c + delta.
    So one map D(q) over the padded grid per pair of opposite offsets serves both: it is read
    at q = c for +delta and at q = c - delta for -delta. D is zero wherever q or q + delta lies
    outside the image, which is exactly where one of its two uses has its neighbour outside.
    The centre's weight is exp(0) = 1."""
    B, Co = out.shape[:2]
    Cg = fp.shape[1]
    Wp, d, m, p, L = geo.Wp, geo.d, geo.centre, geo.p, geo.L
    n_grid = geo.Hq * Wp
    c0 = m * d * (Wp + 1)  # flat padded index of output 0's window centre
    Z = geo.layout(Co, xp)
    Z3, out3 = Z.view(B, Co, L), out.view(B, Co, L)
    D = fp.new_zeros((B, 1, geo.Hq, Wp))
    D_flat = D.view(B, 1, n_grid)
    diff = fp.new_empty(B * Cg * geo.H * geo.W)
    S3 = S.view(B, 1, L) if S is not None else None

    def add(i: int, j: int, K: torch.Tensor | None) -> None:
        _mm(w[i, j], geo.matrix(xp, i, j, None), Z3)  # Z = W_n x_n
        if K is None:  # the centre: K = 1
            out3.add_(Z3)
            if S3 is not None:
                S3.add_(1.0)
        else:
            out3.addcmul_(Z3, K)
            if S3 is not None:
                S3.add_(K)

    add(m, m, None)
    for i in range(m, geo.k):
        for j in range(geo.k):
            if i == m and j <= m:
                continue  # each pair once: +delta after c
            dr, dc = (i - m) * d, (j - m) * d
            r0, r1 = p + max(0, -dr), p + geo.H - max(0, dr)
            q0, q1 = p + max(0, -dc), p + geo.W - max(0, dc)
            if r1 <= r0 or q1 <= q0:
                continue  # no pair of pixels this far apart
            shape = (B, Cg, r1 - r0, q1 - q0)
            dv = diff[: math.prod(shape)].view(shape)
            torch.sub(
                fp[:, :, r0 + dr : r1 + dr, q0 + dc : q1 + dc], fp[:, :, r0:r1, q0:q1], out=dv
            )
            Dr = D[:, :, r0:r1, q0:q1]
            torch.sum(dv.square_(), 1, keepdim=True, out=Dr)
            Dr.mul_(-0.5).exp_()
            shift = dr * Wp + dc
            add(i, j, D_flat[:, :, c0 : c0 + L])
            add(geo.k - 1 - i, geo.k - 1 - j, D_flat[:, :, c0 - shift : c0 - shift + L])
            Dr.zero_()


# --------------------------------------------------------------------------- autograd op


class _GuideGrad(NamedTuple):
    """Backward's buffers for the guide's gradient."""

    Z: torch.Tensor  # (B, Co, Ho, Wl) scratch: W_n x_n, then G W_n x_n
    P: torch.Tensor  # (B, 1, Ho, Wl) scratch: R = K_n dL/dK_n
    gfp: torch.Tensor  # (B, Cg, Hq, Wp) the padded gradient
    gfc: torch.Tensor  # (B, Cg, Ho, Wl) the window centres' share, added once at the end


class _PacConv2dFunction(torch.autograd.Function):
    """Forward and backward accumulate over the k*k offsets with shifted (strided) views of the
    padded input and guide; K is recomputed per offset in backward, never stored. Per offset
    n the filter tap W_n (Co x Ci) mixes channels with one matrix product."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        guide: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: int,
        padding: int,
        dilation: int,
        normalize: bool,
        Ho: int,
        Wo: int,
    ) -> torch.Tensor:
        cd = _compute_dtype(input, guide, weight, bias)
        B, Ci, H, W = input.shape
        Co, _, k, _ = weight.shape
        geo = _Geometry(B, H, W, Ho, Wo, k, stride, padding, dilation)
        with _no_autocast(input.device):
            xp, fp = geo.pad(input, cd), geo.pad(guide, cd)
            w = weight.to(cd).permute(2, 3, 0, 1).contiguous()  # (k, k, Co, Ci)
            f_c = geo.window(fp, geo.centre, geo.centre)
            out = geo.layout(Co, xp, zero=True)
            S = geo.layout(1, xp, zero=True) if normalize else None
            if geo.symmetric:
                _accumulate_symmetric(geo, xp, fp, w, out, S)
            else:
                _accumulate(geo, xp, fp, f_c, w, out, S)
            del xp, fp, f_c
            s_inv = None
            if S is not None:
                s_inv = _safe_reciprocal(S)
                del S
                out.mul_(s_inv)
            if bias is not None:
                out.add_(bias.to(cd).view(1, Co, 1, 1))
            result = out[..., :Wo].to(input.dtype).contiguous()
        del out
        ctx.geo, ctx.cd, ctx.normalize = geo, cd, normalize
        if normalize:
            # The output itself is saved (free when the caller keeps it anyway): the
            # normaliser's gradient needs the normalised sum, out - bias.
            ctx.save_for_backward(input, guide, weight, bias, s_inv, result)
        else:
            ctx.save_for_backward(input, guide, weight, bias)
        return result

    @staticmethod
    @once_differentiable
    def backward(  # noqa: C901, PLR0912, PLR0915
        ctx: Any,
        grad_out: torch.Tensor,
    ) -> tuple[torch.Tensor | None, ...]:
        # (the PAC backward, kept whole: each input's gradient term beside the others)
        geo, cd = ctx.geo, ctx.cd
        if ctx.normalize:
            input, guide, weight, bias, s_inv, result = ctx.saved_tensors
        else:
            input, guide, weight, bias = ctx.saved_tensors
            s_inv = result = None
        need_x, need_f, need_w, need_b = ctx.needs_input_grad[:4]
        B, Ci = input.shape[:2]
        Co, _, k, _ = weight.shape
        Cg = guide.shape[1]
        grad_x = grad_f = grad_w = grad_b = None
        nones = (None,) * 6

        with _no_autocast(input.device):
            if need_b and bias is not None:
                grad_b = grad_out.to(cd).sum((0, 2, 3)).to(bias.dtype)
            if not (need_x or need_f or need_w):
                return (grad_x, grad_f, grad_w, grad_b) + nones

            G = geo.to_layout(grad_out.to(cd))  # dL/d(sum over offsets), junk zero
            d_s = None
            if s_inv is not None:
                G = G * s_inv
                if need_f:
                    # dL/dS = -sum_o G_o (y_o - bias_o); it enters every dL/dK_n.
                    y_nb = result.to(cd)
                    y_nb = (
                        y_nb - bias.to(cd).view(1, Co, 1, 1) if bias is not None else y_nb.clone()
                    )
                    d_s = geo.to_layout(y_nb.mul_(G[..., : geo.Wo]).sum(1, keepdim=True).neg_())
                    del y_nb

            need_xm = need_w or need_f
            fp = geo.pad(guide, cd)
            xp = geo.pad(input, cd) if need_xm else None
            w = weight.to(cd).permute(2, 3, 0, 1).contiguous()  # (k, k, Co, Ci)
            w_t = w.transpose(2, 3).contiguous()  # (k, k, Ci, Co)
            f_c = geo.window(fp, geo.centre, geo.centre)
            L = geo.L

            diff, sq, K = geo.layout(Cg, fp), geo.layout(Cg, fp), geo.layout(1, fp)
            KG = geo.layout(Co, fp)
            KG3 = KG.view(B, Co, L)
            # the buffers of the gradients asked for (None: not asked for)
            xbuf = geo.layout(Ci, fp) if need_xm and not geo.wide else None
            qbuf = geo.layout(Ci, fp) if need_x and not geo.wide else None
            gf = (
                _GuideGrad(
                    geo.layout(Co, fp),
                    geo.layout(1, fp),
                    torch.zeros_like(fp),
                    geo.layout(Cg, fp, zero=True),
                )
                if need_f
                else None
            )
            gxp = fp.new_zeros((B, Ci, geo.Hq, geo.Wp)) if need_x else None
            gw = fp.new_zeros((k, k, Co, Ci)) if need_w else None
            xm = None

            for i, j, rows, cols in geo.offsets:
                _kernel(geo.window(fp, i, j), f_c, diff, K, rows, cols, sq)
                torch.mul(G, K, out=KG)  # K_n G
                xm = geo.matrix(xp, i, j, xbuf) if xp is not None else None
                if gxp is not None:  # += W_n^T K_n G
                    if qbuf is None:  # wide layout: the gradient's window is a matrix view
                        gx3 = geo.window(gxp, i, j).view(B, Ci, L)
                        if B == 1:
                            gx3[0].addmm_(w_t[i, j], KG3[0])
                        else:
                            gx3.baddbmm_(w_t[i, j].expand(B, -1, -1), KG3)
                    else:
                        _mm(w_t[i, j], KG3, qbuf.view(B, Ci, L))
                        geo.window(gxp, i, j).add_(qbuf)
                if gw is not None and xm is not None:  # sum K_n G x_n^T
                    if B == 1:
                        torch.mm(KG3[0], xm[0].t(), out=gw[i, j])
                    else:
                        gw[i, j] = torch.bmm(KG3, xm.transpose(1, 2)).sum(0)
                if gf is not None and xm is not None and (i, j) != (geo.centre, geo.centre):
                    # R = K_n dL/dK_n,  dL/dK_n = <G, W_n x_n> (+ dL/dS)
                    _mm(w[i, j], xm, gf.Z.view(B, Co, L))
                    gf.Z.mul_(G)
                    torch.sum(gf.Z, 1, keepdim=True, out=gf.P)
                    if d_s is not None:
                        gf.P.add_(d_s)
                    gf.P.mul_(K)
                    geo.window(gf.gfp, i, j).addcmul_(diff, gf.P, value=-1.0)
                    gf.gfc.addcmul_(diff, gf.P)
            guide_sums = (gf.gfp, gf.gfc) if gf is not None else None  # without the scratch
            del diff, sq, K, KG, KG3, xbuf, qbuf, gf, xp, fp, f_c, G, xm

            if gxp is not None:
                grad_x = geo.crop(gxp).to(input.dtype)
            if guide_sums is not None:
                gfp, gfc = guide_sums
                del guide_sums
                geo.window(gfp, geo.centre, geo.centre).add_(gfc)
                del gfc
                grad_f = geo.crop(gfp).to(guide.dtype)
            if gw is not None:
                grad_w = gw.permute(2, 3, 0, 1).contiguous().to(weight.dtype)
        return (grad_x, grad_f, grad_w, grad_b) + nones


# --------------------------------------------------------------------------- functional API


def pac_conv2d(
    input: torch.Tensor,
    guide: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    normalize: bool = False,
) -> torch.Tensor:
    """Pixel-adaptive convolution of ``input`` guided by ``guide``.

    Args:
        input: (B, Ci, H, W).
        guide: (B, Cg, H, W) guidance features (same H, W as input).
        weight: (Co, Ci, k, k), k odd.
        bias: (Co,) or None.
        stride, padding, dilation: as in ``F.conv2d`` (ints; input zero-padded).
        normalize: divide the (non-bias) sum by the sum of the adaptive kernel weights.

    Returns:
        (B, Co, Ho, Wo) with the ``F.conv2d`` output size, in ``input``'s dtype.

    Neighbours outside the image get kernel weight 0 (see the module docstring for the full
    border convention). Mixed dtypes are allowed; arithmetic runs in the promoted dtype, at
    least float32. Memory grows with C x H x W (no k^2 factor); differentiable once with
    respect to input, guide, weight and bias.
    """
    Ho, Wo = _validate(input, guide, weight, bias, stride, padding, dilation)
    return _PacConv2dFunction.apply(
        input, guide, weight, bias, stride, padding, dilation, bool(normalize), Ho, Wo
    )


def pac_conv2d_unfold(
    input: torch.Tensor,
    guide: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    normalize: bool = False,
) -> torch.Tensor:
    """Same as :func:`pac_conv2d`, written with ``F.unfold`` and plain autograd.

    Materialises (B, C, k^2, Ho*Wo) tensors: the memory-hungry baseline and a reference.
    """
    Ho, Wo = _validate(input, guide, weight, bias, stride, padding, dilation)
    B, Ci, H, W = input.shape
    Co, _, k, _ = weight.shape
    cd = _compute_dtype(input, guide, weight, bias)
    kw = dict(kernel_size=k, dilation=dilation, padding=padding, stride=stride)
    with _no_autocast(input.device):
        x_unf = F.unfold(input.to(cd), **kw).view(B, Ci, k * k, Ho * Wo)
        f_unf = F.unfold(guide.to(cd), **kw).view(B, guide.shape[1], k * k, Ho * Wo)
        centre = (k * k) // 2
        kern = torch.exp(-0.5 * (f_unf - f_unf[:, :, centre : centre + 1]).pow(2).sum(1))
        inside = F.unfold(input.new_ones((1, 1, H, W), dtype=cd), **kw)  # (1, k^2, L)
        kern = kern * inside  # (B, k^2, L)
        out = weight.to(cd).reshape(Co, Ci * k * k) @ (x_unf * kern.unsqueeze(1)).reshape(
            B, Ci * k * k, Ho * Wo
        )
        if normalize:
            out = out * _safe_reciprocal(kern.sum(1, keepdim=True))
        if bias is not None:
            out = out + bias.to(cd).view(1, Co, 1)
        return out.view(B, Co, Ho, Wo).to(input.dtype)


# --------------------------------------------------------------------------- module


class PacConv2d(nn.Module):
    """Pixel-adaptive convolution layer; ``forward(input, guide)`` calls :func:`pac_conv2d`.

    Parameters are initialised like ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        bias: bool = True,
        normalize: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        _check_int("out_channels", out_channels, 1)
        _check_int("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.stride = _check_int("stride", stride, 1)
        self.padding = _check_int("padding", padding, 0)
        self.dilation = _check_int("dilation", dilation, 1)
        self.normalize = bool(normalize)
        self.weight = nn.Parameter(
            torch.empty(
                (out_channels, in_channels, kernel_size, kernel_size), device=device, dtype=dtype
            )
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform weight and uniform bias, exactly as ``nn.Conv2d``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size * self.kernel_size
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """input (B, Ci, H, W), guide (B, Cg, H, W) -> (B, Co, Ho, Wo)."""
        return pac_conv2d(
            input,
            guide,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.normalize,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding:
            s += f", padding={self.padding}"
        if self.dilation != 1:
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.normalize:
            s += ", normalize=True"
        return s
