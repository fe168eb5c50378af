"""Frozen feature extractors, built from the backbone registry (pipeline/core/registry.py: each
name's spec, torch-free) by the builders here, keyed by the spec's `builder` and registered
with `@builder` (timm's `register_model` style). `Backbone.forward` takes a uint8 batch and
returns the patch-feature map (B, h, w, C); normalisation runs on the tensor's device, so GPU
users send uint8 over PCIe. The ViTs are timm modules run with DINO's / DINOv2's own
position-embedding rule at sizes other than the trained one (models/positions.py:
`vit_forward_features`). Weights files are read, and published weights downloaded, by
models/weights.py (never unpickling arbitrary objects).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..core.errors import EnvironmentProblem
from ..core.keys import weights_file
from ..core.registry import BackboneSpec, check_layers, get_spec
from .positions import vit_forward_features
from .weights import load_checkpoint, pretrained_model

if TYPE_CHECKING:  # timm is imported when a ViT is built (it takes a second)
    from timm.models.vision_transformer import VisionTransformer


class Backbone(nn.Module):
    """A frozen model plus its spec: uint8 images (B, 3, H, W) -> features (B, h, w, C).
    The model is a timm ViT (`ViTBackbone`) or a CNN (`CNNBackbone`)."""

    kind = ""  # "vit" | "cnn"
    channels_last = False
    mean: torch.Tensor  # buffers (1, 3, 1, 1), in uint8 units
    std: torch.Tensor

    def __init__(self, spec: BackboneSpec, layers: int = 1, channels: int | None = None):
        super().__init__()
        self.spec = spec
        self.layers = layers  # backbone.layers: outputs concatenated into the features
        self.channels = channels or spec.embed_dim  # C of the feature map
        self.register_buffer(
            "mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0, persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0, persistent=False
        )

    def optimize_for_inference(self) -> Backbone:
        """Speed-ups that keep the function (CNNs: see CNNBackbone; none for ViTs)."""
        return self

    def feature_shape(self, height: int, width: int) -> tuple[int, int, int]:
        p = self.spec.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
        return height // p, width // p, self.channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected a uint8 batch (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        B, _, H, W = images.shape
        h, w, _ = self.feature_shape(H, W)
        x = (images.float() - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.feature_map(x, B, h, w)

    def feature_map(self, x: torch.Tensor, B: int, h: int, w: int) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> features (B, h, w, C)."""
        raise NotImplementedError


class ViTBackbone(Backbone):
    kind = "vit"

    def __init__(
        self,
        spec: BackboneSpec,
        model: VisionTransformer,
        layers: int = 1,
        channels: int | None = None,
    ):
        super().__init__(spec, layers, channels)
        self.model = model

    def feature_map(self, x: torch.Tensor, B: int, h: int, w: int) -> torch.Tensor:
        tokens = vit_forward_features(self.model, x, self.layers)  # after the final norm
        tokens = tokens[:, self.model.num_prefix_tokens :]  # drop CLS and register tokens
        return tokens.reshape(B, h, w, -1)


class CNNBackbone(Backbone):
    kind = "cnn"

    def __init__(
        self, spec: BackboneSpec, model: nn.Module, layers: int = 1, channels: int | None = None
    ):
        super().__init__(spec, layers, channels)
        self.model = model

    def optimize_for_inference(self) -> Backbone:
        """BatchNorm folded into the convolutions and channels-last memory layout (both
        faster on CPU and GPU)."""
        from torch.fx.experimental.optimization import fuse

        self.model = fuse(self.model.eval())
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def feature_map(
        self,
        x: torch.Tensor,
        B: int,  # noqa: ARG002
        h: int,  # noqa: ARG002
        w: int,  # noqa: ARG002
    ) -> torch.Tensor:  # (the convolutions' output has its grid already)
        return self.model(x).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------- builders

Builder = Callable[[BackboneSpec, bool], nn.Module]  # (spec, pretrained) -> the model
BUILDERS: dict[str, Builder] = {}


def builder(key: str) -> Callable[[Builder], Builder]:
    """Register a builder under `key`, the `builder` of the registry entries it makes."""

    def register(fn: Builder) -> Builder:
        BUILDERS[key] = fn
        return fn

    return register


def _vision_mismatch(e: BaseException) -> bool:
    """Whether `e`, raised by importing torchvision (or timm, which imports it), says that
    the installed torchvision was built for another torch: its C++ operators do not register
    (`operator torchvision::nms does not exist`) or its extension does not link."""
    text = str(e)
    return ("torchvision::" in text and "does not exist" in text) or (
        isinstance(e, (ImportError, OSError))
        and "torchvision" in text
        and "undefined symbol" in text
    )


