"""Human-readable reports of stage 3: a Markdown file and an offline HTML page rendered from
Jinja2 templates, with vector figures and click-to-enlarge overlay thumbnails; and the
training-curve figure of stage 2.

The JSON report (the public contract) is computed and written by the caller; this module only
renders it. Everything written for one split lives next to the JSON:

    <out_dir>/report_<split>.md
    <out_dir>/report_<split>.html
    <out_dir>/report_<split>_files/   figures (SVG for the page, PDF for papers, PNG for the
                                      Markdown), thumbnail strips and their enlargements

so the three can be moved or zipped together and opened offline: links are relative, the CSS
is inline, there is no JavaScript, no web font and no URL of the network.

How it is built: ``_view_model`` turns the report into plain data (formatted numbers, best
flags, file names); the templates in ``pipeline/templates/`` (``report.html.j2`` with
autoescape, ``report.md.j2`` with the ``md`` escaping filter, ``report.css`` inlined) only lay
it out. No HTML is assembled in Python.

matplotlib is imported lazily and only through its object-oriented API (``Figure`` rendered
by the Agg canvas); pyplot is never imported, so no GUI backend or display is ever touched and
the backend of a host application is left alone.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
import re
import shutil
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeGuard

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .config import Config
from .data import display_name

__all__ = ["Thumb", "VariantThumb", "overlay", "thumbnail_strip", "variant_strip",
           "plot_training_curves", "write_reports", "headline_text",
           "TP_COLOUR", "FP_COLOUR", "FN_COLOUR", "CONTOUR_COLOUR", "MASK_COLOUR", "LEGEND",
           "PANELS", "TEMPLATE_DIR"]

TEMPLATE_DIR = Path(__file__).with_name("templates")

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
# the first panels of a variant strip (see variant_strip); one errors panel per variant follows
VARIANT_LEAD_PANELS = ("image", "ground truth")
PANEL_MAX_SIDE = 480  # stored px; shown at up to THUMB_DENSITY x fewer CSS px (sharp on HiDPI)
THUMB_DENSITY = 2
STRIP_GAP = 6  # stored px between two panels
FULL_MAX_SIDE = 1024  # longest side of a panel in the click-to-enlarge image
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
# metrics of the overall dot plot and of the headline (PAC's gain over bilinear upsampling)
CHART_METRICS = CATEGORY_METRICS
HEADLINE_METRICS = (("miou", "mIoU"), ("j_mean", "J"), ("boundary_f", "F"))
# the comparison the headline and the scatter plot make
BASELINE, CANDIDATE = "linear_bilinear", "pac"

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
    ("95% intervals", "bootstrap intervals over images (2000 resamples of the per-image "
                      "values): how much the mean would move with another sample of images "
                      "like these."),
)

VARIANT_NOTES = {
    "linear_nearest": "linear head, patch logits upsampled with nearest-neighbour interpolation",
    "linear_bilinear": "linear head, patch logits upsampled bilinearly",
    "pac": "pixel-adaptive-convolution upsampler guided by the image",
}

# config sections shown in the settings summary (all their keys), and single keys added
SETTINGS_SECTIONS = ("backbone", "train", "upsampler")
SETTINGS_KEYS = ("data.train_split", "extract.fit", "predict.threshold")


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


@dataclass
class VariantThumb:
    """One image with the masks of several variants, shown side by side (the worst images).

    ``masks`` maps a variant name (``"linear_nearest"``, ``"linear_bilinear"``, ``"pac"``) to
    its (H, W) bool mask at the image's size; the panels follow the report's variant order.
    The J and F of each variant are read from the report's ``per_image`` rows.
    """
    category: str
    stem: str
    image: np.ndarray  # (H, W, 3) uint8, original size
    gt: np.ndarray  # (H, W) bool
    masks: dict[str, np.ndarray]  # variant -> (H, W) bool


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


def _prepare_many(image: np.ndarray, masks: list, max_side: int):
    """The image (uint8 RGB) and the masks (bool), downscaled (never upscaled) so that the
    longest side is ``max_side``: the image with Lanczos, the masks by area majority."""
    img = _as_rgb_uint8(image)
    masks = [np.asarray(m).astype(bool) for m in masks]
    h, w = img.shape[:2]
    for m in masks:
        if m.shape != (h, w):
            raise ValueError(f"overlay: image is {h}x{w} but a mask is {m.shape}")
    if max_side < 1:
        raise ValueError("overlay: max_side must be >= 1")
    scale = max_side / max(h, w, 1)
    if scale < 1.0 and h and w:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS,
                                                     reducing_gap=3.0))
        masks = [_resize_mask(m, size) for m in masks]
    return img, masks


def _prepare(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, max_side: int):
    img, (gt, pred) = _prepare_many(image, [gt, pred], max_side)
    return img, gt, pred


def _errors_panel(img: np.ndarray, gt: np.ndarray, pred: np.ndarray,
                  contour_width: int = 1) -> np.ndarray:
    # a per-pixel blend weight and colour (no boolean fancy indexing: ~5x faster)
    alpha = np.zeros(gt.shape, np.float32)
    colour = np.zeros(gt.shape + (3,), np.float32)
    for sel, c, a in ((gt & pred, TP_COLOUR, TP_ALPHA), (~gt & pred, FP_COLOUR, ERR_ALPHA),
                      (gt & ~pred, FN_COLOUR, ERR_ALPHA)):
        alpha[sel] = a
        colour[sel] = c
    alpha = alpha[..., None]
    out = (1.0 - alpha) * img + alpha * colour
    out = np.clip(out, 0, 255).round().astype(np.uint8)
    out[_contour(gt, contour_width)] = CONTOUR_COLOUR
    return out


@functools.lru_cache(maxsize=1)
def _mask_luts() -> tuple[np.ndarray, np.ndarray]:
    """(256, 3) uint8 look-up tables of mask_panel: an object pixel's and a background
    pixel's new value per old value and channel (float32 arithmetic, as computed per pixel)."""
    v = np.arange(256, dtype=np.float32)[:, None]
    obj = v * np.float32(1.0 - MASK_ALPHA) + (np.asarray(MASK_COLOUR, np.float32)
                                              * np.float32(MASK_ALPHA))
    bg = v * np.float32(MASK_DIM) + np.zeros(3, np.float32)
    return (np.clip(obj, 0, 255).round().astype(np.uint8),
            np.clip(bg, 0, 255).round().astype(np.uint8))


