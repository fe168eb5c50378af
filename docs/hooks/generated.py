"""MkDocs hooks (`hooks:` in mkdocs.yml): the parts of the site generated from the code.

A page asks for a generated part with a marker line; the hook replaces it while the site is
built, so the page and the code cannot disagree:

- `<!-- code-map -->`: per folder of `pipeline/`, a table of its modules, each with the
  first sentence of its docstring (read with `ast`, nothing imported).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"


def first_sentence(path: Path) -> str:
    """The first sentence of the module docstring of `path` ("" without one)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    text = " ".join(doc.strip().split("\n\n", 1)[0].split())
    end = re.search(r"\.(\s+[A-Z(`]|$)", text)
    return text[: end.start() + 1] if end else text


def code_map() -> str:
    """Markdown: per folder of the package (the package itself first), a table of its
    modules with the first sentence of each docstring."""
    folders: dict[Path, list[Path]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        folders.setdefault(path.parent, []).append(path)
    out: list[str] = []
    for folder in sorted(folders, key=lambda f: (f != PACKAGE, str(f))):
        rel = folder.relative_to(ROOT).as_posix()
        about = first_sentence(folder / "__init__.py") if folder != PACKAGE else ""
        out += [f"### `{rel}/`", "", *([about, ""] if about else []),
                "| module | holds |", "|---|---|"]
        for path in folders[folder]:
            if path.name == "__init__.py":
                continue
            text = first_sentence(path).replace("|", "\\|") or "-"
            out.append(f"| `{path.name}` | {text} |")
        out.append("")
    return "\n".join(out)


MARKERS = {"<!-- code-map -->": code_map}


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace each marker line with its generated Markdown (mkdocs passes page, config and
    files by keyword; none is needed)."""
    for marker, render in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown
