"""The config as a run sees it: the defaults, a TOML file, a run's recorded config, and
`--set key=value` overrides, each value checked against its field's type and the rules, and
`~` expanded in the path keys. A config file and `--set` may only override known keys, with
values of the default's type (ints are accepted for floats)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .rules import AUTO, AUTO_KEYS, PATH_KEYS, check_range, home, validate
from .schema import Config, all_keys

__all__ = ["parse_set", "load_config", "config_from_dict", "copy_config"]


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def _coerce(key: str, value: Any, default: Any, where: str) -> Any:
    """Check `value` against the type of `default`; return it in that type. A key of
    AUTO_KEYS also takes "auto" (its number's type is that of the key's default)."""
    expected = type(default).__name__
    if key in AUTO_KEYS:
        if value == AUTO:
            return value
        default = Config().get(key)
        expected = f'{type(default).__name__} or "{AUTO}"'
    bad = ConfigError(f"bad value for {key}{where}: {value!r} (expected {expected})")
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
    elif isinstance(default, list) and (
        not isinstance(value, list)
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(f"bad value for {key}{where}: {value!r} (expected a list of ints)")
    check_range(key, value, where)
    return value


def _is_str_key(key: str) -> bool:
    """Whether `key` is a known config key whose value is a string."""
    section, _, name = key.partition(".")
    return isinstance(getattr(getattr(Config(), section, None), name, None), str)


def _apply(cfg: Config, key: str, value: Any, where: str) -> None:
    if key.count(".") != 1:
        raise _unknown(key, where)
    section, name = key.split(".")
    sec = getattr(cfg, section, None)
    if (
        sec is None
        or not dataclasses.is_dataclass(sec)
        or name not in {f.name for f in fields(sec)}
    ):
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


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: Config | None = None,
) -> Config:
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
            raise ConfigError(
                f"cannot read config file {path}: {e.strerror or type(e).__name__}"
            ) from None
        _apply_tables(cfg, doc, f" in {path}")
    for item in overrides:
        key, value = parse_set(item)
        if _is_str_key(key) and not isinstance(value, str) and not isinstance(value, list):
            value = item.split("=", 1)[1].strip()  # `--set run.name=2024`: the name "2024"
        _apply(cfg, key, value, " in --set")
    validate(cfg)
    _expand_user(cfg)
    return cfg


def _expand_user(cfg: Config) -> None:
    """`~` in every path key means the home folder, as in a shell."""
    for key in PATH_KEYS:
        value = cfg.get(key)
        if value.startswith("~"):
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, home(key, value))


def config_from_dict(doc: dict[str, Any], where: str = "") -> Config:
    """A config from its to_dict() form (e.g. as recorded in a report); ConfigError if a
    key or value is not valid here."""
    cfg = Config()
    _apply_tables(cfg, doc, where)
    validate(cfg)
    return cfg


def _apply_tables(cfg: Config, doc: dict[str, Any], where: str) -> None:
    """Sets every key of `doc`'s tables ({section: {name: value}}) in `cfg`; ConfigError for
    an unknown section or key or a bad value (`where`: the source, for the message)."""
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise _unknown(section, where)
        for name, value in table.items():
            _apply(cfg, f"{section}.{name}", value, where)


def copy_config(cfg: Config, **changes: Any) -> Config:
    """A deep copy of `cfg` with dotted-key changes applied (validated)."""
    new = copy.deepcopy(cfg)
    for key, value in changes.items():
        _apply(new, key.replace("__", "."), value, "")
    validate(new)
    return new
