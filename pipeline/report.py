"""Human-readable reports of stage 3: Markdown tables, a self-contained HTML page with charts
and error-overlay thumbnails, and the training-curve figure of stage 2.

The JSON report (the public contract) is computed and written by the caller; this module only
renders it. Everything written for one split lives next to the JSON:

    <out_dir>/report_<split>.md
    <out_dir>/report_<split>.html
    <out_dir>/report_<split>_files/   (PNG charts and thumbnails, linked relatively)

so the three can be moved or zipped together and opened offline. The HTML page uses inline CSS
only: no JavaScript, no web fonts, nothing fetched from the network.

matplotlib is imported lazily and only through its object-oriented API (``Figure`` rendered
by the Agg canvas); pyplot is never imported, so no GUI backend or display is ever touched and
the backend of a host application is left alone.
"""
from __future__ import annotations

import html
import math
import numbers
import os
import re
import shutil
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

__all__ = ["Thumb", "overlay", "thumbnail_strip", "plot_training_curves", "write_reports",
           "TP_COLOUR", "FP_COLOUR", "FN_COLOUR", "CONTOUR_COLOUR", "MASK_COLOUR", "LEGEND",
           "PANELS"]

# ----------------------------------------------------------------------------- overlay colours

TP_COLOUR = (0, 200, 0)  # true positive: object predicted and object in the ground truth
FP_COLOUR = (230, 0, 0)  # false positive: predicted object where the ground truth is background
FN_COLOUR = (0, 90, 255)  # false negative: ground-truth object the prediction missed
CONTOUR_COLOUR = (255, 230, 0)  # the ground-truth object's outline
TP_ALPHA = 0.35  # tint strengths (0 = image only, 1 = flat colour)
ERR_ALPHA = 0.6

MASK_COLOUR = (255, 255, 255)  # outline and light tint of the object in the mask panels
MASK_ALPHA = 0.15
MASK_DIM = 0.4  # brightness kept by the background in the mask panels

# the panels of a thumbnail strip, left to right (see thumbnail_strip)
PANELS = ("image", "ground truth", "prediction", "errors")
PANEL_MAX_SIDE = 480  # stored px; shown at up to THUMB_DENSITY x fewer CSS px (sharp on HiDPI)
THUMB_DENSITY = 2
STRIP_GAP = 6  # stored px between two panels
JPEG_QUALITY = 85

LEGEND = (
    ("true positive (object, found)", TP_COLOUR),
    ("false positive (predicted, not object)", FP_COLOUR),
    ("false negative (object, missed)", FN_COLOUR),
    ("ground-truth contour", CONTOUR_COLOUR),
)

# ----------------------------------------------------------------------------- metric tables

# (key in METRICS, column title) of the overall table, in order
OVERALL_COLUMNS = (
    ("miou", "mIoU"), ("fg_iou", "FG IoU"), ("bg_iou", "BG IoU"), ("j_mean", "J mean"),
    ("boundary_f", "Boundary F"), ("accuracy", "Accuracy"), ("precision", "Precision"),
    ("recall", "Recall"),
)
# metrics with one per-category table each
CATEGORY_METRICS = (("miou", "mIoU"), ("j_mean", "J mean"), ("boundary_f", "Boundary F"))
# metrics of the grouped bar chart
CHART_METRICS = CATEGORY_METRICS

VARIANT_COLOURS = {"linear_nearest": "#9aa5b1", "linear_bilinear": "#4c78a8", "pac": "#f58518"}
_EXTRA_COLOURS = ("#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#eeca3b")

METRIC_NOTES = (
    ("mIoU", "mean of the object IoU and the background IoU, each computed over all pixels of "
             "the group pooled together (the course convention)."),
    ("FG IoU / BG IoU", "IoU of the object class / of the background class over the pooled "
                        "pixels."),
    ("J mean", "mean over images of the per-image object IoU (DAVIS region similarity J): "
               "every image counts equally, whatever the size of its object."),
    ("Boundary F", "DAVIS boundary F-measure: precision/recall of the predicted vs. "
                   "ground-truth object contours, matched within 0.008 x the image diagonal; "
                   "averaged over images."),
    ("Accuracy / Precision / Recall", "pixel accuracy, and the precision / recall of the "
                                      "object pixels."),
)

VARIANT_NOTES = {
    "linear_nearest": "linear head, patch logits upsampled with nearest-neighbour interpolation",
    "linear_bilinear": "linear head, patch logits upsampled bilinearly",
    "pac": "pixel-adaptive-convolution upsampler guided by the image",
}


