"""MkDocs hooks (`hooks:` in mkdocs.yml): the parts of the site generated from the code.

A page asks for a generated part with a marker line; the hook replaces it while the site is
built, so the page and the code cannot disagree:

- `<!-- code-map -->`: a table of the modules under `pipeline/`, each with the first line of
  its docstring (read with `ast`, nothing imported).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"


def first_line(path: Path) -> str:
    """The first sentence-line of the module docstring of `path` ("" without one)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    line = doc.strip().split("\n\n", 1)[0]
    return " ".join(line.split())


def code_map() -> str:
    """A Markdown table: each module of the package (by path) and its docstring's first
    paragraph, packages first by folder."""
    rows = ["| module | holds |", "|---|---|"]
    for path in sorted(PACKAGE.rglob("*.py"), key=lambda p: (p.parent != PACKAGE, str(p))):
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" and not first_line(path):
            continue
        text = first_line(path).replace("|", "\\|") or "-"
        rows.append(f"| `{rel}` | {text} |")
    return "\n".join(rows)


MARKERS = {"<!-- code-map -->": code_map}


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace each marker line with its generated Markdown (mkdocs passes page, config and
    files by keyword; none is needed)."""
    for marker, render in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown
