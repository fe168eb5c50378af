"""Typed TOML configuration: defaults, a config file, and `--set key=value` overrides.

Every key has a default in ``schema`` (the one place for them, one dataclass per section),
declared with ``meta.key`` together with its meaning, what it allows and what a change makes
stale. A config file and `--set` may only override known keys, with values of the default's
type (ints are accepted for floats) and, where the field declares choices, one of them. Every
numeric key declares a fixed range (the same on every machine, so a recorded config validates
anywhere): a non-finite or out-of-range value is a one-line ConfigError before any work.

    meta.py     a field's documentation (KeyDoc, key), Range, the words the rules use
    schema.py   the fields: sections, keys, defaults, documentation (Config, key_docs)
    schema_train.py, schema_refine.py  the [train], [upsampler] and [refine] sections
    rules.py    what a value may be, read from the fields: CHOICES, RANGES, devices, paths,
                names (validate, allowed_text)
    explain.py  `config show --explain KEY`
    load.py     a TOML file, a recorded config and --set overrides into a Config
    writing.py  config tables as TOML
"""

from __future__ import annotations

from ..errors import ConfigError
from . import schema
from .explain import explain
from .load import config_from_dict, copy_config, load_config, parse_set
from .meta import KeyDoc, key
from .rules import (
    CHOICES,
    DASK_LOCAL_WORKERS,
    DEVICE_HELP,
    LIST_LENGTHS,
    ODD,
    PATH_KEYS,
    RANGES,
    Range,
    allowed_text,
    check_name,
)
from .schema import *  # noqa: F403  (the sections and Config: schema.__all__)
from .writing import to_toml, toml_literal, toml_text

__all__ = [
    "ConfigError",
    "KeyDoc",
    "key",
    "allowed_text",
    "explain",
    "CHOICES",
    "RANGES",
    "Range",
    "LIST_LENGTHS",
    "ODD",
    "DASK_LOCAL_WORKERS",
    "DEVICE_HELP",
    "PATH_KEYS",
    "check_name",
    "load_config",
    "parse_set",
    "config_from_dict",
    "copy_config",
    "toml_literal",
    "toml_text",
    "to_toml",
    *schema.__all__,
]
