"""The one TOML writer of config tables: `config show`, a run's config.toml, the report's
settings."""

from __future__ import annotations

import json
from typing import Any

from .schema import Config

__all__ = ["toml_literal", "toml_text", "to_toml"]


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
