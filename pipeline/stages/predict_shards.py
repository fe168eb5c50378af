"""Stage 3's unit of work, one store shard: its masks written as PNG and its per-image
statistics and sweep counts returned (here, or as a Dask task keeping its stores and models
open on the worker)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import ModelError, StoreError
from ..core.fsutil import atomic_write_bytes, sha256_bytes
from ..core.hints import command
from ..core.variants import CANDIDATE, VARIANTS
from ..data import same_size_batches
from ..executors import worker_cached
from ..metrics.masks import image_stats, sweep_counts
from ..store import FeatureStore
from .predict_settings import PredictSettings

if TYPE_CHECKING:  # torch: imported by the functions that compute
    from ..inference import Predictor


def check_mirrored(store: FeatureStore, mirror: FeatureStore) -> None:
    """StoreError unless `mirror` holds the mirrored features of exactly `store`'s images,
    in the same places."""

    def layout(s: FeatureStore) -> list[tuple]:
        return [
            (m.category, m.stem, m.source, m.orig_size, m.box, m.shard, m.slot) for m in s.items
        ]

    if layout(store) != layout(mirror):
        raise StoreError(
            f"{mirror.split_dir}: the mirrored features do not match the stored "
            f"split; run `{command('extract-features', '--split', store.split)}`"
        )


def predict_shard(
    store: FeatureStore,
    shard: int,
    predictor: Predictor,
    pred_dir: Path,
    batch_size: int = 8,
    mirror: FeatureStore | None = None,
    sweep: Sequence[float] = (),
) -> dict:
    """The candidate's masks of one shard written as PNG; returns the unit {"items": [...],
    "sweep": [...], "seconds": {...}, "timed": n} of statistics (None for an image without
    annotation) and, per annotated image and variant, the confusion counts at the ascending
    thresholds `sweep` (metrics.sweep_counts), and the seconds each variant's logits took
    over the shard's n images. Images are batched by canvas size, in order. `mirror`: the
    split's mirrored features (predict.tta = "flip")."""
    from ..inference import mask_png_bytes
    from ..models.variant_logits import VariantSeconds

    metas = [m for m in store.items if m.shard == shard]
    rows: dict[int, dict] = {}
    timing = VariantSeconds()
    for batch in same_size_batches([m.box for m in metas], batch_size):
        items = [store.read(metas[i].index) for i in batch]
        mirrored = None if mirror is None else [mirror.features(metas[i].index) for i in batch]
        for item, (masks, levels) in zip(
            items, predictor.batch_masks_and_levels(items, mirrored, sweep, timing), strict=True
        ):
            meta = item.meta
            png = mask_png_bytes(masks[CANDIDATE])
            atomic_write_bytes(pred_dir / meta.category / f"{meta.stem}.png", png)
            stats, counts = None, None
            if item.mask is not None:
                stats = {
                    v: image_stats(masks[v], item.mask, meta.category, meta.stem).to_dict()
                    for v in VARIANTS
                }
                if sweep:
                    counts = {v: sweep_counts(levels[v], item.mask, len(sweep)) for v in VARIANTS}
            rows[meta.index] = {
                "category": meta.category,
                "stem": meta.stem,
                "index": meta.index,
                "stats": stats,
                "mask": sha256_bytes(png),
                "sweep": counts,
            }
    return {
        "items": [rows[m.index] for m in metas],
        "sweep": list(sweep),
        "seconds": timing.seconds,
        "timed": timing.images,
    }


def seconds_per_image(units: Sequence[dict]) -> dict[str, float]:
    """Per variant, the seconds its logits took per image, over the units that timed it
    (each timed when its shard was predicted, possibly by an earlier, resumed pass)."""
    total: dict[str, float] = {}
    images: dict[str, int] = {}
    for u in units:
        secs, n = u.get("seconds"), u.get("timed")
        if not isinstance(secs, dict) or not isinstance(n, int) or n <= 0:
            continue
        for v, s in secs.items():
            if isinstance(s, (int, float)):
                total[v] = total.get(v, 0.0) + float(s)
                images[v] = images.get(v, 0) + n
    return {v: total[v] / images[v] for v in total}


def predict_task(
    settings: PredictSettings,
    split_dir: str,
    fingerprint: str,
    shard: int,
    pred_dir: str,
    models_fp: str,
    mirror_dir: str | None = None,
    mirror_fp: str | None = None,
) -> tuple[int, dict]:
    """One shard on a Dask worker (`settings`: PredictSettings.portable); the worker keeps
    the stores and models it opened, keyed by their content fingerprints (a re-extracted
    split or retrained models are reopened)."""

    def opened(sdir: str, fp: str) -> FeatureStore:
        store = worker_cached(("store", sdir, fp), lambda: FeatureStore(sdir))
        if store.fingerprint != fp:
            raise StoreError(f"{sdir}: the stored split changed during prediction; rerun predict")
        return store

    store = opened(split_dir, fingerprint)
    mirror = (
        opened(mirror_dir, mirror_fp) if mirror_dir is not None and mirror_fp is not None else None
    )
    predictor = worker_cached(
        (
            "predictor",
            models_fp,
            settings.device,
            tuple(settings.thresholds.values.items()),
            settings.keys.predict.refine,
        ),
        lambda: predictor_of(settings, models_fp),
    )
    return shard, predict_shard(
        store,
        shard,
        predictor,
        Path(pred_dir),
        settings.batch_size,
        mirror,
        settings.thresholds.sweep,
    )


def predictor_of(settings: PredictSettings, models_fp: str) -> Predictor:
    """The run's models on the configured device, cutting masks at the configured threshold;
    ModelError unless their fingerprint is still `models_fp`."""
    from ..inference import Predictor
    from ..models.devices import resolve_device
    from ..models.heads import load_models

    device = resolve_device(settings.device)
    models = load_models(settings.run.models, device)
    if models.fingerprint != models_fp:
        raise ModelError(
            f"{settings.run.models}: the models changed during prediction; rerun predict"
        )
    return Predictor(models, device, settings.thresholds.values, settings.keys.predict.refine)
