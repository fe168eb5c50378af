"""`export`: the Click command and its summary line (the work: commands/export.py, loaded when
it runs)."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.config import Config
from .options import examples, out_option, uses_run


@click.command(
    short_help="One torch.export file: uint8 images -> probabilities.",
    epilog=examples("export", "export --run long --out long.pt2"),
)
@out_option("out_file", "The .pt2 file [default: <paths.outputs>/<run.name>/model.pt2].", file=True)
@click.option(
    "--height",
    type=int,
    default=None,
    help="Example image height for tracing, a multiple of the patch size [default: 14 patches].",
)
@click.option(
    "--width",
    type=int,
    default=None,
    help="Example image width for tracing, a multiple of the patch size [default: 20 patches].",
)
@uses_run
def export(
    cfg: Config, force: bool, out_file: Path | None, height: int | None, width: int | None
) -> None:
    """One self-contained torch.export file: uint8 images -> object probability, runnable
    with torch alone."""
    from .export import run_export

    res = run_export(cfg, out_file, height=height, width=width, force=force, log=click.echo)
    if res.up_to_date:
        click.echo(f"export: up-to-date -> {res.path}")
    else:
        from ..core.fsutil import human_bytes

        click.echo(
            f"export: {res.path} ({human_bytes(res.bytes)}) in {res.seconds:.1f} s; "
            f"input uint8 (B, 3, H, W), H and W multiples of {res.patch_size}"
        )