@dataclass
class Thumb:
    """One image shown in the report, with its pac-variant scores."""
    category: str
    stem: str
    j: float  # of the pac variant for this image
    f: float
    image: np.ndarray  # (H, W, 3) uint8, original size
    gt: np.ndarray  # (H, W) bool
    pred: np.ndarray  # (H, W) bool (pac prediction)


# ----------------------------------------------------------------------------- overlay

def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"overlay: expected an (H, W, 3) image, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        if a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    return a


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-majority downscaling of a bool mask to size (w, h)."""
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(im.resize(size, Image.Resampling.BOX)) >= 128


def _contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Inner 4-connected boundary of a bool mask, ``width`` px thick (the image border is not
    a boundary)."""
    if mask.size == 0:
        return mask.copy()
    eroded = mask
    for _ in range(max(1, int(width))):
        p = np.pad(eroded, 1, mode="edge")
        eroded = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~eroded


def _prepare(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, max_side: int):
    """The image (uint8 RGB) and both masks (bool), downscaled (never upscaled) so that the
    longest side is ``max_side``: the image with Lanczos, the masks by area majority."""
    img = _as_rgb_uint8(image)
    gt = np.asarray(gt).astype(bool)
    pred = np.asarray(pred).astype(bool)
    h, w = img.shape[:2]
    if gt.shape != (h, w) or pred.shape != (h, w):
        raise ValueError(f"overlay: image is {h}x{w} but gt is {gt.shape} and pred is {pred.shape}")
    if max_side < 1:
        raise ValueError("overlay: max_side must be >= 1")
    scale = max_side / max(h, w, 1)
    if scale < 1.0 and h and w:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS,
                                                     reducing_gap=3.0))
        gt = _resize_mask(gt, size)
        pred = _resize_mask(pred, size)
    return img, gt, pred


def _errors_panel(img: np.ndarray, gt: np.ndarray, pred: np.ndarray,
                  contour_width: int = 1) -> np.ndarray:
    out = img.astype(np.float32)
    for sel, colour, alpha in ((gt & pred, TP_COLOUR, TP_ALPHA),
                               (~gt & pred, FP_COLOUR, ERR_ALPHA),
                               (gt & ~pred, FN_COLOUR, ERR_ALPHA)):
        out[sel] = (1.0 - alpha) * out[sel] + alpha * np.asarray(colour, np.float32)
    out[_contour(gt, contour_width)] = CONTOUR_COLOUR
    return np.clip(out, 0, 255).round().astype(np.uint8)


def _mask_panel(img: np.ndarray, mask: np.ndarray, contour_width: int = 1) -> np.ndarray:
    """The object of ``mask`` at the image's own colours, lightly tinted and outlined
    (``MASK_COLOUR``); the background dimmed to ``MASK_DIM`` of its brightness."""
    out = img.astype(np.float32)
    out[~mask] *= MASK_DIM
    out[mask] = (1.0 - MASK_ALPHA) * out[mask] + MASK_ALPHA * np.asarray(MASK_COLOUR, np.float32)
    out[_contour(mask, contour_width)] = MASK_COLOUR
    return np.clip(out, 0, 255).round().astype(np.uint8)


def overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, max_side: int = 320,
            contour_width: int = 1) -> np.ndarray:
    """A thumbnail (uint8 RGB) of ``image`` with the prediction's errors coloured.

    Legend (see ``LEGEND``): true positives are tinted green (``TP_COLOUR``), false positives
    red (``FP_COLOUR``), false negatives blue (``FN_COLOUR``); true negatives keep the image's
    own colours; the ground-truth object's outline is drawn in yellow (``CONTOUR_COLOUR``,
    ``contour_width`` px at thumbnail resolution, drawn over the tint). The image is downscaled
    (never upscaled) so that its longest side is ``max_side``; the masks are downscaled by area
    majority before colouring so the colours and outline stay crisp.
    """
    img, gt, pred = _prepare(image, gt, pred, max_side)
    return _errors_panel(img, gt, pred, contour_width)


def thumbnail_strip(image: np.ndarray, gt: np.ndarray, pred: np.ndarray,
                    max_side: int = PANEL_MAX_SIDE, gap: int = STRIP_GAP
                    ) -> tuple[np.ndarray, tuple[int, int]]:
    """One report thumbnail: ``len(PANELS)`` panels side by side, all the same size, separated
    by ``gap`` white columns: the image, the ground truth, the prediction (both drawn by
    ``_mask_panel``: object bright and outlined in white, background dimmed) and the errors
    (``overlay``'s colours). Each panel is downscaled (never upscaled) to a longest side of
    ``max_side``; outlines are 1 px per 240 px of panel side, so about 1 CSS px at the page's
    display size. Returns the strip (uint8 RGB) and the size (w, h) of one panel.
    """
    img, gt, pred = _prepare(image, gt, pred, max_side)
    h, w = img.shape[:2]
    cw = max(1, round(max(h, w) / 240))
    panels = (img, _mask_panel(img, gt, cw), _mask_panel(img, pred, cw),
              _errors_panel(img, gt, pred, cw))
    out = np.full((h, len(panels) * w + (len(panels) - 1) * gap, 3), 255, np.uint8)
    for i, panel in enumerate(panels):
        out[:, i * (w + gap): i * (w + gap) + w] = panel
    return out, (w, h)


