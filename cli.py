#!/usr/bin/env python
"""Command line of the segmentation pipeline: extract-features -> train-head -> predict.

Run `python cli.py --help`, or `python cli.py demo` for an offline end-to-end example.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from pipeline.commands.cli_cache import cache_group
from pipeline.commands.cli_export import export_model
from pipeline.commands.cli_runs import runs
from pipeline.commands.cli_segment import segment
from pipeline.commands.cli_status import status
from pipeline.commands.options import (
    DEFAULT_CONFIG,
    echo_outcome,
    guarded,
    run_option,
    scheduler_option,
    split_names,
    stage_command,
)
from pipeline.core.config import Config, load_config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vit-objseg", prog_name="vit-objseg")
def cli() -> None:
    """Binary object segmentation from frozen self-supervised ViT features."""
    # a file name that is not valid UTF-8 (surrogate-escaped) prints as \udcXX on a strict
    # UTF-8 stdout instead of failing the command (stderr does the same by default)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


@cli.command("extract-features")
@scheduler_option
@click.option("--split", "splits", multiple=True, callback=lambda c, p, v: split_names(v),
              help="Split(s) to extract (default: all).")
@stage_command
def extract_features(cfg: Config, force: bool, splits: tuple[str, ...]) -> None:
    """Stage 1: images -> backbone patch features in the HDF5 cache."""
    from pipeline.stages.extract import run_extract
    sys.exit(0 if echo_outcome(run_extract(cfg, splits, force=force, progress=True)) else 1)


@cli.command("train-head")
@run_option("train")
@stage_command
def train_head(cfg: Config, force: bool) -> None:
    """Stage 2: train the linear head and the PAC upsampler from the cache."""
    from pipeline.stages.train import run_train
    echo_outcome(run_train(cfg, force=force))


@cli.command()
@scheduler_option
@click.option("--split", default=None, callback=lambda c, p, v: split_names(v),
              help="Split to predict (default: data.test_split).")
@run_option("use")
@stage_command
def predict(cfg: Config, force: bool, split: str | None) -> None:
    """Stage 3: masks for a split, plus the IoU report."""
    from pipeline.stages.predict import run_predict
    echo_outcome(run_predict(cfg, split or cfg.data.test_split, force=force))


@cli.command()
@scheduler_option
@click.option("--split", default=None, callback=lambda c, p, v: split_names(v),
              help="Split to predict (default: data.test_split).")
@stage_command
def run(cfg: Config, force: bool, split: str | None) -> None:
    """All three stages in order, each skipped when up-to-date."""
    from pipeline.stages.workflow import run_all
    ok = [echo_outcome(outcome) for outcome in run_all(cfg, split or cfg.data.test_split, force)]
    sys.exit(0 if all(ok) else 1)


for command in (segment, export_model, status, runs, cache_group):
    cli.add_command(command)


@cli.group("config")
def config_group() -> None:
    """Inspect the effective configuration."""


@config_group.command("show")
@run_option(None)
@stage_command(computes=False)
def config_show(cfg: Config) -> None:
    """Print the effective config (file + --set) as TOML, to save and edit."""
    from pipeline.core.config import to_toml
    click.echo(to_toml(cfg), nl=False)


@cli.command()
@click.option("--config", "config_path", default=str(DEFAULT_CONFIG.parent / "demo.toml"),
              show_default=True, help="TOML config file of the demo.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (a TOML literal, or a bare string); repeatable.")
@click.option("--force", is_flag=True, help="Recompute every stage even when up-to-date.")
def demo(config_path: str, overrides: tuple[str, ...], force: bool) -> None:
    """Offline example: generate a small dataset and run all stages on it."""
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
    click.echo(f"demo: done in {time.perf_counter() - t0:.1f} s; open "
               f"{RunLayout.of(cfg).report(cfg.data.test_split, '.html')}")


if __name__ == "__main__":
    cli()
