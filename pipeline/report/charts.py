"""The report's charts, drawn on ``figures.new_figure`` (matplotlib's object-oriented API on
Agg): the overall dot plot, the dot plots per category, the threshold sweep and the per-image J
scatter. Each returns its Figure (None: nothing to draw); ``figures.save_figure`` saves it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from ..core.jsondoc import finite as _finite
from ..core.variants import BASELINE, CANDIDATE
from ..metrics.definitions import HEADLINE, headline_names
from .doc import ImageScores, SweepPoint, VariantScores
from .figures import bootstrap_ci, metric_value, new_figure, short_name, variant_colour, zoom

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from ..metrics.definitions import Metric

__all__ = [
    "plot_overall",
    "plot_categories",
    "plot_sweep",
    "plot_scatter",
    "CATEGORY_COLOURS",
    "CATEGORY_MARKERS",
    "MAX_CATEGORY_ROWS",
]


# the categories' colours: none of the variants' grey / blue / orange nor the error legend's
# green / red / blue / yellow (panels.LEGEND), dark enough on white; with the markers below,
# len(CATEGORY_COLOURS) x len(CATEGORY_MARKERS) categories are told apart
CATEGORY_COLOURS = (
    "#7b3294",
    "#00a6a6",
    "#8c510a",
    "#d01c8b",
    "#01665e",
    "#6b6b00",
    "#de77ae",
    "#67001f",
    "#40004b",
)


CATEGORY_MARKERS = ("o", "s", "^", "D")

Point = tuple[float, float]


def _per_image_values(per_image: list[ImageScores], key: str, variant: str) -> list[float]:
    return [x for r in per_image if (x := (r.j if key == "j" else r.f).get(variant)) is not None]


def _tidy(ax: Axes, grid: Literal["x", "y", "both"], hide: tuple[str, ...]) -> None:
    """A light grid along `grid` ("x", "y" or "both") and the spines `hide` hidden."""
    ax.grid(True, axis=grid, alpha=0.3)
    for side in hide:
        ax.spines[side].set_visible(False)


def _figure_legend(
    fig: Figure, ax: Axes | None, loc: str, ncol: int, pad: float, gap: float, **more: float
) -> None:
    """The figure's legend at `loc` in `ncol` columns, of the artists of `ax` (None: all the
    figure's); `pad` between a marker and its text, `gap` between columns."""
    opts: dict[str, Any] = {"loc": loc, "ncol": ncol, "fontsize": 8, "frameon": False}
    opts.update(handletextpad=pad, columnspacing=gap, **more)
    if ax is None:
        fig.legend(**opts)
    else:
        fig.legend(*ax.get_legend_handles_labels(), **opts)


def _label(ax: Axes, text: str, xy: Point, offset: Point, ha: str, **style: Any) -> None:
    """`text` above the point `xy`, `offset` points away, aligned `ha` on it."""
    ax.annotate(text, xy, xytext=offset, textcoords="offset points", ha=ha, va="bottom", **style)


def _overall_intervals(
    per_image: list[ImageScores], names: list[str], key: str | None
) -> dict[str, tuple[float, float]]:
    """The 95% bootstrap interval of each variant's per-image mean of `key` ("j" / "f";
    None: a pooled metric, no interval)."""
    cis = {}
    if key is not None and per_image:
        for v in names:
            ci = bootstrap_ci(_per_image_values(per_image, key, v))
            if ci:
                cis[v] = ci
    return cis


def _overall_dot(ax: Axes, x: float, y: float, colour: str, text: str) -> None:
    """One variant's dot at (x, y) with its value printed above it."""
    dot: dict[str, Any] = {"ms": 7.5, "zorder": 3, "clip_on": False}
    edge: dict[str, Any] = {"markeredgecolor": "white", "markeredgewidth": 0.8}
    ax.plot([x], [y], "o", color=colour, **dot, **edge)
    _label(ax, text, (x, y), (0, 6), "center", fontsize=8.5, color="#1f2328")


