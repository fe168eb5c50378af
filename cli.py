#!/usr/bin/env python
"""Command line of the segmentation pipeline: extract-features -> train-head -> predict.

Run `python cli.py --help`, or `python cli.py demo` for an offline end-to-end example.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from pipeline.commands.cli_cache import cache
from pipeline.commands.cli_export import export
from pipeline.commands.cli_runs import runs
from pipeline.commands.cli_segment import segment
from pipeline.commands.cli_status import status
from pipeline.commands.options import (
    DEFAULT_CONFIG,
    echo_outcome,
    examples,
    guarded,
    predict_options,
    reads_run,
    run_option,
    scheduler_option,
    set_option,
    split_option,
    stage_command,
    uses_run,
)
from pipeline.core.config import Config, load_config


class InOrder(click.Group):
    """A group that lists its commands in the order they were added (the pipeline's order),
    not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:  # noqa: ARG002 (Click's signature)
        return list(self.commands)


@click.group(
    cls=InOrder,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=examples("demo", "run --set data.root=data/obj_seg"),
)
@click.version_option(package_name="vit-objseg", prog_name="vit-objseg")
def cli() -> None:
    """Binary object segmentation from frozen self-supervised ViT features.

    The stages in order: extract-features, train-head, predict (or all three: run);
    `python cli.py COMMAND --help` shows a command's options and examples."""
    # a file name that is not valid UTF-8 (surrogate-escaped) prints as \udcXX on a strict
    # UTF-8 stdout instead of failing the command (stderr does the same by default)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


@cli.command(
    short_help="Stage 1: cache the backbone features of every split.",
    epilog=examples("extract-features", "extract-features --split train --set backbone.layers=2"),
)
@scheduler_option
@split_option("Split(s) to extract (default: all).", several=True)
@stage_command
def extract_features(cfg: Config, force: bool, splits: tuple[str, ...]) -> None:
    """Stage 1: images -> backbone patch features in the HDF5 cache (all splits by default)."""
    from pipeline.stages.extract import run_extract

    sys.exit(0 if echo_outcome(run_extract(cfg, splits, force=force, progress=True)) else 1)


@cli.command(
    "train-head",
    short_help="Stage 2: train the linear head and the PAC upsampler.",
    epilog=examples("train-head", "train-head --set run.name=long --set train.epochs=40"),
)
@run_option("train")
@stage_command
def train_head(cfg: Config, force: bool) -> None:
    """Stage 2: train the linear head and the PAC upsampler from the cache."""
    from pipeline.stages.train import run_train

    echo_outcome(run_train(cfg, force=force))


@cli.command(
    short_help="Stage 3: masks and reports (IoU, J, F) for a split.",
    epilog=examples("predict --split test", "predict --run long --set predict.threshold=0.3"),
)
@predict_options
@uses_run
def predict(cfg: Config, force: bool, split: str | None) -> None:
    """Stage 3: masks for a split, plus the IoU / J / F reports (JSON, Markdown, HTML)."""
    from pipeline.stages.predict import run_predict

    echo_outcome(run_predict(cfg, split or cfg.data.test_split, force=force))


@cli.command(
    short_help="All three stages in order, each skipped when up to date.",
    epilog=examples("run", "run --set data.layout=davis2016 --set data.test_split=val"),
)
@predict_options
@stage_command
def run(cfg: Config, force: bool, split: str | None) -> None:
    """All three stages in order, each skipped when up-to-date."""
    from pipeline.stages.workflow import run_all

    ok = [echo_outcome(outcome) for outcome in run_all(cfg, split or cfg.data.test_split, force)]
    sys.exit(0 if all(ok) else 1)


# the pipeline's order in `--help`: the stages, what checks and uses them, then the rest
for command in (status, segment, export, runs):
    cli.add_command(command)


@cli.group(
    "config",
    cls=InOrder,
    short_help="The effective configuration, or one key explained.",
    epilog=examples("config show > mine.toml", "config show --explain train.lr"),
)
def config_group() -> None:
    """Inspect the effective configuration."""


@config_group.command(
    "show",
    epilog=examples(
        "config show --set train.lr=1e-3 > mine.toml", "config show --explain data.max_pixels"
    ),
)
@click.option(
    "--explain",
    "explain_key",
    default=None,
    metavar="KEY",
    help="Explain one key instead: its meaning, value, default, what it allows and "
    "what a change makes stale.",
)
@reads_run
def config_show(cfg: Config, explain_key: str | None) -> None:
    """Print the effective config (file + --set) as TOML, to save and edit (it loads back
    equal); with --explain KEY, what that key means."""
    from pipeline.core.config import explain, to_toml

    if explain_key is not None:
        click.echo(guarded(explain, explain_key, cfg))
        return
    click.echo(to_toml(cfg), nl=False)


cli.add_command(cache)


@cli.command(
    short_help="Offline example: a generated dataset through all stages.",
    epilog=examples("demo", "demo --force"),
)
@click.option(
    "--config",
    "config_path",
    default=str(DEFAULT_CONFIG.parent / "demo.toml"),
    show_default=True,
    help="TOML config file of the demo.",
)
@set_option
@click.option("--force", is_flag=True, help="Recompute every stage even when up-to-date.")
def demo(config_path: str, overrides: tuple[str, ...], force: bool) -> None:
    """Offline example: generate a small dataset and run all stages on it (with
    configs/demo.toml: a randomly initialised MobileNetV2, a short training), then print
    where the report is."""
    from pipeline.core.owned import claim_folder
    from pipeline.data.synth import make_dataset
    from pipeline.store import CACHE_LEGACY

    cfg = guarded(load_config, config_path, overrides)
    root = Path(cfg.data.root)
    if not (root / "train").is_dir() and not (root / "ImageSets").is_dir():
        # the generated dataset is the tool's: under the cache (claimed first), or in a new
        # or empty data.root, never written into a folder of the user's
        guarded(claim_folder, cfg.paths.cache, "paths.cache", CACHE_LEGACY)
        guarded(claim_folder, root, "data.root (for the generated dataset)")
        click.echo(f"demo: writing a generated dataset to {root}")
        make_dataset(root, cfg.data.layout, {"train": 12, "test": 6}, size=(192, 256))
    t0 = time.perf_counter()
    args = ["run", "--config", config_path] + [a for o in overrides for a in ("--set", o)]
    if force:
        args.append("--force")
    try:
        cli.main(args, standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise
    from pipeline.core.layout import RunLayout

    click.echo(
        f"demo: done in {time.perf_counter() - t0:.1f} s; open "
        f"{RunLayout.of(cfg).report(cfg.data.test_split, '.html')}"
    )


if __name__ == "__main__":
    cli()
