"""The trainable models of stage 2: a linear head on patch features and the PAC upsampler
that turns patch-level predictions into a full-resolution mask, guided by the image."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pac import PacConv2d

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureNorm(nn.Module):
    """Per-channel standardisation with statistics of the training features (buffers, saved
    with the model), so the heads train the same way whatever the backbone's feature scale."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-12))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


class LinearHead(nn.Module):
    """1x1 convolution: C feature channels -> one object logit per patch."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = FeatureNorm(in_channels)
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, C, h, w) -> logits (B, 1, h, w)."""
        return self.conv(self.norm(feats))


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, ImageNet-normalised (the RGB guidance of the PAC layers)."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1)
    return (image.float() / 255.0 - mean) / std


@dataclass
class UpsamplerSpec:
    """Architecture of a PacUpsampler (saved with its weights)."""
    in_channels: int
    patch_size: int
    hidden: int = 16
    channels: list[int] = field(default_factory=lambda: [4, 4, 4, 1])
    kernel_size: int = 3
    guide: str = "rgb"
    guide_channels: int = 8
    residual: bool = False
    normalize: bool = False

    @property
    def n_stages(self) -> int:
        """One x2 stage per factor of two in the patch size (4 for 16, 3 for 14 and 8)."""
        return max(1, int(math.floor(math.log2(self.patch_size))))

    def stage_channels(self) -> list[int]:
        """The configured channels fitted to the stage count: the last n entries, or the
        first entry repeated in front when fewer are given."""
        ch, n = list(self.channels), self.n_stages
        return ch[-n:] if len(ch) >= n else [ch[0]] * (n - len(ch)) + ch

    def to_dict(self) -> dict:
        return asdict(self)


class PacUpsampler(nn.Module):
    """Patch features -> full-resolution object logits.

    The course's design: a 1x1 conv (C -> hidden) with leaky ReLU, then per factor of two up
    to the patch size a x2 bilinear upsampling followed by a k x k PacConv2d guided by the
    image at that scale, leaky ReLU between stages, and an exact resize to the full size at
    the end (for patch sizes that are not powers of two). Options: `guide="learned"` guides
    with a small conv net on the image instead of raw RGB; `residual=True` adds the
    bilinearly upsampled linear-head logits, so the upsampler learns a correction."""

    def __init__(self, spec: UpsamplerSpec):
        super().__init__()
        self.spec = spec
        self.norm = FeatureNorm(spec.in_channels)
        self.reduce = nn.Conv2d(spec.in_channels, spec.hidden, kernel_size=1)
        chans = [spec.hidden] + spec.stage_channels()
        k = spec.kernel_size
        self.stages = nn.ModuleList(
            PacConv2d(cin, cout, k, padding=k // 2, normalize=spec.normalize)
            for cin, cout in zip(chans[:-1], chans[1:]))
        if spec.guide == "learned":
            g = spec.guide_channels
            self.guide_net = nn.Sequential(
                nn.Conv2d(3, g, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(g, g, 3, padding=1))
        else:
            self.guide_net = None

    def guidance(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 image (B, 3, H, W) -> guidance features at full resolution."""
        x = normalize_image(image)
        return self.guide_net(x) if self.guide_net is not None else x

    def forward(self, feats: torch.Tensor, image: torch.Tensor,
                base_logits: torch.Tensor | None = None) -> torch.Tensor:
        """feats (B, C, h, w), image uint8 (B, 3, H, W) with H, W = h, w x patch size,
        base_logits (B, 1, h, w) the linear head's output (used when residual) -> (B, 1, H, W)."""
        H, W = image.shape[-2:]
        guide_full = self.guidance(image)
        x = F.leaky_relu(self.reduce(self.norm(feats)), 0.1)
        for i, pac in enumerate(self.stages):
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            guide = F.interpolate(guide_full, size=size, mode="bilinear", align_corners=False,
                                  antialias=True) if size != (H, W) else guide_full
            x = pac(x, guide)
            if i < len(self.stages) - 1:
                x = F.leaky_relu(x, 0.1)
        if x.shape[-2:] != (H, W):
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        if self.spec.residual:
            if base_logits is None:
                raise ValueError("this upsampler is residual: pass the linear head's logits")
            x = x + F.interpolate(base_logits, size=(H, W), mode="bilinear", align_corners=False)
        return x


def upsample_logits(logits: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Patch logits (B, 1, h, w) -> (B, 1, H, W) by "nearest" or "bilinear" interpolation."""
    if mode == "nearest":
        return F.interpolate(logits, size=size, mode="nearest")
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