def _overall_panel(
    ax: Axes,
    m: Metric,
    variants: dict[str, VariantScores],
    names: list[str],
    per_image: list[ImageScores],
) -> None:
    """The dot plot of metric `m`: one row per variant (the first on top), its interval bar,
    the dotted baseline, the x axis zoomed to the values."""
    from matplotlib.ticker import MaxNLocator

    n = len(names)
    ys = {v: n - 1 - i for i, v in enumerate(names)}
    vals = {v: metric_value(variants[v].overall, m.key) for v in names}
    cis = _overall_intervals(per_image, names, m.per_image)
    lo, hi = zoom(list(vals.values()) + [c for ci in cis.values() for c in ci])
    if BASELINE in vals and _finite(vals[BASELINE]):
        ax.axvline(vals[BASELINE], color="#8a949e", lw=1, ls=":", zorder=1)
    for i, v in enumerate(names):
        x, y, c = vals[v], ys[v], variant_colour(v, i)
        if v in cis:
            ax.plot(cis[v], [y, y], color=c, lw=2.4, alpha=0.5, solid_capstyle="butt", zorder=2)
        if _finite(x):
            _overall_dot(ax, x, y, c, m.text(x))
    ax.set_xlim(lo, hi)
    ax.set_ylim(-0.5, n - 0.2)
    ax.set_yticks([ys[v] for v in names], names)
    ax.set_title(m.label, fontsize=10, loc="left", fontweight="bold")
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.tick_params(axis="both", labelsize=8.5, length=3)
    ax.tick_params(axis="y", length=0)
    _tidy(ax, "x", ("top", "right", "left"))


def plot_overall(variants: dict[str, VariantScores], per_image: list[ImageScores]) -> Figure:
    """A dot plot, one panel per metric stacked (each with its own zoomed x axis: readable on
    a phone too), one row per variant, the value printed at each dot, 95% bootstrap intervals
    of the per-image means (J, F), and a dotted reference line at the baseline (bilinear)."""
    names = [v for v in variants if variants[v].overall is not None]
    n = len(names)
    fig = new_figure((5.6, len(HEADLINE) * (0.36 * n + 0.62) + 0.35), layout="constrained")
    axes = fig.subplots(len(HEADLINE), 1, squeeze=False)[:, 0]
    for ax, m in zip(axes, HEADLINE, strict=True):
        _overall_panel(ax, m, variants, names, per_image)
    note = "x axes zoomed to the values (not from 0)"
    if BASELINE in names:
        note += f"; dotted: {BASELINE}"
    if per_image:
        note += "; bars: 95% bootstrap interval"
    fig.supxlabel(note, fontsize=7.5, color="#59636e")
    return fig


MAX_CATEGORY_ROWS = 60


def _sorted_categories(
    variants: dict[str, VariantScores], categories: list[str], key_v: str
) -> list[str]:
    """The categories by `key_v`'s J, best first (one without a J last), then by name."""

    def order(c: str) -> tuple[float, str]:
        j = metric_value(variants[key_v].per_category.get(c), "j_mean")
        return (-j if _finite(j) else math.inf, str(c))

    return sorted(categories, key=order)


def _category_panel(
    ax: Axes, key: str, variants: dict[str, VariantScores], cats: list[str], key_v: str
) -> None:
    """One metric's dots per category (first category on top): a grey line from the lowest
    to the highest variant, a dot per variant (`key_v`'s drawn over the others)."""
    names, n = list(variants), len(cats)

    def val(v: str, c: str) -> float:
        return metric_value(variants[v].per_category.get(c), key)

    allv = []
    for row, c in enumerate(cats):
        fin = [x for x in (val(v, c) for v in names) if _finite(x)]
        allv += fin
        if len(fin) > 1:
            ax.plot([min(fin), max(fin)], [n - 1 - row] * 2, color="#c9d1d9", lw=2, zorder=1)
    for i, v in enumerate(names):
        pts = [(val(v, c), n - 1 - row) for row, c in enumerate(cats) if _finite(val(v, c))]
        if not pts:  # an empty line's extent would collapse the layout
            continue
        style: dict[str, Any] = {"ms": 6, "label": v, "color": variant_colour(v, i)}
        edge: dict[str, Any] = {"markeredgecolor": "white", "markeredgewidth": 0.6}
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, "o", **style, **edge, zorder=2 + (v == key_v), clip_on=False)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(*zoom(allv, pad=0.1))


