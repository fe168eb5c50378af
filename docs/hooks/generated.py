"""MkDocs hooks (`hooks:` in mkdocs.yml): the parts of the site generated from the code.

A page asks for a generated part with a marker line; the hook replaces it while the site is
built, so the page and the code cannot disagree:

- `<!-- code-map -->`: per folder of `pipeline/`, a table of its modules, each with the
  first sentence of its docstring (read with `ast`, nothing imported).
- `<!-- backbone-table -->`: the backbone registry (`pipeline/core/registry.py`): names,
  sources, patch sizes, channels and layers.
- `<!-- config-reference -->`: every config key with its meaning, default, allowed values
  and what a change makes stale, from the fields of the config module (`key_docs()`).

`readme_row(key)` is the README's row of a key in its short table (tests/test_docs.py
checks the README against it).
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


def backbone_table() -> str:
    """Markdown: one row per registered backbone."""
    from pipeline.core.registry import specs

    rows = ["| `backbone.name` | from | patch (stride) | channels | `backbone.layers` |",
            "|---|---|---:|---|---|"]
    for spec in specs():
        if spec.kind == "vit":
            channels = f"{spec.embed_dim} per block"
        else:
            channels = " + ".join(str(c) for c in spec.tap_channels) + " (one per layer)"
        rows.append(f"| `{spec.name}` | `{spec.source}` | {spec.patch_size} | {channels} | "
                    f"1 to {spec.max_layers}; 0 = {spec.default_layers} |")
    return "\n".join(rows)


def _docs_link(see: str) -> str:
    """`see` ("data.md" or "scaling.md#dask") as a Markdown link from a page in docs/."""
    page, _, anchor = see.partition("#")
    title = anchor.replace("-", " ") if anchor else page.removesuffix(".md").replace("-", " ")
    return f"[{title}]({see})"


def config_reference() -> str:
    """Markdown: per config section, each key as a heading (its anchor is the key) with its
    meaning, default, allowed values and what a change makes stale."""
    from pipeline.core.config import allowed_text, key_docs, toml_literal

    out: list[str] = []
    section = ""
    for key, doc in key_docs().items():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            out += [f"## `[{section}]`", ""]
        see = f" See {_docs_link(doc.see)}." if doc.see else ""
        out += [f"### `{key}` {{#{key}}}", "", f"{doc.meaning}{see}", "",
                f"- default: `{toml_literal(doc.default)}`"]
        allowed = allowed_text(key)
        if allowed:
            out.append(f"- allowed: {allowed}")
        out += [f"- a change makes stale: {doc.stale}", ""]
    return "\n".join(out)


def readme_row(key: str) -> str:
    """The row of `key` in the README's short table: key, default, meaning."""
    from pipeline.core.config import key_docs, toml_literal

    doc = key_docs()[key]
    return f"| `{key}` | `{toml_literal(doc.default)}` | {doc.meaning} |"


MARKERS = {"<!-- code-map -->": code_map, "<!-- backbone-table -->": backbone_table,
           "<!-- config-reference -->": config_reference}


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace each marker line with its generated Markdown (mkdocs passes page, config and
    files by keyword; none is needed)."""
    for marker, render in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown
