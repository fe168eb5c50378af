"""What a config value may be: the allowed values of the string keys with a fixed choice
(CHOICES), the fixed range of every numeric key (RANGES: the same on every machine, so a
recorded config validates anywhere), the form of devices, paths, names and the Dask scheduler.
A value that breaks a rule is a one-line ConfigError naming the key, before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .meta import DASK_HELP, DASK_LOCAL_WORKERS, DEVICE_HELP, NAME_HELP, Range
from .schema import Config, key_docs

__all__ = [
    "DEVICE_HELP",
    "CHOICES",
    "Range",
    "RANGES",
    "LIST_LENGTHS",
    "ODD",
    "DASK_LOCAL_WORKERS",
    "PATH_KEYS",
    "AUTO",
    "AUTO_KEYS",
    "allowed_text",
    "check_range",
    "check_name",
    "validate",
    "home",
]

# The rules each field declares with its documentation (schema, meta.key): one source for
# what is enforced here and what the docs, `config show --explain` and the errors say.
# Ranges are fixed, not derived from this machine's cores or memory: a recorded config is
# re-validated on another machine.
_DOCS = key_docs()
CHOICES: dict[str, tuple[str, ...]] = {k: d.choices for k, d in _DOCS.items() if d.choices}
# every numeric key's range (for a list key, of each entry; LIST_LENGTHS bounds the entries)
RANGES: dict[str, Range] = {k: d.range for k, d in _DOCS.items() if d.range is not None}
LIST_LENGTHS: dict[str, Range] = {k: d.length for k, d in _DOCS.items() if d.length is not None}
ODD = {k for k, d in _DOCS.items() if d.odd}


def _list_rule(key: str) -> str:
    """The rule of a list key in words: "1 to 8 integers, each in 1..256, the last 1"."""
    length, rng = LIST_LENGTHS[key], RANGES[key]
    return f"{length.lo} to {length.hi} integers, each in {rng.lo}..{rng.hi}, the last 1"


def _range_rule(key: str) -> str:
    """The range of a numeric key in words: "an odd integer in 1..11", "a finite number in
    (0, 10]"."""
    what = RANGES[key].describe(integer=not isinstance(Config().get(key), float))
    return what.replace("an integer", "an odd integer") if key in ODD else what


AUTO = "auto"
# numeric keys that also take the string "auto": the tool chooses the value (predict.threshold:
# per variant, on the validation split; stages/thresholds.py)
AUTO_KEYS = frozenset({"predict.threshold"})


def allowed_text(key: str) -> str:
    """What `key` allows, in the words of its errors ("" for a free value, e.g. a bool)."""
    if key in LIST_LENGTHS:
        return _list_rule(key)
    if key in RANGES:
        return _range_rule(key) + (f' or "{AUTO}"' if key in AUTO_KEYS else "")
    if key in CHOICES:
        return f"one of {', '.join(CHOICES[key])}"
    return _DOCS[key].allowed if key in _DOCS else ""


def _digits(text: str) -> bool:
    """True for a non-empty string of ASCII digits (str.isdigit also takes '²')."""
    return text.isascii() and text.isdigit()


def check_range(key: str, value: Any, where: str = "") -> None:
    """ConfigError (one line naming the key, the value and the range) unless `value` is in
    RANGES[key] (a list: its length in LIST_LENGTHS[key], each entry in range, the last 1)."""
    rng = RANGES.get(key)
    if rng is None or (key in AUTO_KEYS and value == AUTO):
        return
    if isinstance(value, list):
        length = LIST_LENGTHS[key]
        if not (value and len(value) in length and all(v in rng for v in value) and value[-1] == 1):
            raise ConfigError(f"bad value for {key}{where}: {value!r} ({_list_rule(key)})")
        return
    if value not in rng or (key in ODD and value % 2 == 0):
        raise ConfigError(f"bad value for {key}{where}: {value!r} ({allowed_text(key)})")


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
        raise ConfigError(
            'bad value for backbone.weights: empty ("pretrained", "random" or a file)'
        )


def _check_names(cfg: Config) -> None:
    check_name("run.name", cfg.run.name)
    for key in ("data.train_split", "data.test_split", "data.val_split"):
        if cfg.get(key) or key != "data.val_split":
            check_name(key, cfg.get(key))
    if cfg.data.val_split and cfg.data.val_split == cfg.data.train_split:
        raise ConfigError("bad value for data.val_split: it must differ from data.train_split")
    if cfg.data.val_cut and cfg.data.val_split:
        raise ConfigError(
            "bad value for data.val_cut: it makes the validation split, and data.val_split "
            f"is set ('{cfg.data.val_split}'): set one of the two"
        )
    if cfg.predict.threshold == AUTO and not (cfg.data.val_split or cfg.data.val_cut):
        raise ConfigError(
            'bad value for predict.threshold: "auto" chooses it on the validation split, and '
            "neither data.val_split nor data.val_cut is set"
        )


def _check_scheduler(cfg: Config) -> None:
    sched = cfg.dask.scheduler
    if sched and not (
        sched.startswith(("tcp://", "tls://", "inproc://"))
        or (
            sched.startswith("local:")
            and _digits(sched[6:])
            and int(sched[6:]) in DASK_LOCAL_WORKERS
        )
    ):
        raise ConfigError(f"bad value for dask.scheduler: {sched!r} ({DASK_HELP})")


def validate(cfg: Config) -> None:
    """ConfigError (one line naming the key) at the first value of `cfg` that is not allowed:
    not one of its CHOICES, out of its RANGES, a bad device, an empty path, a name that is not
    one plain folder name, a bad dask.scheduler, a `~user` that cannot be expanded."""
    for key, allowed in CHOICES.items():
        if cfg.get(key) not in allowed:
            raise ConfigError(f"bad value for {key}: {cfg.get(key)!r} ({allowed_text(key)})")
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
    if (
        not name
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name.startswith(".")
        or name != name.strip()
    ):
        raise ConfigError(f"bad value for {what}: {name!r} ({NAME_HELP})")
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
            f"bad value for {key}: {value!r} (a path; cannot expand '~{user}': {why})"
        ) from None
