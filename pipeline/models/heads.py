"""The trainable models of stage 2: a linear head on patch features and the PAC upsampler
that turns patch-level predictions into a full-resolution mask, guided by the image."""

from __future__ import annotations

import io
import itertools
import math
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError

from ..core.errors import ModelError
from ..core.fingerprints import fingerprint
from ..core.fsutil import atomic_write_bytes, atomic_write_json, sha256_bytes
from ..core.hints import command
from ..core.registry import IMAGENET_MEAN, IMAGENET_STD
from .card import (
    CARD_FILE,
    CARD_VERSION,
    HEAD_FILE,
    LEGACY_FILES,
    UPSAMPLER_FILE,
    model_files,
    read_card,
    verified_bytes,
)
from .pac import PacConv2d


class FeatureNorm(nn.Module):
    """Per-channel standardisation with statistics of the training features (buffers, saved
    with the model), so the heads train the same way whatever the backbone's feature scale."""

    mean: torch.Tensor  # buffers (C,)
    std: torch.Tensor

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-12))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        # in place on the difference: one full-size temporary instead of two
        return (feats - self.mean.view(1, -1, 1, 1)).div_(self.std.view(1, -1, 1, 1))


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
    return image.float().div_(255.0).sub_(mean).div_(std)  # in place: one allocation


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, *size), antialiased bilinear. On CPU this is torch's
    SIMD uint8 path (channels-last, as torchvision resizes images), several times faster than
    resizing the float image; elsewhere the float result is rounded the same way."""
    if image.device.type == "cpu":
        return F.interpolate(
            image.contiguous(memory_format=torch.channels_last),
            size=size,
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
    out = F.interpolate(
        image.float(), size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return out.round_().clamp_(0, 255).to(torch.uint8)


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
    # How an RGB guide reaches each stage's scale: "uint8" resizes the 8-bit image and then
    # normalises it (fast); "float" resizes the normalised image (models saved before the
    # uint8 pyramid, whose cards lack this key). Values differ by rounding to 8 bits.
    pyramid: str = "uint8"
    # "learned": a learned scale per stage of the guide (the PAC kernel's inverse bandwidth)
    bandwidth: str = "fixed"
    # "transposed": each x2 stage a transposed PAC (zeros between the pixels, then a PAC of
    # kernel_size + 2), as pacnet's joint upsampler; "bilinear": bilinear x2, then the PAC
    upsample: str = "bilinear"

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
    bilinearly upsampled linear-head logits, so the upsampler learns a correction;
    `bandwidth`, `upsample`: see UpsamplerSpec."""

    def __init__(self, spec: UpsamplerSpec):
        super().__init__()
        self.spec = spec
        self.norm = FeatureNorm(spec.in_channels)
        self.reduce = nn.Conv2d(spec.in_channels, spec.hidden, kernel_size=1)
        chans = [spec.hidden] + spec.stage_channels()
        k = spec.kernel_size + (2 if spec.upsample == "transposed" else 0)
        self.stages = nn.ModuleList(
            PacConv2d(cin, cout, k, padding=k // 2, normalize=spec.normalize)
            for cin, cout in itertools.pairwise(chans)
        )
        self.guide_net: nn.Sequential | None = None
        if spec.guide == "learned":
            g = spec.guide_channels
            self.guide_net = nn.Sequential(
                nn.Conv2d(3, g, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(g, g, 3, padding=1)
            )
        self.log_bandwidth: nn.Parameter | None = None  # log of each stage's guide scale
        if spec.bandwidth == "learned":
            self.log_bandwidth = nn.Parameter(torch.zeros(len(self.stages)))

    def guidance(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 image (B, 3, H, W) -> guidance features at full resolution."""
        x = normalize_image(image)
        return self.guide_net(x) if self.guide_net is not None else x

    def guide_pyramid(
        self, image: torch.Tensor, sizes: list[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """The guidance at each of `sizes` (antialiased bilinear from the full-size image)."""
        full_size = tuple(image.shape[-2:])
        if self.guide_net is None and self.spec.pyramid == "uint8":
            return [
                normalize_image(image if s == full_size else resize_image(image, s)) for s in sizes
            ]
        full = self.guidance(image)
        return [
            full
            if s == full_size
            else F.interpolate(full, size=s, mode="bilinear", align_corners=False, antialias=True)
            for s in sizes
        ]

    def forward(
        self, feats: torch.Tensor, image: torch.Tensor, base_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """feats (B, C, h, w), image uint8 (B, 3, H, W) with H, W = h, w x patch size,
        base_logits (B, 1, h, w) the linear head's output (used when residual) -> (B, 1, H, W)."""
        H, W = image.shape[-2:]
        h, w = feats.shape[-2:]
        guides = self.guide_pyramid(
            image, [(h << i, w << i) for i in range(1, len(self.stages) + 1)]
        )
        x = F.leaky_relu(self.reduce(self.norm(feats)), 0.1)
        for i, (pac, guide) in enumerate(zip(self.stages, guides, strict=True)):
            x = upsample_x2(x, guide.shape[-2:], self.spec.upsample)
            if self.log_bandwidth is not None:
                guide = guide * self.log_bandwidth[i].exp()
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


def upsample_x2(x: torch.Tensor, size: tuple[int, ...], mode: str) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size), size = 2h, 2w: "bilinear", or "transposed": the input
    at the even pixels, zeros between (the stride-2 transposed convolution's input)."""
    if mode != "transposed":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    z = x.new_zeros((*x.shape[:2], *size))
    z[..., ::2, ::2] = x
    return z


def upsample_logits(logits: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Patch logits (B, 1, h, w) -> (B, 1, H, W) by "nearest" or "bilinear" interpolation."""
    if mode == "nearest":
        return F.interpolate(logits, size=size, mode="nearest")
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- model files


@dataclass
class TrainedModels:
    """Stage 2's output as its consumers see it: the heads, their settings and fingerprint."""

    head: LinearHead
    upsampler: PacUpsampler
    patch_size: int
    fingerprint: str  # of the model files' content
    params: dict[str, Any]  # training_params() at training time
    deps: dict[str, Any]  # the stored splits trained on (content fingerprints)


def save_models(
    model_dir: Path, head: LinearHead, up: PacUpsampler, params: dict, deps: dict, patch_size: int
) -> str:
    """Write the model files (safetensors), then the card that lists their checksums (so a
    reader never sees a half-written set); an earlier version's files go after it. Returns
    the models' content fingerprint."""
    files = {
        HEAD_FILE: safetensors.torch.save(head.state_dict()),
        UPSAMPLER_FILE: safetensors.torch.save(up.state_dict()),
    }
    for name, data in files.items():
        atomic_write_bytes(model_dir / name, data)
    listing = {
        name: {"bytes": len(data), "sha256": sha256_bytes(data)} for name, data in files.items()
    }
    fp = fingerprint(listing)
    atomic_write_json(
        model_dir / CARD_FILE,
        {
            "card_version": CARD_VERSION,
            "fingerprint": fp,
            "files": listing,
            "params": params,
            "deps": deps,
            "head": {"in_channels": head.conv.in_channels, "patch_size": patch_size},
            "upsampler": up.spec.to_dict(),
        },
    )
    for name in LEGACY_FILES:
        (model_dir / name).unlink(missing_ok=True)
    return fp


def load_models(model_dir: Path, device: torch.device | str = "cpu") -> TrainedModels:
    """The trained models in `model_dir`, verified against their card and read without
    unpickling; ModelError naming `train-head` when they are absent or damaged."""
    model_dir = Path(model_dir)
    repair = f"run `{command('train-head')}`"
    card, why = read_card(model_dir)
    if card is None:
        raise ModelError(
            f"{why} in {model_dir}: {repair}" if why == "no trained models" else f"{why}: {repair}"
        )
    names = model_files(card)
    states = []
    for name in names:
        data, why = verified_bytes(model_dir, card, name)
        if data is None:
            raise ModelError(f"{why}: {repair}")
        try:
            states.append(
                safetensors.torch.load(data)
                if name not in LEGACY_FILES
                else torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)[
                    "state_dict"
                ]
            )
        except (
            pickle.UnpicklingError,
            SafetensorError,
            RuntimeError,
            zipfile.BadZipFile,
            EOFError,
            KeyError,
            TypeError,
            ValueError,
        ) as e:
            raise ModelError(
                f"{model_dir / name}: not a model file ({type(e).__name__}): {repair}"
            ) from None
    try:
        head = LinearHead(int(card["head"]["in_channels"]))
        head.load_state_dict(states[0])
        up = PacUpsampler(UpsamplerSpec(**{"pyramid": "float", **card["upsampler"]}))
        up.load_state_dict(states[1])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelError(
            f"{model_dir}: models do not match their card ({type(e).__name__}): {repair}"
        ) from None
    return TrainedModels(
        head.to(device).eval(),
        up.to(device).eval(),
        int(card["head"]["patch_size"]),
        card["fingerprint"],
        card["params"],
        card["deps"],
    )
