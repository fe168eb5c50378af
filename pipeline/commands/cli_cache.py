"""`cache list` and `cache gc` (the work: commands/cache.py, loaded when they run)."""

from __future__ import annotations

import click

from ..core.config import Config
from .options import examples, stage_command


@click.group(
    short_help="The feature cache: list its stores, remove unused ones.",
    epilog=examples("cache list", "cache gc --yes"),
)
def cache() -> None:
    """The feature cache (paths.cache): its stores, and removing those no run uses."""


def _store_summary(params: dict) -> str:
    keys = ("backbone.layers", "extract.fit", "extract.precision", "extract.feature_dtype")
    shown = [f"{k.split('.', 1)[1]}={params[k]}" for k in keys if k in params]
    return f"{params.get('backbone.name', '?')} ({', '.join(shown)})" + (
        ", mirrored" if params.get("mirror") else ""
    )


@cache.command(
    "list", epilog=examples("cache list", "cache list --set paths.cache=/data/vit-cache")
)
@stage_command(computes=False)
def cache_list(cfg: Config) -> None:
    """Each store: backbone and settings, splits (images, dataset), size, the runs using it."""
    from ..core.fsutil import human_bytes
    from .cache import stores

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


@cache.command("gc", epilog=examples("cache gc", "cache gc --yes"))
@click.option("--yes", is_flag=True, help="Remove them (without it: only list them).")
@stage_command(computes=False)
def cache_gc(cfg: Config, yes: bool) -> None:
    """Remove the stores no live run uses (a dry run unless --yes)."""
    from ..core.fsutil import human_bytes
    from .cache import collect_garbage

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
