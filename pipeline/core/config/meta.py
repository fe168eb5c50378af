"""What each config key means, allows and makes stale, kept with its field in ``schema`` (as
detectron2's ``config/defaults.py`` keeps the meaning beside the default).

A field is declared with ``key(default, meaning, stale=..., ...)``; ``schema.key_docs()``
gathers them in the fields' order. Everything that explains a key reads this one place: the
docs site's configuration page, the README's table of keys (checked by a test),
``config show --explain KEY``, and the rules and their one-line errors (``rules``: the
ranges and choices enforced are the ones declared here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "Range",
    "KeyDoc",
    "key",
    "STALE_ALL",
    "STALE_TRAINED",
    "STALE_SPEED",
    "DEVICE_HELP",
    "NAME_HELP",
    "PATH_HELP",
    "DASK_LOCAL_WORKERS",
    "DASK_HELP",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key: lo..hi, each end included unless marked open.
    Integer keys use closed ranges; float keys must also be finite."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        """Whether `value` (finite, for a float) lies in the range."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def describe(self, integer: bool) -> str:
        """`an integer in 0..256` or `a finite number in (0, 10]`."""
        if integer:
            return f"an integer in {self.lo}..{self.hi}"
        return (
            f"a finite number in {'(' if self.lo_open else '['}{self.lo:g}, "
            f"{self.hi:g}{')' if self.hi_open else ']'}"
        )


# What a change makes stale, in the words that most keys share (a key with its own story
# writes it out: `stale="predict (...)"`).
STALE_ALL = "all three stages"
STALE_TRAINED = "train-head, predict"
STALE_SPEED = "nothing (speed only)"

# The rules that are not a range or a choice, in the words their errors and the docs use.
DEVICE_HELP = '"auto", "cpu", "cuda" or "cuda:N"'
NAME_HELP = "a plain folder name: no '/', no leading '.', no surrounding spaces"
PATH_HELP = "a path, not empty; a leading `~` is the home folder"
DASK_LOCAL_WORKERS = Range(1, 256)  # N of dask.scheduler = "local:N"
DASK_HELP = (
    f'"", "local:N" with N in {DASK_LOCAL_WORKERS.lo}..{DASK_LOCAL_WORKERS.hi}, '
    'or "tcp://host:port"'
)


@dataclass(frozen=True)
class KeyDoc:
    """The documentation of one config key (its default is the field's).

    meaning: one or two sentences, Markdown (backticks for values and keys).
    stale: what a change makes stale, i.e. recomputed by the next `run` (STALE_* or a phrase).
    range: a numeric key's fixed range (a list key: each entry's); enforced by ``rules``.
    choices: a string key's allowed values; enforced by ``rules``.
    length: a list key's number of entries; odd: an odd integer only; both enforced.
    allowed: a rule that is none of those, in words (e.g. DEVICE_HELP), checked in ``rules``.
    see: a page of the docs site (``docs/``) that tells more, e.g. "scaling.md#dask".
    """

    meaning: str
    stale: str
    range: Range | None = None
    choices: tuple[str, ...] = ()
    length: Range | None = None
    odd: bool = False
    allowed: str = ""
    see: str = ""


def key(
    default: T,
    meaning: str,
    *,
    stale: str,
    range: Range | None = None,
    choices: tuple[str, ...] = (),
    length: Range | None = None,
    odd: bool = False,
    allowed: str = "",
    see: str = "",
) -> T:
    """A config field: its default and its documentation (KeyDoc, in the field's metadata).
    A list default is copied for every Config (a dataclass default_factory)."""
    doc = KeyDoc(meaning, stale, range, choices, length, odd, allowed, see)
    if isinstance(default, list):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata={"doc": doc})  # type: ignore[return-value]
    return field(default=default, metadata={"doc": doc})


def field_doc(metadata: Any) -> KeyDoc | None:
    """The KeyDoc in a dataclass field's metadata (None: a field declared without key())."""
    doc = metadata.get("doc")
    return doc if isinstance(doc, KeyDoc) else None
