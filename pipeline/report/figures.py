"""The report's figures, drawn with matplotlib's object-oriented API only (a ``Figure`` on
the Agg canvas; pyplot is never imported, so no GUI backend or display is touched and the
backend of a host application is left alone): the overall dot plot, mIoU per category, the
per-image J scatter and the training curves, each saved without timestamps (the same report
renders to the same bytes).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np

from ..core.jsondoc import finite as _finite
from ..core.variants import BASELINE, CANDIDATE, VARIANTS
from ..data.dataset import display_name
from .doc import ImageScores, Metrics, SweepPoint, VariantScores

# metrics with one per-category table each, and of the overall dot plot
CATEGORY_METRICS = (("miou", "mIoU"), ("j_mean", "J mean"), ("boundary_f", "Boundary F"))
CHART_METRICS = CATEGORY_METRICS
# the variants in reading order (any other after them, in its own order)
VARIANT_ORDER = VARIANTS
VARIANT_COLOURS = {"linear_nearest": "#9aa5b1", "linear_bilinear": "#4c78a8", "pac": "#f58518"}
_EXTRA_COLOURS = ("#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#eeca3b")
# the categories' colours: none of the variants' grey / blue / orange nor the error legend's
# green / red / blue / yellow (panels.LEGEND), dark enough on white; with the markers below,
# len(CATEGORY_COLOURS) x len(CATEGORY_MARKERS) categories are told apart
CATEGORY_COLOURS = ("#7b3294", "#00a6a6", "#8c510a", "#d01c8b", "#01665e", "#6b6b00",
                    "#de77ae", "#67001f", "#40004b")
CATEGORY_MARKERS = ("o", "s", "^", "D")

def _new_figure(figsize: tuple[float, float],
                layout: Literal["constrained", "compressed", "tight"] | None = None):
    """A matplotlib Figure on the Agg canvas (no pyplot, no display, nothing global)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


_FORMAT_METADATA = {"png": {"Software": None}, "svg": {"Date": None},
                    "pdf": {"CreationDate": None, "ModDate": None}}


def _save_figure(fig, paths, clear: bool = True) -> list[Path]:
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
                fig.savefig(p, dpi=144 if fmt == "png" else 100, format=fmt,
                            metadata=_FORMAT_METADATA.get(fmt))
                out.append(p)
    finally:
        if clear:
            fig.clear()
    return out


def _training_figure(history: list[dict] | None):
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
        val_keys = sorted({k for e in epochs for k, v in rows[e].items()
                           if k.startswith("val_") and _finite(v)})
        vals = {k: [(e, rows[e][k]) for e in epochs if _finite(rows[e].get(k))] for k in val_keys}
        if loss or vals:
            series.append((phase, loss, vals))
    if not series:
        return None

    from matplotlib.ticker import MaxNLocator
    n = len(series)
    fig = _new_figure((min(5.2 * n, 10.6), 3.6))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (phase, loss, vals) in zip(axes, series, strict=True):
        handles = []
        npts = max([len(loss)] + [len(v) for v in vals.values()])
        marker = "o" if npts <= 30 else None
        if loss:
            handles += ax.plot([e for e, _ in loss], [v for _, v in loss], color="#4c78a8",
                               marker=marker, markersize=3.5, lw=1.6, label="loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title(phase, fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if vals:
            ax2 = ax.twinx()
            for j, (k, pts) in enumerate(vals.items()):
                colour = ("#f58518", "#54a24b", "#e45756", "#b279a2", "#72b7b2")[j % 5]
                handles += ax2.plot([e for e, _ in pts], [v for _, v in pts], color=colour,
                                    marker=marker, markersize=3.5, lw=1.4, ls="--", label=k)
            ax2.set_ylabel("validation")
        if handles:
            ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8,
                      loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(len(handles), 3),
                      frameon=False)
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
    fig = _training_figure(history)
    if fig is None:
        return None
    return _save_figure(fig, Path(path))[0]


CURVE_FORMATS = ("svg", "pdf", "png")  # those of the report's figures: page, paper, Markdown


def curve_files(stem: Path) -> list[Path]:
    """The files save_training_curves writes for `stem`, in CURVE_FORMATS' order."""
    return [stem.with_name(f"{stem.name}.{ext}") for ext in CURVE_FORMATS]


def save_training_curves(history: list[dict] | None, stem: Path) -> list[Path]:
    """The training curves (see plot_training_curves) drawn once and saved in each of
    CURVE_FORMATS (``curve_files(stem)``), laid out once for all three; the report shows these
    files instead of drawing the curves again. [] when ``history`` holds nothing to plot."""
    fig = _training_figure(history)
    return [] if fig is None else _save_figure(fig, curve_files(Path(stem)))


def svg_size_in(path: Path) -> tuple[float, float] | None:
    """The size in inches of an SVG figure saved here (its root's width / height in pt), or
    None when the file does not start like one."""
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    m = re.search(r'<svg[^>]*\swidth="([0-9.]+)pt"[^>]*\sheight="([0-9.]+)pt"', head)
    return None if m is None else (float(m.group(1)) / 72, float(m.group(2)) / 72)


def _variant_colour(variant: str, index: int) -> str:
    return VARIANT_COLOURS.get(variant, _EXTRA_COLOURS[index % len(_EXTRA_COLOURS)])


def _short(text: str, n: int = 18) -> str:
    """`text` shown (display_name: U+FFFD for a name's undecodable bytes) in at most n chars."""
    text = display_name(text)
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _value(metrics: Metrics | None, key: str) -> float:
    v = None if metrics is None else metrics.get(key)
    return float("nan") if v is None else v


def _zoom(values: Iterable[float], pad: float = 0.18, min_span: float = 0.04
          ) -> tuple[float, float]:
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


def _bootstrap_ci(values, level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
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


def _per_image_values(per_image: list[ImageScores], key: str, variant: str) -> list[float]:
    return [x for r in per_image if (x := (r.j if key == "j" else r.f).get(variant)) is not None]


def _plot_overall(variants: dict[str, VariantScores], per_image: list[ImageScores]):
    """A dot plot, one panel per metric stacked (each with its own zoomed x axis: readable on
    a phone too), one row per variant, the value printed at each dot, 95% bootstrap intervals
    of the per-image means (J, F), and a dotted reference line at the baseline (bilinear)."""
    from matplotlib.ticker import MaxNLocator
    names = [v for v in variants if variants[v].overall is not None]
    n = len(names)
    fig = _new_figure((5.6, len(CHART_METRICS) * (0.36 * n + 0.62) + 0.35), layout="constrained")
    axes = fig.subplots(len(CHART_METRICS), 1, squeeze=False)[:, 0]
    ys = {v: n - 1 - i for i, v in enumerate(names)}  # first variant on top
    per_image_key = {"j_mean": "j", "boundary_f": "f"}
    for ax, (key, title) in zip(axes, CHART_METRICS, strict=True):
        vals = {v: _value(variants[v].overall, key) for v in names}
        cis = {}
        if key in per_image_key and per_image:
            for v in names:
                ci = _bootstrap_ci(_per_image_values(per_image, per_image_key[key], v))
                if ci:
                    cis[v] = ci
        lo, hi = _zoom(list(vals.values()) + [c for ci in cis.values() for c in ci])
        if BASELINE in vals and _finite(vals[BASELINE]):
            ax.axvline(vals[BASELINE], color="#8a949e", lw=1, ls=":", zorder=1)
        for i, v in enumerate(names):
            x, y, c = vals[v], ys[v], _variant_colour(v, i)
            if v in cis:
                ax.plot(cis[v], [y, y], color=c, lw=2.4, alpha=0.5, solid_capstyle="butt",
                        zorder=2)
            if _finite(x):
                ax.plot([x], [y], "o", color=c, ms=7.5, zorder=3, clip_on=False,
                        markeredgecolor="white", markeredgewidth=0.8)
                ax.annotate(f"{x:.3f}", (x, y), xytext=(0, 6), textcoords="offset points",
                            ha="center", va="bottom", fontsize=8.5, color="#1f2328")
        ax.set_xlim(lo, hi)
        ax.set_ylim(-0.5, n - 0.2)
        ax.set_yticks([ys[v] for v in names], names)
        ax.set_title(title, fontsize=10, loc="left", fontweight="bold")
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.tick_params(axis="both", labelsize=8.5, length=3)
        ax.tick_params(axis="y", length=0)
        ax.grid(True, axis="x", alpha=0.3)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    note = "x axes zoomed to the values (not from 0)"
    if BASELINE in names:
        note += f"; dotted: {BASELINE}"
    if per_image:
        note += "; bars: 95% bootstrap interval"
    fig.supxlabel(note, fontsize=7.5, color="#59636e")
    return fig


MAX_CATEGORY_ROWS = 60


def _plot_categories(variants: dict[str, VariantScores], categories: list[str]):
    """mIoU, J and F per category as dot plots side by side, one row per category (sorted by
    the candidate's J, worst at the bottom), one coloured dot per variant joined by a grey
    line; each panel's x axis zoomed to its values. J and F are per-image means, mIoU pools
    the pixels: they disagree when a category's images differ in object size."""
    names = list(variants)
    key_v = CANDIDATE if CANDIDATE in names else names[-1]

    def val(v, c, key):
        return _value(variants[v].per_category.get(c), key)

    cats = sorted(categories, key=lambda c: (-val(key_v, c, "j_mean")
                                             if _finite(val(key_v, c, "j_mean")) else math.inf,
                                             str(c)))
    title = "mIoU, J and F per category"
    if len(cats) > MAX_CATEGORY_ROWS:
        cats = cats[-MAX_CATEGORY_ROWS:]
        title += f" (the {MAX_CATEGORY_ROWS} lowest J of {key_v})"
    n = len(cats)
    fig = _new_figure((9.6, 0.3 * n + 1.9), layout="constrained")
    axes = fig.subplots(1, len(CATEGORY_METRICS), sharey=True)
    for k, (ax, (key, label)) in enumerate(zip(axes, CATEGORY_METRICS, strict=True)):
        allv = []
        for row, c in enumerate(cats):
            y = n - 1 - row
            fin = [x for x in (val(v, c, key) for v in names) if _finite(x)]
            allv += fin
            if len(fin) > 1:
                ax.plot([min(fin), max(fin)], [y, y], color="#c9d1d9", lw=2, zorder=1)
        for i, v in enumerate(names):
            pts = [(val(v, c, key), n - 1 - row) for row, c in enumerate(cats)
                   if _finite(val(v, c, key))]
            if not pts:  # an empty line's extent would collapse the layout
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=6, label=v,
                    color=_variant_colour(v, i), markeredgecolor="white", markeredgewidth=0.6,
                    zorder=2 + (v == key_v), clip_on=False)
        if k == 0:
            ax.set_yticks(range(n), [_short(c, 22) for c in reversed(cats)], fontsize=8.5)
        ax.set_ylim(-0.6, n - 0.4)
        ax.set_xlim(*_zoom(allv, pad=0.1))
        ax.set_title(label, fontsize=9.5, loc="left", fontweight="bold")
        ax.xaxis.set_major_locator(_max_n_locator(4))
        ax.tick_params(axis="x", labelsize=8)
        ax.tick_params(axis="y", length=0)
        ax.grid(True, axis="x", alpha=0.3)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    fig.suptitle(title, fontsize=10, x=0.01, ha="left", fontweight="bold")
    fig.supxlabel("each axis zoomed to its values (not from 0)", fontsize=7.5, color="#59636e")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper right",
               ncol=len(names), fontsize=8, frameon=False, handletextpad=0.2,
               columnspacing=1.0)
    return fig


def _max_n_locator(n: int):
    from matplotlib.ticker import MaxNLocator
    return MaxNLocator(n)


def _plot_sweep(sweep: dict[str, list[SweepPoint]], threshold: float | None):
    """The threshold sweep: J mean against the threshold per variant (top), precision and
    recall of the object pixels (below; solid precision, dashed recall), the configured
    threshold marked with a dotted line and each variant's best J with a ring."""
    names = [v for v, pts in sweep.items() if pts]
    if not names:
        return None
    fig = _new_figure((5.6, 6.4), layout="constrained")  # stacked: readable on a phone too
    ax_j, ax_pr = fig.subplots(2, 1)
    for i, v in enumerate(names):
        pts, c = sweep[v], _variant_colour(v, i)
        ts = [p.threshold for p in pts]
        ax_j.plot(ts, [p.j_mean for p in pts], color=c, lw=1.8, marker="o", ms=3, label=v)
        best = max(pts, key=lambda p: (p.j_mean, -abs(p.threshold - (threshold or 0.5))))
        ax_j.plot([best.threshold], [best.j_mean], "o", ms=9, mfc="none", mec=c, mew=1.4)
        ax_pr.plot(ts, [p.precision for p in pts], color=c, lw=1.6, label=f"{v} precision")
        ax_pr.plot(ts, [p.recall for p in pts], color=c, lw=1.6, ls="--",
                   label=f"{v} recall")
    for ax, title in ((ax_j, "J mean"), (ax_pr, "Precision (solid) and recall (dashed)")):
        if threshold is not None:
            ax.axvline(threshold, color="#59636e", lw=1.1, ls=":", zorder=0)
            ax.annotate(f"configured {threshold:g}", (threshold, 0.0),
                        xycoords=("data", "axes fraction"), xytext=(3, 3),
                        textcoords="offset points", ha="left", va="bottom", fontsize=7.5,
                        color="#59636e", bbox=dict(boxstyle="square,pad=0.15", fc="white",
                                                   ec="none", alpha=0.8))
        ax.set_xlim(0, 1)
        ax.set_xlabel("threshold on the object probability", fontsize=8.5)
        ax.set_title(title, fontsize=10, loc="left", fontweight="bold")
        ax.tick_params(labelsize=8.5)
        ax.grid(True, alpha=0.3)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    lo, hi = _zoom([p.j_mean for v in names for p in sweep[v]], pad=0.08)
    ax_j.set_ylim(lo, hi)
    ax_pr.set_ylim(-0.02, 1.02)
    fig.legend(*ax_j.get_legend_handles_labels(), loc="outside lower center", ncol=len(names),
               fontsize=8, frameon=False, handletextpad=0.3, columnspacing=1.2)
    return fig


def _category_styles(categories: list[str]) -> dict[str, tuple[str, str]] | None:
    """A distinct (colour, marker) per category from CATEGORY_COLOURS x CATEGORY_MARKERS
    (colours first), None for more categories than that."""
    nc, nm = len(CATEGORY_COLOURS), len(CATEGORY_MARKERS)
    if len(categories) > nc * nm:
        return None
    return {c: (CATEGORY_COLOURS[i % nc], CATEGORY_MARKERS[i // nc])
            for i, c in enumerate(categories)}


def _plot_scatter(per_image: list[ImageScores], x_variant: str, y_variant: str):
    """Per-image J of the candidate against the baseline's: zoomed (same range on both axes),
    the diagonal, the side where the candidate is better shaded, points coloured by
    category, and how many images lie on each side."""
    pts = []
    for r in per_image:
        a, b = r.j.get(x_variant), r.j.get(y_variant)
        if a is not None and b is not None:
            pts.append((r.category, a, b))
    if not pts:
        return None
    cats = list(dict.fromkeys(c for c, _, _ in pts))
    colours = _category_styles(cats)
    many = len(pts) > 400
    fig = _new_figure((5.0, 5.3 + (0.18 * math.ceil(len(cats) / 3) if colours else 0)),
                      layout="constrained")
    ax = fig.subplots()
    lo, hi = _zoom([p[1] for p in pts] + [p[2] for p in pts], pad=0.06)
    ax.fill_between([lo, hi], [lo, hi], [hi, hi], color="#f58518", alpha=0.07, lw=0, zorder=0)
    ax.plot([lo, hi], [lo, hi], color="#59636e", lw=1, ls="--", zorder=1)
    for c in cats:
        xs = [a for cc, a, _ in pts if cc == c]
        ys = [b for cc, _, b in pts if cc == c]
        ax.scatter(xs, ys, s=10 if many else 28, alpha=0.55 if many else 0.85,
                   color=colours[c][0] if colours else "#6a51a3",
                   marker=colours[c][1] if colours else "o",
                   edgecolors="white", linewidths=0 if many else 0.5, zorder=2,
                   label=_short(c, 20), clip_on=False)
    better = sum(b > a + 1e-9 for _, a, b in pts)
    worse = sum(b < a - 1e-9 for _, a, b in pts)
    box = dict(boxstyle="round,pad=0.3", fc="white", ec="none", alpha=0.85)
    ax.text(0.03, 0.97, f"{y_variant} better: {better}", transform=ax.transAxes, ha="left",
            va="top", fontsize=8.5, color="#b35806", bbox=box)
    ax.text(0.97, 0.03, f"{x_variant} better: {worse}", transform=ax.transAxes, ha="right",
            va="bottom", fontsize=8.5, color="#2f5d8a", bbox=box)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"J, {x_variant}", fontsize=9)
    ax.set_ylabel(f"J, {y_variant}", fontsize=9)
    ax.tick_params(labelsize=8.5)
    ax.set_title(f"Per-image J, {len(pts)} images (axes zoomed)", fontsize=10, loc="left",
                 fontweight="bold")
    ax.grid(True, alpha=0.3)
    if colours:
        fig.legend(loc="outside lower center", ncol=min(len(cats), 3), fontsize=8,
                   frameon=False, handletextpad=0.2, columnspacing=1.2,
                   markerscale=2.0 if many else 1.0)
    return fig
