#!/usr/bin/env python
"""Command line of the segmentation pipeline: extract-features -> train-head -> predict.

Run `python cli.py --help`, or `python cli.py demo` for an offline end-to-end example.
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import click

from pipeline.config import Config, load_config
from pipeline.errors import PipelineError, UsageError

# The checkout's default config; an installed command without a checkout uses the same
# values built into pipeline/config.py (a test keeps the two equal).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.toml"


def load(config_path: str | Path | None, overrides) -> Config:
    """The effective config: `config_path` (default: DEFAULT_CONFIG when present, else the
    built-in defaults) with the --set overrides applied."""
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    return load_config(config_path, overrides)


def _fail(message: str, code: int) -> None:
    """Print `message` as one `error:` line (a library's multi-line text is joined) and exit."""
    one_line = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    click.echo(f"error: {one_line}", err=True)
    sys.exit(code)


def os_error_line(e: OSError) -> str:
    """One line for a filesystem error: the file and the problem (permission, full disk,
    symlink loop, ...), never a traceback."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
    what = e.strerror or type(e).__name__
    return f"{where}: {what}" if where else what


MEMORY_ADVICE = ("lower extract.batch_size, predict.batch_size, train.crop, upsampler.hidden, "
                 "upsampler.channels, upsampler.kernel_size or data.max_pixels")


def allocation_failure(e: BaseException) -> bool:
    """Whether `e` is an allocator's out-of-memory error: MemoryError, torch's CUDA
    OutOfMemoryError, or the RuntimeError of torch's CPU allocator (it has no type of its own)."""
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(e, RuntimeError) and "DefaultCPUAllocator" in str(e)


def guarded(call, *args, **kwargs):
    """Run `call`, mapping user-facing errors to their exit code at this one boundary:
    PipelineError (1, or 2 for usage errors), OSError (1), out of memory (1), Ctrl-C (130)."""
    try:
        return call(*args, **kwargs)
    except PipelineError as e:
        _fail(str(e), e.exit_code)
    except OSError as e:
        _fail(os_error_line(e), 1)
    except (MemoryError, RuntimeError) as e:
        if not allocation_failure(e):
            raise
        first = (str(e).splitlines() or [type(e).__name__])[0]
        _fail(f"out of memory ({first[:160]}): {MEMORY_ADVICE}", 1)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: rerun the same command to resume", err=True)
        sys.exit(130)


def stage_command(func):
    """Common options of the stage commands, config loading and the exit-code policy:
    0 success, 1 a failed stage (bad data, missing upstream), 2 a usage error."""
    @click.option("--config", "config_path", default=None,
                  help="TOML config file [default: configs/default.toml of this checkout].")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config key (a TOML literal, or a bare string); repeatable.")
    @click.option("--force", is_flag=True, help="Recompute even when the stage is up to date.")
    @functools.wraps(func)
    def wrapper(config_path, overrides, force, **kwargs):
        distributable = "scheduler" in kwargs  # the command runs on Dask when configured
        scheduler = kwargs.pop("scheduler", None)
        if scheduler:
            overrides = (*overrides, f"dask.scheduler={scheduler}")
        cfg = guarded(load, config_path, overrides)
        if distributable and cfg.dask.scheduler:
            from pipeline.executors import require_distributed
            guarded(require_distributed)
        from pipeline.devices import apply_threads
        apply_threads(cfg.run.threads)
        return guarded(func, cfg, force=force, **kwargs)
    return wrapper


def split_names(value):
    """A --split value (or several) checked to be plain folder names: a `/`, `..` or an
    absolute path would make the stages write outside their folders (exit 2, one line)."""
    from pipeline.config import check_name
    for name in (value if isinstance(value, tuple) else (value,) if value else ()):
        guarded(check_name, "--split", name)
    return value


scheduler_option = click.option(
    "--scheduler", default=None, metavar="ADDRESS",
    help='Run on Dask: "local:N" or "tcp://host:8786" (same as --set dask.scheduler=...).')


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vit-objseg", prog_name="vit-objseg")
def cli() -> None:
    """Binary object segmentation from frozen self-supervised ViT features."""
    # a file name that is not valid UTF-8 (surrogate-escaped) prints as \udcXX on a strict
    # UTF-8 stdout instead of failing the command (stderr does the same by default)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def do_extract(cfg, force: bool, splits=()) -> bool:
    from pipeline.extract import run_extract
    res = run_extract(cfg, splits, force=force, progress=True)
    if res.up_to_date:
        click.echo("extract-features: up to date")
        if res.n_errors:
            click.echo(f"note: {res.n_errors} file(s) were skipped when the cache was built "
                       "(rerun with --force to list them)", err=True)
        return True
    rate = res.n_images / res.seconds if res.seconds > 0 else 0.0
    click.echo(f"extract-features: {res.n_images} images in {res.seconds:.1f} s "
               f"({rate:.1f} images/s), cache {_human_bytes(res.cache_bytes)}"
               + (f", {res.n_errors} skipped" if res.n_errors else ""))
    if res.errors:
        for e in res.errors:
            click.echo(f"  skipped: {e}", err=True)
        click.echo(f"error: {res.n_errors} file(s) could not be used (listed above); "
                   "the other images are cached", err=True)
        return False
    return True


@cli.command("extract-features")
@scheduler_option
@click.option("--split", "splits", multiple=True, callback=lambda c, p, v: split_names(v),
              help="Split(s) to extract (default: all).")
@stage_command
def extract_features(cfg, force, splits):
    """Stage 1: images -> backbone patch features in the HDF5 cache."""
    sys.exit(0 if do_extract(cfg, force, splits) else 1)


def do_train(cfg, force: bool) -> None:
    from pipeline.train import run_train
    res = run_train(cfg, force=force)
    if res.up_to_date:
        click.echo("train-head: up to date")
    else:
        click.echo(f"train-head: trained in {res.seconds:.1f} s; models in {res.model_dir}")


@cli.command("train-head")
@stage_command
def train_head(cfg, force):
    """Stage 2: train the linear head and the PAC upsampler from the cache."""
    do_train(cfg, force)


def do_predict(cfg, force: bool, split: str) -> None:
    from pipeline.predict import run_predict
    res = run_predict(cfg, split, force=force)
    if res.up_to_date:
        click.echo(f"predict [{split}]: up to date; report {res.report_json}")
        return
    click.echo(f"predict [{split}]: {res.n_predicted} images in {res.seconds:.1f} s "
               f"({res.n_images} annotated, scored); masks in {res.predictions_dir}")
    click.echo(f"report: {res.report_json} (also .md and .html)")
    for line in res.headline:
        click.echo(f"  {line}")


@cli.command()
@scheduler_option
@click.option("--split", default=None, callback=lambda c, p, v: split_names(v),
              help="Split to predict (default: data.test_split).")
@stage_command
def predict(cfg, force, split):
    """Stage 3: masks for a split, plus the IoU report."""
    do_predict(cfg, force, split or cfg.data.test_split)


@cli.command()
@scheduler_option
@click.option("--split", default=None, callback=lambda c, p, v: split_names(v),
              help="Split to predict (default: data.test_split).")
@stage_command
def run(cfg, force, split):
    """All three stages in order, each skipped when up to date."""
    split = split or cfg.data.test_split
    needed = [cfg.data.train_split, split] + ([cfg.data.val_split] if cfg.data.val_split else [])
    ok = do_extract(cfg, force, tuple(dict.fromkeys(needed)))
    do_train(cfg, force)
    do_predict(cfg, force, split)
    sys.exit(0 if ok else 1)


def do_segment(cfg, force: bool, paths, out_dir, overlays: bool) -> bool:
    from pipeline.segment import run_segment
    res = run_segment(cfg, paths, out_dir, overlays=overlays, force=force,
                      warn=lambda line: click.echo(f"  skipped: {line}", err=True))
    if res.n_written == 0 and not res.errors:
        click.echo(f"segment: {res.n_current} masks up to date -> {res.out_dir}")
        return True
    rate = res.n_written / res.seconds if res.seconds > 0 else 0.0
    click.echo(f"segment: {res.n_written} masks in {res.seconds:.1f} s ({rate:.1f} images/s)"
               + (f", {res.n_current} up to date" if res.n_current else "") + f" -> {res.out_dir}")
    if res.errors:
        click.echo(f"error: {len(res.errors)} image(s) or folder(s) could not be segmented "
                   "(listed above); the other masks are written", err=True)
        return False
    return True


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: <paths.outputs>/<run.name>/segment].")
@click.option("--overlays/--no-overlays", default=True, show_default=True,
              help="Also write overlays/<path>.jpg: the image with the mask tinted and outlined.")
@stage_command
def segment(cfg, force, paths, out_dir, overlays):
    """Masks for image files or folders (recursive) with the run's trained models."""
    sys.exit(0 if do_segment(cfg, force, paths, out_dir, overlays) else 1)


@cli.command("export")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The .pt2 file [default: <paths.outputs>/<run.name>/model.pt2].")
@click.option("--height", type=int, default=None,
              help="Example image height for tracing, a multiple of the patch size "
                   "[default: 14 patches].")
@click.option("--width", type=int, default=None,
              help="Example image width for tracing, a multiple of the patch size "
                   "[default: 20 patches].")
@stage_command
def export_model(cfg, force, out_file, height, width):
    """One self-contained torch.export file: uint8 images -> object probability."""
    from pipeline.export import run_export
    res = run_export(cfg, out_file, height=height, width=width, force=force)
    if res.up_to_date:
        click.echo(f"export: up to date -> {res.path}")
    else:
        click.echo(f"export: {res.path} ({_human_bytes(res.bytes)}) in {res.seconds:.1f} s; "
                   f"input uint8 (B, 3, H, W), H and W multiples of {res.patch_size}")


@cli.command()
@click.option("--split", default=None, callback=lambda c, p, v: split_names(v),
              help="Split whose predictions to check (default: data.test_split).")
@click.option("--verify", is_flag=True,
              help="Rehash every input and output, ignoring the checksum memo (reads all the "
                   "data and the cache); what is found damaged is marked for repair.")
@stage_command
def status(cfg, force, split, verify):
    """One line per stage: up-to-date, stale (why) or missing."""
    from pipeline import extract, train
    from pipeline import predict as predict_stage
    from pipeline.stages import StageStatus
    split = split or cfg.data.test_split
    checks = ((extract.STAGE, extract.status, (cfg, (), verify)),
              (train.STAGE, train.status, (cfg,)),
              (predict_stage.stage_name(split), predict_stage.status, (cfg, split, verify)))
    for name, check, args in checks:
        try:
            st = check(*args)
        except UsageError:  # a config no command can use (e.g. backbone.layers): exit 2
            raise
        except (PipelineError, OSError) as e:  # status reports, it never fails
            why = os_error_line(e) if isinstance(e, OSError) else str(e)
            st = StageStatus(name, "stale", f"cannot check: {why}")
        click.echo(st.line())


@cli.command()
@click.option("--split", default=None, callback=lambda c, p, v: split_names(v),
              help="Split whose reports to compare (default: data.test_split).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@stage_command
def runs(cfg, force, split, as_json):
    """One row per run: the config keys that differ, the split's metrics, up to date or not
    (judged in the run's folder as listed; a damaged file is a row that says so)."""
    import json

    from pipeline import runs as runs_mod
    split = split or cfg.data.test_split
    rows = runs_mod.collect(cfg, split)
    if as_json:
        # strict JSON: every number in a row is finite (damaged files are rows that say so)
        click.echo(json.dumps(runs_mod.as_json(rows), indent=1, allow_nan=False))
    elif not rows:
        click.echo(f"no runs under {cfg.paths.outputs}")
    else:
        click.echo(runs_mod.table(rows))


@cli.group("config")
def config_group() -> None:
    """Inspect the effective configuration."""


@config_group.command("show")
@stage_command
def config_show(cfg, force):
    """Print the effective config (file + --set) as TOML, to save and edit."""
    from pipeline.config import to_toml
    click.echo(to_toml(cfg), nl=False)


@cli.command()
@click.option("--config", "config_path", default=str(DEFAULT_CONFIG.parent / "demo.toml"),
              show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--force", is_flag=True)
def demo(config_path, overrides, force):
    """Offline example: generate a small dataset and run all stages on it."""
    from pipeline.owned import claim_folder
    from pipeline.store import CACHE_LEGACY
    from pipeline.synth import make_dataset
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
    click.echo(f"demo: done in {time.perf_counter() - t0:.1f} s; open "
               f"{cfg.run_dir / f'report_{cfg.data.test_split}.html'}")


if __name__ == "__main__":
    cli()