def mask_panel(img: np.ndarray, mask: np.ndarray, contour_width: int = 1) -> np.ndarray:
    """The object of ``mask`` at the image's own colours, lightly tinted and outlined
    (``MASK_COLOUR``); the background dimmed to ``MASK_DIM`` of its brightness. Also used
    by ``segment`` for its overlays (any image ``_as_rgb_uint8`` takes)."""
    img = _as_rgb_uint8(img)
    mask = np.asarray(mask, bool)
    obj, bg = _mask_luts()
    if (obj == obj[:, :1]).all() and (bg == bg[:, :1]).all():  # a grey MASK_COLOUR: 2x faster
        o, b = np.take(obj[:, 0], img), np.take(bg[:, 0], img)
    else:
        o, b = obj[img, np.arange(3)], bg[img, np.arange(3)]
    out = np.where(mask[..., None], o, b)
    out[_contour(mask, contour_width)] = MASK_COLOUR
    return out


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


def _line_width(img: np.ndarray) -> int:
    """Outline width: 1 px per 240 px of panel side (about 1 CSS px as the page shows it)."""
    return max(1, round(max(img.shape[:2]) / 240))


def _strip_panels(image, gt, pred, max_side) -> list[np.ndarray]:
    img, gt, pred = _prepare(image, gt, pred, max_side)
    cw = _line_width(img)
    return [img, mask_panel(img, gt, cw), mask_panel(img, pred, cw),
            _errors_panel(img, gt, pred, cw)]


def _variant_panels(image, gt, masks: list[np.ndarray], max_side) -> list[np.ndarray]:
    img, (gt, *masks) = _prepare_many(image, [gt, *masks], max_side)
    cw = _line_width(img)
    return [img, mask_panel(img, gt, cw)] + [_errors_panel(img, gt, m, cw) for m in masks]


def _hstack(panels: list[np.ndarray], gap: int) -> np.ndarray:
    h, w = panels[0].shape[:2]
    out = np.full((h, len(panels) * w + (len(panels) - 1) * gap, 3), 255, np.uint8)
    for i, panel in enumerate(panels):
        out[:, i * (w + gap): i * (w + gap) + w] = panel
    return out


def thumbnail_strip(image: np.ndarray, gt: np.ndarray, pred: np.ndarray,
                    max_side: int = PANEL_MAX_SIDE, gap: int = STRIP_GAP
                    ) -> tuple[np.ndarray, tuple[int, int]]:
    """One report thumbnail: ``len(PANELS)`` panels side by side, all the same size, separated
    by ``gap`` white columns: the image, the ground truth, the prediction (both drawn by
    ``mask_panel``: object bright and outlined in white, background dimmed) and the errors
    (``overlay``'s colours). Each panel is downscaled (never upscaled) to a longest side of
    ``max_side``; outlines are 1 px per 240 px of panel side, so about 1 CSS px at the page's
    display size. Returns the strip (uint8 RGB) and the size (w, h) of one panel.
    """
    panels = _strip_panels(image, gt, pred, max_side)
    h, w = panels[0].shape[:2]
    return _hstack(panels, gap), (w, h)


def variant_strip(image: np.ndarray, gt: np.ndarray, masks: dict[str, np.ndarray],
                  max_side: int = PANEL_MAX_SIDE, gap: int = STRIP_GAP
                  ) -> tuple[np.ndarray, tuple[int, int]]:
    """The variants of one image side by side: the image, the ground truth (as in
    ``thumbnail_strip``), then one errors panel (``overlay``'s colours) per entry of ``masks``,
    in its order. Returns the strip (uint8 RGB) and the size (w, h) of one panel."""
    panels = _variant_panels(image, gt, list(masks.values()), max_side)
    h, w = panels[0].shape[:2]
    return _hstack(panels, gap), (w, h)


# ----------------------------------------------------------------------------- enlargements

@functools.lru_cache(maxsize=8)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _row_counts(n: int) -> list[int]:
    """Panels per row of an enlargement: 4 -> 2 + 2, 5 -> 2 + 3, at most 3 per row."""
    if n <= 3:
        return [n]
    if n == 4:
        return [2, 2]
    rows = [3] * (n // 3)
    if n % 3:
        rows.insert(0, n % 3)
    return rows


def _labelled_grid(panels: list[np.ndarray], labels: list[str], title: str,
                   legend: bool = True) -> np.ndarray:
    """The click-to-enlarge image: the panels in rows (``_row_counts``), each with its label
    underneath, a title line on top and the error colours' legend at the bottom."""
    h, w = panels[0].shape[:2]
    fs = int(np.clip(round(max(h, w) / 40), 13, 26))
    font, bold = _font(fs), _font(round(fs * 1.15))
    pad, gap, band = round(fs * 0.8), round(fs * 0.6), round(fs * 1.9)
    rows = _row_counts(len(panels))
    width = max(rows) * w + (max(rows) - 1) * gap + 2 * pad
    title_h = round(fs * 2.2)
    legend_h = round(fs * 2.0) if legend else 0
    height = pad + title_h + len(rows) * (h + band) + (len(rows) - 1) * gap + legend_h + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill=(31, 35, 40), font=bold)
    y, k = pad + title_h, 0
    for n in rows:
        x = (width - (n * w + (n - 1) * gap)) // 2
        for _ in range(n):
            canvas.paste(Image.fromarray(panels[k]), (x, y))
            draw.text((x + w // 2, y + h + band // 2), labels[k], fill=(60, 66, 74), font=font,
                      anchor="mm")
            x += w + gap
            k += 1
        y += h + band + gap
    if legend:
        y = height - pad - legend_h // 2
        x = pad
        for label, colour in LEGEND:
            draw.rectangle((x, y - fs // 2, x + fs, y + fs // 2), fill=colour)
            x += fs + fs // 2
            draw.text((x, y), label, fill=(60, 66, 74), font=font, anchor="lm")
            x += int(draw.textlength(label, font=font)) + fs
    return np.asarray(canvas)


# ----------------------------------------------------------------------------- figures

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


def _by_variant(row: dict, key: str) -> dict:
    """A per-image row's {variant: score} under `key` ({} when absent or damaged)."""
    scores = row.get(key)
    return scores if isinstance(scores, dict) else {}


def _finite(x: object) -> TypeGuard[float]:
    """A real, finite number (numpy scalars included, bools not): usable as a float."""
    return (isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))
            and math.isfinite(x))


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


def _variant_colour(variant: str, index: int) -> str:
    return VARIANT_COLOURS.get(variant, _EXTRA_COLOURS[index % len(_EXTRA_COLOURS)])


def _short(text: str, n: int = 18) -> str:
    """`text` shown (display_name: U+FFFD for a name's undecodable bytes) in at most n chars."""
    text = display_name(text)
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _value(metrics: dict | None, key: str) -> float:
    v = (metrics or {}).get(key)
    return float(v) if _finite(v) else float("nan")


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
FIGURES = ("overall", "per_category", "per_image_j", "training_curves")

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


def _per_image_values(per_image: list[dict], key: str, variant: str) -> list[float]:
    out = []
    for r in per_image:
        d = _by_variant(r, key)
        if _finite(d.get(variant)):
            out.append(float(d[variant]))
    return out


def _plot_overall(variants: dict, per_image: list[dict]):
    """A dot plot, one panel per metric stacked (each with its own zoomed x axis: readable on
    a phone too), one row per variant, the value printed at each dot, 95% bootstrap intervals
    of the per-image means (J, F), and a dotted reference line at the baseline (bilinear)."""
    from matplotlib.ticker import MaxNLocator
    names = [v for v in variants if isinstance(variants[v].get("overall"), dict)]
    n = len(names)
    fig = _new_figure((5.6, len(CHART_METRICS) * (0.36 * n + 0.62) + 0.35), layout="constrained")
    axes = fig.subplots(len(CHART_METRICS), 1, squeeze=False)[:, 0]
    ys = {v: n - 1 - i for i, v in enumerate(names)}  # first variant on top
    per_image_key = {"j_mean": "j", "boundary_f": "f"}
    for ax, (key, title) in zip(axes, CHART_METRICS, strict=True):
        vals = {v: _value(variants[v]["overall"], key) for v in names}
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


def _plot_categories(variants: dict, categories: list[str]):
    """mIoU per category as a dot plot: one row per category (sorted by the candidate's mIoU,
    best on top), one coloured dot per variant joined by a grey line, zoomed x axis."""
    names = list(variants)
    key_v = CANDIDATE if CANDIDATE in names else names[-1]

    def val(v, c):
        return _value((variants[v].get("per_category") or {}).get(c), "miou")

    cats = sorted(categories, key=lambda c: (-val(key_v, c) if _finite(val(key_v, c))
                                             else math.inf, str(c)))
    title = "mIoU per category"
    if len(cats) > MAX_CATEGORY_ROWS:
        cats = cats[-MAX_CATEGORY_ROWS:]
        title += f" (the {MAX_CATEGORY_ROWS} lowest by {key_v})"
    n = len(cats)
    fig = _new_figure((5.6, 0.3 * n + 1.25), layout="constrained")
    ax = fig.subplots()
    allv = []
    for row, c in enumerate(cats):
        y = n - 1 - row
        fin = [x for x in (val(v, c) for v in names) if _finite(x)]
        allv += fin
        if len(fin) > 1:
            ax.plot([min(fin), max(fin)], [y, y], color="#c9d1d9", lw=2, zorder=1)
    for i, v in enumerate(names):
        pts = [(val(v, c), n - 1 - row) for row, c in enumerate(cats) if _finite(val(v, c))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=6.5, label=v,
                color=_variant_colour(v, i), markeredgecolor="white", markeredgewidth=0.6,
                zorder=2 + (v == key_v), clip_on=False)
    ax.set_yticks(range(n), [_short(c, 22) for c in reversed(cats)], fontsize=8.5)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(*_zoom(allv, pad=0.1))
    ax.set_xlabel("mIoU (axis zoomed to the values, not from 0)", fontsize=8, color="#59636e")
    ax.tick_params(axis="x", labelsize=8.5)
    ax.tick_params(axis="y", length=0)
    ax.grid(True, axis="x", alpha=0.3)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title, fontsize=10, loc="left", fontweight="bold")
    fig.legend(loc="outside upper right", ncol=len(names), fontsize=8, frameon=False,
               handletextpad=0.2, columnspacing=1.0)
    return fig


def _category_colours(categories: list[str]) -> dict[str, str] | None:
    """A distinct colour per category (tab10 / tab20), None for more than 20 categories."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex
    if len(categories) > 20:
        return None
    cmap = colormaps["tab10" if len(categories) <= 10 else "tab20"]
    return {c: to_hex(cmap(i)) for i, c in enumerate(categories)}


def _plot_scatter(per_image: list[dict], x_variant: str, y_variant: str):
    """Per-image J of the candidate against the baseline's: zoomed (same range on both axes),
    the diagonal, the side where the candidate is better shaded, points coloured by
    category, and how many images lie on each side."""
    pts = []
    for r in per_image:
        j = _by_variant(r, "j")
        a, b = j.get(x_variant), j.get(y_variant)
        if _finite(a) and _finite(b):
            pts.append((str(r.get("category", "")), float(a), float(b)))
    if not pts:
        return None
    cats = list(dict.fromkeys(c for c, _, _ in pts))
    colours = _category_colours(cats)
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
                   color=colours[c] if colours else _variant_colour(y_variant, 2),
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


# ----------------------------------------------------------------------------- formatting

def _fmt(x) -> str:
    return f"{float(x):.3f}" if _finite(x) else "\u2014"


def _signed(x) -> str:
    """A difference with its sign at 3 decimals: +0.025, -0.013, \u00b10.000."""
    if not _finite(x):
        return "\u2014"
    s = f"{float(x):+.3f}"
    return "\u00b10.000" if s in ("+0.000", "-0.000") else s


def _fmt_int(x) -> str:
    if isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)):
        return str(int(x))
    if _finite(x) and float(x).is_integer():
        return str(int(x))
    return "\u2014" if x is None else str(x)


def _plural(n, word: str) -> str:
    return f"{_fmt_int(n)} {word}" + ("" if n == 1 else "s")


def _best_flags(values: list) -> list[bool]:
    """Which values are the best: the largest of the raw (unrounded) numbers, so two values
    shown alike at 3 decimals are both flagged only when they are truly equal; none when fewer
    than two finite numbers compete. Pass the numbers, never their formatted strings."""
    present = [float(v) for v in values if _finite(v)]
    if len(present) < 2:
        return [False] * len(values)
    top = max(present)
    return [_finite(v) and float(v) == top for v in values]


VARIANT_ORDER = ("linear_nearest", "linear_bilinear", "pac")


def _ordered_variants(variants) -> dict:
    """The report's variants in reading order (nearest, bilinear, pac, then any other in its
    own order), whatever the order of the JSON's keys."""
    variants = {k: v for k, v in (variants or {}).items() if isinstance(v, dict)}
    order = [v for v in VARIANT_ORDER if v in variants] + [v for v in variants
                                                            if v not in VARIANT_ORDER]
    return {v: variants[v] for v in order}


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


def _config_value(v) -> str:
    """A config value as TOML writes it (strings unquoted)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_config_value(x) for x in v) + "]"
    if v == "":
        return '""'
    return str(v)


_MD_SPECIAL = re.compile(r"([\\|`*\[\]<>#!])")
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def _md(text) -> str:
    """Text made safe for a Markdown table cell or heading (literal, one line)."""
    s = " ".join(str(text).split())
    s = _MD_SPECIAL.sub(r"\\\1", s)
    return _MD_UNDERSCORE.sub(r"\\_", s)


def _url(path: str) -> str:
    """A relative path as a URL (each segment percent-quoted, '/' kept; a name's undecodable
    bytes, held as surrogates, quoted as those bytes, so the link finds the file)."""
    return urllib.parse.quote(str(path).replace(os.sep, "/"), safe="/#",
                              errors="surrogateescape")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _rel(files_dir: Path, name: str) -> str:
    """A relative URL (from the report file) to a file in files_dir."""
    return urllib.parse.quote(f"{files_dir.name}/{name}", errors="surrogateescape")


# ----------------------------------------------------------------------------- headline

def _gains(report: dict) -> list[tuple[str, float]] | None:
    variants = report.get("variants") or {}
    cand = (variants.get(CANDIDATE) or {}).get("overall")
    base = (variants.get(BASELINE) or {}).get("overall")
    if not isinstance(cand, dict) or not isinstance(base, dict):
        return None
    out = [(label, float(cand[k]) - float(base[k])) for k, label in HEADLINE_METRICS
           if _finite(cand.get(k)) and _finite(base.get(k))]
    return out or None


def _scored(report: dict):
    variants = report.get("variants") or {}
    n = ((variants.get(CANDIDATE) or {}).get("overall") or {}).get("n_images")
    return n if n is not None else report.get("n_images")


def headline_text(report: dict) -> str | None:
    """The report's headline: PAC's gain over bilinear upsampling, from the overall metrics,
    e.g. "PAC upsampler: +0.025 mIoU, +0.030 J, +0.071 F over bilinear upsampling
    (35 images)". None when either variant has no overall metrics (nothing annotated)."""
    gains = _gains(report)
    if gains is None:
        return None
    parts = ", ".join(f"{_signed(d)} {label}" for label, d in gains)
    return (f"PAC upsampler: {parts} over bilinear upsampling "
            f"({_plural(_scored(report), 'image')})")


def _no_annotation_text(report: dict, split: str) -> str:
    n = report.get("n_predicted")
    masks = _plural(n, "mask") if n is not None else "the masks"
    return (f"No image of the {split} split is annotated: {masks} "
            f"{'was' if n == 1 else 'were'} written to predictions/{split}/, "
            "and there is nothing to score.")


def _paired_note(per_image: list[dict]) -> str | None:
    """Per-image comparison of the candidate with the baseline: on how many images it is
    better / worse, and a bootstrap interval of the mean J gain."""
    diffs = []
    for r in per_image:
        j = _by_variant(r, "j")
        a, b = j.get(CANDIDATE), j.get(BASELINE)
        if _finite(a) and _finite(b):
            diffs.append(float(a) - float(b))
    if not diffs:
        return None
    better = sum(d > 1e-9 for d in diffs)
    worse = sum(d < -1e-9 for d in diffs)
    text = (f"Per image, {CANDIDATE} has a higher J than {BASELINE} on {better} of "
            f"{len(diffs)} images and a lower one on {worse}")
    ci = _bootstrap_ci(diffs)
    if ci:
        text += (f"; mean J gain {_signed(float(np.mean(diffs)))} (95% bootstrap interval "
                 f"{_signed(ci[0])} to {_signed(ci[1])})")
    return text + "."


# ----------------------------------------------------------------------------- view model

@dataclass
class _Strip:
    """A thumbnail strip written to the files folder, as the page shows it."""
    category: str
    stem: str
    url: str  # the strip, relative to the report
    full_url: str  # its click-to-enlarge image
    css_size: tuple[int, int]  # (w, h) shown, in CSS px: never more than the stored size
    gap_fraction: float  # one gap between two panels / the strip's width
    labels: list[tuple[str, tuple[str, ...]]]  # per panel: its name and its scores, if any
    scores: list[tuple[str, str, str]]  # (variant, J, F) shown in the caption
    kind: str  # "strip" (4 panels, pac) or "variants"
    caption: str  # the scores after the image's name

    def score_text(self, which: int) -> str:
        """The J (which=1) or F (which=2) of the caption: "0.812", or per variant
        "linear_nearest 0.41, linear_bilinear 0.45, pac 0.52"."""
        if len(self.scores) == 1:
            return self.scores[0][which]
        return ", ".join(f"{s[0]} {s[which]}" for s in self.scores)


def _cell(x, best: bool = False) -> dict:
    return {"text": _fmt(x), "best": bool(best)}


def _overall_table(variants: dict, colours: dict) -> dict:
    vnames = list(variants)
    cols = [[_value(variants[v].get("overall"), k) for v in vnames] for k, _ in OVERALL_COLUMNS]
    flags = [_best_flags(c) for c in cols]
    rows = [{"variant": v, "colour": colours[v],
             "cells": [_cell(cols[j][i], flags[j][i]) for j in range(len(cols))],
             "n": _fmt_int((variants[v].get("overall") or {}).get("n_images"))}
            for i, v in enumerate(vnames)]
    return {"columns": [t for _, t in OVERALL_COLUMNS], "rows": rows}


def _category_tables(variants: dict, categories: list[str]) -> list[dict]:
    vnames = list(variants)
    tables = []
    for key, title in CATEGORY_METRICS:
        rows = []
        for c in categories:
            vals = [_value((variants[v].get("per_category") or {}).get(c), key) for v in vnames]
            rows.append({"category": display_name(c),
                         "n": _fmt_int(_category_count(variants, c)),
                         "cells": [_cell(x, b)
                                   for x, b in zip(vals, _best_flags(vals), strict=True)]})
        tables.append({"title": title, "rows": rows})
    return tables


_MAX_ROWS = 5000


