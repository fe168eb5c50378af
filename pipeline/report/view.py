"""The report as the templates see it: ``view_model`` turns a typed ``Report`` into plain data
(formatted numbers, best flags, file names, notes) that ``render.render`` lays out with the
Jinja2 templates. The metrics shown, their order, labels and notes: ``metrics.definitions``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.variants import BASELINE, CANDIDATE
from ..metrics.definitions import HEADLINE, OVERALL_TABLE, Metric
from .doc import ImageScores, Metrics, Report, VariantScores, parse_report
from .figures import VARIANT_ORDER, bootstrap_ci, variant_colour
from .format import file_url, fmt_int, plural, signed, url_of
from .panels import LEGEND
from .tables import (
    category_tables,
    config_toml,
    davis_table,
    overall_table,
    per_image_table,
    settings_rows,
    sweep_table,
)

if TYPE_CHECKING:
    from .strips import Strip

__all__ = [
    "view_model",
    "headline_text",
    "ordered_variants",
    "categories_of",
    "figure_entry",
    "METRIC_NOTES",
    "VARIANT_NOTES",
]


def _metric_notes(metrics: tuple[Metric, ...]) -> tuple[tuple[str, str], ...]:
    """(labels, note) per note of `metrics`, in their order: the metrics that share a note,
    side by side, are named together ("FG IoU / BG IoU")."""
    groups: list[tuple[list[str], str]] = []
    for m in metrics:
        if groups and groups[-1][1] == m.note:
            groups[-1][0].append(m.label)
        else:
            groups.append(([m.label], m.note))
    return tuple((" / ".join(labels), note) for labels, note in groups)


# the notes below the tables: each metric's, in the overall table's order, then the intervals'
METRIC_NOTES = (
    *_metric_notes(OVERALL_TABLE),
    (
        "95% intervals",
        "bootstrap intervals over images (2000 resamples of the per-image values): "
        "how much the mean would move with another sample of images like these.",
    ),
)

VARIANT_NOTES = {
    "linear_nearest": "linear head, patch logits upsampled with nearest-neighbour interpolation",
    "linear_bilinear": "linear head, patch logits upsampled bilinearly",
    "pac": "pixel-adaptive-convolution upsampler guided by the image",
}

# ----------------------------------------------------------------------------- variants


def ordered_variants(variants: dict[str, VariantScores]) -> dict[str, VariantScores]:
    """The variants in reading order (nearest, bilinear, pac, then any other in its own
    order), whatever the order of the JSON's keys."""
    order = [v for v in VARIANT_ORDER if v in variants] + [
        v for v in variants if v not in VARIANT_ORDER
    ]
    return {v: variants[v] for v in order}


def categories_of(variants: dict[str, VariantScores]) -> list[str]:
    seen: dict[str, None] = {}
    for v in variants.values():
        for c in v.per_category:
            seen.setdefault(c, None)
    return list(seen)


# ----------------------------------------------------------------------------- headline


def _overall(report: Report, variant: str) -> Metrics | None:
    v = report.variants.get(variant)
    return None if v is None else v.overall


def _gains(report: Report) -> list[tuple[str, float]] | None:
    cand, base = _overall(report, CANDIDATE), _overall(report, BASELINE)
    if cand is None or base is None:
        return None
    out = [
        (m.short, c - b)
        for m in HEADLINE
        if (c := cand.get(m.key)) is not None and (b := base.get(m.key)) is not None
    ]
    return out or None


def _scored(report: Report) -> int | None:
    cand = _overall(report, CANDIDATE)
    n = None if cand is None else cand.n_images
    return n if n is not None else report.n_images


def headline_text(report: Report | dict) -> str | None:
    """The report's headline: PAC's gain over bilinear upsampling, from the overall metrics,
    e.g. "PAC upsampler: +0.025 mIoU, +0.030 J, +0.071 F over bilinear upsampling
    (35 images)". None when either variant has no overall metrics (nothing annotated)."""
    if not isinstance(report, Report):
        report = parse_report(report, strict=False)
    gains = _gains(report)
    if gains is None:
        return None
    parts = ", ".join(f"{signed(d)} {label}" for label, d in gains)
    return f"PAC upsampler: {parts} over bilinear upsampling ({plural(_scored(report), 'image')})"


def _no_annotation_text(report: Report, split: str) -> str:
    n = report.n_predicted
    masks = plural(n, "mask") if n is not None else "the masks"
    return (
        f"No image of the {split} split is annotated: {masks} "
        f"{'was' if n == 1 else 'were'} written to predictions/{split}/, "
        "and there is nothing to score."
    )


