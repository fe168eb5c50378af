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

from pipeline.core import hints
from pipeline.core.config import Config, load_config
from pipeline.core.errors import PipelineError, os_error_line
from pipeline.core.progress import plural

# The checkout's default config; an installed command without a checkout uses the same
# values built into pipeline/core/config.py (a test keeps the two equal).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.toml"


def load(config_path: str | Path | None, overrides) -> Config:
    """The effective config: `config_path` (default: DEFAULT_CONFIG when present, else the
    built-in defaults) with the --set overrides applied."""
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    return load_config(config_path, overrides)


def load_run(config_path: str | Path | None, overrides, name: str, guard: str | None) -> Config:
    """`--run NAME`: the run's recorded config (found under the paths.outputs of --config /
    --set or the default) with the --config file's keys and the --set overrides on top.
    `guard`: "use" (segment, predict, export) or "train" (train-head) refuse a key that would
    make the run's models stale (exit 2); None (status, config show) shows it."""
    from pipeline.runconfig import load_run_config, refuse_stale
    run = load_run_config(load(config_path, overrides), name, config_path, overrides)
    if guard is not None:
        refuse_stale(run, training=guard == "train")
    return run.cfg


def _fail(message: str, code: int) -> None:
    """Print `message` as one `error:` line (a library's multi-line text is joined) and exit."""
    one_line = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    click.echo(f"error: {one_line}", err=True)
    sys.exit(code)


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


def stage_command(func=None, *, computes: bool = True):
    """Common options of the commands, config loading and the exit-code policy: 0 success,
    1 a failed stage (bad data, missing upstream), 2 a usage error. `computes`: the command
    computes something (a stage, segment, export), so it takes --force and sets the threads;
    `@stage_command(computes=False)` for those that only read (status, runs, config show,
    cache list / gc): no --force, and torch's threads untouched."""
    if func is None:
        return functools.partial(stage_command, computes=computes)

    def force_option(f):
        return click.option("--force", is_flag=True,
                            help="Recompute even when the result is up-to-date.")(f) \
            if computes else f

    @click.option("--config", "config_path", default=None,
                  help="TOML config file [default: configs/default.toml of this checkout].")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config key (a TOML literal, or a bare string); repeatable.")
    @force_option
    @functools.wraps(func)
    def wrapper(config_path, overrides, force=False, **kwargs):
        # repair hints name this program and carry these options (pipeline/core/hints.py)
        hints.invoked(sys.argv[0], config_path, overrides,
                      (kwargs.get("run_name") or (None,))[0], run_commands())
        distributable = "scheduler" in kwargs  # the command runs on Dask when configured
        scheduler = kwargs.pop("scheduler", None)
        if scheduler:
            overrides = (*overrides, f"dask.scheduler={scheduler}")
        run = kwargs.pop("run_name", None)  # (NAME, guard) of --run (run_option)
        cfg = (guarded(load, config_path, overrides) if run is None
               else guarded(load_run, config_path, overrides, *run))
        if distributable and cfg.dask.scheduler:
            from pipeline.executors import require_distributed
            guarded(require_distributed)
        if not computes:
            return guarded(func, cfg, **kwargs)
        from pipeline.models.devices import apply_threads
        apply_threads(cfg.run.threads)
        return guarded(func, cfg, force=force, **kwargs)
    return wrapper


def run_commands() -> list[str]:
    """The commands that take --run (run_option): a repair hint naming one carries it."""
    return [name for name, c in cli.commands.items()
            if any(p.name == "run_name" for p in c.params)]


def split_names(value):
    """A --split value (or several) checked to be plain folder names: a `/`, `..` or an
    absolute path would make the stages write outside their folders (exit 2, one line)."""
    from pipeline.core.config import check_name
    for name in (value if isinstance(value, tuple) else (value,) if value else ()):
        guarded(check_name, "--split", name)
    return value


def run_option(guard: str | None):
    """`--run NAME` for a stage_command: its config starts from that run's record; `guard`
    as in load_run (what a key that would make the run's models stale does)."""
    what = {"use": " A key that would make its models stale is refused.",
            "train": " Its models are not retrained under a changed config (refused).",
            None: ""}[guard]
    return click.option(
        "--run", "run_name", default=None, metavar="NAME",
        callback=lambda c, p, v: None if v is None else (v, guard),
        help="Start from the config run NAME was trained with (<paths.outputs>/NAME/"
             f"config.toml); --config and --set apply on top.{what}")


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


def echo_outcome(outcome) -> bool:
    """Print what a stage did (its summary lines); whether it went well."""
    for text, to_err in outcome.lines():
        click.echo(text, err=to_err)
    return outcome.ok


@cli.command("extract-features")
@scheduler_option
@click.option("--split", "splits", multiple=True, callback=lambda c, p, v: split_names(v),
              help="Split(s) to extract (default: all).")
