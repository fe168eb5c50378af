"""Refinement of an object probability map with its image: a dense CRF (mean field) and the
guided filter. Pure torch, device-agnostic, no trainable parameters.

* :func:`dense_crf` -- the fully connected CRF of Kraehenbuehl and Koltun (NIPS 2011) for two
  labels, unary ``-log p``, Potts pairwise terms with an appearance kernel (position and RGB)
  and a smoothness kernel (position), solved by mean field. The fully connected appearance
  kernel is approximated as PAC-CRF does (Su et al., CVPR 2019): pixel-adaptive Gaussian
  kernels over local windows, here at several dilations (a dense inner window, sparser
  rings further out, each sample weighted by the area it stands for), optionally on the
  image reduced by an integer ``scale`` (the CRF's change of the logits is then upsampled
  and added to the full-resolution unary).
* :func:`guided_filter` -- He, Sun and Tang's guided filter (ECCV 2010 / TPAMI 2013) with the
  colour image as guide, box means by cumulative sums (O(1) in the radius); with ``subsample``
  the fast guided filter (He and Sun, 2015): coefficients at reduced resolution.
* :func:`box_mean` -- the mean over each pixel's (2r+1)^2 window clipped to the image.
* :data:`REFINERS` and :func:`refine_logits` -- the refiners by name, on logits: the
  refinement variants of stage 3 (core.variants.REFINED).

The CRF's pairwise messages are models.crf_kernels.

Conventions: ``prob`` is (B, 1, H, W) object probabilities in [0, 1] (any floating dtype),
``image`` the (B, 3, H, W) RGB image as uint8 or as floats in 0..255. Results are
probabilities in ``prob``'s dtype; arithmetic runs in at least float32. Every image of a
batch is refined independently of the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .crf_kernels import pairwise_messages

__all__ = [
    "box_mean",
    "guided_filter",
    "dense_crf",
    "crf_offsets",
    "REFINERS",
    "refine_logits",
]

# probabilities are clipped to [EPS, 1 - EPS] before taking logs (|unary logit| <= 11.5)
EPS = 1e-5


# ----------------------------------------------------------------------------- helpers


def _check(prob: torch.Tensor, image: torch.Tensor) -> torch.dtype:
    """Validate the shapes; return the dtype the arithmetic runs in."""
    if prob.dim() != 4 or prob.shape[1] != 1:
        raise ValueError(f"prob must be (B, 1, H, W), got {tuple(prob.shape)}")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    if image.shape[0] != prob.shape[0] or image.shape[-2:] != prob.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} does not match prob {tuple(prob.shape)}")
    if not prob.is_floating_point():
        raise ValueError(f"prob must be a floating-point tensor, got {prob.dtype}")
    if image.device != prob.device:
        raise ValueError(
            f"prob and image must be on one device, got {prob.device} and {image.device}"
        )
    dtype = torch.promote_types(prob.dtype, torch.float32)
    if image.is_floating_point():
        dtype = torch.promote_types(dtype, image.dtype)
    return dtype


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(EPS, 1 - EPS)
    return torch.log(p) - torch.log1p(-p)


def _downsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Mean over scale x scale blocks (the last block of a row or column may be partial)."""
    if scale == 1:
        return x
    h, w = -(-x.shape[-2] // scale), -(-x.shape[-1] // scale)
    return F.interpolate(x, size=(h, w), mode="area")


def _upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- box mean


def _box_sum_1d(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Sum over [i - r, i + r] along `dim`, clipped to the tensor, by a cumulative sum."""
    n = x.shape[dim]
    c = torch.cumsum(x, dim)
    zero = torch.zeros_like(c.narrow(dim, 0, 1))
    c = torch.cat([zero, c], dim)  # c[k] = sum of the first k entries
    hi = torch.arange(n, device=x.device).add_(r + 1).clamp_(max=n)
    lo = torch.arange(n, device=x.device).sub_(r).clamp_(min=0)
    return c.index_select(dim, hi) - c.index_select(dim, lo)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean of `x` (..., H, W) over each pixel's (2 radius + 1)^2 window, the window clipped
    to the image (so a border pixel averages fewer values, as in He et al.'s code). Separable
    cumulative sums: the cost does not depend on the radius."""
    _int("radius", radius, 0)
    if radius == 0:
        return x
    s = _box_sum_1d(_box_sum_1d(x, radius, -1), radius, -2)
    H, W = x.shape[-2:]

    def count(n: int) -> torch.Tensor:
        i = torch.arange(n, device=x.device)
        return ((i + radius).clamp(max=n - 1) - (i - radius).clamp(min=0) + 1).to(x.dtype)

    return s / (count(H).view(-1, 1) * count(W).view(1, -1))


# ----------------------------------------------------------------------------- guided filter


def _guided_coefficients(
    p: torch.Tensor, guide: torch.Tensor, radius: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """He et al.'s colour guided filter: per window the linear model p ~ a . I + b, the
    coefficients averaged over the windows covering each pixel (mean a (B, 3, H, W), mean b
    (B, 1, H, W))."""
    mean_i = box_mean(guide, radius)  # (B, 3, H, W)
    mean_p = box_mean(p, radius)
    cov_ip = box_mean(guide * p, radius) - mean_i * mean_p  # (B, 3, H, W)
    # the 3 x 3 covariance of the guide in each window, + eps on the diagonal
    pairs = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    prods = torch.cat([guide[:, i : i + 1] * guide[:, j : j + 1] for i, j in pairs], 1)
    sig = box_mean(prods, radius) - torch.cat(
        [mean_i[:, i : i + 1] * mean_i[:, j : j + 1] for i, j in pairs], 1
    )
    a, b, c, d, e, f = sig.unbind(1)
    a, d, f = a + eps, d + eps, f + eps
    # the inverse by its adjugate (symmetric)
    i00, i01, i02 = d * f - e * e, c * e - b * f, b * e - c * d
    i11, i12, i22 = a * f - c * c, b * c - a * e, a * d - b * b
    det = a * i00 + b * i01 + c * i02
    x, y, z = cov_ip.unbind(1)
    coef = torch.stack(
        [i00 * x + i01 * y + i02 * z, i01 * x + i11 * y + i12 * z, i02 * x + i12 * y + i22 * z], 1
    ) / det.unsqueeze(1)
    offset = mean_p - (coef * mean_i).sum(1, keepdim=True)
    return box_mean(coef, radius), box_mean(offset, radius)


def guided_filter(
    prob: torch.Tensor,
    image: torch.Tensor,
    *,
    radius: int = 8,
    eps: float = 1e-3,
    subsample: int = 1,
) -> torch.Tensor:
    """`prob` filtered by the guided filter with the colour `image` as guide (intensities
    scaled to [0, 1]), clipped to [0, 1].

    Args:
        radius: the window is (2 radius + 1)^2 pixels of the full-resolution image.
        eps: regularisation of the linear model (in squared [0, 1] intensity units): edges
            whose contrast variance is well above it are kept, flatter detail is smoothed.
        subsample: the fast guided filter: coefficients computed on the image reduced by
            this factor (radius / subsample there, at least 1), upsampled bilinearly and
            applied to the full-resolution guide. 1: the exact guided filter.
    """
    dtype = _check(prob, image)
    _int("radius", radius, 1)
    _positive("eps", eps)
    _int("subsample", subsample, 1)
    size = (prob.shape[-2], prob.shape[-1])
    guide = image.to(dtype) / 255.0
    p = prob.to(dtype)
    r = max(1, round(radius / subsample))
    mean_a, mean_b = _guided_coefficients(
        _downsample(p, subsample), _downsample(guide, subsample), r, eps
    )
    mean_a, mean_b = _upsample(mean_a, size), _upsample(mean_b, size)
    q = (mean_a * guide).sum(1, keepdim=True) + mean_b
    return q.clamp_(0.0, 1.0).to(prob.dtype)


# ----------------------------------------------------------------------------- dense CRF


def crf_offsets(kernel_size: int, dilations: Sequence[int]) -> list[tuple[int, int, float]]:
    """The pixel offsets (dy, dx) the appearance kernel samples, with the area each stands
    for: for each dilation d (ascending) a kernel_size^2 window with step d, without the
    centre and without the offsets an earlier (finer) window already covers; a sample of a
    ring stands for the ring's area over its sample count (1 for the finest, dense window)."""
    _int("kernel_size", kernel_size, 3)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if not dilations or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilations
    ):
        raise ValueError(f"dilations must be ints >= 1, got {list(dilations)!r}")
    if list(dilations) != sorted(set(dilations)):
        raise ValueError(f"dilations must be strictly ascending, got {list(dilations)!r}")
    h = kernel_size // 2
    out: list[tuple[int, int, float]] = []
    inner = 0  # the half-width (in pixels) already covered
    for d in dilations:
        ring = [
            (a * d, b * d)
            for a in range(-h, h + 1)
            for b in range(-h, h + 1)
            if max(abs(a), abs(b)) * d > inner
        ]
        if ring:
            area = ((2 * h * d + 1) ** 2 - (2 * inner + 1) ** 2) / len(ring)
            out += [(dy, dx, area) for dy, dx in ring]
            inner = h * d
    return out


def dense_crf(
    prob: torch.Tensor,
    image: torch.Tensor,
    *,
    iterations: int = 5,
    appearance_weight: float = 4.0,
    appearance_xy: float = 40.0,
    appearance_rgb: float = 13.0,
    smoothness_weight: float = 1.0,
    smoothness_xy: float = 3.0,
    kernel_size: int = 5,
    dilations: Sequence[int] = (1, 4, 16),
    scale: int = 1,
    unary_scale: float = 1.0,
) -> torch.Tensor:
    """Object probabilities after mean-field inference in the dense CRF whose unary is
    -log(prob) and whose Potts pairwise weight between pixels i and j is

        appearance_weight * exp(-|p_i - p_j|^2 / (2 appearance_xy^2)
                                - |I_i - I_j|^2 / (2 appearance_rgb^2)) / Z_a
        + smoothness_weight * exp(-|p_i - p_j|^2 / (2 smoothness_xy^2)) / Z_s

    (p positions in pixels, I RGB in 0..255). Each kernel is divided by its total weight
    over the image plane, Z, so a weight is the largest logit change its term can make: a
    pixel whose whole neighbourhood has its colour and is certain of one label moves by
    the weight towards it. The appearance kernel sees the offsets `crf_offsets(kernel_size,
    dilations)` (a window spanning 2 (kernel_size // 2) max(dilations) + 1 pixels of the
    reduced image); the smoothness kernel all pixels within 3 smoothness_xy.

    `scale` > 1: inference on the image and the probabilities reduced by `scale` (block
    means; lengths in pixels stay those of the full-resolution image), and the CRF's change
    of the logits, upsampled bilinearly, added to the full-resolution unary.
    `unary_scale`: the unary is unary_scale * log(p / (1 - p)) (a temperature: below 1 the
    pairwise terms weigh more against it); the result is the input's logit plus the CRF's
    change over unary_scale, so where the CRF changes nothing the probability is the input's.
    `iterations` 0 returns `prob` (clipped to [EPS, 1 - EPS]).
    """
    dtype = _check(prob, image)
    lengths = {"appearance_xy": appearance_xy, "appearance_rgb": appearance_rgb}
    weights = {"appearance_weight": appearance_weight, "smoothness_weight": smoothness_weight}
    _check_crf_numbers(iterations, scale, unary_scale, {**lengths, "smoothness_xy": smoothness_xy})
    _check_crf_numbers(0, 1, 1.0, weights, minimum_zero=True)
    offsets = crf_offsets(kernel_size, dilations)
    size = (prob.shape[-2], prob.shape[-1])
    unary = _logit(prob.to(dtype))
    if iterations == 0 or (appearance_weight == 0 and smoothness_weight == 0):
        return torch.sigmoid(unary).to(prob.dtype)
    low_unary = _logit(_downsample(prob.to(dtype), scale)) if scale > 1 else unary
    low_unary = low_unary * unary_scale  # (exact at 1)
    pairwise = pairwise_messages(
        _downsample(image.to(dtype), scale) / appearance_rgb,
        offsets,
        scale,
        (appearance_weight, appearance_xy),
        (smoothness_weight, smoothness_xy),
    )
    message = _mean_field(low_unary, pairwise, iterations).div_(unary_scale)
    return torch.sigmoid(unary + _upsample(message, size)).to(prob.dtype)


def _check_crf_numbers(
    iterations: int,
    scale: int,
    unary_scale: float,
    numbers: dict[str, float],
    minimum_zero: bool = False,
) -> None:
    """Refuse dense_crf's numeric arguments out of range: the counts, the unary's scale and
    `numbers` (> 0, or >= 0 with `minimum_zero`: the weights)."""
    _int("iterations", iterations, 0)
    _int("scale", scale, 1)
    _positive("unary_scale", unary_scale)
    for name, value in numbers.items():
        if not minimum_zero:
            _positive(name, value)
        elif not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _mean_field(
    unary: torch.Tensor, pairwise: Callable[[torch.Tensor], torch.Tensor], iterations: int
) -> torch.Tensor:
    """Mean field for two labels with Potts pairwise terms: the message (the logit change)
    after `iterations` updates q = sigmoid(unary + pairwise(2 q - 1)), from q = sigmoid(unary)."""
    q = torch.sigmoid(unary)
    message = torch.zeros_like(unary)
    for _ in range(iterations):
        message = pairwise(q.mul(2.0).sub_(1.0))  # Potts: Q(object) - Q(background)
        q = torch.sigmoid(unary + message)
    return message


# ----------------------------------------------------------------------------- refiners

# the refiners by the names core.variants.REFINED and the config's [refine] keys use
REFINERS: dict[str, Callable[..., torch.Tensor]] = {"crf": dense_crf, "guided": guided_filter}


def refine_logits(
    refiner: str, logits: torch.Tensor, image: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    """Object logits (B, 1, H, W) refined with the image (B, 3, H, W) by the refiner named
    `refiner` (REFINERS) with its keyword arguments: the refiner applied to their
    probabilities, the result as float32 logits again (probabilities clipped to
    [EPS, 1 - EPS] first, so the logits are finite)."""
    if refiner not in REFINERS:
        raise ValueError(f"unknown refiner {refiner!r} (one of {', '.join(REFINERS)})")
    prob = REFINERS[refiner](torch.sigmoid(logits.float()), image, **kwargs)
    return _logit(prob.float())
