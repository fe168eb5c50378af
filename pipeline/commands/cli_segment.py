"""`segment`: the Click command and its summary lines (the work: commands/segment.py, loaded
when it runs)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..core.config import Config
from ..core.progress import plural
from .options import examples, out_option, uses_run

if TYPE_CHECKING:
    from .segment import SegmentResult


def echo_result(res: SegmentResult) -> bool:
    """Print what segment did (its summary line, and an error line when images were
    skipped); whether every image was segmented."""
    if res.n_written == 0 and not res.errors:
        click.echo(f"segment: {plural(res.n_current, 'mask')} up-to-date -> {res.out_dir}")
        return True
    # the rate counts from the first image's decoding: the models' loading is not in it
    rate = (
        f", {res.n_written / res.images_seconds:.1f} images/s after loading the models"
        if res.n_written and res.images_seconds > 0
        else ""
    )
    click.echo(
        f"segment: {plural(res.n_written, 'mask')} in {res.seconds:.1f} s{rate}"
        + (f"; {res.n_current} up-to-date" if res.n_current else "")
        + f" -> {res.out_dir}"
    )
    if res.errors:
        click.echo(
            f"error: {plural(len(res.errors), 'image or folder', 'images or folders')} "
            "could not be segmented (listed above); the other masks are written",
            err=True,
        )
        return False
    return True


@click.command(
    short_help="Masks for your own image files or folders.",
    epilog=examples(
        "segment my_photos/", "segment a.jpg b.png --out masks/ --no-overlays --run long"
    ),
)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@out_option("out_dir", "Output folder [default: <paths.outputs>/<run.name>/segment].", file=False)
@click.option(
    "--overlays/--no-overlays",
    default=True,
    show_default=True,
    help="Also write overlays/<path>.jpg: the image with the mask tinted and outlined.",
)
@uses_run
def segment(
    cfg: Config, force: bool, paths: tuple[Path, ...], out_dir: Path | None, overlays: bool
) -> None:
    """Masks for PATHS, image files or folders (searched recursively), with the run's
    trained models."""
    from .segment import run_segment

    res = run_segment(
        cfg,
        paths,
        out_dir,
        overlays=overlays,
        force=force,
        warn=lambda line: click.echo(f"  skipped: {line}", err=True),
    )
    sys.exit(0 if echo_result(res) else 1)
