"""The runs of one `paths.outputs` side by side as an offline HTML page (`runs --html`):
`runs`' rows (``runs.collect``, as ``runs.as_json`` gives them) laid out by the Jinja2
template ``templates/runs.html.j2``, each run linking to its report. Written next to the run
folders, as ``<paths.outputs>/runs_<split>.html``, so the links are relative."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import OwnershipError
from ..core.fsutil import atomic_write_bytes
from ..core.hints import current
from ..core.jsondoc import finite as _finite
from ..metrics.definitions import RUNS_COLUMNS
from .format import best_flags, config_value, fmt, url_of
from .render import render


def runs_page_path(outputs: Path, split: str) -> Path:
    """Where the runs page of `split` is written: <outputs>/runs_<split>.html."""
    return Path(outputs) / f"runs_{split}.html"


def runs_view(rows: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """What runs.html.j2 shows: the keys that differ, one row per run with its values, its
    metrics (the columns of `runs`' table: RUNS_COLUMNS; the best per column flagged), its
    state and the link to its report."""
    keys = sorted({k for r in rows for k in (r.get("params") or {})})
    cols = [
        [(r.get("metrics") or {}).get(v, {}).get(m.key) for r in rows] for _, v, m in RUNS_COLUMNS
    ]
    flags = [
        best_flags(c, m.higher_is_better) for c, (_, _, m) in zip(cols, RUNS_COLUMNS, strict=True)
    ]
    out = []
    for i, r in enumerate(rows):
        params = r.get("params") or {}
        damaged = r.get("damaged")
        up = r.get("up_to_date")
        state = (
            "damaged"
            if damaged
            else "up-to-date"
            if up is True
            else "stale"
            if up is False
            else "unknown"
        )
        secs = r.get("train_seconds")
        out.append(
            {
                "run": str(r.get("run", "?")),
                "href": url_of(r["report"]) if r.get("report") else None,
                "params": ["\u2014" if k not in params else config_value(params[k]) for k in keys],
                "cells": [
                    {"text": fmt(cols[j][i]), "best": flags[j][i]} for j in range(len(RUNS_COLUMNS))
                ],
                "n": "\u2014" if r.get("n_images") is None else str(r["n_images"]),
                "train_s": f"{secs:.0f}" if _finite(secs) else "\u2014",
                "state": state,
                "css": state,
                "why": str(damaged or r.get("why") or ""),
            }
        )
    return {
        "split": split,
        "keys": keys,
        "columns": [t for t, _, _ in RUNS_COLUMNS],
        "rows": out,
        "n": len(out),
        "program": current().program,
    }


GENERATOR = b'<meta name="generator" content="vit-objseg runs page">'  # in runs.html.j2


def write_runs_page(outputs: Path, split: str, rows: list[dict[str, Any]]) -> Path:
    """Writes <outputs>/runs_<split>.html (atomically) from `runs`' rows; returns its path.
    A file of that name that this page did not write (no GENERATOR tag in its head, or not
    a regular file) is left alone: OwnershipError naming it."""
    path = runs_page_path(outputs, split)
    if path.is_symlink() or path.exists():
        head = b""
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                head = f.read(4096)
        if GENERATOR not in head:
            raise OwnershipError(
                f"{path}: not a runs page written by vit-objseg; move or "
                "delete it to write the page"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, render("runs.html.j2", runs_view(rows, split)).encode("utf-8"))
    return path
