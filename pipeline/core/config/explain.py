"""`config show --explain KEY`: one key's meaning, value, default, what it allows and what a
change makes stale, in plain text, from the field's documentation (``meta``)."""

from __future__ import annotations

import difflib

from ..errors import ConfigError
from .rules import allowed_text
from .schema import Config, key_docs
from .writing import toml_literal

__all__ = ["explain"]

DOCS_SITE = "docs/"  # where a key's `see` page lives in a checkout


def explain(key: str, cfg: Config | None = None) -> str:
    """The explanation of `key`, with its value in `cfg` (the effective config) beside the
    default; ConfigError (a usage error) for an unknown key, naming the closest one."""
    docs = key_docs()
    if key not in docs:
        close = difflib.get_close_matches(key, list(docs), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key '{key}'{hint}")
    doc = docs[key]
    default = toml_literal(Config().get(key))
    value = toml_literal((cfg or Config()).get(key))
    lines = [
        f"{key} = {value}" + ("  (the default)" if value == default else f"  (default: {default})"),
        doc.meaning,
    ]
    allowed = allowed_text(key)
    if allowed:
        lines.append(f"allowed: {allowed}")
    lines.append(f"a change makes stale: {doc.stale}")
    if doc.see:
        lines.append(f"more: {DOCS_SITE}{doc.see}")
    return "\n".join(lines)
