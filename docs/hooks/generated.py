"""MkDocs hooks (`hooks:` in mkdocs.yml): the parts of the site generated from the code.

A page asks for a generated part with a marker line; the hook replaces it while the site is
built, so the page and the code cannot disagree:

- `<!-- code-map -->`: per folder of `pipeline/`, a table of its modules, each with the
  first sentence of its docstring (read with `ast`, nothing imported).
- `<!-- backbone-table -->`: the backbone registry (`pipeline/core/registry.py`): names,
  sources, patch sizes, channels and layers.
- `<!-- commands-reference -->`: `python cli.py --help` as it prints, then each command in
  the group's (pipeline) order through mkdocs-click, followed by its examples (its epilog).
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
        out += [
            f"### `{rel}/`",
            "",
            *([about, ""] if about else []),
            "| module | holds |",
            "|---|---|",
        ]
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

    rows = ["| name | from | patch | channels | layers | 0 means |", "|---|---|---:|---|---:|---:|"]
    for spec in specs():
        if spec.kind == "vit":
            channels = f"{spec.embed_dim} a block"
        else:
            channels = " + ".join(str(c) for c in spec.tap_channels)
        rows.append(
            f"| `{spec.name}` | {spec.source.split(':')[0]} | {spec.patch_size} | "
            f"{channels} | "
            f"1 to {spec.max_layers} | {spec.default_layers} |"
        )
    return "\n".join(rows)


def _docs_link(see: str) -> str:
    """`see` ("data.md" or "scaling.md#dask") as a Markdown link from a page in docs/."""
    page, _, anchor = see.partition("#")
    title = anchor.replace("-", " ") if anchor else page.removesuffix(".md").replace("-", " ")
    return f"[{title}]({see})"


def config_reference() -> str:
    """Markdown: per config section, each key as a heading (its anchor is the key) with its
    meaning, default, allowed values and what a change makes stale."""
    from pipeline.core.config import Config, allowed_text, key_docs, toml_literal

    defaults, out = Config(), []
    section = ""
    for key, doc in key_docs().items():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            out += [f"## `[{section}]`", ""]
        see = f" See {_docs_link(doc.see)}." if doc.see else ""
        out += [
            f"### `{key}` {{#{key}}}",
            "",
            f"{doc.meaning}{see}",
            "",
            f"- default: `{toml_literal(defaults.get(key))}`",
        ]
        allowed = allowed_text(key)
        if allowed:
            out.append(f"- allowed: {allowed}")
        out += [f"- a change makes stale: {doc.stale}", ""]
    return "\n".join(out)


def _command_attribute(command: Any) -> tuple[str, str]:
    """(module, attribute) under which `command` (a Click command) is importable, for
    mkdocs-click's `:module:` and `:command:`."""
    import sys

    module = sys.modules[command.callback.__module__]
    name = next(n for n, v in vars(module).items() if v is command)
    return module.__name__, name


def _epilog_examples(command: Any) -> list[str]:
    """The example lines of a command's epilog (`examples(...)`)."""
    lines = (command.epilog or "").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("python cli.py")]


def commands_reference() -> str:
    """Markdown: the top-level --help, then per command (in the group's order) mkdocs-click's
    rendering of its options and its examples."""
    import click

    from cli import cli

    ctx = click.Context(cli, info_name="python cli.py", terminal_width=88, max_content_width=88)
    out = ["```text", cli.get_help(ctx), "```", ""]
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        module, attribute = _command_attribute(command)
        out += [
            "::: mkdocs-click",
            f"    :module: {module}",
            f"    :command: {attribute}",
            f"    :prog_name: python cli.py {name}",
            "    :depth: 1",
            "    :style: plain",
        ]
        if isinstance(command, click.Group):
            out.append("    :list_subcommands: true")
        out.append("")
        groups = [command, *getattr(command, "commands", {}).values()]
        for sub in groups:
            lines = _epilog_examples(sub)
            if lines:
                title = "Examples" if sub is command else f"Examples of `{name} {sub.name}`"
                out += [f"**{title}:**", "", "```bash", *lines, "```", ""]
    return "\n".join(out)


def readme_row(key: str) -> str:
    """The row of `key` in the README's short table: key, default, meaning, allowed."""
    from pipeline.core.config import Config, allowed_text, key_docs, toml_literal

    doc = key_docs()[key]
    allowed = allowed_text(key) or "-"
    return f"| `{key}` | `{toml_literal(Config().get(key))}` | {doc.meaning} | {allowed} |"


MARKERS = {
    "<!-- code-map -->": code_map,
    "<!-- backbone-table -->": backbone_table,
    "<!-- commands-reference -->": commands_reference,
    "<!-- config-reference -->": config_reference,
}


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace each marker line with its generated Markdown (mkdocs passes page, config and
    files by keyword; none is needed)."""
    for marker, render in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown
