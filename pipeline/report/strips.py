"""The thumbnail strips of a report's best and worst images, written to its files folder:
a 4-panel strip of the pac prediction, or every variant's errors side by side, each with its
labelled click-to-enlarge grid."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.variants import CANDIDATE
from ..data import display_name
from .doc import ImageScores
from .format import file_url, fmt
from .panels import (
    FULL_MAX_SIDE,
    JPEG_QUALITY,
    PANEL_MAX_SIDE,
    PANELS,
    STRIP_GAP,
    THUMB_DENSITY,
    VARIANT_LEAD_PANELS,
    Thumb,
    VariantThumb,
    hstack,
    labelled_grid,
    strip_panels,
    variant_panels,
)

__all__ = ["Strip", "write_strips"]


@dataclass
class Strip:
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


def _thumb_scores(
    row: ImageScores | None, vnames: list[str]
) -> dict[str, tuple[float | None, float | None]]:
    if row is None:
        return {v: (None, None) for v in vnames}
    return {v: (row.j.get(v), row.f.get(v)) for v in vnames}


def _save_strip(
    arr: np.ndarray, panel: tuple[int, int], big: np.ndarray, name: str, tmp_dir: Path
) -> tuple[tuple[int, int], float]:
    pw, ph = panel
    # shown at THUMB_DENSITY stored px per CSS px when the panel is full size; a smaller
    # source image (never upscaled) is shown at its natural size
    scale = min(1.0, PANEL_MAX_SIDE / THUMB_DENSITY / max(pw, ph, 1))
    # JPEG: ~30x faster to encode than PNG on photos and a quarter of the size; stored at
    # 2 px per CSS px, 4:2:0 chroma is still 1 CSS px sharp and saves a fifth of the bytes
    Image.fromarray(arr).save(
        tmp_dir / f"{name}.jpg",
        format="JPEG",
        quality=JPEG_QUALITY,
        subsampling=2 if scale <= 1.0 / THUMB_DENSITY else 0,
    )
    Image.fromarray(big).save(
        tmp_dir / f"{name}_full.jpg", format="JPEG", quality=JPEG_QUALITY, subsampling=0
    )
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


def _variant_strip(
    vt: VariantThumb, scores: dict[str, tuple], vnames: list[str], j: object, f: object
) -> _StripPanels:
    """Every variant's mask side by side; `j`, `f`: the pac variant's scores, captioned."""
    order = [v for v in vnames if v in vt.masks] + [v for v in vt.masks if v not in vnames]
    masks = [vt.masks[v] for v in order]
    shown = [
        (v, fmt(scores.get(v, (None, None))[0]), fmt(scores.get(v, (None, None))[1])) for v in order
    ]
    labels: list[tuple[str, tuple[str, ...]]] = [(x, ()) for x in VARIANT_LEAD_PANELS]
    labels += [(v, (f"J {vj}", f"F {vf}")) for v, vj, vf in shown]
    return _StripPanels(
        shown,
        labels,
        variant_panels(vt.image, vt.gt, masks, PANEL_MAX_SIDE),
        variant_panels(vt.image, vt.gt, masks, FULL_MAX_SIDE),
        "variants",
        f"{CANDIDATE}: J {fmt(j)}, F {fmt(f)}",
    )


def _pac_strip(t: Thumb) -> _StripPanels:
    """The 4-panel strip of the pac prediction."""
    return _StripPanels(
        [(CANDIDATE, fmt(t.j), fmt(t.f))],
        [(x, ()) for x in PANELS],
        strip_panels(t.image, t.gt, t.pred, PANEL_MAX_SIDE),
        strip_panels(t.image, t.gt, t.pred, FULL_MAX_SIDE),
        "strip",
        f"J {fmt(t.j)}, F {fmt(t.f)}",
    )


def write_strips(
    thumbs: Iterable[Thumb | VariantThumb],
    variant_thumbs: dict[tuple[str, str], VariantThumb],
    prefix: str,
    tmp_dir: Path,
    files_dir: Path,
    vnames: list[str],
    per_image_index: dict[tuple[str, str], ImageScores],
) -> list[Strip]:
    """The strips of one section: a variant strip where a VariantThumb of the same image was
    given (its masks side by side), else the 4-panel strip of the pac prediction."""
    out = []
    for i, t in enumerate(thumbs):
        name = f"{prefix}_{i + 1:02d}"
        title = f"{display_name(t.category)} / {display_name(t.stem)}"
        scores = _thumb_scores(per_image_index.get((str(t.category), str(t.stem))), vnames)
        if isinstance(t, VariantThumb):
            p = _variant_strip(t, scores, vnames, *(scores.get(CANDIDATE) or (None, None)))
        else:
            vt = variant_thumbs.get((str(t.category), str(t.stem)))
            p = _pac_strip(t) if vt is None else _variant_strip(vt, scores, vnames, t.j, t.f)
        arr = hstack(p.small, STRIP_GAP)
        grid = labelled_grid(
            p.big, [" \u00b7 ".join((a, *b)) for a, b in p.labels], f"{title} \u00b7 {p.caption}"
        )
        css, gap = _save_strip(arr, p.small[0].shape[1::-1], grid, name, tmp_dir)
        out.append(
            Strip(
                display_name(t.category),
                display_name(t.stem),
                file_url(files_dir, f"{name}.jpg"),
                file_url(files_dir, f"{name}_full.jpg"),
                css,
                gap,
                p.labels,
                p.shown,
                p.kind,
                p.caption,
            )
        )
    return out
