"""The report's pictures of masks: the error overlay and the mask panels (``mask_panel``,
also used by ``segment``), thumbnail strips of one image's panels side by side, and the
labelled click-to-enlarge grid. Pure numpy / Pillow on uint8 RGB arrays and bool masks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


def _prepare_many(
    image: np.ndarray, masks: list[np.ndarray], max_side: int
) -> tuple[np.ndarray, list[np.ndarray]]:
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
        img = np.asarray(
            Image.fromarray(img).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        )
        masks = [_resize_mask(m, size) for m in masks]
    return img, masks


def _prepare(
    image: np.ndarray, gt: np.ndarray, pred: np.ndarray, max_side: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img, (gt, pred) = _prepare_many(image, [gt, pred], max_side)
    return img, gt, pred


def _errors_panel(
    img: np.ndarray, gt: np.ndarray, pred: np.ndarray, contour_width: int = 1
) -> np.ndarray:
    # a per-pixel blend weight and colour (no boolean fancy indexing: ~5x faster)
    alpha = np.zeros(gt.shape, np.float32)
    colour = np.zeros(gt.shape + (3,), np.float32)
    for sel, c, a in (
        (gt & pred, TP_COLOUR, TP_ALPHA),
        (~gt & pred, FP_COLOUR, ERR_ALPHA),
        (gt & ~pred, FN_COLOUR, ERR_ALPHA),
    ):
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
    obj = v * np.float32(1.0 - MASK_ALPHA) + (
        np.asarray(MASK_COLOUR, np.float32) * np.float32(MASK_ALPHA)
    )
    bg = v * np.float32(MASK_DIM) + np.zeros(3, np.float32)
    return (
        np.clip(obj, 0, 255).round().astype(np.uint8),
        np.clip(bg, 0, 255).round().astype(np.uint8),
    )


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


def overlay(
    image: np.ndarray, gt: np.ndarray, pred: np.ndarray, max_side: int = 320, contour_width: int = 1
) -> np.ndarray:
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


def outline_width(shape: tuple[int, ...]) -> int:
    """The outline width of a panel or overlay of `shape` (H, W[, C]): 1 px per 240 px of its
    longer side (about 1 CSS px as the report's page shows a panel)."""
    return max(1, round(max(shape[:2]) / 240))


def strip_panels(
    image: np.ndarray, gt: np.ndarray, pred: np.ndarray, max_side: int
) -> list[np.ndarray]:
    img, gt, pred = _prepare(image, gt, pred, max_side)
    cw = outline_width(img.shape)
    return [
        img,
        mask_panel(img, gt, cw),
        mask_panel(img, pred, cw),
        _errors_panel(img, gt, pred, cw),
    ]


def variant_panels(
    image: np.ndarray, gt: np.ndarray, masks: list[np.ndarray], max_side: int
) -> list[np.ndarray]:
    img, (gt, *masks) = _prepare_many(image, [gt, *masks], max_side)
    cw = outline_width(img.shape)
    return [img, mask_panel(img, gt, cw)] + [_errors_panel(img, gt, m, cw) for m in masks]


def hstack(panels: list[np.ndarray], gap: int) -> np.ndarray:
    h, w = panels[0].shape[:2]
    out = np.full((h, len(panels) * w + (len(panels) - 1) * gap, 3), 255, np.uint8)
    for i, panel in enumerate(panels):
        out[:, i * (w + gap) : i * (w + gap) + w] = panel
    return out


def thumbnail_strip(
    image: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    max_side: int = PANEL_MAX_SIDE,
    gap: int = STRIP_GAP,
) -> tuple[np.ndarray, tuple[int, int]]:
    """One report thumbnail: ``len(PANELS)`` panels side by side, all the same size, separated
    by ``gap`` white columns: the image, the ground truth, the prediction (both drawn by
    ``mask_panel``: object bright and outlined in white, background dimmed) and the errors
    (``overlay``'s colours). Each panel is downscaled (never upscaled) to a longest side of
    ``max_side``; outlines are 1 px per 240 px of panel side, so about 1 CSS px at the page's
    display size. Returns the strip (uint8 RGB) and the size (w, h) of one panel.
    """
    panels = strip_panels(image, gt, pred, max_side)
    h, w = panels[0].shape[:2]
    return hstack(panels, gap), (w, h)


def variant_strip(
    image: np.ndarray,
    gt: np.ndarray,
    masks: dict[str, np.ndarray],
    max_side: int = PANEL_MAX_SIDE,
    gap: int = STRIP_GAP,
) -> tuple[np.ndarray, tuple[int, int]]:
    """The variants of one image side by side: the image, the ground truth (as in
    ``thumbnail_strip``), then one errors panel (``overlay``'s colours) per entry of ``masks``,
    in its order. Returns the strip (uint8 RGB) and the size (w, h) of one panel."""
    panels = variant_panels(image, gt, list(masks.values()), max_side)
    h, w = panels[0].shape[:2]
    return hstack(panels, gap), (w, h)


# ----------------------------------------------------------------------------- enlargements


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
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


def labelled_grid(
    panels: list[np.ndarray], labels: list[str], title: str, legend: bool = True
) -> np.ndarray:
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
            draw.text(
                (x + w // 2, y + h + band // 2),
                labels[k],
                fill=(60, 66, 74),
                font=font,
                anchor="mm",
            )
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
