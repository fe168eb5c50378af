"""Frozen feature extractors, built from the backbone registry (pipeline/core/registry.py: each
name's spec, torch-free) by the builders here, keyed by the spec's `builder` and registered
with `@builder` (timm's `register_model` style). `Backbone.forward` takes a uint8 batch and
returns the patch-feature map (B, h, w, C); normalisation runs on the tensor's device, so GPU
users send uint8 over PCIe. The ViTs are timm modules run with DINO's / DINOv2's own
position-embedding rule at sizes other than the trained one (`vit_forward_features`).
Weights files are read without unpickling arbitrary objects: torch.load(weights_only=True)
or safetensors.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from safetensors import SafetensorError

from ..core.errors import BackboneError, EnvironmentProblem
from ..core.keys import weights_file
from ..core.registry import BackboneSpec, check_layers, get_spec

if TYPE_CHECKING:  # timm is imported when a ViT is built (it takes a second)
    from timm.models.vision_transformer import VisionTransformer

# DINO / DINOv2's work-around offset in the position-embedding interpolation (their
# `interpolate_offset`, 0.1 in the released models; facebookresearch/dino issue #8)
POS_INTERPOLATE_OFFSET = 0.1

# heads and classifiers that checkpoints may carry and a feature extractor does not use
_DROP_PREFIXES = ("head.", "head_dist.", "fc_norm.", "classifier.", "mask_token")


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
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0,
                             persistent=False)

    def optimize_for_inference(self, device: torch.device) -> Backbone:
        """Speed-ups that keep the function (CNNs: see CNNBackbone; none for ViTs)."""
        return self

    def feature_shape(self, height: int, width: int) -> tuple[int, int, int]:
        p = self.spec.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch "
                             f"size {p}")
        return height // p, width // p, self.channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a uint8 batch (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
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

    def __init__(self, spec: BackboneSpec, model: VisionTransformer, layers: int = 1,
                 channels: int | None = None):
        super().__init__(spec, layers, channels)
        self.model = model

    def feature_map(self, x: torch.Tensor, B: int, h: int, w: int) -> torch.Tensor:
        tokens = vit_forward_features(self.model, x, self.layers)  # after the final norm
        tokens = tokens[:, self.model.num_prefix_tokens:]  # drop CLS and register tokens
        return tokens.reshape(B, h, w, -1)


class CNNBackbone(Backbone):
    kind = "cnn"

    def __init__(self, spec: BackboneSpec, model: nn.Module, layers: int = 1,
                 channels: int | None = None):
        super().__init__(spec, layers, channels)
        self.model = model

    def optimize_for_inference(self, device: torch.device) -> Backbone:
        """BatchNorm folded into the convolutions and channels-last memory layout (both
        faster on CPU and GPU)."""
        from torch.fx.experimental.optimization import fuse
        self.model = fuse(self.model.eval())
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def feature_map(self, x: torch.Tensor, B: int, h: int, w: int) -> torch.Tensor:
        return self.model(x).permute(0, 2, 3, 1)


def official_pos_embed(pos_embed: torch.Tensor, num_prefix: int,
                       grid: tuple[int, int]) -> torch.Tensor:
    """The position embeddings (1, num_prefix + h*w, C) for a grid of h x w patches, resized
    as DINO and DINOv2 do (`interpolate_pos_encoding`): bicubic, align_corners=False, no
    antialias, with `scale_factor=((h + 0.1) / M, (w + 0.1) / M)` (not an output size: the
    sampling positions follow that scale), in float32; unchanged at the trained M x M grid.
    timm's dynamic_img_size resizes to the exact size with antialiasing instead, which moves
    the final features (e.g. by up to 1.4e-2 for ViT-S/16 with random weights at 480x848)."""
    h, w = grid
    n = pos_embed.shape[1] - num_prefix
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position embeddings of {n} patches are not a square grid")
    if torch.compiler.is_exporting():
        return _exportable_pos_embed(pos_embed, num_prefix, m, grid)
    if (h, w) == (m, m):
        return pos_embed
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, num_prefix:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    patch = nn.functional.interpolate(
        patch, scale_factor=((h + POS_INTERPOLATE_OFFSET) / m, (w + POS_INTERPOLATE_OFFSET) / m),
        mode="bicubic", align_corners=False)
    if tuple(patch.shape[-2:]) != (h, w):  # the offset makes floor(m * scale) == h, w
        raise RuntimeError(f"position embeddings resized to {tuple(patch.shape[-2:])}, "
                           f"not {(h, w)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat((pos_embed[:, :num_prefix], patch), dim=1)


_CUBIC_A = -0.75  # the bicubic convolution constant of torch's (and OpenCV's) "bicubic" mode


def _dino_resize_matrix(size: int, m: int, identity: torch.Tensor) -> torch.Tensor:
    """(size, m) float64: row y holds the bicubic taps that `official_pos_embed`'s resize
    (scale factor (size + 0.1) / m, align_corners=False, borders clamped) gives output y,
    or the identity rows where `identity` (a bool tensor: the trained grid) holds. The size
    enters as a tensor, never as a Python float, so torch.export keeps it symbolic."""
    dst = torch.arange(size, dtype=torch.float64, device=identity.device)
    n = dst[-1:] + 1  # `size` as a tensor
    src = (dst + 0.5) * (m / (n + POS_INTERPOLATE_OFFSET)) - 0.5
    i0 = src.floor()
    t = src - i0
    u = 1 - t
    a = _CUBIC_A
    taps = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * u - (a + 3)) * u * u + 1,
            ((a * (u + 1) - 5 * a) * (u + 1) + 8 * a) * (u + 1) - 4 * a)
    i0 = i0.long()
    mat = sum(nn.functional.one_hot((i0 + k - 1).clamp(0, m - 1), m).double() * wk[:, None]
              for k, wk in enumerate(taps))
    eye = nn.functional.one_hot(torch.arange(size, device=identity.device).clamp(max=m - 1),
                                m).double()
    return torch.where(identity, eye, mat)


def _exportable_pos_embed(pos_embed: torch.Tensor, num_prefix: int, m: int,
                          grid: tuple[int, int]) -> torch.Tensor:
    """`official_pos_embed` for torch.export, where the grid size is symbolic: the same
    resize written as two interpolation matrices (float64), with no Python branch or float
    on the grid size (F.interpolate's scale factor would be frozen to the example's grid).
    Agrees with the eager resize to float32 rounding (a few parts in a million: torch's
    kernel computes the sampling positions in float32), not bit for bit, which is why the
    eager path keeps torch's kernel (the feature cache's values)."""
    h, w = grid
    dim = pos_embed.shape[-1]
    rows = torch.arange(h, device=pos_embed.device)  # on the embeddings' device, not cpu
    cols = torch.arange(w, device=pos_embed.device)
    trained = ((rows[-1:] + 1) == m) & ((cols[-1:] + 1) == m)  # both sides at the trained grid
    patch = pos_embed[0, num_prefix:].double().reshape(m, m, dim)
    out = torch.einsum("yi,ijc,xj->yxc", _dino_resize_matrix(h, m, trained), patch,
                       _dino_resize_matrix(w, m, trained))
    return torch.cat((pos_embed[:, :num_prefix], out.reshape(1, h * w, dim).to(pos_embed.dtype)),
                     dim=1)


def vit_forward_features(model: VisionTransformer, x: torch.Tensor,
                         layers: int = 1) -> torch.Tensor:
    """timm's VisionTransformer.forward_features (all tokens, after the final norm) with the
    position embeddings resized by the official DINO / DINOv2 rule (`official_pos_embed`)
    instead of timm's; the same modules, so timm checkpoints load unchanged. With `layers`
    > 1, the outputs of the last `layers` blocks, each through the final norm, concatenated
    along the channels in block order (DINO's and DINOv2's `get_intermediate_layers(n,
    norm=True)`, as their linear evaluations use them)."""
    pos_embed = model.pos_embed
    if pos_embed is None:
        raise BackboneError("a ViT without position embeddings (timm's pos_embed='none') is not "
                            "supported")
    tokens = model.patch_embed(x)  # (B, h, w, C) with dynamic_img_size (NHWC), else (B, h*w, C)
    if tokens.ndim == 4:
        grid = (tokens.shape[1], tokens.shape[2])
        tokens = tokens.flatten(1, 2)
    else:
        p = model.patch_embed.patch_size
        grid = (x.shape[-2] // p[0], x.shape[-1] // p[1])
    prefix = [t.expand(tokens.shape[0], -1, -1) for t in (model.cls_token, model.reg_token)
              if t is not None]
    if model.no_embed_class:  # position embeddings for the patches only: add, then concat
        tokens = tokens + official_pos_embed(pos_embed, 0, grid)
        tokens = torch.cat(prefix + [tokens], dim=1)
    else:  # DINO / DINOv2 (and original timm): concat, then add (the CLS token has its own)
        tokens = torch.cat(prefix + [tokens], dim=1)
        tokens = tokens + official_pos_embed(pos_embed, model.num_prefix_tokens, grid)
    tokens = model.pos_drop(tokens)
    tokens = model.patch_drop(tokens)
    tokens = model.norm_pre(tokens)
    if layers == 1:
        return model.norm(model.blocks(tokens))
    first, outs = len(model.blocks) - layers, []
    for i, block in enumerate(model.blocks):
        tokens = block(tokens)
        if i >= first:
            outs.append(model.norm(tokens))
    return torch.cat(outs, dim=-1)


# ----------------------------------------------------------------------------- weights

# What torch.load(weights_only=True) raises on a damaged or foreign file: the zip reader
# (RuntimeError, BadZipFile), the file (OSError, EOFError), the weights-only unpickler
# reading garbage (IndexError/KeyError on its stack and memo, struct.error, TypeError,
# UnicodeDecodeError) and the legacy format's storage lookup (AssertionError "storage key
# ... not found"; found by fuzzing). UnpicklingError is handled apart: the safe loader's refusal.
_UNREADABLE = (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, LookupError,
               TypeError, struct.error, AssertionError)

# The only non-tensor type a checkpoint may contain: DINO's training checkpoints pickle their
# command line (`args`) as an argparse.Namespace.
_SAFE_GLOBALS: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [argparse.Namespace]


def _is_safetensors(path: Path) -> bool:
    """By suffix, or by content: an 8-byte little-endian header length, then a JSON object
    (a torch checkpoint starts with a zip or pickle header instead)."""
    if path.suffix.lower() == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint's top-level dict, read without ever unpickling arbitrary objects:
    safetensors, or torch.load(weights_only=True) with argparse.Namespace allowed. Anything
    the safe loader refuses is refused here too, in one line (no fallback)."""
    if _is_safetensors(path):
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise BackboneError(f"{path}: not a readable .safetensors file "
                                f"({_first_line(e)})") from None
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BackboneError(f"{path}: refused: loading it would need unpickling arbitrary objects "
                            f"({_refusal_reason(e)}); only tensors and plain containers are read. "
                            "Where you trust the file, convert it to a plain state dict "
                            "(torch.save(model.state_dict(), ...)) or to .safetensors") from None
    except _UNREADABLE as e:
        raise BackboneError(f"{path}: not a readable checkpoint ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise BackboneError(f"{path}: not a state dict (found {type(obj).__name__})")
    return obj


def _refusal_reason(e: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, in a few words: "Unsupported global: GLOBAL
    builtins.exec", or its own reason ("Unsupported operand 149", ...)."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL [\w.<>]+", text)
    if m:
        return m.group(0)
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return m.group(1).strip()[:160] if m else "the safe loader refused it"


def extract_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """The backbone's tensors from any of the accepted checkpoint formats: a plain state
    dict, {"state_dict"|"model": ...} wrappers, or a DINO training checkpoint (the teacher),
    with `module.` / `backbone.` prefixes removed and head keys dropped."""
    for key in ("teacher", "state_dict", "model", "student"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        stripped = True
        while stripped:  # any order and repetition of wrapper prefixes
            stripped = False
            for prefix in ("module.", "backbone.", "_orig_mod."):
                if k.startswith(prefix):
                    k, stripped = k[len(prefix):], True
        if k.startswith(_DROP_PREFIXES):
            continue
        out[k] = v
    return out


def _load_into(model: nn.Sequential | VisionTransformer, state: dict[str, torch.Tensor],
               path: Path, spec: BackboneSpec) -> None:
    own = model.state_dict()
    if isinstance(model, nn.Sequential):  # torchvision's features[:n]: keys "0.conv..."
        state = {k[len("features."):] if k.startswith("features.") else k: v
                 for k, v in state.items()}
        state = {k: v for k, v in state.items()
                 if not (k.split(".", 1)[0].isdigit() and int(k.split(".", 1)[0]) >= len(model))}
    for k in own:  # old BatchNorm checkpoints lack the (unused in eval) batch counters
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise BackboneError(f"{path}: not a {spec.name} checkpoint: missing {len(missing)} keys "
                            f"(e.g. {', '.join(missing[:3])})")
    if unexpected:
        raise BackboneError(f"{path}: unexpected keys for {spec.name} "
                            f"(e.g. {', '.join(unexpected[:3])})")
    for k, v in state.items():
        if v.shape != own[k].shape and k != "pos_embed":
            raise BackboneError(f"{path}: shape mismatch for {k}: checkpoint {tuple(v.shape)}, "
                                f"{spec.name} {tuple(own[k].shape)}")
    if (not isinstance(model, nn.Sequential)  # (a ViT: only they have position embeddings)
            and "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape):
        # a checkpoint trained at another resolution: interpolate its position embeddings
        from timm.layers import resample_abs_pos_embed
        n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=model.patch_embed.grid_size, num_prefix_tokens=n_prefix)
    model.load_state_dict(state, strict=True)


def _first_line(e: BaseException, limit: int = 400) -> str:
    """`e`'s type and the first line of its message, whole (a library's sentence, not cut
    mid-word); only a line longer than `limit` is cut, at a word boundary, with "..."."""
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    line = text[0].strip()
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " ..."
    return f"{type(e).__name__}: {line}"


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
        isinstance(e, (ImportError, OSError)) and "torchvision" in text
        and "undefined symbol" in text)


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
    match = f"torchvision==0.{int(minor) + 15}.*" if major == "2" and minor.isdigit() \
        else "torchvision"
    cuda = getattr(torch.version, "cuda", None)
    index = f"cu{cuda.replace('.', '')}" if cuda else "cpu"
    return (f"torchvision {vision} was built for another torch than the installed torch "
            f"{torch.__version__} ({cause}); install the two "
            f"from one index: python -m pip install --force-reinstall torch=={version} "
            f"'{match}' --index-url https://download.pytorch.org/whl/{index}")


def import_vision(module: str):
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
    return timm.create_model(spec.source.split(":", 1)[1], pretrained=pretrained, num_classes=0,
                             dynamic_img_size=True)


@builder("torchvision:mobilenet_v2")
def _build_mobilenet(spec: BackboneSpec, pretrained: bool) -> nn.Module:
    torchvision = import_vision("torchvision")
    model = torchvision.models.mobilenet_v2(weights=None)
    if pretrained:  # not mobilenet_v2(weights=...): torchvision's own download unpickles the file
        weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
        model.load_state_dict(weights.get_state_dict(progress=True, check_hash=True,
                                                     weights_only=True))
    return model.features


class MobileNetTaps(nn.Module):
    """The first blocks of mobilenet_v2's `features` -> the outputs of the blocks in `taps`,
    concatenated along the channels. The stride-2 convolution after the stride-16 output
    runs with stride 1 and the later 3x3 convolutions with dilation 2 (DeepLab's output
    stride 16), so every tapped output is on the same 1/16 grid."""

    def __init__(self, features: nn.Sequential, taps: tuple[int, ...]):
        super().__init__()
        self.blocks = features[:taps[-1] + 1]
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


_HOSTS = {"timm": "huggingface.co", "torchvision": "download.pytorch.org"}


def _resolves(host: str) -> bool:
    """Whether the download host resolves: offline machines skip minutes of hub retries."""
    import socket
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline():
    """Hugging Face hub in offline mode (cache only) for the duration; torchvision already
    looks in its cache before downloading."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


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
        if weights == "pretrained":
            source = spec.source.split(":", 1)[0]
            try:
                if _resolves(_HOSTS[source]):
                    model = build(spec, True)
                else:  # offline: a cached download still works, and fails fast otherwise
                    with _hub_offline():
                        model = build(spec, True)
            except (OSError, RuntimeError, ValueError, SafetensorError) as e:
                # OSError: no network, urllib / requests / huggingface_hub errors (offline:
                # LocalEntryNotFoundError); RuntimeError, ValueError, SafetensorError: a bad
                # or partial download in the cache
                raise BackboneError(
                    f"could not download pretrained weights for {name} ({_first_line(e)}); "
                    f"download {spec.checkpoint_hint} ({spec.checkpoint_url}) elsewhere "
                    "and pass it with "
                    "--set backbone.weights=/path/to/file"
                ) from None
        else:
            model = build(spec, False)
    if spec.kind == "cnn":
        if not isinstance(model, nn.Sequential):
            raise TypeError(f"{name}: expected its blocks in an nn.Sequential, got "
                            f"{type(model).__name__}")
        features = model[:spec.taps[layers - 1] + 1]
        if path is not None:
            _load_into(features, extract_state_dict(_read_checkpoint(path)), path, spec)
        cnn = MobileNetTaps(features, spec.taps[:layers]) if layers > 1 else features
        cnn.eval().requires_grad_(False)
        return CNNBackbone(spec, cnn, layers, spec.channels(layers)).eval()
    vit = _as_vit(name, model)
    if path is not None:
        _load_into(vit, extract_state_dict(_read_checkpoint(path)), path, spec)
    vit.eval().requires_grad_(False)
    return ViTBackbone(spec, vit, layers, spec.channels(layers)).eval()


def _as_vit(name: str, model: nn.Module) -> VisionTransformer:
    from timm.models.vision_transformer import VisionTransformer
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{name}: expected a timm VisionTransformer, got {type(model).__name__}")
    return model
