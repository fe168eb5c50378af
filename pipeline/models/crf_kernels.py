"""The pairwise messages of models.refine's dense CRF: the appearance kernel (position and
RGB) over dilated local windows, PAC-CRF style, and the smoothness kernel (position) by a
separable Gaussian convolution. Pure torch."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["AppearanceKernel", "gaussian_message", "pairwise_messages"]


class AppearanceKernel:
    """The appearance messages sum_o c_o K(i, i + o) x(i + o) / Z of one image batch, with
    K(i, j) = exp(-|I_i - I_j|^2 / 2) on the guide I (RGB over theta_rgb).

    Images live zero-padded by the largest offset and flattened, so that every offset is a
    shift of one flat index and each product below is one contiguous slice (a row's shift
    into its padding never wraps into the image). K is symmetric: the map D(q) = c_o K(q, q
    + o) of each pair of opposite offsets is computed once, read at q for +o and at q - o
    for -o. Only the messages of pixels inside the image are used, and x is zero in the
    padding, so D needs no mask: wherever q or q + o lies in the padding, one factor of
    each product it enters is zero or the product lands in the padding."""

    def __init__(self, guide: torch.Tensor, offsets: list[tuple[int, int, float]], theta_xy: float):
        B, C, H, W = guide.shape
        self.B, self.H, self.W = B, H, W
        self.pad = max(max(abs(dy), abs(dx)) for dy, dx, _ in offsets)
        p = self.pad
        self.Wp = W + 2 * p
        self.n = (H + 2 * p) * self.Wp
        flat = F.pad(guide, (p, p, p, p)).reshape(B, C, self.n)
        self.pairs: list[tuple[int, torch.Tensor]] = []
        self.norm = 0.0
        for dy, dx, area in offsets:
            if (dy, dx) < (0, 0):
                continue  # served by its opposite
            coef = area * math.exp(-0.5 * (dy * dy + dx * dx) / theta_xy**2)
            self.norm += 2 * coef  # the message of a neighbourhood that agrees everywhere: 1
            if abs(dy) >= H or abs(dx) >= W:
                continue  # no two pixels of the image this far apart
            s = dy * self.Wp + dx
            diff = flat[:, :, s:] - flat[:, :, : self.n - s]
            kern = diff.square_().sum(1).mul_(-0.5).exp_().mul_(coef)  # (B, n - s)
            self.pairs.append((s, kern))

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> the zero-padded flat layout (B, n)."""
        p = self.pad
        return F.pad(x, (p, p, p, p)).reshape(self.B, self.n)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = self.padded(x)
        out = torch.zeros_like(xf)
        for s, kern in self.pairs:
            out[:, : self.n - s].addcmul_(kern, xf[:, s:])
            out[:, s:].addcmul_(kern, xf[:, : self.n - s])
        p = self.pad
        out = out.view(self.B, 1, self.H + 2 * p, self.Wp)[:, :, p : p + self.H, p : p + self.W]
        return out / self.norm


def gaussian_message(x: torch.Tensor, theta_xy: float) -> torch.Tensor:
    """sum_j g(i - j) x_j / sum_j g over j != i, g a Gaussian of std theta_xy pixels (zero
    outside the image): the smoothness kernel's message, by separable convolution."""
    r = max(1, math.ceil(3 * theta_xy))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-0.5 * (t / theta_xy) ** 2)
    out = F.conv2d(x, g.view(1, 1, 1, -1), padding=(0, r))
    out = F.conv2d(out, g.view(1, 1, -1, 1), padding=(r, 0))
    return out.sub_(x).div_(g.sum() ** 2 - 1.0)  # without the centre (g(0) = 1)


def pairwise_messages(
    guide: torch.Tensor,
    offsets: list[tuple[int, int, float]],
    scale: int,
    appearance: tuple[float, float],
    smoothness: tuple[float, float],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """dense_crf's weighted sum of the appearance message (on `guide`, the reduced image over
    appearance_rgb) and the smoothness message; `appearance` and `smoothness` are (weight,
    std in full-resolution pixels)."""
    (a_weight, a_xy), (s_weight, s_xy) = appearance, smoothness
    kernel = AppearanceKernel(guide, offsets, a_xy / scale) if a_weight > 0 else None

    def pairwise(m: torch.Tensor) -> torch.Tensor:
        message = torch.zeros_like(m)
        if kernel is not None:
            message.add_(kernel(m), alpha=a_weight)
        if s_weight > 0:
            message.add_(gaussian_message(m, s_xy / scale), alpha=s_weight)
        return message

    return pairwise
