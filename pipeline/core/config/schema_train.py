"""The [train] and [upsampler] sections of the config (sections of ``schema.Config``,
declared with ``meta.key`` like every other): stage 2's training schedule and losses, and the
PAC upsampler's design. A change of any of them retrains (stage 2) and predicts again."""

from __future__ import annotations

from dataclasses import dataclass

from .meta import DEVICE_HELP, STALE_SPEED, STALE_TRAINED, Range, key

__all__ = ["TrainCfg", "UpsamplerCfg"]


@dataclass
class TrainCfg:
    lr: float = key(
        2e-3,
        "PAC upsampler learning rate (AdamW, cosine schedule).",
        stale=STALE_TRAINED,
        range=Range(0, 10, lo_open=True),
        see="design.md#the-upsampler",
    )
    linear_lr: float = key(
        1e-2,
        "Linear head learning rate (AdamW).",
        stale=STALE_TRAINED,
        range=Range(0, 10, lo_open=True),
    )
    epochs: int = key(
        20,
        "PAC upsampler epochs.",
        stale=STALE_TRAINED,
        range=Range(1, 100_000),
        see="design.md#the-upsampler",
    )
    linear_epochs: int = key(
        30, "Linear head epochs (cheap: patch level).", stale=STALE_TRAINED, range=Range(0, 100_000)
    )
    batch_size: int = key(
        4,
        "Images per optimiser step (unlike the other batch sizes, this one changes the result).",
        stale=STALE_TRAINED,
        range=Range(1, 4096),
    )
    crop: int = key(
        320,
        "Side of the random training crops in pixels, rounded down to whole patches; "
        "`0` = whole images.",
        stale=STALE_TRAINED,
        range=Range(0, 8192),
    )
    weight_decay: float = key(
        1e-4, "AdamW weight decay of both models.", stale=STALE_TRAINED, range=Range(0, 10)
    )
    boundary_weight: float = key(
        0.0,
        "Extra loss weight on pixels within 3 px of the mask boundary (PAC upsampler).",
        stale=STALE_TRAINED,
        range=Range(0, 1000),
    )
    region_loss: str = key(
        "none",
        "A region term beside the BCE of both heads: soft `dice` or the `lovasz` hinge.",
        stale=STALE_TRAINED,
        choices=("none", "dice", "lovasz"),
        see="design.md#losses-and-upsampler-options",
    )
    region_weight: float = key(
        1.0, "Weight of `train.region_loss`.", stale=STALE_TRAINED, range=Range(0, 1000)
    )
    seed: int = key(
        0,
        "Seed of the initialisation, image order and crops.",
        stale=STALE_TRAINED,
        range=Range(0, 2**32 - 1),
    )
    device: str = key(
        "auto",
        "Device of training (`auto`: CUDA when there is a GPU).",
        stale=STALE_SPEED,
        allowed=DEVICE_HELP,
    )


# the PAC stages run at up to full resolution: beyond these, one training epoch of a 480p
# dataset takes minutes and its checkpoint a GB (1024 channels, 15 x 15: 1 GB)
@dataclass
class UpsamplerCfg:
    hidden: int = key(
        16,
        "Channels of the 1x1 conv applied to the features.",
        stale=STALE_TRAINED,
        range=Range(1, 256),
    )
    channels: list[int] = key(
        [4, 4, 4, 1],
        "Output channels of the PAC stages, one x2 stage per factor of two of "
        "the patch size (4 for patch 16, 3 for 14 and 8; the last entries are used).",
        stale=STALE_TRAINED,
        range=Range(1, 256),
        length=Range(1, 8),
    )
    kernel_size: int = key(3, "PAC kernel size.", stale=STALE_TRAINED, range=Range(1, 11), odd=True)
    guide: str = key(
        "rgb",
        "What guides the PAC kernels: the image (`rgb`, as in the course) or a small "
        "conv net on it (`learned`).",
        stale=STALE_TRAINED,
        choices=("rgb", "learned"),
    )
    guide_channels: int = key(
        8, "Output channels of the `learned` guide.", stale=STALE_TRAINED, range=Range(1, 64)
    )
    residual: bool = key(
        True,
        "Add the bilinearly upsampled linear-head logits to the output, so that the "
        "upsampler learns a correction (`false`: the course design).",
        stale=STALE_TRAINED,
        see="design.md#the-upsampler",
    )
    normalize: bool = key(False, "Normalise the PAC kernels.", stale=STALE_TRAINED)
    bandwidth: str = key(
        "fixed",
        "The PAC kernels' bandwidth on the guide: `fixed` or `learned` (a scale per stage).",
        stale=STALE_TRAINED,
        choices=("fixed", "learned"),
        see="design.md#losses-and-upsampler-options",
    )
    upsample: str = key(
        "bilinear",
        "Each x2 stage: `bilinear` then a PAC (the course), or a `transposed` PAC (pacnet).",
        stale=STALE_TRAINED,
        choices=("bilinear", "transposed"),
        see="design.md#losses-and-upsampler-options",
    )
