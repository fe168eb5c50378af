"""The report as the templates see it: ``view_model`` turns a typed ``Report`` into plain data
(formatted numbers, best flags, file names, notes) that ``render.render`` lays out with the
Jinja2 templates. The metrics shown, their order, labels and notes: ``metrics.definitions``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.config.schema import Config
from ..core.config.writing import toml_text
from ..core.jsondoc import finite as _finite
from ..core.variants import BASELINE, CANDIDATE
from ..data import display_name
from ..metrics.definitions import HEADLINE, OVERALL_TABLE, Metric
from .doc import ImageScores, Metrics, Report, VariantScores, parse_report
from .figures import VARIANT_ORDER, bootstrap_ci, metric_value, variant_colour
from .format import best_flags, config_value, file_url, fmt, fmt_int, plural, signed, url_of
from .panels import LEGEND

if TYPE_CHECKING:
    from .strips import Strip

__all__ = [
    "view_model",
    "headline_text",
    "ordered_variants",
    "categories_of",
    "configured_threshold",
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

# config sections shown in the settings summary (all their keys), and single keys added
SETTINGS_SECTIONS = ("backbone", "train", "upsampler")
SETTINGS_KEYS = (
    "data.train_split",
    "extract.fit",
    "extract.precision",
    "predict.threshold",
    "predict.device",
)


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


def _category_count(variants: dict[str, VariantScores], cat: str) -> int | None:
    for v in variants.values():
        m = v.per_category.get(cat)
        if m is not None and m.n_images is not None:
            return m.n_images
    return None


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


def _cell(m: Metric, x: object, best: bool = False) -> dict[str, Any]:
    """A table cell of metric `m`: its value as `m` formats it (a dash: none), and whether it
    is the best of its column."""
    return {"text": m.text(float(x)) if _finite(x) else "\u2014", "best": bool(best)}


def _overall_table(variants: dict[str, VariantScores], colours: dict[str, str]) -> dict[str, Any]:
    vnames = list(variants)
    cols = [[metric_value(variants[v].overall, m.key) for v in vnames] for m in OVERALL_TABLE]
    flags = [best_flags(c, m.higher_is_better) for c, m in zip(cols, OVERALL_TABLE, strict=True)]
    rows = [
        {
            "variant": v,
            "colour": colours[v],
            "cells": [_cell(m, cols[j][i], flags[j][i]) for j, m in enumerate(OVERALL_TABLE)],
            "n": fmt_int(o.n_images if (o := variants[v].overall) is not None else None),
        }
        for i, v in enumerate(vnames)
    ]
    return {"columns": [m.label for m in OVERALL_TABLE], "rows": rows}


def _category_tables(
    variants: dict[str, VariantScores], categories: list[str]
) -> list[dict[str, Any]]:
    vnames = list(variants)
    tables = []
    for m in HEADLINE:
        rows = []
        for c in categories:
            vals = [metric_value(variants[v].per_category.get(c), m.key) for v in vnames]
            rows.append(
                {
                    "category": display_name(c),
                    "n": fmt_int(_category_count(variants, c)),
                    "cells": [
                        _cell(m, x, b)
                        for x, b in zip(vals, best_flags(vals, m.higher_is_better), strict=True)
                    ],
                }
            )
        tables.append({"title": m.label, "rows": rows})
    return tables


_MAX_ROWS = 5000


def _per_image_table(per_image: list[ImageScores], vnames: list[str]) -> dict | None:
    if not per_image:
        return None
    key_v = CANDIDATE if CANDIDATE in vnames else (vnames[-1] if vnames else "")

    def sort_key(r: ImageScores) -> tuple[int, float, str, str]:
        x = r.j.get(key_v)
        return (0 if x is not None else 1, x if x is not None else 0.0, r.category, r.stem)

    ranked = sorted(per_image, key=sort_key)
    rows = []
    for r in ranked[:_MAX_ROWS]:
        rows.append(
            {
                "category": display_name(r.category),
                "stem": display_name(r.stem),
                "j": [fmt(r.j.get(v)) for v in vnames],
                "f": [fmt(r.f.get(v)) for v in vnames],
            }
        )
    return {
        "key": key_v or None,
        "n": len(ranked),
        "rows": rows,
        "truncated": len(ranked) > len(rows),
    }


def _used_value(key: str, value: object, resolved: dict[str, Any]) -> str:
    """A setting as the run used it: backbone.layers with its channels ("2 (256 channels)",
    0 resolved to the backbone's default), an "auto" value resolved ("fp32 (auto)"), as the
    report's ``resolved`` records them; else the value as configured."""
    if key == "backbone.layers" and "backbone.layers" in resolved:
        text = str(resolved["backbone.layers"])
        if "backbone.channels" in resolved:
            text += f" ({resolved['backbone.channels']} channels)"
        return text
    if value == "auto" and key in resolved:
        return f"{config_value(resolved[key])} (auto)"
    return config_value(value)


def _settings(config: dict[str, dict] | None, resolved: dict | None = None) -> list[dict]:
    """The training settings (backbone.*, train.*, upsampler.* and a few single keys) as
    rows {key, value, changed}, each value as the run used it (``_used_value``); ``changed``
    when the configured value differs from the built-in default."""
    if config is None:
        return []
    defaults = Config().to_dict()
    rows = []

    def add(section: str, name: str, value: object) -> None:
        d = defaults.get(section) or {}
        changed = (
            name in d
            and d[name] != value
            and not (_finite(d[name]) and _finite(value) and float(d[name]) == float(value))
        )
        key = f"{section}.{name}"
        rows.append(
            {"key": key, "value": _used_value(key, value, resolved or {}), "changed": bool(changed)}
        )

    for section in SETTINGS_SECTIONS:
        for name, value in (config.get(section) or {}).items():
            add(section, name, value)
    for key in SETTINGS_KEYS:
        section, name = key.split(".", 1)
        if name in (config.get(section) or {}):
            add(section, name, config[section][name])
    return rows


def _config_toml(config: dict[str, dict] | None) -> str | None:
    return toml_text(config) if config else None


def configured_threshold(report: Report) -> float | None:
    """predict.threshold as the report's config records it (None: absent or unusable)."""
    t = ((report.config or {}).get("predict") or {}).get("threshold")
    return float(t) if _finite(t) and 0 < float(t) < 1 else None


def _sweep_view(report: Report, vnames: list[str], colours: dict) -> dict | None:
    """The sweep's table: per variant J / precision / recall at the configured threshold and
    the threshold with the best J mean (the nearer to the configured one on a tie)."""
    t0 = configured_threshold(report)
    rows = []
    for v in vnames:
        pts = report.threshold_sweep.get(v) or []
        if not pts:
            continue
        at = next((p for p in pts if t0 is not None and p.threshold == t0), None)
        best = max(pts, key=lambda p: (p.j_mean, -abs(p.threshold - (t0 or 0.5))))
        gain = None if at is None else best.j_mean - at.j_mean
        rows.append(
            {
                "variant": v,
                "colour": colours.get(v, "#888"),
                "at": [
                    fmt(None if at is None else getattr(at, k))
                    for k in ("j_mean", "precision", "recall")
                ],
                "best_threshold": f"{best.threshold:g}",
                "best_j": fmt(best.j_mean),
                "gain": signed(gain) if gain is not None else "\u2014",
                "better": gain is not None and gain > 0.005,
            }
        )
    if not rows:
        return None
    return {
        "threshold": "\u2014" if t0 is None else f"{t0:g}",
        "rows": rows,
        "any_better": any(r["better"] for r in rows),
    }


DAVIS_STATS = ("mean", "recall", "decay")


def _davis_view(report: Report, vnames: list[str], colours: dict) -> dict | None:
    """The DAVIS protocol's table: per variant J and F mean / recall / decay over sequences
    and J&F (report_<split>.json's ``davis``)."""
    rows, frames, n_seq = [], None, None
    for v in vnames:
        d = report.davis.get(v)
        if d is None:
            continue
        frames, n_seq = frames or d.frames, n_seq if n_seq is not None else d.n_sequences
        rows.append(
            {
                "variant": v,
                "colour": colours.get(v, "#888"),
                "j": [(signed if k == "decay" else fmt)(d.j.get(k)) for k in DAVIS_STATS],
                "f": [(signed if k == "decay" else fmt)(d.f.get(k)) for k in DAVIS_STATS],
                "jf": fmt(d.jf),
            }
        )
    if not rows:
        return None
    return {
        "rows": rows,
        "frames": frames or "\u2014",
        "n_sequences": "\u2014" if n_seq is None else fmt_int(n_seq),
    }


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
    variants = ordered_variants(report.variants)
    vnames = list(variants)
    colours = {v: variant_colour(v, i) for i, v in enumerate(vnames)}
    scored = any(v.overall is not None for v in variants.values())
    categories = categories_of(variants) if scored else []
    name = "?" if report.backbone is None else report.backbone
    n_images, n_predicted = report.n_images, report.n_predicted
    images_text = plural(n_images, "image") + " scored"
    if n_predicted is not None and n_predicted != n_images:
        images_text += f" of {fmt_int(n_predicted)} predicted"
    settings = _settings(report.config, report.resolved)
    return {
        "title": f"Segmentation report: {split} split, {name} backbone",
        "split": split,
        "backbone": name,
        "weights": report.weights,
        "run": report.run,
        "images_text": images_text,
        "md_name": url_of(md_name),
        "html_name": url_of(html_name),
        "md_label": md_name,
        "html_label": html_name,
        "scored": scored,
        "headline": headline_text(report) if scored else None,
        "gains": [
            {
                "value": signed(d),
                "label": label,
                "css": "up"
                if signed(d).startswith("+")
                else "down"
                if signed(d).startswith("-")
                else "",
            }
            for label, d in (_gains(report) or [])
        ]
        if scored
        else [],
        "n_scored": plural(_scored(report), "image"),
        "no_annotation": None if scored else _no_annotation_text(report, split),
        "paired_note": _paired_note(per_image) if scored else None,
        "variants": [
            {"name": v, "colour": colours[v], "note": VARIANT_NOTES.get(v)} for v in vnames
        ],
        "overall": _overall_table(variants, colours) if scored else None,
        "sweep": _sweep_view(report, vnames, colours) if scored else None,
        "davis": _davis_view(report, vnames, colours) if scored else None,
        "category_tables": _category_tables(variants, categories) if categories else [],
        "per_image": _per_image_table(per_image, vnames) if scored else None,
        "figures": figures,
        "strips": strips,
        "legend": [{"label": label, "colour": f"rgb({r},{g},{b})"} for label, (r, g, b) in LEGEND],
        "settings": settings,
        "settings_changed": any(r["changed"] for r in settings),
        "config_toml": _config_toml(report.config),
        "provenance": _provenance(report),
        "other_runs": _other_runs(other_runs),
        "metric_notes": METRIC_NOTES,
    }
