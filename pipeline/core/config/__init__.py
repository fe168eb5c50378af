"""Typed TOML configuration: defaults, a config file, and `--set key=value` overrides.

Every key has a default in ``schema`` (the one place for them, one dataclass per section); a
config file and `--set` may only override known keys, with values of the default's type (ints
are accepted for floats) and, where listed in CHOICES, one of the allowed values. Every numeric
key has a fixed range in RANGES (the same on every machine, so a recorded config validates
anywhere): a non-finite or out-of-range value is a one-line ConfigError before any work.

    schema.py   the fields: sections, keys, defaults (Config)
    rules.py    what a value may be: CHOICES, RANGES, devices, paths, names (validate)
    load.py     a TOML file, a recorded config and --set overrides into a Config
    writing.py  config tables as TOML
"""
from __future__ import annotations

from ..errors import ConfigError
from .load import config_from_dict, copy_config, load_config, parse_set
from .rules import (
    CHOICES,
    DASK_LOCAL_WORKERS,
    DEVICE_HELP,
    LIST_LENGTHS,
    ODD,
    PATH_KEYS,
    RANGES,
    Range,
    check_name,
)
from .schema import (
    BackboneCfg,
    Config,
    DaskCfg,
    DataCfg,
    ExtractCfg,
    PathsCfg,
    PredictCfg,
    RunCfg,
    TrainCfg,
    UpsamplerCfg,
    all_keys,
)
from .writing import to_toml, toml_literal, toml_text

__all__ = ["ConfigError", "Config", "RunCfg", "PathsCfg", "DataCfg", "BackboneCfg",
           "ExtractCfg", "TrainCfg", "UpsamplerCfg", "PredictCfg", "DaskCfg", "all_keys",
           "CHOICES", "RANGES", "Range", "LIST_LENGTHS", "ODD", "DASK_LOCAL_WORKERS",
           "DEVICE_HELP", "PATH_KEYS", "check_name", "load_config", "parse_set",
           "config_from_dict", "copy_config", "toml_literal", "toml_text", "to_toml"]