@stage_command
def extract_features(cfg, force, splits):
    """Stage 1: images -> backbone patch features in the HDF5 cache."""
    from pipeline.stages.extract import run_extract
    sys.exit(0 if echo_outcome(run_extract(cfg, splits, force=force, progress=True)) else 1)


@cli.command("train-head")
@run_option("train")
@stage_command
def train_head(cfg, force):
    """Stage 2: train the linear head and the PAC upsampler from the cache."""
    from pipeline.stages.train import run_train
    echo_outcome(run_train(cfg, force=force))


@cli.command()
@scheduler_option
@click.option("--split", default=None, callback=lambda c, p, v: split_names(v),
              help="Split to predict (default: data.test_split).")
@run_option("use")
@stage_command
def predict(cfg, force, split):
    """Stage 3: masks for a split, plus the IoU report."""
    from pipeline.stages.predict import run_predict
    echo_outcome(run_predict(cfg, split or cfg.data.test_split, force=force))


@cli.command()
@scheduler_option
@click.option("--split", default=None, callback=lambda c, p, v: split_names(v),
              help="Split to predict (default: data.test_split).")
@stage_command
def run(cfg, force, split):
    """All three stages in order, each skipped when up-to-date."""
    from pipeline.stages.workflow import run_all
    ok = [echo_outcome(outcome) for outcome in run_all(cfg, split or cfg.data.test_split, force)]
    sys.exit(0 if all(ok) else 1)


def do_segment(cfg, force: bool, paths, out_dir, overlays: bool) -> bool:
    from pipeline.commands.segment import run_segment
    res = run_segment(cfg, paths, out_dir, overlays=overlays, force=force,
                      warn=lambda line: click.echo(f"  skipped: {line}", err=True))
    if res.n_written == 0 and not res.errors:
        click.echo(f"segment: {plural(res.n_current, 'mask')} up-to-date -> {res.out_dir}")
        return True
    # the rate counts from the first image's decoding: the models' loading is not in it
    rate = (f", {res.n_written / res.images_seconds:.1f} images/s after loading the models"
            if res.n_written and res.images_seconds > 0 else "")
    click.echo(f"segment: {plural(res.n_written, 'mask')} in {res.seconds:.1f} s{rate}"
               + (f"; {res.n_current} up-to-date" if res.n_current else "")
               + f" -> {res.out_dir}")
    if res.errors:
        click.echo(f"error: {plural(len(res.errors), 'image or folder', 'images or folders')} "
                   "could not be segmented (listed above); the other masks are written",
                   err=True)
        return False
    return True


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: <paths.outputs>/<run.name>/segment].")
@click.option("--overlays/--no-overlays", default=True, show_default=True,
              help="Also write overlays/<path>.jpg: the image with the mask tinted and outlined.")
@run_option("use")
@stage_command
def segment(cfg, force, paths, out_dir, overlays):
    """Masks for PATHS, image files or folders (searched recursively), with the run's
    trained models."""
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
@run_option("use")
@stage_command
def export_model(cfg, force, out_file, height, width):
    """One self-contained torch.export file: uint8 images -> object probability."""
    from pipeline.commands.export import run_export
    res = run_export(cfg, out_file, height=height, width=width, force=force, log=click.echo)
    if res.up_to_date:
        click.echo(f"export: up-to-date -> {res.path}")
    else:
        from pipeline.core.fsutil import human_bytes
        click.echo(f"export: {res.path} ({human_bytes(res.bytes)}) in {res.seconds:.1f} s; "
                   f"input uint8 (B, 3, H, W), H and W multiples of {res.patch_size}")


@cli.command()
@click.option("--split", default=None, callback=lambda c, p, v: split_names(v),
              help="Split whose predictions to check (default: data.test_split).")
@click.option("--verify", is_flag=True,
              help="Rehash every input and output, ignoring the checksum memo (reads all the "
                   "data and the cache); what is found damaged is marked for repair.")
@run_option(None)
@stage_command(computes=False)
def status(cfg, split, verify):
    """One line per stage: up-to-date, stale (why) or missing."""
    from pipeline.stages.base import Context
    from pipeline.stages.workflow import statuses
    for st in statuses(Context.of(cfg, split, verify)):
        click.echo(st.line())


@cli.command()
@click.option("--split", default=None, callback=lambda c, p, v: split_names(v),
              help="Split whose reports to compare [default: each run's own data.test_split, "
                   "as recorded when it was trained].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--markdown", "as_markdown", is_flag=True,
              help="Print a Markdown table (to paste) instead of the aligned plain-text one.")
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="Only the runs whose recorded config has this value (a TOML literal or a "
                   "string; * and ? match any text; KEY `run` is the run's name); repeatable: "
                   "all must match.")
@click.option("--keys", "keys", default=None, metavar="K,...",
              help="The config keys to show as columns, comma-separated [default: those whose "
                   "values differ between the runs listed].")
