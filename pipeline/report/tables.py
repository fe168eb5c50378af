"""The report's tables as the templates see them: overall, per category, per image, the
threshold sweep, the DAVIS protocol and the training settings, each as plain data (formatted
numbers, best flags) for ``view.view_model``.
"""

from __future__ import annotations

from typing import Any

from ..core.config.schema import Config
from ..core.config.writing import toml_text
from ..core.jsondoc import finite as _finite
from ..core.variants import CANDIDATE
from ..data import display_name
from ..metrics.definitions import HEADLINE, OVERALL_TABLE, Metric
from .doc import ImageScores, Report, VariantScores
from .figures import metric_value
from .format import best_flags, config_value, fmt, fmt_int, signed

__all__ = [
    "overall_table",
    "category_tables",
    "per_image_table",
    "sweep_table",
    "davis_table",
    "settings_rows",
    "config_toml",
    "configured_threshold",
    "DAVIS_STATS",
]


def configured_threshold(report: Report) -> float | None:
    """predict.threshold as the report's config records it (None: absent or unusable)."""
    t = ((report.config or {}).get("predict") or {}).get("threshold")
    return float(t) if _finite(t) and 0 < float(t) < 1 else None


# config sections shown in the settings summary (all their keys), and single keys added
SETTINGS_SECTIONS = ("backbone", "train", "upsampler")
SETTINGS_KEYS = (
    "data.train_split",
    "extract.fit",
    "extract.precision",
    "predict.threshold",
    "predict.device",
)


def _category_count(variants: dict[str, VariantScores], cat: str) -> int | None:
    for v in variants.values():
        m = v.per_category.get(cat)
        if m is not None and m.n_images is not None:
            return m.n_images
    return None


def _cell(m: Metric, x: object, best: bool = False) -> dict[str, Any]:
    """A table cell of metric `m`: its value as `m` formats it (a dash: none), and whether it
    is the best of its column."""
    return {"text": m.text(float(x)) if _finite(x) else "\u2014", "best": bool(best)}


def overall_table(variants: dict[str, VariantScores], colours: dict[str, str]) -> dict[str, Any]:
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


def category_tables(
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


def per_image_table(per_image: list[ImageScores], vnames: list[str]) -> dict | None:
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


def settings_rows(config: dict[str, dict] | None, resolved: dict | None = None) -> list[dict]:
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


def config_toml(config: dict[str, dict] | None) -> str | None:
    return toml_text(config) if config else None


def sweep_table(report: Report, vnames: list[str], colours: dict) -> dict | None:
    """The sweep's table: per variant J / precision / recall at the threshold its masks were
    cut at (configured, or chosen on the validation split) and the threshold with the best
    J mean (the nearer to the one used on a tie)."""
    configured = configured_threshold(report)
    rows = []
    for v in vnames:
        pts = report.threshold_sweep.get(v) or []
        if not pts:
            continue
        t0 = report.thresholds.get(v, configured)
        at = next((p for p in pts if t0 is not None and p.threshold == t0), None)
        best = max(pts, key=lambda p: (p.j_mean, -abs(p.threshold - (t0 or 0.5))))
        gain = None if at is None else best.j_mean - at.j_mean
        rows.append(
            {
                "variant": v,
                "colour": colours.get(v, "#888"),
                "used": "\u2014" if t0 is None else f"{t0:g}",
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
    chosen_on = report.threshold_split
    label = (
        "the threshold chosen on " + chosen_on
        if chosen_on is not None
        else "\u2014"
        if configured is None
        else f"{configured:g}"
    )
    return {
        "threshold": label,
        "chosen_on": chosen_on,
        "rows": rows,
        "any_better": any(r["better"] for r in rows),
    }


DAVIS_STATS = ("mean", "recall", "decay")


def davis_table(report: Report, vnames: list[str], colours: dict) -> dict | None:
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
