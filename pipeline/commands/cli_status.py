"""`status`: one line per stage (the stage list: stages/workflow.py, loaded when it runs)."""

from __future__ import annotations

import click

from ..core.config import Config
from .options import examples, reads_run, split_option


@click.command(
    short_help="One line per stage: up-to-date, stale (why) or missing.",
    epilog=examples("status", "status --split val --verify"),
)
@split_option("Split whose predictions to check (default: data.test_split).")
@click.option(
    "--verify",
    is_flag=True,
    help="Rehash every input and output, ignoring the checksum memo (reads all the "
    "data and the cache); what is found damaged is marked for repair.",
)
@reads_run
def status(cfg: Config, split: str | None, verify: bool) -> None:
    """One line per stage: up-to-date, stale (why) or missing; exit 0."""
    from ..stages.base import Context
    from ..stages.workflow import statuses

    for st in statuses(Context.of(cfg, split, verify)):
        click.echo(st.line())