def plot_categories(variants: dict[str, VariantScores], categories: list[str]) -> Figure:
    """mIoU, J and F per category as dot plots side by side, one row per category (sorted by
    the candidate's J, worst at the bottom), one coloured dot per variant joined by a grey
    line; each panel's x axis zoomed to its values. J and F are per-image means, mIoU pools
    the pixels: they disagree when a category's images differ in object size."""
    names = list(variants)
    key_v = CANDIDATE if CANDIDATE in names else names[-1]
    cats = _sorted_categories(variants, categories, key_v)
    title = f"{headline_names()} per category"
    if len(cats) > MAX_CATEGORY_ROWS:
        cats = cats[-MAX_CATEGORY_ROWS:]
        title += f" (the {MAX_CATEGORY_ROWS} lowest J of {key_v})"
    n = len(cats)
    fig = new_figure((9.6, 0.3 * n + 1.9), layout="constrained")
    axes = fig.subplots(1, len(HEADLINE), sharey=True)
    for k, (ax, m) in enumerate(zip(axes, HEADLINE, strict=True)):
        _category_panel(ax, m.key, variants, cats, key_v)
        if k == 0:
            ax.set_yticks(range(n), [short_name(c, 22) for c in reversed(cats)], fontsize=8.5)
        ax.set_title(m.label, fontsize=9.5, loc="left", fontweight="bold")
        ax.xaxis.set_major_locator(_max_n_locator(4))
        ax.tick_params(axis="x", labelsize=8)
        ax.tick_params(axis="y", length=0)
        _tidy(ax, "x", ("top", "right", "left"))
    fig.suptitle(title, fontsize=10, x=0.01, ha="left", fontweight="bold")
    fig.supxlabel("each axis zoomed to its values (not from 0)", fontsize=7.5, color="#59636e")
    _figure_legend(fig, axes[0], "outside upper right", len(names), pad=0.2, gap=1.0)
    return fig


def _max_n_locator(n: int) -> MaxNLocator:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(n)


def plot_sweep(sweep: dict[str, list[SweepPoint]], threshold: float | None) -> Figure | None:
    """The threshold sweep: J mean against the threshold per variant (top), precision and
    recall of the object pixels (below; solid precision, dashed recall), the configured
    threshold marked with a dotted line and each variant's best J with a ring."""
    names = [v for v, pts in sweep.items() if pts]
    if not names:
        return None
    fig = new_figure((5.6, 6.4), layout="constrained")  # stacked: readable on a phone too
    ax_j, ax_pr = fig.subplots(2, 1)
    for i, v in enumerate(names):
        pts, c = sweep[v], variant_colour(v, i)
        ts = [p.threshold for p in pts]
        ax_j.plot(ts, [p.j_mean for p in pts], color=c, lw=1.8, marker="o", ms=3, label=v)
        best = max(pts, key=lambda p: (p.j_mean, -abs(p.threshold - (threshold or 0.5))))
        ax_j.plot([best.threshold], [best.j_mean], "o", ms=9, mfc="none", mec=c, mew=1.4)
        ax_pr.plot(ts, [p.precision for p in pts], color=c, lw=1.6, label=f"{v} precision")
        ax_pr.plot(ts, [p.recall for p in pts], color=c, lw=1.6, ls="--", label=f"{v} recall")
    for ax, title in ((ax_j, "J mean"), (ax_pr, "Precision (solid) and recall (dashed)")):
        if threshold is not None:
            ax.axvline(threshold, color="#59636e", lw=1.1, ls=":", zorder=0)
            _label(
                ax,
                f"configured {threshold:g}",
                (threshold, 0.0),
                (3, 3),
                "left",
                fontsize=7.5,
                color="#59636e",
                xycoords=("data", "axes fraction"),
                bbox=dict(boxstyle="square,pad=0.15", fc="white", ec="none", alpha=0.8),
            )
        ax.set_xlim(0, 1)
        ax.set_xlabel("threshold on the object probability", fontsize=8.5)
        ax.set_title(title, fontsize=10, loc="left", fontweight="bold")
        ax.tick_params(labelsize=8.5)
        _tidy(ax, "both", ("top", "right"))
    lo, hi = zoom([p.j_mean for v in names for p in sweep[v]], pad=0.08)
    ax_j.set_ylim(lo, hi)
    ax_pr.set_ylim(-0.02, 1.02)
    _figure_legend(fig, ax_j, "outside lower center", len(names), pad=0.3, gap=1.2)
    return fig