def _per_image_table(per_image: list[dict], vnames: list[str]) -> dict | None:
    if not per_image:
        return None
    key_v = CANDIDATE if CANDIDATE in vnames else (vnames[-1] if vnames else None)

    def sort_key(r):
        j = _by_variant(r, "j")
        x = j.get(key_v)
        return (0 if _finite(x) else 1, x if _finite(x) else 0.0, str(r.get("category")),
                str(r.get("stem")))

    ranked = sorted(per_image, key=sort_key)
    rows = []
    for r in ranked[:_MAX_ROWS]:
        j = _by_variant(r, "j")
        f = _by_variant(r, "f")
        rows.append({"category": display_name(r.get("category", "")),
                     "stem": display_name(r.get("stem", "")),
                     "j": [_fmt(j.get(v)) for v in vnames], "f": [_fmt(f.get(v)) for v in vnames]})
    return {"key": key_v, "n": len(ranked), "rows": rows,
            "truncated": len(ranked) > len(rows)}


def _settings(config) -> list[dict]:
    """The training settings (backbone.*, train.*, upsampler.* and a few single keys) as
    rows {key, value, changed}; ``changed`` when the value differs from the built-in default."""
    if not isinstance(config, dict):
        return []
    defaults = Config().to_dict()
    rows = []

    def add(section, name, value):
        d = (defaults.get(section) or {})
        changed = name in d and d[name] != value and not (
            _finite(d[name]) and _finite(value) and float(d[name]) == float(value))
        rows.append({"key": f"{section}.{name}", "value": _config_value(value),
                     "changed": bool(changed)})

    for section in SETTINGS_SECTIONS:
        for name, value in (config.get(section) or {}).items():
            add(section, name, value)
    for key in SETTINGS_KEYS:
        section, name = key.split(".", 1)
        if name in (config.get(section) or {}):
            add(section, name, config[section][name])
    return rows


def _config_toml(config) -> str | None:
    if not isinstance(config, dict) or not config:
        return None
    lines = []
    for section, values in config.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            for k, v in values.items():
                lit = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                       if isinstance(v, str) else _config_value(v))
                lines.append(f"{k} = {lit}")
            lines.append("")
        else:
            lines.append(f"{section} = {_config_value(values)}")
    return "\n".join(lines).rstrip() + "\n"


def _provenance(report: dict) -> list[tuple[str, str]]:
    out = []
    for group in ("fingerprints", "versions"):
        d = report.get(group)
        if isinstance(d, dict):
            label = "fingerprint" if group == "fingerprints" else "version"
            out += [(f"{k} {label}", "\u2014" if v is None else str(v)) for k, v in d.items()]
    return out


def _other_runs(other_runs) -> list[dict]:
    out = []
    for item in other_runs or []:
        name, href = item
        out.append({"name": str(name), "href": _url(href)})
    return out


def _figure(key: str, title: str, alt: str, caption: str, files_dir: Path,
            size_in: tuple[float, float]) -> dict:
    return {"key": key, "title": title, "alt": alt, "caption": caption,
            "svg": _rel(files_dir, f"{key}.svg"), "pdf": _rel(files_dir, f"{key}.pdf"),
            "png": _rel(files_dir, f"{key}.png"),
            # CSS px of the SVG (its own size is in pt: 72 per inch, CSS has 96)
            "width": round(size_in[0] * 96), "height": round(size_in[1] * 96)}


def _view_model(split: str, report: dict, variants: dict, per_image: list[dict],
                strips: dict[str, list[_Strip]], figures: dict[str, dict | None], other_runs,
                md_name: str, html_name: str) -> dict:
    vnames = list(variants)
    colours = {v: _variant_colour(v, i) for i, v in enumerate(vnames)}
    scored = any(isinstance(v.get("overall"), dict) for v in variants.values())
    categories = _categories(variants) if scored else []
    name, weights = _backbone_text(report.get("backbone"))
    n_images, n_predicted = report.get("n_images"), report.get("n_predicted")
    images_text = _plural(n_images, "image") + " scored"
    if n_predicted is not None and n_predicted != n_images:
        images_text += f" of {_fmt_int(n_predicted)} predicted"
    settings = _settings(report.get("config"))
    return {
        "title": f"Segmentation report: {split} split, {name} backbone",
        "split": split, "backbone": name, "weights": weights,
        "run": _run_text(report.get("run")), "images_text": images_text,
        "md_name": _url(md_name), "html_name": _url(html_name),
        "md_label": md_name, "html_label": html_name,
        "scored": scored,
        "headline": headline_text(report) if scored else None,
        "gains": [{"value": _signed(d), "label": label,
                   "css": "up" if _signed(d).startswith("+") else
                   "down" if _signed(d).startswith("-") else ""}
                  for label, d in (_gains(report) or [])] if scored else [],
        "n_scored": _plural(_scored(report), "image"),
        "no_annotation": None if scored else _no_annotation_text(report, split),
        "paired_note": _paired_note(per_image) if scored else None,
        "variants": [{"name": v, "colour": colours[v], "note": VARIANT_NOTES.get(v)}
                     for v in vnames],
        "overall": _overall_table(variants, colours) if scored else None,
        "category_tables": _category_tables(variants, categories) if categories else [],
        "per_image": _per_image_table(per_image, vnames) if scored else None,
        "figures": figures,
        "strips": strips,
        "legend": [{"label": label, "colour": f"rgb({r},{g},{b})"}
                   for label, (r, g, b) in LEGEND],
        "settings": settings,
        "settings_changed": any(r["changed"] for r in settings),
        "config_toml": _config_toml(report.get("config")),
        "provenance": _provenance(report),
        "other_runs": _other_runs(other_runs),
        "metric_notes": METRIC_NOTES,
    }


