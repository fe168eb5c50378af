"""How the report and the runs page show values: numbers at 3 decimals, signed gains, counts,
the best of a column, config values as TOML writes them, relative links."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Any

from ..core.jsondoc import finite as _finite

__all__ = ["fmt", "signed", "fmt_int", "plural", "best_flags", "config_value", "url_of", "file_url"]


def fmt(x: object) -> str:
    """A score at 3 decimals ("0.812"); a dash for no finite number."""
    return f"{float(x):.3f}" if _finite(x) else "\u2014"


def signed(x: object) -> str:
    """A difference with its sign at 3 decimals: +0.025, -0.013, \u00b10.000."""
    if not _finite(x):
        return "\u2014"
    s = f"{float(x):+.3f}"
    return "\u00b10.000" if s in ("+0.000", "-0.000") else s


def fmt_int(x: int | None) -> str:
    """A count; a dash for None."""
    return "\u2014" if x is None else str(x)


def plural(n: int | None, word: str) -> str:
    """ "1 image", "3 images" (a dash for None)."""
    return f"{fmt_int(n)} {word}" + ("" if n == 1 else "s")


def best_flags(values: list[Any], higher_is_better: bool = True) -> list[bool]:
    """Which values are the best: the largest (`higher_is_better`, else the smallest) of the
    raw (unrounded) numbers, so two values shown alike at 3 decimals are both flagged only
    when they are truly equal; none when fewer than two finite numbers compete. Pass the
    numbers, never their formatted strings."""
    present = [float(v) for v in values if _finite(v)]
    if len(present) < 2:
        return [False] * len(values)
    top = max(present) if higher_is_better else min(present)
    return [_finite(v) and float(v) == top for v in values]


def config_value(v: object) -> str:
    """A config value as TOML writes it (strings unquoted)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(config_value(x) for x in v) + "]"
    if v == "":
        return '""'
    return str(v)


def url_of(path: str) -> str:
    """A relative path as a URL (each segment percent-quoted, '/' kept; a name's undecodable
    bytes, held as surrogates, quoted as those bytes, so the link finds the file)."""
    return urllib.parse.quote(str(path).replace(os.sep, "/"), safe="/#", errors="surrogateescape")


def file_url(files_dir: Path, name: str) -> str:
    """A relative URL (from the report file) to a file in files_dir."""
    return urllib.parse.quote(f"{files_dir.name}/{name}", errors="surrogateescape")