def vision_mismatch_line(cause: str) -> str:
    """The one line for a torchvision built for another torch (`cause`: the import's error
    line): both versions and the fix."""
    from importlib import metadata

    try:
        vision = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        vision = "?"
    version = torch.__version__.split("+")[0]
    major, minor = (version.split(".") + ["0"])[:2]
    # torch 2.N pairs with torchvision 0.(N + 15) (2.0 with 0.15, ..., 2.14 with 0.29)
    match = (
        f"torchvision==0.{int(minor) + 15}.*" if major == "2" and minor.isdigit() else "torchvision"
    )
    cuda = getattr(torch.version, "cuda", None)
    index = f"cu{cuda.replace('.', '')}" if cuda else "cpu"
    return (
        f"torchvision {vision} was built for another torch than the installed torch "
        f"{torch.__version__} ({cause}); install the two "
        f"from one index: python -m pip install --force-reinstall torch=={version} "
        f"'{match}' --index-url https://download.pytorch.org/whl/{index}"
    )


def import_vision(module: str) -> ModuleType:
    """`module` (timm, torchvision or one of their submodules) imported, with a torchvision
    built for another torch reported as EnvironmentProblem in one line (vision_mismatch_line)
    instead of a traceback from deep inside the import. Imported here, lazily: commands that
    build no backbone never import them."""
    try:
        return importlib.import_module(module)
    except (RuntimeError, ImportError, OSError) as e:
        if _vision_mismatch(e):
            cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EnvironmentProblem(vision_mismatch_line(cause)) from None
        raise


@builder("timm")
def _build_timm(spec: BackboneSpec, pretrained: bool) -> nn.Module:
    timm = import_vision("timm")
    return timm.create_model(
        spec.source.split(":", 1)[1], pretrained=pretrained, num_classes=0, dynamic_img_size=True
    )


@builder("torchvision:mobilenet_v2")
def _build_mobilenet(spec: BackboneSpec, pretrained: bool) -> nn.Module:  # noqa: ARG001
    # (a Builder's signature: this builder makes one network, whatever the spec)
    torchvision = import_vision("torchvision")
    model = torchvision.models.mobilenet_v2(weights=None)
    if pretrained:  # not mobilenet_v2(weights=...): torchvision's own download unpickles the file
        weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
        model.load_state_dict(
            weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
        )
    return model.features


class MobileNetTaps(nn.Module):
    """The first blocks of mobilenet_v2's `features` -> the outputs of the blocks in `taps`,
    concatenated along the channels. The stride-2 convolution after the stride-16 output
    runs with stride 1 and the later 3x3 convolutions with dilation 2 (DeepLab's output
    stride 16), so every tapped output is on the same 1/16 grid."""

    def __init__(self, features: nn.Sequential, taps: tuple[int, ...]):
        super().__init__()
        self.blocks = features[: taps[-1] + 1]
        self.taps = taps
        for i in range(14, len(self.blocks)):
            for m in self.blocks[i].modules():
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                    if i == 14:
                        m.stride = (1, 1)
                    else:
                        m.dilation, m.padding = (2, 2), (2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                outs.append(x)
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def create_backbone(name: str, weights: str, layers: int = 1) -> Backbone:
    """A frozen backbone in eval mode. `weights`: "pretrained" (download), "random" (seeded,
    global RNG untouched), or a local checkpoint file; `layers`: backbone.layers."""
    spec = get_spec(name)
    build = BUILDERS[spec.builder]
    check_layers(name, layers, layers)
    path = None
    if weights not in ("pretrained", "random"):
        path, _ = weights_file(weights)
    with torch.random.fork_rng(devices=[]):  # model init never touches the caller's RNG
        torch.manual_seed(0)
        model = pretrained_model(spec, build) if weights == "pretrained" else build(spec, False)
    if spec.kind == "cnn":
        if not isinstance(model, nn.Sequential):
            raise TypeError(
                f"{name}: expected its blocks in an nn.Sequential, got {type(model).__name__}"
            )
        features = model[: spec.taps[layers - 1] + 1]
        if path is not None:
            load_checkpoint(features, path, spec)
        cnn = MobileNetTaps(features, spec.taps[:layers]) if layers > 1 else features
        cnn.eval().requires_grad_(False)
        return CNNBackbone(spec, cnn, layers, spec.channels(layers)).eval()
    vit = _as_vit(name, model)
    if path is not None:
        load_checkpoint(vit, path, spec)
    vit.eval().requires_grad_(False)
    return ViTBackbone(spec, vit, layers, spec.channels(layers)).eval()


def _as_vit(name: str, model: nn.Module) -> VisionTransformer:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{name}: expected a timm VisionTransformer, got {type(model).__name__}")
    return model
