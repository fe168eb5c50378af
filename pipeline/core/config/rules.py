"""What a config value may be: the allowed values of the string keys with a fixed choice
(CHOICES), the fixed range of every numeric key (RANGES: the same on every machine, so a
recorded config validates anywhere), the form of devices, paths, names and the Dask scheduler.
A value that breaks a rule is a one-line ConfigError naming the key, before any work."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..registry import list_backbones, most_layers
from .schema import Config

__all__ = ["DEVICE_HELP", "CHOICES", "Range", "RANGES", "LIST_LENGTHS", "ODD",
           "DASK_LOCAL_WORKERS", "PATH_KEYS", "check_range", "check_name", "validate", "home"]

DEVICE_HELP = '"auto", "cpu", "cuda" or "cuda:N"'


CHOICES: dict[str, tuple[str, ...]] = {
    "data.layout": ("obj_seg", "davis2016"),
    "backbone.name": tuple(list_backbones()),  # the backbone registry's names
    "extract.precision": ("auto", "fp32", "bf16", "fp16"),
    "extract.feature_dtype": ("float16", "float32"),
    "extract.fit": ("crop", "pad"),
    "upsampler.guide": ("rgb", "learned"),
    "predict.tta": ("none", "flip"),
}


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key: lo..hi, each end included unless marked open.
    Integer keys use closed ranges; float keys must also be finite."""
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        """Whether `value` (finite, for a float) lies in the range."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def describe(self, integer: bool) -> str:
        """`an integer in 0..256` or `a finite number in (0, 10]`."""
        if integer:
            return f"an integer in {self.lo}..{self.hi}"
        return (f"a finite number in {'(' if self.lo_open else '['}{self.lo:g}, "
                f"{self.hi:g}{')' if self.hi_open else ']'}")


# Every numeric key's fixed range (for upsampler.channels: of each entry; LIST_LENGTHS bounds
# the number of entries). Fixed, not derived from this machine's cores or memory: a recorded
# config is re-validated on another machine.
RANGES: dict[str, Range] = {
    "run.threads": Range(0, 256),
    "data.max_pixels": Range(1, 2**31 - 1),
    "backbone.layers": Range(0, most_layers()),  # 0 = the backbone's default (registry)
    "extract.batch_size": Range(1, 4096),
    "extract.num_workers": Range(0, 64),
    "train.lr": Range(0, 10, lo_open=True),
    "train.linear_lr": Range(0, 10, lo_open=True),
    "train.epochs": Range(1, 100_000),
    "train.linear_epochs": Range(0, 100_000),
    "train.batch_size": Range(1, 4096),
    "train.crop": Range(0, 8192),
    "train.weight_decay": Range(0, 10),
    "train.boundary_weight": Range(0, 1000),
    "train.seed": Range(0, 2**32 - 1),
    # the PAC stages run at up to full resolution: beyond these, one training epoch of a
    # 480p dataset takes minutes and its checkpoint a GB (1024 channels, 15 x 15: 1 GB)
    "upsampler.hidden": Range(1, 256),
    "upsampler.channels": Range(1, 256),
    "upsampler.kernel_size": Range(1, 11),
    "upsampler.guide_channels": Range(1, 64),
    "predict.batch_size": Range(1, 4096),
    "predict.threshold": Range(0, 1, lo_open=True, hi_open=True),
    "predict.thumbnails": Range(0, 100),
}


LIST_LENGTHS: dict[str, Range] = {"upsampler.channels": Range(1, 8)}


ODD = {"upsampler.kernel_size"}


DASK_LOCAL_WORKERS = Range(1, 256)  # N of dask.scheduler = "local:N"


def _digits(text: str) -> bool:
    """True for a non-empty string of ASCII digits (str.isdigit also takes '²')."""
    return text.isascii() and text.isdigit()


def check_range(key: str, value: Any, where: str = "") -> None:
    """ConfigError (one line naming the key, the value and the range) unless `value` is in
    RANGES[key] (a list: its length in LIST_LENGTHS[key], each entry in range)."""
    rng = RANGES.get(key)
    if rng is None:
        return
    if isinstance(value, list):
        length = LIST_LENGTHS[key]
        if not (value and len(value) in length and all(v in rng for v in value)
                and value[-1] == 1):
            raise ConfigError(
                f"bad value for {key}{where}: {value!r} ({length.lo} to {length.hi} integers, "
                f"each in {rng.lo}..{rng.hi}, the last 1)")
        return
    odd = key in ODD
    if value not in rng or (odd and value % 2 == 0):
        what = rng.describe(integer=not isinstance(Config().get(key), float))
        if odd:
            what = what.replace("an integer", "an odd integer")
        raise ConfigError(f"bad value for {key}{where}: {value!r} ({what})")


def _check_devices(cfg: Config) -> None:
    for key in ("extract.device", "train.device", "predict.device"):
        dev = cfg.get(key)
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and _digits(dev[5:]))):
            raise ConfigError(f"bad value for {key}: {dev!r} (one of {DEVICE_HELP})")


def _check_paths(cfg: Config) -> None:
    for key in ("data.root", "paths.cache", "paths.outputs"):
        if not str(cfg.get(key)).strip():
            raise ConfigError(f"bad value for {key}: empty (a folder path)")
    if not cfg.backbone.weights.strip():
        raise ConfigError("bad value for backbone.weights: empty "
                          "(\"pretrained\", \"random\" or a file)")


def _check_names(cfg: Config) -> None:
    check_name("run.name", cfg.run.name)
    for key in ("data.train_split", "data.test_split", "data.val_split"):
        if cfg.get(key) or key != "data.val_split":
            check_name(key, cfg.get(key))
    if cfg.data.val_split and cfg.data.val_split == cfg.data.train_split:
        raise ConfigError("bad value for data.val_split: it must differ from data.train_split")


def _check_scheduler(cfg: Config) -> None:
    sched = cfg.dask.scheduler
    if sched and not (sched.startswith(("tcp://", "tls://", "inproc://"))
                      or (sched.startswith("local:") and _digits(sched[6:])
                          and int(sched[6:]) in DASK_LOCAL_WORKERS)):
        n = DASK_LOCAL_WORKERS
        raise ConfigError(
            f"bad value for dask.scheduler: {sched!r} (\"\", \"local:N\" with N in "
            f"{n.lo}..{n.hi}, or \"tcp://host:port\")")


def validate(cfg: Config) -> None:
    """ConfigError (one line naming the key) at the first value of `cfg` that is not allowed:
    not one of its CHOICES, out of its RANGES, a bad device, an empty path, a name that is not
    one plain folder name, a bad dask.scheduler, a `~user` that cannot be expanded."""
    for key, allowed in CHOICES.items():
        if cfg.get(key) not in allowed:
            raise ConfigError(
                f"bad value for {key}: {cfg.get(key)!r} (one of {', '.join(allowed)})")
    for key in RANGES:
        check_range(key, cfg.get(key))
    _check_devices(cfg)
    _check_paths(cfg)
    _check_names(cfg)
    _check_scheduler(cfg)
    for key in PATH_KEYS:
        home(key, cfg.get(key))


def check_name(what: str, name: str) -> str:
    """`name` when it is one plain path component (a run or split name: it becomes a folder
    name under the tool's own folders), else ConfigError naming `what`: a `/`, `..`, a
    leading `.` or an absolute path would write elsewhere."""
    if (not name or "/" in name or "\\" in name or "\0" in name or name.startswith(".")
            or name != name.strip()):
        raise ConfigError(f"bad value for {what}: {name!r} (a plain folder name: no '/', "
                          "no leading '.', no surrounding spaces)")
    return name


PATH_KEYS = ("data.root", "paths.cache", "paths.outputs", "backbone.weights")


def home(key: str, value: str) -> str:
    """`value` with a leading `~` or `~user` expanded as in a shell; ConfigError (one line)
    when there is no such user or no home folder."""
    if not value.startswith("~"):
        return value
    try:
        return str(Path(value).expanduser())
    except RuntimeError:
        user = value[1:].split("/", 1)[0]
        why = f"no user '{user}'" if user else "no home folder"
        raise ConfigError(
            f"bad value for {key}: {value!r} (a path; cannot expand '~{user}': {why})") from None
