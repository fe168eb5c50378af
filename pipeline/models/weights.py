"""Backbone weights: a local checkpoint read without unpickling arbitrary objects
(torch.load(weights_only=True) or safetensors) and loaded into a model (`load_checkpoint`),
and the published weights downloaded through the hubs (`pretrained_model`; offline, from
their download cache). What identifies a weights file in the feature key is core.keys's
(`weights_identity`, torch-free).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from safetensors import SafetensorError

from ..core.errors import BackboneError
from ..core.registry import BackboneSpec

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

# heads and classifiers that checkpoints may carry and a feature extractor does not use
_DROP_PREFIXES = ("head.", "head_dist.", "fc_norm.", "classifier.", "mask_token")

# What torch.load(weights_only=True) raises on a damaged or foreign file: the zip reader
# (RuntimeError, BadZipFile), the file (OSError, EOFError), the weights-only unpickler
# reading garbage (IndexError/KeyError on its stack and memo, struct.error, TypeError,
# UnicodeDecodeError) and the legacy format's storage lookup (AssertionError "storage key
# ... not found"; found by fuzzing). UnpicklingError is handled apart: the safe loader's refusal.
_UNREADABLE = (
    RuntimeError,
    OSError,
    EOFError,
    ValueError,
    zipfile.BadZipFile,
    LookupError,
    TypeError,
    struct.error,
    AssertionError,
)

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
            raise BackboneError(
                f"{path}: not a readable .safetensors file ({_first_line(e)})"
            ) from None
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BackboneError(
            f"{path}: refused: loading it would need unpickling arbitrary objects "
            f"({_refusal_reason(e)}); only tensors and plain containers are read. "
            "Where you trust the file, convert it to a plain state dict "
            "(torch.save(model.state_dict(), ...)) or to .safetensors"
        ) from None
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
                    k, stripped = k[len(prefix) :], True
        if k.startswith(_DROP_PREFIXES):
            continue
        out[k] = v
    return out


def _load_into(
    model: nn.Sequential | VisionTransformer,
    state: dict[str, torch.Tensor],
    path: Path,
    spec: BackboneSpec,
) -> None:
    own = model.state_dict()
    if isinstance(model, nn.Sequential):  # torchvision's features[:n]: keys "0.conv..."
        state = {
            k[len("features.") :] if k.startswith("features.") else k: v for k, v in state.items()
        }
        state = {
            k: v
            for k, v in state.items()
            if not (k.split(".", 1)[0].isdigit() and int(k.split(".", 1)[0]) >= len(model))
        }
    for k in own:  # old BatchNorm checkpoints lack the (unused in eval) batch counters
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise BackboneError(
            f"{path}: not a {spec.name} checkpoint: missing {len(missing)} keys "
            f"(e.g. {', '.join(missing[:3])})"
        )
    if unexpected:
        raise BackboneError(
            f"{path}: unexpected keys for {spec.name} (e.g. {', '.join(unexpected[:3])})"
        )
    for k, v in state.items():
        if v.shape != own[k].shape and k != "pos_embed":
            raise BackboneError(
                f"{path}: shape mismatch for {k}: checkpoint {tuple(v.shape)}, "
                f"{spec.name} {tuple(own[k].shape)}"
            )
    if (
        not isinstance(model, nn.Sequential)  # (a ViT: only they have position embeddings)
        and "pos_embed" in state
        and state["pos_embed"].shape != own["pos_embed"].shape
    ):
        # a checkpoint trained at another resolution: interpolate its position embeddings
        from timm.layers import resample_abs_pos_embed

        n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=model.patch_embed.grid_size, num_prefix_tokens=n_prefix
        )
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


def load_checkpoint(
    model: nn.Sequential | VisionTransformer, path: Path, spec: BackboneSpec
) -> None:
    """The backbone weights of the checkpoint file `path` loaded into `model` (strictly: a
    one-line BackboneError for a file of another model, or one that needs unpickling)."""
    _load_into(model, extract_state_dict(_read_checkpoint(path)), path, spec)


# ----------------------------------------------------------------------------- hubs

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
def _hub_offline() -> Iterator[None]:
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


def pretrained_model(
    spec: BackboneSpec, build: Callable[[BackboneSpec, bool], nn.Module]
) -> nn.Module:
    """`build(spec, True)`: the model with its published weights, downloaded (offline, when
    the host does not resolve: from the download cache, failing fast otherwise); a one-line
    BackboneError naming the file to download elsewhere when that fails."""
    source = spec.source.split(":", 1)[0]
    try:
        if _resolves(_HOSTS[source]):
            return build(spec, True)
        with _hub_offline():  # offline: a cached download works, others fail fast
            return build(spec, True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        # OSError: no network, urllib / requests / huggingface_hub errors (offline:
        # LocalEntryNotFoundError); RuntimeError, ValueError, SafetensorError: a bad
        # or partial download in the cache
        raise BackboneError(
            f"could not download pretrained weights for {spec.name} ({_first_line(e)}); "
            f"download {spec.checkpoint_hint} ({spec.checkpoint_url}) elsewhere "
            "and pass it with "
            "--set backbone.weights=/path/to/file"
        ) from None