def _category_styles(categories: list[str]) -> dict[str, tuple[str, str]] | None:
    """A distinct (colour, marker) per category from CATEGORY_COLOURS x CATEGORY_MARKERS
    (colours first), None for more categories than that."""
    nc, nm = len(CATEGORY_COLOURS), len(CATEGORY_MARKERS)
    if len(categories) > nc * nm:
        return None
    return {
        c: (CATEGORY_COLOURS[i % nc], CATEGORY_MARKERS[i // nc]) for i, c in enumerate(categories)
    }


def _scatter_points(
    per_image: list[ImageScores], x_variant: str, y_variant: str
) -> list[tuple[str, float, float]]:
    """(category, J of `x_variant`, J of `y_variant`) of each image that has both."""
    pts = []
    for r in per_image:
        a, b = r.j.get(x_variant), r.j.get(y_variant)
        if a is not None and b is not None:
            pts.append((r.category, a, b))
    return pts


def _scatter_dots(
    ax: Axes,
    pts: list[tuple[str, float, float]],
    cats: list[str],
    styles: dict[str, tuple[str, str]] | None,
) -> None:
    """The points, one scatter per category in its colour and marker (one purple without
    `styles`); smaller and lighter beyond 400 points."""
    many = len(pts) > 400
    for c in cats:
        xs = [a for cc, a, _ in pts if cc == c]
        ys = [b for cc, _, b in pts if cc == c]
        colour, marker = styles[c] if styles else ("#6a51a3", "o")
        ax.scatter(
            xs,
            ys,
            s=10 if many else 28,
            alpha=0.55 if many else 0.85,
            color=colour,
            marker=marker,
            edgecolors="white",
            linewidths=0 if many else 0.5,
            zorder=2,
            label=short_name(c, 20),
            clip_on=False,
        )


def _scatter_counts(
    ax: Axes, pts: list[tuple[str, float, float]], x_variant: str, y_variant: str
) -> None:
    """How many images lie on each side of the diagonal, in the corners of their side."""
    better = sum(b > a + 1e-9 for _, a, b in pts)
    worse = sum(b < a - 1e-9 for _, a, b in pts)
    box = dict(boxstyle="round,pad=0.3", fc="white", ec="none", alpha=0.85)
    for (x, y, ha, va), text, colour in (
        ((0.03, 0.97, "left", "top"), f"{y_variant} better: {better}", "#b35806"),
        ((0.97, 0.03, "right", "bottom"), f"{x_variant} better: {worse}", "#2f5d8a"),
    ):
        ax.text(
            x, y, text, transform=ax.transAxes, ha=ha, va=va, fontsize=8.5, color=colour, bbox=box
        )


def plot_scatter(per_image: list[ImageScores], x_variant: str, y_variant: str) -> Figure | None:
    """Per-image J of the candidate against the baseline's: zoomed (same range on both axes),
    the diagonal, the side where the candidate is better shaded, points coloured by
    category, and how many images lie on each side."""
    pts = _scatter_points(per_image, x_variant, y_variant)
    if not pts:
        return None
    cats = list(dict.fromkeys(c for c, _, _ in pts))
    styles = _category_styles(cats)
    fig = new_figure(
        (5.0, 5.3 + (0.18 * math.ceil(len(cats) / 3) if styles else 0)), layout="constrained"
    )
    ax = fig.subplots()
    lo, hi = zoom([p[1] for p in pts] + [p[2] for p in pts], pad=0.06)
    ax.fill_between([lo, hi], [lo, hi], [hi, hi], color="#f58518", alpha=0.07, lw=0, zorder=0)
    ax.plot([lo, hi], [lo, hi], color="#59636e", lw=1, ls="--", zorder=1)
    _scatter_dots(ax, pts, cats, styles)
    _scatter_counts(ax, pts, x_variant, y_variant)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"J, {x_variant}", fontsize=9)
    ax.set_ylabel(f"J, {y_variant}", fontsize=9)
    ax.tick_params(labelsize=8.5)
    ax.set_title(
        f"Per-image J, {len(pts)} images (axes zoomed)", fontsize=10, loc="left", fontweight="bold"
    )
    ax.grid(True, alpha=0.3)
    if styles:
        markerscale = 2.0 if len(pts) > 400 else 1.0
        _figure_legend(
            fig, None, "outside lower center", min(len(cats), 3), 0.2, 1.2, markerscale=markerscale
        )
    return fig
