"""Devices and precisions: "auto" resolved once, in one place, for every stage."""
from __future__ import annotations

import torch

from .errors import DeviceError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; DeviceError for an unavailable CUDA device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available; "
                              "use device = \"auto\" or \"cpu\"")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} requested but only {torch.cuda.device_count()} "
                              "CUDA device(s) are visible")
    return dev


def resolve_precision(precision: str, device_name: str) -> str:
    """extract.precision with "auto" resolved: bf16 on CUDA, fp32 on CPU (so a cache key
    records what was computed, and a CPU cache is not taken for a GPU one)."""
    if precision != "auto":
        return precision
    on_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    return "bf16" if on_cuda else "fp32"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a resolved or "auto" precision on `device` (None: plain fp32)."""
    return PRECISIONS[resolve_precision(precision, device.type)]