def _paired_note(per_image: list[ImageScores]) -> str | None:
    """Per-image comparison of the candidate with the baseline: on how many images it is
    better / worse, and a bootstrap interval of the mean J gain."""
    diffs = [
        a - b
        for r in per_image
        if (a := r.j.get(CANDIDATE)) is not None and (b := r.j.get(BASELINE)) is not None
    ]
    if not diffs:
        return None
    better = sum(d > 1e-9 for d in diffs)
    worse = sum(d < -1e-9 for d in diffs)
    text = (
        f"Per image, {CANDIDATE} has a higher J than {BASELINE} on {better} of "
        f"{len(diffs)} images and a lower one on {worse}"
    )
    ci = bootstrap_ci(diffs)
    if ci:
        text += (
            f"; mean J gain {signed(float(np.mean(diffs)))} (95% bootstrap interval "
            f"{signed(ci[0])} to {signed(ci[1])})"
        )
    return text + "."


# ----------------------------------------------------------------------------- view model


def _provenance(report: Report) -> list[tuple[str, str]]:
    return [
        (f"{k} {label}", "\u2014" if v is None else v)
        for d, label in ((report.fingerprints, "fingerprint"), (report.versions, "version"))
        for k, v in d.items()
    ]


def _other_runs(other_runs: list[tuple[str, str]] | None) -> list[dict]:
    return [{"name": str(name), "href": url_of(href)} for name, href in other_runs or []]


def figure_entry(
    key: str, title: str, alt: str, caption: str, files_dir: Path, size_in: tuple[float, float]
) -> dict:
    return {
        "key": key,
        "title": title,
        "alt": alt,
        "caption": caption,
        "svg": file_url(files_dir, f"{key}.svg"),
        "pdf": file_url(files_dir, f"{key}.pdf"),
        "png": file_url(files_dir, f"{key}.png"),
        # CSS px of the SVG (its own size is in pt: 72 per inch, CSS has 96)
        "width": round(size_in[0] * 96),
        "height": round(size_in[1] * 96),
    }


def _images_text(report: Report) -> str:
    """ "35 images scored", with " of 40 predicted" when not every predicted image is."""
    n_images, n_predicted = report.n_images, report.n_predicted
    text = plural(n_images, "image") + " scored"
    if n_predicted is not None and n_predicted != n_images:
        text += f" of {fmt_int(n_predicted)} predicted"
    return text


def _gain_badges(report: Report) -> list[dict[str, str]]:
    """The headline's gains as badges: the signed value, its label, "up" / "down" / ""."""
    badges = []
    for label, d in _gains(report) or []:
        value = signed(d)
        css = "up" if value.startswith("+") else "down" if value.startswith("-") else ""
        badges.append({"value": value, "label": label, "css": css})
    return badges


def _scored_view(
    report: Report, variants: dict[str, VariantScores], per_image: list[ImageScores]
) -> dict[str, Any]:
    """The parts of the view that need scores (None or empty where nothing is annotated)."""
    vnames = list(variants)
    colours = {v: variant_colour(v, i) for i, v in enumerate(vnames)}
    scored = any(v.overall is not None for v in variants.values())
    categories = categories_of(variants) if scored else []
    return {
        "scored": scored,
        "headline": headline_text(report) if scored else None,
        "gains": _gain_badges(report) if scored else [],
        "n_scored": plural(_scored(report), "image"),
        "paired_note": _paired_note(per_image) if scored else None,
        "variants": [
            {"name": v, "colour": colours[v], "note": VARIANT_NOTES.get(v)} for v in vnames
        ],
        "overall": overall_table(variants, colours) if scored else None,
        "sweep": sweep_table(report, vnames, colours) if scored else None,
        "davis": davis_table(report, vnames, colours) if scored else None,
        "category_tables": category_tables(variants, categories) if categories else [],
        "per_image": per_image_table(per_image, vnames) if scored else None,
    }


def view_model(
    split: str,
    report: Report,
    per_image: list[ImageScores],
    strips: dict[str, list[Strip]],
    figures: dict[str, dict | None],
    other_runs: list[tuple[str, str]] | None,
    md_name: str,
    html_name: str,
) -> dict:
    """What the templates show, as plain data."""
    scores = _scored_view(report, ordered_variants(report.variants), per_image)
    name = "?" if report.backbone is None else report.backbone
    settings = settings_rows(report.config, report.resolved)
    return {
        "title": f"Segmentation report: {split} split, {name} backbone",
        "split": split,
        "backbone": name,
        "weights": report.weights,
        "run": report.run,
        "images_text": _images_text(report),
        "md_name": url_of(md_name),
        "html_name": url_of(html_name),
        "md_label": md_name,
        "html_label": html_name,
        **scores,
        "no_annotation": None if scores["scored"] else _no_annotation_text(report, split),
        "figures": figures,
        "strips": strips,
        "legend": [{"label": label, "colour": f"rgb({r},{g},{b})"} for label, (r, g, b) in LEGEND],
        "settings": settings,
        "settings_changed": any(r["changed"] for r in settings),
        "config_toml": config_toml(report.config),
        "provenance": _provenance(report),
        "other_runs": _other_runs(other_runs),
        "metric_notes": METRIC_NOTES,
    }
