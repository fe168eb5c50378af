"""Each mask variant's logits from the trained models (core.variants.VARIANTS): the linear
head's upsampled by nearest / bilinear interpolation, the PAC upsampler's, and the refined
variants (core.variants.REFINED: models.refine on their source's logits, with the image),
the mirror image's averaged in (predict.tta = "flip") and each variant's seconds measured.
inference.Predictor thresholds them; this is the one place a variant is computed."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

from ..core.keys import RefineKey
from ..core.variants import REFINED
from .heads import TrainedModels, upsample_logits
from .refine import refine_logits

__all__ = ["VariantSeconds", "variant_logits"]


class VariantSeconds:
    """Seconds each variant's logits took, summed over the images predicted: a variant's
    heads from features to logits (its source's too, for a refined variant) and its
    refinement. Safe to add to from several threads (models.devices.CpuFanout)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.images = 0

    def add(self, seconds: dict[str, float], images: int) -> None:
        """Add one batch's `seconds` per variant, for its `images` images."""
        with self._lock:
            for v, s in seconds.items():
                self.seconds[v] = self.seconds.get(v, 0.0) + s
            self.images += images


def _clock(device: torch.device) -> float:
    """perf_counter once the device's queued kernels ran (their time, not their launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _plain(
    models: TrainedModels,
    f: torch.Tensor,
    img: torch.Tensor,
    variants: Sequence[str],
    seconds: dict[str, float],
) -> dict[str, torch.Tensor]:
    """The unrefined variants' logits (B, 1, H', W') at canvas size, one variant at a time
    (each with its own linear head pass, a 1 x 1 convolution at patch level), the seconds
    each took added to `seconds`."""
    size = (img.shape[-2], img.shape[-1])
    compute = {
        "linear_nearest": lambda: upsample_logits(models.head(f), size, "nearest"),
        "linear_bilinear": lambda: upsample_logits(models.head(f), size, "bilinear"),
        "pac": lambda: models.upsampler(f, img, models.head(f)),
    }
    out = {}
    for v in variants:
        t0 = _clock(img.device)
        out[v] = compute[v]()
        seconds[v] = seconds.get(v, 0.0) + _clock(img.device) - t0
    return out


def variant_logits(
    models: TrainedModels,
    f: torch.Tensor,
    img: torch.Tensor,
    variants: Sequence[str],
    mirrored: torch.Tensor | None = None,
    refine: RefineKey | None = None,
    timing: VariantSeconds | None = None,
) -> dict[str, torch.Tensor]:
    """Each of `variants`' logits (B, 1, H', W') at canvas size from the patch features `f`
    (B, C, h, w) and the canvases `img` (B, 3, H', W', uint8): with `mirrored` (the mirrored
    canvases' features) each unrefined variant's logits averaged with the mirror image's,
    mirrored back, and a refined variant refining its source's averaged logits with the
    settings `refine` (None: models.refine's own defaults). `timing`: where each
    variant's seconds are added."""
    seconds: dict[str, float] = {}
    plain = list(dict.fromkeys(REFINED[v][0] if v in REFINED else v for v in variants))
    logits = _plain(models, f, img, plain, seconds)
    if mirrored is not None:
        flipped = _plain(models, mirrored, img.flip(-1), plain, seconds)
        logits = {v: (logits[v] + flipped[v].flip(-1)).mul_(0.5) for v in plain}
    for v in variants:
        if v in REFINED:
            source, refiner = REFINED[v]
            t0 = _clock(img.device)
            kwargs = refine.kwargs(refiner) if refine is not None else {}
            logits[v] = refine_logits(refiner, logits[source], img, **kwargs)
            seconds[v] = seconds[source] + _clock(img.device) - t0
    if timing is not None:
        timing.add({v: seconds[v] for v in variants}, img.shape[0])
    return {v: logits[v] for v in variants}