# ----------------------------------------------------------------------------- figures

def _new_figure(figsize: tuple[float, float]):
    """A matplotlib Figure on the Agg canvas (no pyplot, no display, nothing global)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=100, format="png")
    finally:
        fig.clear()
    return path


def _finite(x) -> bool:
    """A real, finite number (numpy scalars included, bools not)."""
    return (isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))
            and math.isfinite(x))


def plot_training_curves(history: list[dict] | None, path: Path) -> Path | None:
    """Loss curves PNG from stage 2's metrics.jsonl rows.

    Rows look like ``{"phase": "linear", "epoch": 3, "loss": 0.21}`` or
    ``{"phase": "upsampler", "epoch": 2, "loss": 0.1, "val_miou": 0.9}`` (``val_*`` keys
    optional). One subplot per phase (in order of first appearance), loss vs. epoch on the left
    axis, the ``val_*`` metrics on a twin right axis when present. When an epoch appears more
    than once in a phase (a resumed run), its last row wins. Returns ``path``, or None when
    ``history`` is empty or holds nothing to plot.
    """
    phases: dict[str, dict[float, dict]] = {}
    for i, row in enumerate(history or []):
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
    for ax, (phase, loss, vals) in zip(axes, series):
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
    return _save_figure(fig, path)


def _variant_colour(variant: str, index: int) -> str:
    return VARIANT_COLOURS.get(variant, _EXTRA_COLOURS[index % len(_EXTRA_COLOURS)])


def _short(text: str, n: int = 18) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _value(metrics: dict | None, key: str) -> float:
    v = (metrics or {}).get(key)
    return float(v) if _finite(v) else float("nan")


def _plot_variant_bars(variants: dict, path: Path) -> Path:
    names = list(variants)
    fig = _new_figure((5.1, 3.4))
    ax = fig.subplots()
    x = np.arange(len(CHART_METRICS))
    width = 0.8 / max(len(names), 1)
    for i, v in enumerate(names):
        ys = [_value(variants[v].get("overall"), k) for k, _ in CHART_METRICS]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, np.nan_to_num(ys), width * 0.95,
                      label=v, color=_variant_colour(v, i))
        for b, y in zip(bars, ys):
            if math.isfinite(y):
                ax.annotate(f"{y:.3f}", (b.get_x() + b.get_width() / 2, y), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [t for _, t in CHART_METRICS])
    ax.set_ylim(0, 1.1)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("score")
    ax.set_title("Variants, overall", fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(names),
              frameon=False)
    # fixed labels: fixed margins, no tight_layout (a third of the figure's cost)
    fig.subplots_adjust(left=0.12, right=0.98, top=0.91, bottom=0.2)
    return _save_figure(fig, path)


def _plot_category_bars(variants: dict, categories: list[str], path: Path) -> Path:
    names = list(variants)
    ncat = len(categories)
    fig = _new_figure((min(max(5.1, 0.4 * ncat * max(len(names), 1) + 1.2), 11.0), 3.4))
    ax = fig.subplots()
    x = np.arange(ncat)
    width = 0.8 / max(len(names), 1)
    for i, v in enumerate(names):
        pc = variants[v].get("per_category") or {}
        ys = [_value(pc.get(c), "miou") for c in categories]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, np.nan_to_num(ys), width * 0.95,
               label=v, color=_variant_colour(v, i))
    rotate = ncat > 6 or max((len(str(c)) for c in categories), default=0) > 12
    ax.set_xticks(x, [_short(c) for c in categories], rotation=40 if rotate else 0,
                  ha="right" if rotate else "center", fontsize=8)
    ax.set_xlim(-0.6, ncat - 0.4)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("mIoU")
    ax.set_title("mIoU per category", fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 if not rotate else -0.3),
              ncol=len(names), frameon=False)
    fig.tight_layout()
    return _save_figure(fig, path)


def _plot_scatter(per_image: list[dict], x_variant: str, y_variant: str, path: Path) -> Path | None:
    pts = [(r["j"].get(x_variant), r["j"].get(y_variant)) for r in per_image
           if isinstance(r.get("j"), dict)]
    pts = [(a, b) for a, b in pts if _finite(a) and _finite(b)]
    if not pts:
        return None
    xs, ys = np.array(pts, np.float64).T
    fig = _new_figure((3.8, 3.6))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#888", lw=1, ls="--", zorder=1)
    ax.scatter(xs, ys, s=12 if len(xs) < 500 else 5, alpha=0.7 if len(xs) < 500 else 0.4,
               color=_variant_colour(y_variant, 2), edgecolors="none", zorder=2)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel(f"J, {x_variant}")
    ax.set_ylabel(f"J, {y_variant}")
    ax.set_title("Per-image J", fontsize=11)
    ax.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.17, right=0.97, top=0.91, bottom=0.14)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------- helpers

def _fmt(x) -> str:
    return f"{float(x):.3f}" if _finite(x) else "\u2014"


def _fmt_int(x) -> str:
    if isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)):
        return str(int(x))
    if _finite(x) and float(x).is_integer():
        return str(int(x))
    return "\u2014" if x is None else str(x)


def _best_flags(values: list) -> list[bool]:
    """Which values are the best: the largest of the raw (unrounded) numbers, so two values
    shown alike at 3 decimals are both flagged only when they are truly equal; none when fewer
    than two finite numbers compete. Pass the numbers, never their formatted strings."""
    present = [float(v) for v in values if _finite(v)]
    if len(present) < 2:
        return [False] * len(values)
    top = max(present)
    return [_finite(v) and float(v) == top for v in values]


def _categories(variants: dict) -> list[str]:
    seen: dict[str, None] = {}
    for v in variants.values():
        for c in (v.get("per_category") or {}):
            seen.setdefault(c, None)
    return list(seen)


def _category_count(variants: dict, cat: str):
    for v in variants.values():
        m = (v.get("per_category") or {}).get(cat)
        if isinstance(m, dict) and m.get("n_images") is not None:
            return m["n_images"]
    return None


def _backbone_text(backbone) -> tuple[str, str | None]:
    if isinstance(backbone, dict):
        return str(backbone.get("name", "?")), (None if backbone.get("weights") is None
                                                 else str(backbone["weights"]))
    return ("?" if backbone is None else str(backbone)), None


def _run_text(run) -> str | None:
    if run is None:
        return None
    if isinstance(run, dict):
        return ", ".join(f"{k}: {v}" for k, v in run.items())
    return str(run)


_MD_SPECIAL = re.compile(r"([\\|`*\[\]<>#!])")
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def _md(text) -> str:
    """Text made safe for a Markdown table cell or heading (literal, one line)."""
    s = " ".join(str(text).split())
    s = _MD_SPECIAL.sub(r"\\\1", s)
    return _MD_UNDERSCORE.sub(r"\\_", s)


def _md_table(header: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join({"l": ":---", "r": "---:"}[a] for a in align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _rel(files_dir: Path, name: str) -> str:
    """A relative URL (from the report file) to a file in files_dir."""
    return urllib.parse.quote(f"{files_dir.name}/{name}")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


# ----------------------------------------------------------------------------- Markdown

def _markdown(split: str, report: dict, variants: dict, categories: list[str],
              thumbs_best: list[Thumb], thumbs_worst: list[Thumb],
              figures: dict[str, str], html_name: str) -> str:
    name, weights = _backbone_text(report.get("backbone"))
    lines = [f"# Segmentation report: {_md(split)} split, {_md(name)} backbone", ""]
    n_images = report.get("n_images")
    lines.append(f"- Split: {_md(split)} ({_fmt_int(n_images)} images)")
    lines.append(f"- Backbone: {_md(name)}" + (f" (weights: {_md(weights)})" if weights else ""))
    run = _run_text(report.get("run"))
    if run:
        lines.append(f"- Run: {_md(run)}")
    lines.append(f"- Figures and thumbnails: [{_md(html_name)}]({urllib.parse.quote(html_name)})")
    lines.append("")

    lines += ["## Overall", ""]
    vnames = list(variants)
    cols = [[_value(variants[v].get("overall"), k) for v in vnames] for k, _ in OVERALL_COLUMNS]
    flags = [_best_flags(c) for c in cols]
    rows = []
    for i, v in enumerate(vnames):
        row = [_md(v)]
        for j, (k, _) in enumerate(OVERALL_COLUMNS):
            s = _fmt(cols[j][i])
            row.append(f"**{s}**" if flags[j][i] else s)
        row.append(_fmt_int((variants[v].get("overall") or {}).get("n_images")))
        rows.append(row)
    lines += _md_table(["variant"] + [t for _, t in OVERALL_COLUMNS] + ["images"],
                       ["l"] + ["r"] * (len(OVERALL_COLUMNS) + 1), rows)
    lines.append("")
    lines.append("Best value per column in bold.")
    lines.append("")

    if categories:
        lines += ["## Per category", ""]
        for key, title in CATEGORY_METRICS:
            lines += [f"### {title}", ""]
            rows = []
            for c in categories:
                vals = [_value((variants[v].get("per_category") or {}).get(c), key) for v in vnames]
                fl = _best_flags(vals)
                rows.append([_md(c), _fmt_int(_category_count(variants, c))]
                            + [f"**{_fmt(x)}**" if b else _fmt(x) for x, b in zip(vals, fl)])
            lines += _md_table(["category", "images"] + [_md(v) for v in vnames],
                               ["l", "r"] + ["r"] * len(vnames), rows)
            lines.append("")
        lines.append("Best variant per category in bold.")
        lines.append("")

    for title, thumbs in (("Best images", thumbs_best), ("Worst images", thumbs_worst)):
        if not thumbs:
            continue
        lines += [f"## {title} (by J of pac)", ""]
        rows = [[str(i + 1), _md(t.category), _md(t.stem), _fmt(t.j), _fmt(t.f)]
                for i, t in enumerate(thumbs)]
        lines += _md_table(["#", "category", "image", "J", "F"], ["r", "l", "l", "r", "r"], rows)
        lines.append("")

    lines += ["## Metrics", ""]
    for v in vnames:
        if v in VARIANT_NOTES:
            lines.append(f"- {_md(v)}: {VARIANT_NOTES[v]}.")
    for term, text in METRIC_NOTES:
        lines.append(f"- **{term}**: {text}")
    lines.append("")

    if figures:
        lines += ["## Figures", ""]
        for title, url in figures.items():
            lines.append(f"![{_md(title)}]({url})")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- HTML

_CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#e1e4e8;--head:#f3f5f7;--best:#e3f3e6}
*{box-sizing:border-box}
body{margin:0;background:#eef0f3;color:var(--fg);line-height:1.45;
 font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1140px;margin:0 auto;padding:28px 36px 56px;background:#fff;min-height:100vh}
h1{font-size:1.55rem;margin:0 0 .4rem}
h2{font-size:1.18rem;margin:2.1rem 0 .7rem;padding-bottom:.3rem;border-bottom:1px solid var(--line)}
h3{font-size:.98rem;margin:.9rem 0 .45rem}
p,li{font-size:.92rem}
.meta{display:flex;flex-wrap:wrap;gap:.3rem 1.6rem;color:var(--muted);font-size:.9rem;
 margin:0 0 .6rem}
.meta b{color:var(--fg);font-weight:600}
.meta code{font-size:.85rem;word-break:break-all}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.88rem;margin:.2rem 0 .6rem}
th,td{padding:.38rem .75rem;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
thead th{background:var(--head);font-weight:600;border-bottom:2px solid #d0d7de}
tbody tr:nth-child(even) td{background:#fafbfc}
tbody tr:hover td{background:#f1f6ff}
td{font-variant-numeric:tabular-nums}
td.best{font-weight:700;background:var(--best)!important}
th.sep,td.sep{border-left:2px solid #d0d7de}
td.cat{max-width:22rem;overflow:hidden;text-overflow:ellipsis}
.sw{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.45em;
 vertical-align:-.05em}
.note{color:var(--muted);font-size:.84rem;margin:.1rem 0 .8rem}
.tables{display:flex;flex-wrap:wrap;gap:12px 32px;align-items:flex-start}
.tables section{max-width:100%}
.charts{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.charts img,.wide img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:4px}
.wide{margin:.4rem 0}
.thumbs{display:grid;grid-template-columns:minmax(0,1fr);justify-items:start;gap:16px;
 margin-bottom:1.2rem}
.thumbs figure{margin:0;max-width:100%;border:1px solid var(--line);border-radius:6px;
 overflow:hidden;background:#fafbfc}
.thumbs figcaption{padding:.35rem .6rem;font-size:.8rem;color:var(--muted)}
.thumbs figcaption b{color:var(--fg);font-weight:600;overflow-wrap:anywhere}
.strip{width:fit-content;max-width:100%}
.strip img{display:block;max-width:100%;height:auto;background:#fff}
.panels{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));text-align:center;
 font-size:.74rem;line-height:1.25;color:var(--muted);padding:.2rem 0 .3rem}
.legend{display:flex;flex-wrap:wrap;gap:.4rem 1.4rem;font-size:.85rem;margin:.2rem 0 .9rem}
dl.notes{display:grid;grid-template-columns:minmax(0,max-content) minmax(0,1fr);gap:.3rem 1rem;
 font-size:.9rem;margin:0}
dl.notes dt{font-weight:600;overflow-wrap:anywhere}
dl.notes dd{margin:0;color:#333}
details summary{cursor:pointer;font-weight:600;font-size:.92rem;margin:.3rem 0}
footer{margin-top:2.5rem;color:var(--muted);font-size:.8rem}
@media (max-width:600px){
 main{padding:18px 14px 40px}
 dl.notes{grid-template-columns:minmax(0,1fr);gap:0}
 dl.notes dd{margin:0 0 .6rem}
}
"""