@functools.lru_cache(maxsize=1)
def _env():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATE_DIR)),
        # HTML (and anything not named .md.j2) is autoescaped; Markdown escapes with |md
        autoescape=select_autoescape(enabled_extensions=("html.j2", "html"),
                                     disabled_extensions=("md.j2",),
                                     default_for_string=True, default=True),
        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True)
    env.filters["md"] = _md
    env.filters["wbr"] = _wbr
    return env


def _wbr(text):
    """Escaped text with a line-break opportunity after each underscore (narrow headers)."""
    from markupsafe import Markup, escape
    return Markup("_<wbr>").join(escape(part) for part in str(text).split("_"))


def _render(template: str, vm: dict) -> str:
    """The rendered page as valid UTF-8 text: the names were shown with display_name by the
    view model, and anything else from the report (a config path such as data.root) that
    holds a non-UTF-8 name's surrogates shows U+FFFD there too."""
    return display_name(_env().get_template(template).render(**vm))


# ----------------------------------------------------------------------------- entry point

def _thumb_scores(per_image_index: dict, category: str, stem: str, vnames: list[str]
                  ) -> dict[str, tuple]:
    r = per_image_index.get((str(category), str(stem))) or {}
    j = _by_variant(r, "j")
    f = _by_variant(r, "f")
    return {v: (j.get(v), f.get(v)) for v in vnames}


def _save_strip(arr: np.ndarray, panel: tuple[int, int], big: np.ndarray, name: str,
                tmp_dir: Path) -> tuple[tuple[int, int], float]:
    pw, ph = panel
    # shown at THUMB_DENSITY stored px per CSS px when the panel is full size; a smaller
    # source image (never upscaled) is shown at its natural size
    scale = min(1.0, PANEL_MAX_SIDE / THUMB_DENSITY / max(pw, ph, 1))
    # JPEG: ~30x faster to encode than PNG on photos and a quarter of the size; stored at
    # 2 px per CSS px, 4:2:0 chroma is still 1 CSS px sharp and saves a fifth of the bytes
    Image.fromarray(arr).save(tmp_dir / f"{name}.jpg", format="JPEG", quality=JPEG_QUALITY,
                              subsampling=2 if scale <= 1.0 / THUMB_DENSITY else 0)
    Image.fromarray(big).save(tmp_dir / f"{name}_full.jpg", format="JPEG",
                              quality=JPEG_QUALITY, subsampling=0)
    css = (max(1, round(arr.shape[1] * scale)), max(1, round(arr.shape[0] * scale)))
    return css, STRIP_GAP / arr.shape[1]


@dataclass
class _StripPanels:
    """What one strip shows: its panels, stored and click-to-enlarge, and their labels."""
    shown: list[tuple[str, str, str]]  # (variant, J, F) shown in the caption
    labels: list[tuple[str, tuple[str, ...]]]  # per panel: its name and its scores, if any
    small: list[np.ndarray]
    big: list[np.ndarray]
    kind: str  # "strip" (4 panels, pac) or "variants"
    caption: str


def _variant_strip(vt: VariantThumb, scores: dict[str, tuple], vnames: list[str], j: object,
                   f: object) -> _StripPanels:
    """Every variant's mask side by side; `j`, `f`: the pac variant's scores, captioned."""
    order = [v for v in vnames if v in vt.masks] + [v for v in vt.masks if v not in vnames]
    masks = [vt.masks[v] for v in order]
    shown = [(v, _fmt(scores.get(v, (None, None))[0]),
              _fmt(scores.get(v, (None, None))[1])) for v in order]
    labels: list[tuple[str, tuple[str, ...]]] = [(x, ()) for x in VARIANT_LEAD_PANELS]
    labels += [(v, (f"J {vj}", f"F {vf}")) for v, vj, vf in shown]
    return _StripPanels(shown, labels, _variant_panels(vt.image, vt.gt, masks, PANEL_MAX_SIDE),
                        _variant_panels(vt.image, vt.gt, masks, FULL_MAX_SIDE), "variants",
                        f"{CANDIDATE}: J {_fmt(j)}, F {_fmt(f)}")


def _pac_strip(t: Thumb) -> _StripPanels:
    """The 4-panel strip of the pac prediction."""
    return _StripPanels([(CANDIDATE, _fmt(t.j), _fmt(t.f))], [(x, ()) for x in PANELS],
                        _strip_panels(t.image, t.gt, t.pred, PANEL_MAX_SIDE),
                        _strip_panels(t.image, t.gt, t.pred, FULL_MAX_SIDE), "strip",
                        f"J {_fmt(t.j)}, F {_fmt(t.f)}")


