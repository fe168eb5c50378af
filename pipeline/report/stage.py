"""Stage 3's report: the content of report_<split>.json (metrics of the annotated images,
their provenance, J and F per image), the lines the CLI prints, and the human-readable
reports with the best and worst images of the split (see ``write_reports``). It is handed
the rows and the images to show; it reads no store."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..core.errors import StoreError
from ..core.keys import FeatureKey
from ..core.layout import RunLayout
from ..core.registry import get_spec
from ..metrics.davis import per_variant as davis_per_variant
from ..metrics.definitions import HEADLINE
from ..metrics.masks import ImageStats, summarize, sweep_summary
from . import write_reports
from .figures import curve_files
from .panels import Thumb, VariantThumb

# what report_<split>.json holds, recorded with stage 3's record: 2 = adds ``davis`` and
# ``calibration``. A record
# of a lower (or no) format makes stage 3 rebuild its reports from its stored units (no mask,
# feature or model is computed again)
REPORT_FORMAT = 2


def _summaries(scored: list[dict], variants: Sequence[str]) -> dict[str, dict]:
    """Per variant, the metrics of the annotated images (`scored`: overall and per
    category; None and {} without any)."""
    if not scored:
        return {v: {"overall": None, "per_category": {}} for v in variants}
    return {v: summarize([ImageStats.from_dict(r["stats"][v]) for r in scored]) for v in variants}


def _per_image(scored: list[dict], variants: Sequence[str]) -> list[dict]:
    """J and F per annotated image: {category, stem, j: {variant: J}, f: {variant: F}}."""
    return [
        {
            "category": r["category"],
            "stem": r["stem"],
            "j": {v: r["stats"][v]["j"] for v in variants},
            "f": {v: r["stats"][v]["f"] for v in variants},
        }
        for r in scored
    ]


def build_report(
    config: dict[str, dict[str, Any]],
    split: str,
    rows: list[dict],
    fingerprints: dict[str, str],
    variants: Sequence[str],
    sweep: Sequence[float] = (),
    resolved: dict | None = None,
    seconds: dict[str, float] | None = None,
    calibration: dict | None = None,
) -> dict:
    """The report of a split: metrics of the annotated images (`n_images`), how many masks
    were written (`n_predicted`), and its provenance: the effective `config` (its tables, as
    Config.to_dict gives them), the content
    fingerprints of the features and models used, the versions, and J and F per image.
    `rows`: stage 3's unit items (``stats``: {variant: ImageStats dict}, None unannotated;
    ``sweep``: {variant: sweep counts at the thresholds `sweep`}). With `sweep`, the report's
    ``threshold_sweep``: per variant, J mean, precision and recall at each threshold. With
    annotated images, ``davis``: per variant the DAVIS protocol's aggregate of the per-image
    J and F (metrics.davis; a category is a sequence, its frames in stem order).
    `resolved`: the values used where the config says "auto" or 0 (``resolved_settings``).
    `seconds`: per variant, the seconds its logits took per image: ``timing`` (measured, so
    the one part of the report that differs between two runs of the same inputs).
    `calibration`: the thresholds per variant and which split chose them
    (stages/thresholds.Thresholds.to_json)."""
    import torch

    if not rows:
        raise StoreError(f"split '{split}' holds no usable image: nothing to predict")
    scored = [r for r in rows if r["stats"] is not None]
    per_image = _per_image(scored, variants)
    report = {
        "split": split,
        "n_images": len(scored),
        "n_predicted": len(rows),
        "backbone": {"name": config["backbone"]["name"], "weights": config["backbone"]["weights"]},
        "run": config["run"]["name"],
        "variants": _summaries(scored, variants),
        "config": config,
        "fingerprints": dict(fingerprints),
        "per_image": per_image,
        "versions": {"vit-objseg": package_version(), "torch": torch.__version__},
    }
    if per_image:
        report["davis"] = davis_per_variant(per_image, variants)
    if seconds:
        report["timing"] = {"seconds_per_image": {v: seconds[v] for v in variants if v in seconds}}
    if sweep:
        report["threshold_sweep"] = {
            v: sweep_summary(
                sweep, [(r["sweep"][v], r["stats"][v]["tp"] + r["stats"][v]["fn"]) for r in scored]
            )
            for v in variants
        }
    if resolved:
        report["resolved"] = dict(resolved)
    if calibration:
        report["calibration"] = dict(calibration)
    return report


def resolved_settings(key: FeatureKey, predict_device: str) -> dict:
    """The values stage 3 used where the config leaves the choice to the tool: backbone.layers
    (0: the backbone's default) and its channels, extract.precision ("auto": by the device;
    the feature key `key` the stored split was made with), predict.device ("auto")."""
    return {
        "backbone.layers": key.layers,
        "backbone.channels": get_spec(key.backbone).channels(key.layers),
        "extract.precision": key.precision,
        "predict.device": str(predict_device),
    }


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vit-objseg")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def headline(report: dict) -> list[str]:
    """The lines the CLI prints after stage 3: each variant's headline metrics."""
    if report["n_images"] == 0:
        return [
            f"no annotated image among the {report['n_predicted']}: masks written, nothing scored"
        ]
    out = []
    for v, block in report["variants"].items():
        m = block["overall"]
        out.append(f"{v:<16} " + "  ".join(f"{h.short} {h.text(m[h.key])}" for h in HEADLINE))
    if report["n_images"] < report["n_predicted"]:
        out.append(f"scored {report['n_images']} annotated of {report['n_predicted']} images")
    return out