def _swatch(colour: str) -> str:
    return f'<span class="sw" style="background:{_e(colour)}"></span>'


def _html_table(header: list[str], rows: list[list[tuple[str, str]]]) -> str:
    """header: escaped cells (or (html, css class)); rows: (escaped html, css class) cells."""
    out = ['<div class="scroll"><table><thead><tr>']
    for h in header:
        h, c = h if isinstance(h, tuple) else (h, "")
        out.append(f'<th class="{c}">{h}</th>' if c else f"<th>{h}</th>")
    out.append("</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="{c}">{x}</td>' if c else f"<td>{x}</td>"
                                    for x, c in r) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _html(split: str, report: dict, variants: dict, categories: list[str],
          per_image: list[dict], thumbs: dict[str, list[_StripFile]],
          figures: dict[str, str], md_name: str) -> str:
    vnames = list(variants)
    colours = {v: _variant_colour(v, i) for i, v in enumerate(vnames)}
    name, weights = _backbone_text(report.get("backbone"))
    title = f"Segmentation report: {split} split, {name} backbone"
    p = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width, initial-scale=1">',
         f"<title>{_e(title)}</title>", f"<style>{_CSS}</style>", "</head><body><main>"]
    p.append(f"<h1>Segmentation report: <code>{_e(split)}</code> split</h1>")
    meta = [("Backbone", f"<b>{_e(name)}</b>")]
    if weights:
        meta.append(("Weights", f"<code>{_e(weights)}</code>"))
    run = _run_text(report.get("run"))
    if run:
        meta.append(("Run", f"<b>{_e(run)}</b>"))
    meta.append(("Images", f"<b>{_e(_fmt_int(report.get('n_images')))}</b>"))
    meta.append(("Variants", f"<b>{len(vnames)}</b>"))
    p.append('<div class="meta">' + "".join(f"<span>{k}: {v}</span>" for k, v in meta) + "</div>")
    p.append(f'<p class="note">Tables also in <a href="{_e(urllib.parse.quote(md_name))}">'
             f"{_e(md_name)}</a>. Best value per column in bold.</p>")

    # overall
    p.append("<h2>Overall</h2>")
    cols = [[_value(variants[v].get("overall"), k) for v in vnames] for k, _ in OVERALL_COLUMNS]
    flags = [_best_flags(c) for c in cols]
    rows = []
    for i, v in enumerate(vnames):
        row = [(_swatch(colours[v]) + _e(v), "")]
        row += [(_fmt(cols[j][i]), "best" if flags[j][i] else "") for j in range(len(cols))]
        row.append((_e(_fmt_int((variants[v].get("overall") or {}).get("n_images"))), ""))
        rows.append(row)
    p.append(_html_table(["variant"] + [_e(t) for _, t in OVERALL_COLUMNS] + ["images"], rows))
    if "variants" in figures or "category" in figures:
        p.append('<div class="charts">')
        for key, alt in (("variants", "grouped bar chart of mIoU, J and F per variant"),
                         ("category", "mIoU per category and variant")):
            if key in figures:
                p.append(f'<img src="{_e(figures[key])}" alt="{_e(alt)}">')
        p.append("</div>")

    # per category
    if categories:
        p.append("<h2>Per category</h2>")
        p.append('<p class="note">Best variant per category in bold.</p>')
        p.append('<div class="tables">')
        for key, title_ in CATEGORY_METRICS:
            rows = []
            for c in categories:
                vals = [_value((variants[v].get("per_category") or {}).get(c), key) for v in vnames]
                fl = _best_flags(vals)
                rows.append([(f'<span title="{_e(c)}">{_e(c)}</span>', "cat"),
                             (_e(_fmt_int(_category_count(variants, c))), "")]
                            + [(_fmt(x), "best" if b else "") for x, b in zip(vals, fl)])
            header = ["category", "images"] + [_swatch(colours[v]) + _e(v) for v in vnames]
            p.append(f"<section><h3>{_e(title_)}</h3>{_html_table(header, rows)}</section>")
        p.append("</div>")

    # per image
    if "scatter" in figures or per_image:
        p.append("<h2>Per image</h2>")
        if "scatter" in figures:
            p.append(f'<div class="wide"><img src="{_e(figures["scatter"])}" '
                     f'alt="per-image J scatter plot"></div>')
        comp = _comparison(per_image, vnames)
        if comp:
            p.append(f'<p class="note">{_e(comp)}</p>')
        if per_image:
            p.append(_per_image_details(per_image, vnames))

    # training curves
    if "curves" in figures:
        p.append("<h2>Training curves</h2>")
        p.append(f'<div class="wide"><img src="{_e(figures["curves"])}" '
                 f'alt="training loss curves"></div>')

    # thumbnails
    if any(thumbs.values()):
        p.append("<h2>Images</h2>")
        p.append('<p class="note">Each image as four panels: the image; the ground truth and '
                 "the prediction (object outlined in white, background dimmed); the errors "
                 "of the prediction:</p>")
        p.append('<div class="legend">' + "".join(
            f"<span>{_swatch('rgb' + str(tuple(c)))}{_e(label)}</span>" for label, c in LEGEND)
            + "</div>")
        for key, title_ in (("best", "Best images by J (pac)"),
                            ("worst", "Worst images by J (pac)")):
            items = thumbs.get(key) or []
            if not items:
                continue
            p.append(f"<h3>{_e(title_)}</h3>")
            p.append('<div class="thumbs">')
            for s in items:
                t, (w, h) = s.thumb, s.css_size
                cap = f"{t.category} / {t.stem}"
                alt = f"{cap}: " + ", ".join(PANELS)
                labels = "".join(f"<span>{_e(x)}</span>" for x in PANELS)
                p.append(f'<figure><figcaption><b>{_e(cap)}</b> &middot; J {_e(_fmt(t.j))} '
                         f"&middot; F {_e(_fmt(t.f))}</figcaption>"
                         f'<div class="strip"><img src="{_e(s.url)}" width="{w}" height="{h}" '
                         f'alt="{_e(alt)}"><div class="panels" '
                         f'style="column-gap:{100 * s.gap_fraction:.3f}%">{labels}</div></div>'
                         f"</figure>")
            p.append("</div>")

    # notes
    p.append("<h2>What the numbers mean</h2>")
    p.append('<dl class="notes">')
    for v in vnames:
        if v in VARIANT_NOTES:
            p.append(f"<dt>{_swatch(colours[v])}{_e(v)}</dt><dd>{_e(VARIANT_NOTES[v])}</dd>")
    for term, text in METRIC_NOTES:
        p.append(f"<dt>{_e(term)}</dt><dd>{_e(text)}</dd>")
    p.append("</dl>")
    p.append("<footer>Generated by vit-objseg; the JSON report next to this page holds the "
             "exact numbers.</footer>")
    p.append("</main></body></html>")
    return "\n".join(p) + "\n"


