"""Devices and precisions: "auto" resolved once, in one place, for every stage (and so the
config's keys, whose feature key records the resolved precision: `config_keys`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..core.errors import DeviceError, thread_limits
from ..core.keys import Keys

if TYPE_CHECKING:
    import torch

    from ..core.config import Config

# torch is imported inside the functions that compute: `status` (extract.precision "auto"
# resolved through `config_keys`) runs without it on a machine with no GPU driver.

T = TypeVar("T")

# Device nodes or driver folders of which at least one exists wherever torch can see a GPU on
# Linux (NVIDIA, ROCm, WSL2): without any of them CUDA is unavailable and torch is not asked.
GPU_DRIVER_PATHS = (
    "/dev/nvidiactl",
    "/dev/nvidia0",
    "/proc/driver/nvidia",
    "/dev/kfd",
    "/dev/dxg",
)


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch on a Linux machine with no GPU
    driver (where the answer is False)."""
    if "torch" not in sys.modules and sys.platform.startswith("linux"):
        if not any(Path(p).exists() for p in GPU_DRIVER_PATHS):
            return False
    import torch

    return torch.cuda.is_available()


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; DeviceError for an unavailable CUDA device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f'device {name!r} requested but CUDA is not available; use device = "auto" or "cpu"'
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} requested but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible"
            )
    return dev


def resolve_precision(precision: str, device_name: str) -> str:
    """extract.precision with "auto" resolved: bf16 on CUDA, fp32 on CPU (so a cache key
    records what was computed, and a CPU cache is not taken for a GPU one)."""
    if precision != "auto":
        return precision
    on_cuda = device_name.startswith("cuda") or (device_name == "auto" and cuda_available())
    return "bf16" if on_cuda else "fp32"


def config_keys(cfg: Config) -> Keys:
    """`cfg`'s keys (core.keys) on this machine, extract.precision "auto" resolved: what the
    stage and command entry points build once and hand down, validated here."""
    return Keys.from_config(cfg, resolve_precision(cfg.extract.precision, cfg.extract.device))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a resolved or "auto" precision on `device` (None: plain fp32)."""
    import torch

    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    return dtypes[resolve_precision(precision, device.type)]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a cluster job's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """OMP_NUM_THREADS when the user set it (a cluster job's share), else the usable cores."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else usable_cores()


def apply_threads(threads: int) -> int:
    """Set torch's intra-op thread count for this process (`threads` = 0: default_threads());
    returns the count set."""
    import torch

    n = threads if threads > 0 else default_threads()
    torch.set_num_threads(n)
    return n


class CpuFanout:
    """Per-image work on the CPU: each image's whole computation in one thread with one
    intra-op thread, images spread over `threads` threads (default: torch's thread count).
    On CPU larger batches only spill activations out of the caches, and a result then depends
    neither on which images shared its batch nor on the core count (a local run and 1-thread
    Dask workers compute identical values; `segment` and `predict` give identical masks)."""

    def __init__(self, threads: int | None = None):
        import torch

        self.threads = max(1, threads or torch.get_num_threads())
        self._pool: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[[int], T], n: int) -> list[T]:
        """[fn(0), ..., fn(n - 1)] computed over the threads (OpenMP's thread count is per
        thread and set to 1 in each; MKL's is process-wide: 1 meanwhile, restored after)."""
        import torch

        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.threads,
                thread_name_prefix="cpu-image",
                initializer=torch.set_num_threads,
                initargs=(1,),
            )
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with thread_limits(f"{self.threads} images side by side (run.threads)"):
                return list(self._pool.map(fn, range(n)))
        finally:
            torch.set_num_threads(threads)
