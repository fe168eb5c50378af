"""`runs`'s table: the rows of commands/runs.py as text cells, a plain aligned table, a
Markdown one, and JSON data."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from ..metrics.definitions import RUNS_COLUMNS

if TYPE_CHECKING:
    from .runs import RunRow

PATH_KEYS = ("backbone.weights", "data.root", "paths.cache", "paths.outputs")


def as_json(rows: list[RunRow]) -> list[dict]:
    """The rows as strict JSON data (json.dumps(..., allow_nan=False) accepts it)."""
    return [asdict(r) for r in rows]


def _printable(text: str) -> str:
    """`text` with control characters (and undecodable bytes) as backslash escapes, so that a
    name never splits a line."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
        for c in text
    )


def _cell(text: str) -> str:
    """`text` as one Markdown table cell: `|` escaped, control characters (and undecodable
    bytes) as backslash escapes, so that a name never adds or splits a column or a line."""
    return _printable(text).replace("|", "\\|")


def short_paths(values: Sequence[str]) -> dict[str, str]:
    """Each path in `values` shown by the shortest tail of its components that still tells
    the values apart (usually the file or folder name: `dino_deitsmall16_pretrain.pth`)."""
    distinct = sorted(set(values))
    parts = {v: PurePosixPath(v).parts or (v,) for v in distinct}
    for n in range(1, max(len(p) for p in parts.values()) + 1 if parts else 1):
        shown = {v: "/".join(p[-n:]).replace("//", "/") for v, p in parts.items()}
        if len(set(shown.values())) == len(distinct):
            return {v: v if n >= len(parts[v]) else shown[v] for v in distinct}
    return {v: v for v in distinct}


def _value(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:g}"
    return "-" if x is None else (x if isinstance(x, str) else json.dumps(x))


def grid(rows: list[RunRow]) -> tuple[list[str], list[list[str]], list[bool]]:
    """The table of `rows` as text cells: (headers, one list of cells per row, whether each
    column is numeric, i.e. right-aligned). Path keys (backbone.weights, data.root, paths.*)
    are shortened to what tells them apart (short_paths); the plain table, the Markdown
    table and the HTML page show these cells."""
    keys = list(dict.fromkeys(k for r in rows for k in r.params))
    shorter = {
        k: short_paths([v for r in rows if isinstance(v := r.params.get(k), str) and "/" in v])
        for k in keys
        if k in PATH_KEYS
    }
    heads = [
        "run",
        "split",
        *keys,
        *(c[0] for c in RUNS_COLUMNS),
        "images",
        "train s",
        "up-to-date",
    ]
    numeric = [
        False,
        False,
        *(False for _ in keys),
        *(True for _ in RUNS_COLUMNS),
        True,
        True,
        False,
    ]

    def num(x: float | int | None) -> str:
        return f"{x:.3f}" if isinstance(x, float) else ("-" if x is None else str(x))

    cells = []
    for r in rows:
        params = [
            shorter.get(k, {}).get(v, _value(v))
            if isinstance(v := r.params.get(k), str)
            else _value(v)
            for k in keys
        ]
        state = (
            {True: "yes", False: "no", None: "?"}[r.up_to_date]
            if r.damaged is None
            else f"damaged: {r.damaged}"
        )
        cells.append(
            [
                r.run,
                r.split,
                *params,
                *(num(r.metrics.get(v, {}).get(m.key)) for _, v, m in RUNS_COLUMNS),
                num(r.n_images),
                "-" if r.train_seconds is None else f"{r.train_seconds:.0f}",
                state,
            ]
        )
    return heads, cells, numeric


def markdown(rows: list[RunRow]) -> str:
    """A Markdown table, for pasting (`runs --markdown`)."""
    heads, cells, numeric = grid(rows)
    lines = [
        "| " + " | ".join(_cell(h) for h in heads) + " |",
        "|" + "|".join("--:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in cells]
    return "\n".join(lines)


def table(rows: list[RunRow]) -> str:
    """An aligned plain-text table for the terminal (what `runs` prints): columns two spaces
    apart, numbers right-aligned, the last column (up-to-date, or what is damaged) as is."""
    heads, cells, numeric = grid(rows)
    text = [[_printable(c) for c in row] for row in [heads, *cells]]
    widths = [max(len(row[i]) for row in text) for i in range(len(heads))]
    lines = []
    for row in text:
        padded = [
            c.rjust(w) if n else c.ljust(w)
            for c, w, n in zip(row[:-1], widths, numeric, strict=False)
        ]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)