def _comparison(per_image: list[dict], vnames: list[str]) -> str | None:
    if "pac" not in vnames or "linear_bilinear" not in vnames:
        return None
    better = worse = n = 0
    for r in per_image:
        j = r.get("j") if isinstance(r.get("j"), dict) else {}
        a, b = j.get("pac"), j.get("linear_bilinear")
        if _finite(a) and _finite(b):
            n += 1
            better += a > b + 1e-9
            worse += a < b - 1e-9
    if not n:
        return None
    return (f"pac has a higher J than linear_bilinear on {better} of {n} images, "
            f"a lower one on {worse}.")


_MAX_ROWS = 5000


def _per_image_details(per_image: list[dict], vnames: list[str]) -> str:
    key_v = "pac" if "pac" in vnames else (vnames[-1] if vnames else None)

    def sort_key(r):
        j = r.get("j") if isinstance(r.get("j"), dict) else {}
        x = j.get(key_v)
        return (0 if _finite(x) else 1, x if _finite(x) else 0.0, str(r.get("category")),
                str(r.get("stem")))

    ranked = sorted(per_image, key=sort_key)
    shown = ranked[:_MAX_ROWS]
    header = (["category", "image"] + [f"J {_e(v)}" for v in vnames]
              + [(f"F {_e(v)}", "sep" if i == 0 else "") for i, v in enumerate(vnames)])
    rows = []
    for r in shown:
        j = r.get("j") if isinstance(r.get("j"), dict) else {}
        f = r.get("f") if isinstance(r.get("f"), dict) else {}
        rows.append([(_e(r.get("category", "")), "cat"), (_e(r.get("stem", "")), "")]
                    + [(_fmt(j.get(v)), "") for v in vnames]
                    + [(_fmt(f.get(v)), "sep" if i == 0 else "") for i, v in enumerate(vnames)])
    more = (f" (the {len(shown)} lowest shown)" if len(ranked) > len(shown) else "")
    return (f"<details><summary>All {len(ranked)} images, sorted by J of {_e(key_v)}{_e(more)}"
            f"</summary>{_html_table(header, rows)}</details>")


# ----------------------------------------------------------------------------- entry point

@dataclass
class _StripFile:
    """A thumbnail strip written to the files folder, as the HTML page shows it."""
    thumb: Thumb
    url: str  # relative to the report
    css_size: tuple[int, int]  # (w, h) shown, in CSS px: never more than the stored size
    gap_fraction: float  # one gap between two panels / the strip's width


def _write_thumbs(thumbs: Iterable[Thumb], prefix: str, tmp_dir: Path,
                  files_dir: Path) -> list[_StripFile]:
    out = []
    for i, t in enumerate(thumbs):
        arr, (pw, ph) = thumbnail_strip(t.image, t.gt, t.pred)
        name = f"{prefix}_{i + 1:02d}.jpg"
        # shown at THUMB_DENSITY stored px per CSS px when the panel is full size; a smaller
        # source image (never upscaled) is shown at its natural size
        scale = min(1.0, PANEL_MAX_SIDE / THUMB_DENSITY / max(pw, ph, 1))
        # JPEG: ~30x faster to encode than PNG on photos and a quarter of the size; stored at
        # 2 px per CSS px, 4:2:0 chroma is still 1 CSS px sharp and saves a fifth of the bytes
        Image.fromarray(arr).save(tmp_dir / name, format="JPEG", quality=JPEG_QUALITY,
                                  subsampling=2 if scale <= 1.0 / THUMB_DENSITY else 0)
        css = (max(1, round(arr.shape[1] * scale)), max(1, round(arr.shape[0] * scale)))
        out.append(_StripFile(t, _rel(files_dir, name), css, STRIP_GAP / arr.shape[1]))
    return out