SPREAD_CAPS = (1, 2)  # images per category of the best / worst: one each, then two, then any


def spread(ranked: Sequence[dict], k: int) -> list[dict]:
    """The first `k` of the rows `ranked` spread over their categories (a DAVIS category is a
    sequence): round-robin, at most one image per category while other categories have one
    to offer, then at most two, then the next in rank order. In rank order."""

    def category(r: dict) -> str:
        return r["category"]

    chosen: set[int] = set()
    for cap in (*SPREAD_CAPS, None):
        used: dict[str, int] = {}
        for i in sorted(chosen):
            used[category(ranked[i])] = used.get(category(ranked[i]), 0) + 1
        for i, r in enumerate(ranked):
            if len(chosen) >= k:
                break
            c = category(r)
            if i not in chosen and (cap is None or used.get(c, 0) < cap):
                chosen.add(i)
                used[c] = used.get(c, 0) + 1
    return [ranked[i] for i in sorted(chosen)]


def other_runs(run: RunLayout, split: str) -> list[tuple[str, str]]:
    """(run name, link relative to `run`'s folder) of the other runs' reports of `split`."""
    others = [
        RunLayout(d) for d in sorted(run.root.parent.iterdir()) if d.is_dir() and d.name != run.name
    ]
    return [
        (r.name, f"../{r.name}/{r.report(split, '.html').name}")
        for r in others
        if r.report(split, ".html").is_file()
    ]


def _history(run_dir: Path) -> list[dict]:
    """Stage 2's metrics.jsonl rows (the training curves are decoration: a damaged line is
    dropped)."""
    history = []
    mfile = RunLayout(run_dir).history
    if mfile.is_file():
        for line in mfile.read_text().splitlines():
            try:
                history.append(json.loads(line))
            except ValueError:
                continue
    return history


@dataclass(frozen=True)
class Shown:
    """A scored image as the human reports show it: the image (H, W, 3) uint8, its annotation
    (H, W) bool, and every variant's masks (the worst images'), computed when asked."""

    image: np.ndarray
    mask: np.ndarray
    variant_masks: Callable[[], dict[str, np.ndarray]]


def write_human_reports(
    run: RunLayout,
    split: str,
    report: dict,
    rows: list[dict],
    thumbnails: int,
    shown: Callable[[dict], Shown],
) -> None:
    """The Markdown and HTML reports of stage 3 next to its JSON `report` in the run `run`:
    the `thumbnails` (predict.thumbnails) best images (pac masks read back from the split's
    predictions) and worst images (every variant's masks), each image got from `shown(row)`
    once; the training curves as stage 2 drew them (drawn from its metrics.jsonl for a run
    trained before it kept them)."""
    rows = [r for r in rows if r["stats"] is not None]
    k = thumbnails
    pred_dir = run.predictions(split)
    ranked = sorted(rows, key=lambda r: (r["stats"]["pac"]["j"], r["category"], r["stem"]))
    worst = spread(ranked, k)
    taken = {id(r) for r in worst}
    best = spread([r for r in ranked[::-1] if id(r) not in taken], k)

    def thumb(r: dict) -> Thumb:
        item = shown(r)
        pred = np.asarray(Image.open(pred_dir / r["category"] / f"{r['stem']}.png")) > 127
        s = r["stats"]["pac"]
        return Thumb(r["category"], r["stem"], s["j"], s["f"], item.image, item.mask, pred)

    def variants(r: dict) -> VariantThumb:  # the worst images, with every variant's mask
        item = shown(r)
        return VariantThumb(r["category"], r["stem"], item.image, item.mask, item.variant_masks())

    curves = curve_files(run.loss_curves)
    kept = all(p.is_file() for p in curves)
    write_reports(
        run.root,
        split,
        report,
        report["per_image"],
        [thumb(r) for r in best],
        [variants(r) for r in worst],
        None if kept else _history(run.root),
        other_runs=other_runs(run, split),
        curves=curves if kept else None,
    )