def _write_strips(thumbs: Iterable[Thumb | VariantThumb],
                  variant_thumbs: dict[tuple[str, str], VariantThumb], prefix: str,
                  tmp_dir: Path, files_dir: Path, vnames: list[str],
                  per_image_index: dict) -> list[_Strip]:
    """The strips of one section: a variant strip where a VariantThumb of the same image was
    given (its masks side by side), else the 4-panel strip of the pac prediction."""
    out = []
    for i, t in enumerate(thumbs):
        name = f"{prefix}_{i + 1:02d}"
        title = f"{display_name(t.category)} / {display_name(t.stem)}"
        scores = _thumb_scores(per_image_index, t.category, t.stem, vnames)
        if isinstance(t, VariantThumb):
            p = _variant_strip(t, scores, vnames, *(scores.get(CANDIDATE) or (None, None)))
        else:
            vt = variant_thumbs.get((str(t.category), str(t.stem)))
            p = _pac_strip(t) if vt is None else _variant_strip(vt, scores, vnames, t.j, t.f)
        arr = _hstack(p.small, STRIP_GAP)
        grid = _labelled_grid(p.big, [" \u00b7 ".join((a, *b)) for a, b in p.labels],
                              f"{title} \u00b7 {p.caption}")
        css, gap = _save_strip(arr, p.small[0].shape[1::-1], grid, name, tmp_dir)
        out.append(_Strip(display_name(t.category), display_name(t.stem),
                          _rel(files_dir, f"{name}.jpg"),
                          _rel(files_dir, f"{name}_full.jpg"), css, gap, p.labels, p.shown,
                          p.kind, p.caption))
    return out


def write_reports(out_dir: Path, split: str, report: dict, per_image: list[dict],
                  thumbs_best: list[Thumb], thumbs_worst: list[Thumb],
                  history: list[dict] | None = None, *,
                  variant_thumbs: list[VariantThumb] | None = None,
                  other_runs: list[tuple[str, str]] | None = None) -> dict[str, Path]:
    """Writes out_dir/report_<split>.md, out_dir/report_<split>.html and the figures and
    thumbnails under out_dir/report_<split>_files/ (relative links only, so the three can be
    moved or zipped together and opened offline). Does NOT write the JSON (the caller does).

    per_image: one dict per image: ``{"category", "stem", "j": {variant: J}, "f": {variant: F}}``
    (None: the report's own ``per_image``).
    history: stage 2's metrics.jsonl rows (the training curves), optional.
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
    variants = _ordered_variants(report.get("variants"))
    vnames = list(variants)
    scored = any(isinstance(v.get("overall"), dict) for v in variants.values())
    categories = _categories(variants) if scored else []
    if per_image is None:
        per_image = report.get("per_image")
    per_image = [r for r in (per_image or []) if isinstance(r, dict)]
    index = {(str(r.get("category")), str(r.get("stem"))): r for r in per_image}
    md_path = out_dir / f"report_{split}.md"
    html_path = out_dir / f"report_{split}.html"
    files_dir = out_dir / f"report_{split}_files"
    tmp_dir = out_dir / f".report_{split}_files.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    try:
        figures: dict[str, dict | None] = dict.fromkeys(FIGURES)

        def add_figure(fig, key, title, alt, caption):
            if fig is None:
                return
            size = tuple(fig.get_size_inches())
            _save_figure(fig, [tmp_dir / f"{key}.{ext}" for ext in ("svg", "pdf", "png")])
            figures[key] = _figure(key, title, alt, caption, files_dir, size)

        if scored:
            add_figure(_plot_overall(variants, per_image), "overall", "Variants, overall",
                       "dot plot of mIoU, J and F per variant",
                       "Each panel has its own zoomed axis.")
            if categories:
                add_figure(_plot_categories(variants, categories), "per_category",
                           "mIoU per category", "dot plot of mIoU per category and variant",
                           f"Categories sorted by the mIoU of {CANDIDATE}.")
            if CANDIDATE in variants and BASELINE in variants and per_image:
                add_figure(_plot_scatter(per_image, BASELINE, CANDIDATE), "per_image_j",
                           "Per-image J", f"scatter plot of per-image J, {CANDIDATE} against "
                           f"{BASELINE}",
                           f"One point per image; above the dashed diagonal, {CANDIDATE} "
                           f"is better.")
        if history:
            add_figure(_training_figure(history), "training_curves", "Training curves",
                       "training loss curves", "Loss per epoch of each training phase.")

        vthumbs = {(str(t.category), str(t.stem)): t for t in (variant_thumbs or [])}
        worst: list[Thumb | VariantThumb] = list(thumbs_worst or [])
        seen = {(str(t.category), str(t.stem)) for t in worst}
        worst += [t for k, t in vthumbs.items() if k not in seen]
        strips = {"best": _write_strips(thumbs_best or [], {}, "best", tmp_dir, files_dir,
                                        vnames, index),
                  "worst": _write_strips(worst, vthumbs, "worst", tmp_dir, files_dir, vnames,
                                         index)}

        vm = _view_model(split, report, variants, per_image, strips, figures, other_runs,
                         md_path.name, html_path.name)
        html_text = _render("report.html.j2", vm)
        md_text = _render("report.md.j2", vm)

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
