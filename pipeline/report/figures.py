"""The report's figures, drawn with matplotlib's object-oriented API only (a ``Figure`` on
the Agg canvas; pyplot is never imported, so no GUI backend or display is touched and the
backend of a host application is left alone), each saved without timestamps (the same report
renders to the same bytes); the training curves; what the charts share (``charts``: the
overall dot plot, the dot plots per category, the threshold sweep, the per-image J scatter):
the variants' colours, zoomed axes, bootstrap intervals.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..core.jsondoc import finite as _finite
from ..core.variants import VARIANTS
from ..data import display_name
from .doc import Metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

__all__ = [
    "new_figure",
    "save_figure",
    "training_figure",
    "plot_training_curves",
    "save_training_curves",
    "curve_files",
    "svg_size_in",
    "variant_colour",
    "short_name",
    "metric_value",
    "zoom",
    "bootstrap_ci",
    "FIGURES",
    "CURVE_FORMATS",
    "VARIANT_ORDER",
    "VARIANT_COLOURS",
    "N_BOOT",
]

# the variants in reading order (any other after them, in its own order)
VARIANT_ORDER = VARIANTS
VARIANT_COLOURS = {"linear_nearest": "#9aa5b1", "linear_bilinear": "#4c78a8", "pac": "#f58518"}
_EXTRA_COLOURS = ("#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#eeca3b")


def new_figure(
    figsize: tuple[float, float],
    layout: Literal["constrained", "compressed", "tight"] | None = None,
) -> Figure:
    """A matplotlib Figure on the Agg canvas (no pyplot, no display, nothing global)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


_FORMAT_METADATA = {
    "png": {"Software": None},
    "svg": {"Date": None},
    "pdf": {"CreationDate": None, "ModDate": None},
}


def save_figure(
    fig: Figure, paths: str | Path | Iterable[str | Path], clear: bool = True
) -> list[Path]:
    """Saves ``fig`` to each path, in the format its suffix names (png, svg or pdf), without
    timestamps (the same report renders to the same bytes); PNGs at 144 dpi."""
    import matplotlib

    out = []
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    try:
        engine = fig.get_layout_engine()
        if engine is not None and len(paths) > 1:
            # lay the figure out once, then keep that layout for every format (the layout
            # engine would otherwise run again on each save: a third of the cost)
            fig.canvas.draw()
            fig.set_layout_engine("none")
        with matplotlib.rc_context({"svg.hashsalt": "vit-objseg", "svg.fonttype": "path"}):
            for p in paths:
                p = Path(p)
                p.parent.mkdir(parents=True, exist_ok=True)
                fmt = p.suffix.lower().lstrip(".") or "png"
                fig.savefig(
                    p,
                    dpi=144 if fmt == "png" else 100,
                    format=fmt,
                    metadata=_FORMAT_METADATA.get(fmt),
                )
                out.append(p)
    finally:
        if clear:
            fig.clear()
    return out


Series = list[tuple[float, float]]  # (epoch, value) of one curve


def _training_series(
    history: list[dict[str, Any]] | None,
) -> list[tuple[str, Series, dict[str, Series]]]:
    """(phase, loss, {val_* key: curve}) per phase of stage 2's rows, in order of first
    appearance, epochs sorted (a repeated epoch: its last row); a phase with nothing finite
    to plot is left out."""
    phases: dict[str, dict[float, dict]] = {}
    for row in history or []:
        if not isinstance(row, dict):
            continue
        phase = str(row.get("phase", "train"))
        rows = phases.setdefault(phase, {})
        epoch = row.get("epoch")
        rows[epoch if _finite(epoch) else float(len(rows))] = row
    series = []
    for phase, rows in phases.items():
        epochs = sorted(rows)
        loss = [(e, rows[e]["loss"]) for e in epochs if _finite(rows[e].get("loss"))]
        val_keys = sorted(
            {k for e in epochs for k, v in rows[e].items() if k.startswith("val_") and _finite(v)}
        )
        vals = {k: [(e, rows[e][k]) for e in epochs if _finite(rows[e].get(k))] for k in val_keys}
        if loss or vals:
            series.append((phase, loss, vals))
    return series


_VAL_COLOURS = ("#f58518", "#54a24b", "#e45756", "#b279a2", "#72b7b2")


def _curve(ax: Axes, pts: Series, marker: str | None, **style: Any) -> list[Line2D]:
    """One curve of (epoch, value) points, its markers shown when `marker` is not None."""
    return ax.plot([e for e, _ in pts], [v for _, v in pts], marker=marker, markersize=3.5, **style)


def _training_panel(ax: Axes, phase: str, loss: Series, vals: dict[str, Series]) -> None:
    """One phase: the loss on `ax`, the validation curves on a twin right axis, a legend of
    both below."""
    from matplotlib.ticker import MaxNLocator

    handles = []
    npts = max([len(loss)] + [len(v) for v in vals.values()])
    marker = "o" if npts <= 30 else None
    if loss:
        handles += _curve(ax, loss, marker, color="#4c78a8", lw=1.6, label="loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(phase, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if vals:
        ax2 = ax.twinx()
        for j, (k, pts) in enumerate(vals.items()):
            colour = _VAL_COLOURS[j % len(_VAL_COLOURS)]
            handles += _curve(ax2, pts, marker, color=colour, lw=1.4, ls="--", label=k)
        ax2.set_ylabel("validation")
    if handles:
        ax.legend(
            handles=handles,
            labels=[h.get_label() for h in handles],
            fontsize=8,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.2),
            ncol=min(len(handles), 3),
            frameon=False,
        )


def training_figure(history: list[dict[str, Any]] | None) -> Figure | None:
    """The training curves of stage 2's rows (see plot_training_curves), one panel per
    phase; None when there is nothing to plot."""
    series = _training_series(history)
    if not series:
        return None
    n = len(series)
    fig = new_figure((min(5.2 * n, 10.6), 3.6))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (phase, loss, vals) in zip(axes, series, strict=True):
        _training_panel(ax, phase, loss, vals)
    fig.tight_layout()
    return fig


def plot_training_curves(history: list[dict] | None, path: Path) -> Path | None:
    """Loss curves from stage 2's metrics.jsonl rows, saved to ``path`` in the format its
    suffix names (``.png``, ``.svg`` or ``.pdf``).

    Rows look like ``{"phase": "linear", "epoch": 3, "loss": 0.21}`` or
    ``{"phase": "upsampler", "epoch": 2, "loss": 0.1, "val_miou": 0.9}`` (``val_*`` keys
    optional). One subplot per phase (in order of first appearance), loss vs. epoch on the left
    axis, the ``val_*`` metrics on a twin right axis when present. When an epoch appears more
    than once in a phase (a resumed run), its last row wins. Returns ``path``, or None when
    ``history`` is empty or holds nothing to plot.
    """
    fig = training_figure(history)
    if fig is None:
        return None
    return save_figure(fig, Path(path))[0]


CURVE_FORMATS = ("svg", "pdf", "png")  # those of the report's figures: page, paper, Markdown


def curve_files(stem: Path) -> list[Path]:
    """The files save_training_curves writes for `stem`, in CURVE_FORMATS' order."""
    return [stem.with_name(f"{stem.name}.{ext}") for ext in CURVE_FORMATS]


def save_training_curves(history: list[dict] | None, stem: Path) -> list[Path]:
    """The training curves (see plot_training_curves) drawn once and saved in each of
    CURVE_FORMATS (``curve_files(stem)``), laid out once for all three; the report shows these
    files instead of drawing the curves again. [] when ``history`` holds nothing to plot."""
    fig = training_figure(history)
    return [] if fig is None else save_figure(fig, curve_files(Path(stem)))


def svg_size_in(path: Path) -> tuple[float, float] | None:
    """The size in inches of an SVG figure saved here (its root's width / height in pt), or
    None when the file does not start like one."""
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    m = re.search(r'<svg[^>]*\swidth="([0-9.]+)pt"[^>]*\sheight="([0-9.]+)pt"', head)
    return None if m is None else (float(m.group(1)) / 72, float(m.group(2)) / 72)


def variant_colour(variant: str, index: int) -> str:
    return VARIANT_COLOURS.get(variant, _EXTRA_COLOURS[index % len(_EXTRA_COLOURS)])


def short_name(text: str, n: int = 18) -> str:
    """`text` shown (display_name: U+FFFD for a name's undecodable bytes) in at most n chars."""
    text = display_name(text)
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def metric_value(metrics: Metrics | None, key: str) -> float:
    v = None if metrics is None else metrics.get(key)
    return float("nan") if v is None else v


def zoom(values: Iterable[float], pad: float = 0.18, min_span: float = 0.04) -> tuple[float, float]:
    """An axis range around ``values`` (scores in [0, 1]): their span, widened to at least
    ``min_span`` and padded by ``pad`` of it on each side, kept inside [0, 1] (a little over,
    so that a point at 1 is not cut)."""
    vals = [float(v) for v in values if _finite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    span = max(hi - lo, min_span)
    mid = (lo + hi) / 2
    lo, hi = min(lo, mid - span / 2), max(hi, mid + span / 2)
    lo, hi = lo - pad * span, hi + pad * span
    if lo < 0:
        lo, hi = 0.0, min(hi - lo, 1.0)
    if hi > 1.0:
        lo, hi = max(0.0, lo - (hi - 1.0)), 1.0
    m = 0.01 * (hi - lo)
    return max(lo - m, -0.005), min(hi + m, 1.005)


# the figures of a report (file stems in the files folder: .svg, .pdf and .png each)
FIGURES = ("overall", "threshold_sweep", "per_category", "per_image_j", "training_curves")

N_BOOT = 2000


def bootstrap_ci(
    values: Iterable[float], level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """A percentile bootstrap interval of the mean (N_BOOT resamples, a fixed seed: the same
    report renders the same interval); None for fewer than 2 values."""
    x = np.asarray([v for v in values if _finite(v)], np.float64)
    if x.size < 2:
        return None
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // x.size)
    means = []
    for start in range(0, N_BOOT, chunk):
        k = min(chunk, N_BOOT - start)
        means.append(x[rng.integers(0, x.size, (k, x.size))].mean(axis=1))
    m = np.concatenate(means)
    a = (1 - level) / 2
    return float(np.quantile(m, a)), float(np.quantile(m, 1 - a))
