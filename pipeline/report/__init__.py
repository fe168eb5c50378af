"""Human-readable reports of stage 3: a Markdown file and an offline HTML page rendered from
Jinja2 templates, with vector figures and click-to-enlarge overlay thumbnails; and the
training-curve figure of stage 2.

The JSON report (the public contract) is computed by ``stage.build_report`` and written by
stage 3; ``write_reports`` renders it. Everything written for one split lives next to the JSON:

    <out_dir>/report_<split>.md
    <out_dir>/report_<split>.html
    <out_dir>/report_<split>_files/   figures (SVG for the page, PDF for papers, PNG for the
                                      Markdown), thumbnail strips and their enlargements

so the three can be moved or zipped together and opened offline: links are relative, the CSS
is inline, there is no JavaScript, no web font and no URL of the network.

The modules, each one job:

    doc.py        report_<split>.json read and validated once into a typed Report (also `runs`)
    panels.py     mask panels, error overlays, strips, the labelled enlargement grid
    figures.py    matplotlib figures on Agg (pyplot never imported), saved without timestamps;
                  the training curves; colours, zoomed axes, bootstrap intervals
    charts.py     the report's charts: overall and per-category dot plots, sweep, J scatter
    format.py     how values are shown: scores, gains, counts, best flags, config values, links
    view.py       the view model (plain data) the templates show
    tables.py     its tables: overall, per category and image, sweep, DAVIS, settings
    render.py     the Jinja2 templates (templates/) and their rendering
    strips.py     the best / worst images' strips written to the files folder
    stage.py      stage 3's report: the JSON's content, the CLI headline, the images shown
    runs_page.py  `runs --html`: the runs side by side as an offline page

The metrics (their keys, labels, order, notes) are ``metrics.definitions``'.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.fsutil import atomic_folder, atomic_write_bytes, remove_temporaries
from ..core.jsondoc import Damaged
from ..core.layout import RunLayout
from ..core.variants import BASELINE, CANDIDATE
from ..metrics.definitions import headline_names
from .charts import plot_categories, plot_overall, plot_scatter, plot_sweep
from .doc import ImageScores, Report, VariantScores, parse_per_image, parse_report
from .figures import (
    FIGURES,
    plot_training_curves,
    save_figure,
    save_training_curves,
    svg_size_in,
    training_figure,
    zoom,
)
from .format import best_flags
from .panels import (
    CONTOUR_COLOUR,
    FN_COLOUR,
    FP_COLOUR,
    LEGEND,
    MASK_COLOUR,
    MASK_DIM,
    PANEL_MAX_SIDE,
    PANELS,
    STRIP_GAP,
    TP_COLOUR,
    Thumb,
    VariantThumb,
    mask_panel,
    overlay,
    thumbnail_strip,
    variant_strip,
)
from .render import TEMPLATE_DIR, render
from .strips import Strip, write_strips
from .tables import configured_threshold
from .view import (
    categories_of,
    figure_entry,
    headline_text,
    ordered_variants,
    view_model,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "Thumb",
    "VariantThumb",
    "overlay",
    "thumbnail_strip",
    "variant_strip",
    "mask_panel",
    "plot_training_curves",
    "save_training_curves",
    "write_reports",
    "headline_text",
    "TP_COLOUR",
    "FP_COLOUR",
    "FN_COLOUR",
    "CONTOUR_COLOUR",
    "MASK_COLOUR",
    "MASK_DIM",
    "LEGEND",
    "PANELS",
    "PANEL_MAX_SIDE",
    "STRIP_GAP",
    "TEMPLATE_DIR",
    "Report",
    "parse_report",
    "Damaged",
    "best_flags",
    "plot_overall",
    "plot_scatter",
    "zoom",
]

FigureEntries = dict[str, dict[str, Any] | None]


class _Figures:
    """The figures of one report saved into the files folder being built (`tmp_dir`, to be
    `files_dir`): each in SVG, PDF and PNG, and its entry for the view model."""

    def __init__(self, tmp_dir: Path, files_dir: Path):
        self.tmp_dir, self.files_dir = tmp_dir, files_dir
        self.entries: FigureEntries = dict.fromkeys(FIGURES)

    def add(self, fig: Figure | None, key: str, title: str, alt: str, caption: str) -> None:
        if fig is None:
            return
        size = tuple(fig.get_size_inches())
        save_figure(fig, [self.tmp_dir / f"{key}.{ext}" for ext in ("svg", "pdf", "png")])
        self.entries[key] = figure_entry(key, title, alt, caption, self.files_dir, size)

    def copy(
        self,
        curves: Sequence[Path],
        size: tuple[float, float],
        key: str,
        title: str,
        alt: str,
        caption: str,
    ) -> None:
        """Files drawn elsewhere (stage 2's training curves), as they are."""
        for path in curves:
            shutil.copyfile(path, self.tmp_dir / f"{key}{path.suffix}")
        self.entries[key] = figure_entry(key, title, alt, caption, self.files_dir, size)


def _score_figures(
    figs: _Figures, report: Report, variants: dict[str, VariantScores], rows: list[ImageScores]
) -> None:
    """The figures of the scores: overall, the threshold sweep, per category, per image."""
    names = headline_names()
    figs.add(
        plot_overall(variants, rows),
        "overall",
        "Variants, overall",
        f"dot plot of {names} per variant",
        "Each panel has its own zoomed axis.",
    )
    if report.threshold_sweep:
        figs.add(
            plot_sweep(report.threshold_sweep, configured_threshold(report)),
            "threshold_sweep",
            "Threshold sweep",
            "line plots of J mean, precision and recall against the threshold, per variant",
            "Each variant's masks cut at other thresholds on the object probability; "
            "dotted: the configured threshold, rings: the best J.",
        )
    categories = categories_of(variants)
    if categories:
        figs.add(
            plot_categories(variants, categories),
            "per_category",
            f"{names} per category",
            f"dot plots of {names} per category and variant",
            f"Categories sorted by the J of {CANDIDATE}. J and F are means over images, "
            f"mIoU pools the pixels: a category whose small objects are missed has a low "
            f"J but can keep a high mIoU.",
        )
    if CANDIDATE in variants and BASELINE in variants and rows:
        figs.add(
            plot_scatter(rows, BASELINE, CANDIDATE),
            "per_image_j",
            "Per-image J",
            f"scatter plot of per-image J, {CANDIDATE} against {BASELINE}",
            f"One point per image; above the dashed diagonal, {CANDIDATE} is better.",
        )


def _curves_figure(
    figs: _Figures, history: list[dict[str, Any]] | None, curves: list[Path] | None
) -> None:
    """The training curves: stage 2's drawing as it is, else drawn from its history."""
    args = (
        "training_curves",
        "Training curves",
        "training loss curves",
        "Loss per epoch of each training phase.",
    )
    size = svg_size_in(curves[0]) if curves else None
    if curves and size is not None:
        figs.copy(curves, size, *args)
    elif history:
        figs.add(training_figure(history), *args)


def _strips(
    thumbs_best: list[Thumb] | None,
    thumbs_worst: list[Thumb | VariantThumb] | None,
    variant_thumbs: list[VariantThumb] | None,
    tmp_dir: Path,
    files_dir: Path,
    vnames: list[str],
    index: dict[tuple[str, str], ImageScores],
) -> dict[str, list[Strip]]:
    """The best and the worst images' strips: the worst images, then the variant thumbs of
    images not among them (a worst image with a variant thumb shows its variants)."""
    vthumbs = {(str(t.category), str(t.stem)): t for t in (variant_thumbs or [])}
    worst: list[Thumb | VariantThumb] = list(thumbs_worst or [])
    seen = {(str(t.category), str(t.stem)) for t in worst}
    worst += [t for k, t in vthumbs.items() if k not in seen]
    return {
        "best": write_strips(thumbs_best or [], {}, "best", tmp_dir, files_dir, vnames, index),
        "worst": write_strips(worst, vthumbs, "worst", tmp_dir, files_dir, vnames, index),
    }


def _report_paths(out_dir: Path, split: str) -> tuple[Path, Path, Path]:
    """The split's Markdown and HTML reports and files folder in `out_dir`, after removing
    what a killed writer of them left (stage 3 holds the split's lock)."""
    layout = RunLayout(out_dir)
    md_path, html_path = layout.report(split, ".md"), layout.report(split, ".html")
    files_dir = layout.report_files(split)
    remove_temporaries(out_dir, of=(md_path.name, html_path.name, files_dir.name))
    return md_path, html_path, files_dir


def write_reports(
    out_dir: Path,
    split: str,
    report: Report | dict[str, Any],
    per_image: list[dict[str, Any]] | None,
    thumbs_best: list[Thumb],
    thumbs_worst: list[Thumb | VariantThumb],
    history: list[dict[str, Any]] | None = None,
    *,
    variant_thumbs: list[VariantThumb] | None = None,
    other_runs: list[tuple[str, str]] | None = None,
    curves: list[Path] | None = None,
) -> dict[str, Path]:
    """Writes out_dir/report_<split>.md, out_dir/report_<split>.html and the figures and
    thumbnails under out_dir/report_<split>_files/ (relative links only, so the three can be
    moved or zipped together and opened offline). Does NOT write the JSON (the caller does).

    report: a typed Report, or the report as a dict (stage 3's, or a hand-made one: read once,
    leniently, by ``parse_report``: a missing or unusable field is shown as a dash).
    per_image: one dict per image: ``{"category", "stem", "j": {variant: J}, "f": {variant: F}}``
    (None: the report's own ``per_image``).
    history: stage 2's metrics.jsonl rows (the training curves, drawn here), optional;
    curves: the training curves stage 2 drew (``save_training_curves``: SVG, PDF, PNG), shown
    as they are instead (history is then not used).
    variant_thumbs: images with every variant's mask (``VariantThumb``); a worst image with
    one is shown as the variants side by side (image, ground truth, one errors panel per
    variant) instead of the pac-only strip; variant thumbs of images not among
    ``thumbs_worst`` are appended to the worst images.
    other_runs: ``(run name, path of its report HTML relative to out_dir)`` pairs, listed as
    links at the top of both reports (plain paths: they are URL-quoted here).

    The files folder is built aside and swapped in whole, so a stale thumbnail of an earlier
    run never lingers and a killed run leaves the previous folder intact; the two text files
    are replaced atomically. Returns ``{"md": path, "html": path, "files": dir}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = str(split)
    if not isinstance(report, Report):
        report = parse_report(report, strict=False)
    rows: list[ImageScores] = report.per_image if per_image is None else parse_per_image(per_image)
    variants = ordered_variants(report.variants)
    index = {(r.category, r.stem): r for r in rows}
    md_path, html_path, files_dir = _report_paths(out_dir, split)
    with atomic_folder(files_dir) as tmp_dir:
        figs = _Figures(tmp_dir, files_dir)
        if any(v.overall is not None for v in variants.values()):
            _score_figures(figs, report, variants, rows)
        _curves_figure(figs, history, curves)
        strips = _strips(
            thumbs_best, thumbs_worst, variant_thumbs, tmp_dir, files_dir, list(variants), index
        )
        vm = view_model(
            split, report, rows, strips, figs.entries, other_runs, md_path.name, html_path.name
        )
        html_text = render("report.html.j2", vm)
        md_text = render("report.md.j2", vm)
    atomic_write_bytes(md_path, md_text.encode("utf-8"))
    atomic_write_bytes(html_path, html_text.encode("utf-8"))
    return {"md": md_path, "html": html_path, "files": files_dir}
