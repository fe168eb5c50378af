"""`runs`: one row per run (the work: commands/runs.py, loaded when it runs)."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.config import Config
from .options import examples, split_option, stage_command


@click.command(
    short_help="The runs side by side: differing keys and metrics.",
    epilog=examples("runs", "runs --filter 'run=lr*' --markdown"),
)
@split_option(
    "Split whose reports to compare [default: each run's own data.test_split, "
    "as recorded when it was trained]."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--markdown",
    "as_markdown",
    is_flag=True,
    help="Print a Markdown table (to paste) instead of the aligned plain-text one.",
)
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="KEY=VALUE",
    help="Only the runs whose recorded config has this value (a TOML literal or a "
    "string; * and ? match any text; KEY `run` is the run's name); repeatable: "
    "all must match.",
)
@click.option(
    "--keys",
    "keys",
    default=None,
    metavar="K,...",
    help="The config keys to show as columns, comma-separated [default: those whose "
    "values differ between the runs listed].",
)
@click.option(
    "--html",
    "as_html",
    is_flag=True,
    help="Also write the table as <paths.outputs>/runs_<split>.html, each run linking "
    "to its report (offline), and print its path.",
)
@stage_command(computes=False)
def runs(
    cfg: Config,
    split: str | None,
    as_json: bool,
    as_html: bool,
    as_markdown: bool,
    filters: tuple[str, ...],
    keys: str | None,
) -> None:
    """One row per run: the config keys that differ, the split's metrics, up-to-date or not
    (judged in the run's folder as listed; a damaged file is a row that says so)."""
    import json

    from . import runs as runs_mod

    outputs = Path(cfg.paths.outputs)
    wanted = runs_mod.parse_filters(filters)
    columns = (
        None
        if keys is None
        else runs_mod.check_keys([k.strip() for k in keys.split(",") if k.strip()], "--keys")
    )
    rows = runs_mod.collect(outputs, cfg.data.test_split, split, wanted, columns)
    split = split or cfg.data.test_split
    if as_html:
        from ..report.runs_page import write_runs_page

        page = write_runs_page(outputs, split, runs_mod.as_json(rows))
        click.echo(f"runs page: {page}", err=True)
    if as_json:
        # strict JSON: every number in a row is finite (damaged files are rows that say so)
        click.echo(json.dumps(runs_mod.as_json(rows), indent=1, allow_nan=False))
    elif not rows:
        unmatched = filters and runs_mod.run_dirs(outputs)
        click.echo(
            f"no runs under {cfg.paths.outputs}" + (" match the --filter" if unmatched else "")
        )
    else:
        click.echo(runs_mod.markdown(rows) if as_markdown else runs_mod.table(rows))
