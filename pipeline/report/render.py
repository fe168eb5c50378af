"""The Jinja2 templates of ``templates/`` and how they are rendered: ``report.html.j2`` and
``runs.html.j2`` autoescaped, ``report.md.j2`` with the ``md`` escaping filter, ``report.css``
inlined. No HTML is assembled in Python."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import display_name

if TYPE_CHECKING:
    from jinja2 import Environment
    from markupsafe import Markup

__all__ = ["TEMPLATE_DIR", "render"]

TEMPLATE_DIR = Path(__file__).with_name("templates")
_MD_SPECIAL = re.compile(r"([\\|`*\[\]<>#!])")
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def _md(text: object) -> str:
    """Text made safe for a Markdown table cell or heading (literal, one line)."""
    s = " ".join(str(text).split())
    s = _MD_SPECIAL.sub(r"\\\1", s)
    return _MD_UNDERSCORE.sub(r"\\_", s)


@functools.lru_cache(maxsize=1)
def _env() -> Environment:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=FileSystemLoader(str(TEMPLATE_DIR)),
        # HTML (and anything not named .md.j2) is autoescaped; Markdown escapes with |md
        autoescape=select_autoescape(
            enabled_extensions=("html.j2", "html"),
            disabled_extensions=("md.j2",),
            default_for_string=True,
            default=True,
        ),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["md"] = _md
    env.filters["wbr"] = _wbr
    return env


def _wbr(text: object) -> Markup:
    """Escaped text with a line-break opportunity after each underscore (narrow headers)."""
    from markupsafe import Markup, escape

    return Markup("_<wbr>").join(escape(part) for part in str(text).split("_"))


def render(template: str, vm: dict[str, Any]) -> str:
    """The rendered page as valid UTF-8 text: the names were shown with display_name by the
    view model, and anything else from the report (a config path such as data.root) that
    holds a non-UTF-8 name's surrogates shows U+FFFD there too."""
    return display_name(_env().get_template(template).render(**vm))