def write_reports(out_dir: Path, split: str, report: dict, per_image: list[dict],
                  thumbs_best: list[Thumb], thumbs_worst: list[Thumb],
                  history: list[dict] | None = None) -> dict[str, Path]:
    """Writes out_dir/report_<split>.md, out_dir/report_<split>.html and the figures and
    thumbnails under out_dir/report_<split>_files/ (relative links only, so the three can be
    moved or zipped together and opened offline). Does NOT write the JSON (the caller does).

    per_image: one dict per image: ``{"category", "stem", "j": {variant: J}, "f": {variant: F}}``.
    The files folder is built aside and swapped in whole, so a stale thumbnail of an earlier
    run never lingers and a killed run leaves the previous folder intact; the two text files
    are replaced atomically. Returns ``{"md": path, "html": path, "files": dir}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = str(split)
    variants = report.get("variants") or {}
    categories = _categories(variants)
    per_image = [r for r in (per_image or []) if isinstance(r, dict)]
    md_path = out_dir / f"report_{split}.md"
    html_path = out_dir / f"report_{split}.html"
    files_dir = out_dir / f"report_{split}_files"
    tmp_dir = out_dir / f".report_{split}_files.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    try:
        figures: dict[str, str] = {}
        if variants:
            _plot_variant_bars(variants, tmp_dir / "variants.png")
            figures["variants"] = _rel(files_dir, "variants.png")
        if variants and categories:
            _plot_category_bars(variants, categories, tmp_dir / "per_category_miou.png")
            figures["category"] = _rel(files_dir, "per_category_miou.png")
        if "pac" in variants and "linear_bilinear" in variants and per_image:
            if _plot_scatter(per_image, "linear_bilinear", "pac", tmp_dir / "per_image_j.png"):
                figures["scatter"] = _rel(files_dir, "per_image_j.png")
        if history and plot_training_curves(history, tmp_dir / "training_curves.png"):
            figures["curves"] = _rel(files_dir, "training_curves.png")
        thumbs = {"best": _write_thumbs(thumbs_best or [], "best", tmp_dir, files_dir),
                  "worst": _write_thumbs(thumbs_worst or [], "worst", tmp_dir, files_dir)}

        md_figures = {title: figures[k] for k, title in
                      (("variants", "Variants, overall"), ("category", "mIoU per category"),
                       ("scatter", "Per-image J"), ("curves", "Training curves")) if k in figures}
        md_text = _markdown(split, report, variants, categories, thumbs_best or [],
                            thumbs_worst or [], md_figures, html_path.name)
        html_text = _html(split, report, variants, categories, per_image, thumbs, figures,
                          md_path.name)

        old_dir = out_dir / f".report_{split}_files.old-{os.getpid()}"
        if files_dir.exists():
            if old_dir.exists():
                shutil.rmtree(old_dir)
            files_dir.rename(old_dir)
        tmp_dir.rename(files_dir)
        if old_dir.exists():
            shutil.rmtree(old_dir, ignore_errors=True)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    _atomic_write_text(md_path, md_text)
    _atomic_write_text(html_path, html_text)
    return {"md": md_path, "html": html_path, "files": files_dir}