@click.option("--html", "as_html", is_flag=True,
              help="Also write the table as <paths.outputs>/runs_<split>.html, each run linking "
                   "to its report (offline), and print its path.")
@stage_command(computes=False)
def runs(cfg, split, as_json, as_html, as_markdown, filters, keys):
    """One row per run: the config keys that differ, the split's metrics, up-to-date or not
    (judged in the run's folder as listed; a damaged file is a row that says so)."""
    import json

    from pipeline.commands import runs as runs_mod
    wanted = runs_mod.parse_filters(filters)
    columns = None if keys is None else runs_mod.check_keys(
        [k.strip() for k in keys.split(",") if k.strip()], "--keys")
    rows = runs_mod.collect(cfg, split, wanted, columns)
    split = split or cfg.data.test_split
    if as_html:
        from pipeline.report.runs_page import write_runs_page
        page = write_runs_page(Path(cfg.paths.outputs), split, runs_mod.as_json(rows))
        click.echo(f"runs page: {page}", err=True)
    if as_json:
        # strict JSON: every number in a row is finite (damaged files are rows that say so)
        click.echo(json.dumps(runs_mod.as_json(rows), indent=1, allow_nan=False))
    elif not rows:
        click.echo(f"no runs under {cfg.paths.outputs}"
                   + (" match the --filter" if filters and runs_mod.run_dirs(
                       Path(cfg.paths.outputs)) else ""))
    else:
        click.echo(runs_mod.markdown(rows) if as_markdown else runs_mod.table(rows))


@cli.group("config")
def config_group() -> None:
    """Inspect the effective configuration."""


@config_group.command("show")
@run_option(None)
@stage_command(computes=False)
def config_show(cfg):
    """Print the effective config (file + --set) as TOML, to save and edit."""
    from pipeline.core.config import to_toml
    click.echo(to_toml(cfg), nl=False)


@cli.group("cache")
def cache_group() -> None:
    """The feature cache (paths.cache): its stores, and removing those no run uses."""


def _store_summary(params: dict) -> str:
    keys = ("backbone.layers", "extract.fit", "extract.precision", "extract.feature_dtype")
    shown = [f"{k.split('.', 1)[1]}={params[k]}" for k in keys if k in params]
    return f"{params.get('backbone.name', '?')} ({', '.join(shown)})" + (
        ", mirrored" if params.get("mirror") else "")


@cache_group.command("list")
@stage_command(computes=False)
def cache_list(cfg):
    """Each store: backbone and settings, splits (images, dataset), size, the runs using it."""
    from pipeline.commands.cache import stores
    from pipeline.core.fsutil import human_bytes
    infos = stores(cfg)
    if not infos:
        click.echo(f"no feature stores in {cfg.paths.cache}")
    for info in infos:
        click.echo(f"{info.path.name}: {_store_summary(info.params)}, {human_bytes(info.bytes)}")
        for f in info.folders:
            where = ", ".join(k.split(":", 1)[1] for k in f.datasets) or "not indexed"
            what = f"{f.n_images} images" if f.fingerprint else "incomplete"
            click.echo(f"  {f.split} [{f.path.name}]: {what}; {where}")
        runs = ", ".join(str(r) for r in info.runs) or "none"
        click.echo(f"  runs: {runs}" + (f" ({len(info.gone)} gone)" if info.gone else ""))


@cache_group.command("gc")
@click.option("--yes", is_flag=True, help="Remove them (without it: only list them).")
@stage_command(computes=False)
def cache_gc(cfg, yes):
    """Remove the stores no live run uses (a dry run unless --yes)."""
    from pipeline.commands.cache import collect_garbage
    from pipeline.core.fsutil import human_bytes
    done, skipped = collect_garbage(cfg, remove=yes)
    for path, size, why in done:
        click.echo(f"{'removed' if yes else 'would remove'} {path} ({human_bytes(size)}): {why}")
    for line in skipped:
        click.echo(f"skipped: {line}", err=True)
    total = human_bytes(sum(size for _, size, _ in done))
    if not done:
        click.echo(f"cache gc: nothing to remove in {cfg.paths.cache}")
    elif yes:
        click.echo(f"cache gc: {len(done)} removed, {total} freed")
    else:
        click.echo(f"cache gc: {len(done)} to remove ({total}); rerun with --yes to remove them")


@cli.command()
@click.option("--config", "config_path", default=str(DEFAULT_CONFIG.parent / "demo.toml"),
              show_default=True, help="TOML config file of the demo.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (a TOML literal, or a bare string); repeatable.")
@click.option("--force", is_flag=True, help="Recompute every stage even when up-to-date.")
def demo(config_path, overrides, force):
    """Offline example: generate a small dataset and run all stages on it."""
    from pipeline.core.owned import claim_folder
    from pipeline.data.synth import make_dataset
    from pipeline.store.feature_store import CACHE_LEGACY
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
