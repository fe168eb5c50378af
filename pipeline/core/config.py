"""Typed TOML configuration: defaults, a config file, and `--set key=value` overrides.

Every key has a default here (the one place for them); a config file and `--set` may only
override known keys, with values of the default's type (ints are accepted for floats) and,
where listed in CHOICES, one of the allowed values. Every numeric key has a fixed range in
RANGES (the same on every machine, so a recorded config validates anywhere): a non-finite or
out-of-range value is a one-line ConfigError before any work.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .registry import list_backbones, most_layers


@dataclass
class RunCfg:
    name: str = "default"
    threads: int = 0  # CPU threads of every stage; 0 = the cores this process may use


@dataclass
class PathsCfg:
    cache: str = "cache"
    outputs: str = "outputs"


@dataclass
class DataCfg:
    root: str = "data/obj_seg"
    layout: str = "obj_seg"
    train_split: str = "train"
    val_split: str = ""  # "" = no validation during training
    test_split: str = "test"  # default split for `predict` and `run`
    # the largest image (width x height, read from the file header before decoding) that
    # stage 1 and segment accept; a bigger one is skipped as a bad image (not in the feature key)
    max_pixels: int = 24_000_000


@dataclass
class BackboneCfg:
    name: str = "dino_vits16"
    weights: str = "pretrained"
    # final blocks concatenated into the features; 0 = the backbone's measured default
    layers: int = 0


@dataclass
class ExtractCfg:
    batch_size: int = 32
    device: str = "auto"
    num_workers: int = 4  # image-decoding threads
    precision: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    feature_dtype: str = "float16"
    # how images are made a multiple of the patch size: centre "crop" | edge "pad"
    fit: str = "crop"
    compile: bool = False  # torch.compile the backbone (CUDA only)


@dataclass
class TrainCfg:
    lr: float = 2e-3  # PAC upsampler learning rate (the contract's example: 5e-4; see README)
    linear_lr: float = 1e-2
    epochs: int = 20  # PAC upsampler epochs
    linear_epochs: int = 30
    batch_size: int = 4
    # random training crop side in pixels (rounded to the patch grid); 0 = whole images
    crop: int = 320
    weight_decay: float = 1e-4
    boundary_weight: float = 0.0  # extra BCE weight on pixels near the mask boundary
    seed: int = 0
    device: str = "auto"


@dataclass
class UpsamplerCfg:
    hidden: int = 16  # channels of the 1x1 conv on the features
    channels: list[int] = field(default_factory=lambda: [4, 4, 4, 1])  # PAC stage outputs
    kernel_size: int = 3
    guide: str = "rgb"  # "rgb" (the course) | "learned" (a small conv net on the image)
    guide_channels: int = 8  # for guide = "learned"
    residual: bool = True  # add the bilinearly upsampled linear-head logits to the output
    normalize: bool = False  # PAC kernel normalisation


@dataclass
class PredictCfg:
    batch_size: int = 8
    device: str = "auto"
    threshold: float = 0.5  # on the object probability
    thumbnails: int = 6  # best / worst images shown in the HTML report
    # "flip": average with the mirrored image's logits (stage 1 stores its features)
    tta: str = "none"


@dataclass
class DaskCfg:
    scheduler: str = ""  # "" = run locally; "local:N" = N local worker processes; "tcp://host:8786"


@dataclass
class Config:
    run: RunCfg = field(default_factory=RunCfg)
    paths: PathsCfg = field(default_factory=PathsCfg)
    data: DataCfg = field(default_factory=DataCfg)
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    extract: ExtractCfg = field(default_factory=ExtractCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    upsampler: UpsamplerCfg = field(default_factory=UpsamplerCfg)
    predict: PredictCfg = field(default_factory=PredictCfg)
    dask: DaskCfg = field(default_factory=DaskCfg)

    def get(self, key: str) -> Any:
        section, name = key.split(".", 1)
        return getattr(getattr(self, section), name)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.paths.outputs) / self.run.name


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


def _check_range(key: str, value: Any, where: str = "") -> None:
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


def all_keys() -> list[str]:
    cfg = Config()
    return [f"{s.name}.{f.name}" for s in fields(cfg) for f in fields(getattr(cfg, s.name))]


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def _coerce(key: str, value: Any, default: Any, where: str) -> Any:
    """Check `value` against the type of `default`; return it in that type."""
    bad = ConfigError(
        f"bad value for {key}{where}: {value!r} (expected {type(default).__name__})")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise bad
    elif isinstance(default, list):
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"bad value for {key}{where}: {value!r} (expected a list of ints)")
    _check_range(key, value, where)
    return value


def _validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        if cfg.get(key) not in allowed:
            raise ConfigError(
                f"bad value for {key}: {cfg.get(key)!r} (one of {', '.join(allowed)})")
    for key in RANGES:
        _check_range(key, cfg.get(key))
    for key in ("extract.device", "train.device", "predict.device"):
        dev = cfg.get(key)
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and _digits(dev[5:]))):
            raise ConfigError(f"bad value for {key}: {dev!r} (one of {DEVICE_HELP})")
    for key in ("data.root", "paths.cache", "paths.outputs"):
        if not str(cfg.get(key)).strip():
            raise ConfigError(f"bad value for {key}: empty (a folder path)")
    if not cfg.backbone.weights.strip():
        raise ConfigError("bad value for backbone.weights: empty "
                          "(\"pretrained\", \"random\" or a file)")
    check_name("run.name", cfg.run.name)
    for key in ("data.train_split", "data.test_split", "data.val_split"):
        if cfg.get(key) or key != "data.val_split":
            check_name(key, cfg.get(key))
    if cfg.data.val_split and cfg.data.val_split == cfg.data.train_split:
        raise ConfigError("bad value for data.val_split: it must differ from data.train_split")
    sched = cfg.dask.scheduler
    if sched and not (sched.startswith(("tcp://", "tls://", "inproc://"))
                      or (sched.startswith("local:") and _digits(sched[6:])
                          and int(sched[6:]) in DASK_LOCAL_WORKERS)):
        n = DASK_LOCAL_WORKERS
        raise ConfigError(
            f"bad value for dask.scheduler: {sched!r} (\"\", \"local:N\" with N in "
            f"{n.lo}..{n.hi}, or \"tcp://host:port\")")
    for key in PATH_KEYS:
        _home(key, cfg.get(key))


def _is_str_key(key: str) -> bool:
    """Whether `key` is a known config key whose value is a string."""
    section, _, name = key.partition(".")
    return isinstance(getattr(getattr(Config(), section, None), name, None), str)


def check_name(what: str, name: str) -> str:
    """`name` when it is one plain path component (a run or split name: it becomes a folder
    name under the tool's own folders), else ConfigError naming `what`: a `/`, `..`, a
    leading `.` or an absolute path would write elsewhere."""
    if (not name or "/" in name or "\\" in name or "\0" in name or name.startswith(".")
            or name != name.strip()):
        raise ConfigError(f"bad value for {what}: {name!r} (a plain folder name: no '/', "
                          "no leading '.', no surrounding spaces)")
    return name


def _apply(cfg: Config, key: str, value: Any, where: str) -> None:
    if key.count(".") != 1:
        raise _unknown(key, where)
    section, name = key.split(".")
    sec = getattr(cfg, section, None)
    if (sec is None or not dataclasses.is_dataclass(sec)
            or name not in {f.name for f in fields(sec)}):
        raise _unknown(key, where)
    setattr(sec, name, _coerce(key, value, getattr(sec, name), where))


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one `--set KEY=VALUE`: VALUE is a TOML literal, or else taken as a bare string."""
    if "=" not in item:
        raise ConfigError(f"bad --set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = (), base: Config | None = None) -> Config:
    """Defaults (or a copy of `base`: a run's recorded config) <- the TOML file at `path` (if
    given) <- `overrides` ("key=value" strings)."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if not path.is_file():  # a folder, FIFO or device: never opened (a FIFO would hang)
            raise ConfigError(f"config file {path} is not a regular file")
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is no statement
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot parse config file {path}: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: "
                              f"{e.strerror or type(e).__name__}") from None
        where = f" in {path}"
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise _unknown(section, where)
            for name, value in table.items():
                _apply(cfg, f"{section}.{name}", value, where)
    for item in overrides:
        key, value = parse_set(item)
        if _is_str_key(key) and not isinstance(value, str) and not isinstance(value, list):
            value = item.split("=", 1)[1].strip()  # `--set run.name=2024`: the name "2024"
        _apply(cfg, key, value, " in --set")
    _validate(cfg)
    _expand_user(cfg)
    return cfg


PATH_KEYS = ("data.root", "paths.cache", "paths.outputs", "backbone.weights")


def _home(key: str, value: str) -> str:
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


def _expand_user(cfg: Config) -> None:
    """`~` in every path key means the home folder, as in a shell."""
    for key in PATH_KEYS:
        value = cfg.get(key)
        if value.startswith("~"):
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, _home(key, value))


def toml_literal(value: Any) -> str:
    """A config value as a TOML literal (a string as a basic string: JSON's escapes are valid
    TOML; what TOML cannot hold, e.g. a damaged record's null, as its JSON)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(x) for x in value) + "]"
    return json.dumps(value)


def toml_text(tables: dict[str, dict[str, Any]]) -> str:
    """Config tables ({section: {key: value}}, e.g. to_dict()'s or a report's) as a TOML
    document, in their order: the one TOML writer (config show, a run's config.toml, the
    report's settings)."""
    lines = []
    for section, values in tables.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_literal(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def to_toml(cfg: Config) -> str:
    """The config as a TOML document that load_config reads back to an equal config."""
    return toml_text(cfg.to_dict())


def config_from_dict(doc: dict[str, Any], where: str = "") -> Config:
    """A config from its to_dict() form (e.g. as recorded in a report); ConfigError if a
    key or value is not valid here."""
    cfg = Config()
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise _unknown(section, where)
        for name, value in table.items():
            _apply(cfg, f"{section}.{name}", value, where)
    _validate(cfg)
    return cfg


def copy_config(cfg: Config, **changes: Any) -> Config:
    """A deep copy of `cfg` with dotted-key changes applied (validated)."""
    new = copy.deepcopy(cfg)
    for key, value in changes.items():
        _apply(new, key.replace("__", "."), value, "")
    _validate(new)
    return new
