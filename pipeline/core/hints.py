"""Repair hints that name a command the user can paste: the program as they ran it
(`vit-objseg` installed, `python cli.py` from a checkout) and their `--config` / `--set` /
`--run`, so that after `--set data.root=X` the hint extracts X, not the default dataset.

cli.py records the invocation once per command (`invoked`); the library below builds every
hint with `command` and never imports click. Without a CLI (the library called from Python)
hints say `python cli.py` with no options."""

from __future__ import annotations

import os
import shlex
from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Invocation:
    """How the user ran the tool: the program and the options that shape the config."""

    program: str = "python cli.py"
    config: str | None = None  # --config
    sets: tuple[str, ...] = ()  # --set KEY=VALUE, in order
    run: str | None = None  # --run NAME
    run_commands: frozenset[str] = frozenset()  # the commands that take --run


_current = Invocation()


def program_of(argv0: str) -> str:
    """The program as the user typed it: `python <script>` for a Python file (cli.py, as
    given: relative or absolute), else the command's own name (`vit-objseg`, found on PATH)."""
    if argv0.endswith(".py"):
        return f"python {shlex.quote(argv0)}"
    return shlex.quote(os.path.basename(argv0) or "vit-objseg")


def invoked(
    argv0: str,
    config: str | None,
    sets: Sequence[str],
    run: str | None = None,
    run_commands: Collection[str] = (),
) -> None:
    """Record how this process was invoked (cli.py, once per command)."""
    global _current
    _current = Invocation(
        program_of(argv0),
        None if config is None else str(config),
        tuple(sets),
        run,
        frozenset(run_commands),
    )


def current() -> Invocation:
    return _current


def command(name: str, *args: str) -> str:
    """The command line that runs `name` (e.g. "extract-features", or "config show") with
    `args` under the user's program and options: `--run NAME` where that command takes it
    (and `args` give none), then `--config` and each `--set`, shell-quoted."""
    inv = _current
    parts = [*name.split(), *args]
    if inv.run is not None and name in inv.run_commands and "--run" not in args:
        parts += ["--run", inv.run]
    if inv.config is not None:
        parts += ["--config", inv.config]
    for s in inv.sets:
        parts += ["--set", s]
    return " ".join([inv.program, *(shlex.quote(p) for p in parts)])
