"""The backbone registry: every backbone the tool offers, as data, in one place (timm's
`register_model` style: one `register` call per name). Each entry carries its kind, patch
size, channels, normalisation, the builder that makes the model, its default and maximum
`backbone.layers` and, for a CNN, the blocks tapped for them, plus where its official weights
are published. Importable without torch: config validation (`config show`) reads it, and
pipeline/models/backbones.py builds the models from it (its builders keyed by `builder`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BackboneError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

KINDS = ("vit", "cnn")


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    kind: str  # "vit": a timm VisionTransformer | "cnn": a torchvision network's blocks
    patch_size: int  # output stride; images are cropped/padded to a multiple of it
    embed_dim: int  # C of the one-layer feature map
    source: str  # "timm:<model>" or "torchvision:<model>"
    builder: str  # the key of backbones.BUILDERS whose function makes the model
    checkpoint_hint: str  # the file a user offline should download and pass
    checkpoint_url: str  # where that file is published (its key format is the one read)
    # backbone.layers: 1 to max_layers; 0 ("auto") means default_layers. A ViT concatenates
    # its last N blocks' outputs (max: its depth); a CNN the outputs of its first N `taps`
    # (blocks of its `features`), whose channels are `tap_channels`.
    max_layers: int = 1
    default_layers: int = 1
    taps: tuple[int, ...] = ()
    tap_channels: tuple[int, ...] = ()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "cnn" and not (
            len(self.taps) == len(self.tap_channels) == self.max_layers
            and self.tap_channels[0] == self.embed_dim
        ):
            raise ValueError(f"{self.name}: a CNN has one tap (and its channels) per layer")
        if not 1 <= self.default_layers <= self.max_layers:
            raise ValueError(
                f"{self.name}: default layers {self.default_layers} not in 1 to {self.max_layers}"
            )

    def channels(self, layers: int) -> int:
        """C of the feature map with `layers` layers concatenated."""
        return sum(self.tap_channels[:layers]) if self.kind == "cnn" else self.embed_dim * layers


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add `spec` to the registry (a name is registered once)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


VIT_S_DEPTH = 12  # blocks of the ViT-S models below
DINO_URL = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"  # the original DINO release
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{0}/{0}_pretrain.pth"

register(
    BackboneSpec(
        "dino_vits16",
        "vit",
        16,
        384,
        "timm:vit_small_patch16_224.dino",
        "timm",
        "dino_deitsmall16_pretrain.pth",
        DINO_URL.format("dino_deitsmall16_pretrain"),
        max_layers=VIT_S_DEPTH,
    )
)
register(
    BackboneSpec(
        "dino_vits8",
        "vit",
        8,
        384,
        "timm:vit_small_patch8_224.dino",
        "timm",
        "dino_deitsmall8_pretrain.pth",
        DINO_URL.format("dino_deitsmall8_pretrain"),
        max_layers=VIT_S_DEPTH,
    )
)
register(
    BackboneSpec(
        "dinov2_vits14",
        "vit",
        14,
        384,
        "timm:vit_small_patch14_dinov2.lvd142m",
        "timm",
        "dinov2_vits14_pretrain.pth",
        DINOV2_URL.format("dinov2_vits14"),
        max_layers=VIT_S_DEPTH,
    )
)
# mobilenet_v2's stride-16 output is features[13] (96 channels); backbone.layers = N adds the
# outputs of the next N - 1 stages (160, 320 and 1280 channels), kept at stride 16. Its
# default, 2, was measured with stage 3's report on both shared datasets (benchmarks/
# RESULTS.md, "Feature layers and flip TTA"); the ViTs could not be measured offline (no DINO
# weights): 1.
register(
    BackboneSpec(
        "mobilenet_v2",
        "cnn",
        16,
        96,
        "torchvision:mobilenet_v2",
        "torchvision:mobilenet_v2",
        "a torchvision mobilenet_v2 state dict (.pth)",
        "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        max_layers=4,
        default_layers=2,
        taps=(13, 16, 17, 18),
        tap_channels=(96, 160, 320, 1280),
    )
)


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def specs() -> list[BackboneSpec]:
    """Every registered backbone, by name."""
    return [_REGISTRY[n] for n in list_backbones()]


def get_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackboneError(
            f"unknown backbone {name!r} (one of {', '.join(list_backbones())})"
        ) from None


def max_layers(name: str) -> int:
    """The largest backbone.layers a backbone offers."""
    return get_spec(name).max_layers


def most_layers() -> int:
    """The largest backbone.layers any backbone offers (the key's fixed range)."""
    return max(s.max_layers for s in _REGISTRY.values())


def resolve_layers(name: str, layers: int) -> int:
    """backbone.layers as a number: 0 -> the backbone's measured default. A ConfigError
    (usage error) naming the key and the backbone's range when the backbone has fewer
    layers: every command computes the feature key through here before it looks for a store,
    so an impossible value is never mistaken for a missing stage 1."""
    resolved = layers or get_spec(name).default_layers
    check_layers(name, layers, resolved)
    return resolved


def check_layers(name: str, layers: int, resolved: int) -> None:
    """ConfigError unless `resolved` (backbone.layers `layers`, 0 resolved) is 1 to
    max_layers(name)."""
    spec = get_spec(name)
    if not 1 <= resolved <= spec.max_layers:
        raise ConfigError(
            f"bad value for backbone.layers: {layers} ({name} offers 1 to "
            f"{spec.max_layers}; 0 = its default, {spec.default_layers})"
        )
