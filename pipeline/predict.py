"""Stage 3: masks for a split from the cache and the trained models (no backbone), and the
IoU report of the three variants (linear head upsampled nearest / bilinear, PAC upsampler).

Work is done per cache shard: the shard's masks are written, then a small JSON "unit" with
its per-image statistics is written atomically. A killed run resumes at the first shard
without a current unit; the report is assembled from the units at the end.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .cache import FeatureCache, atomic_write_bytes, atomic_write_json, read_json
from .config import Config
from .data import from_canvas, same_size_batches, to_canvas
from .extract import model_params, open_split, plan_split, resolve_device, split_params
from .metrics import ImageStats, image_stats, summarize
from .models import upsample_logits
from .stages import StageStatus, fingerprint, judge, save_record
from .train import TrainedModels, load_models, stage_params as train_params

VARIANTS = ("linear_nearest", "linear_bilinear", "pac")


def stage_name(split: str) -> str:
    return f"predict[{split}]"


def stage_params(cfg: Config, split: str) -> dict:
    mparams = model_params(cfg)
    params = train_params(cfg)
    params.update(split_params(cfg, split, mparams, plan_split(cfg, split, mparams)))
    params["predict.threshold"] = cfg.predict.threshold
    params["predict.thumbnails"] = cfg.predict.thumbnails
    return params


def report_path(cfg: Config, split: str) -> Path:
    return cfg.run_dir / f"report_{split}.json"


def status(cfg: Config, split: str) -> StageStatus:
    try:
        params = stage_params(cfg, split)
    except Exception as e:
        return StageStatus(stage_name(split), "stale", f"inputs unavailable: {str(e).splitlines()[0]}")
    return judge(cfg, stage_name(split), params, report_path(cfg, split).is_file())


# ----------------------------------------------------------------------------- the work unit

class Predictor:
    """Trained models on a device; turns one cached image into three full-size masks."""

    def __init__(self, models: TrainedModels, device: torch.device, threshold: float):
        self.models = models
        self.device = device
        self.logit_threshold = math.log(threshold / (1 - threshold))

    @torch.inference_mode()
    def batch_masks(self, items: list) -> list[dict[str, np.ndarray]]:
        """Boolean masks (H, W) at the original size for each variant, for cached items
        whose canvases share one size (one batched forward)."""
        feats = torch.from_numpy(np.stack([it.features for it in items]).astype(np.float32))
        f = feats.permute(0, 3, 1, 2).to(self.device)
        canvases = np.stack([to_canvas(it.image, it.meta.box) for it in items])
        img = torch.from_numpy(canvases).permute(0, 3, 1, 2).to(self.device)
        size = tuple(img.shape[-2:])
        base = self.models.head(f)
        up = self.models.upsampler
        logits = {
            "linear_nearest": upsample_logits(base, size, "nearest"),
            "linear_bilinear": upsample_logits(base, size, "bilinear"),
            "pac": up(f, img, base),
        }
        binary = {k: (v[:, 0] > self.logit_threshold).cpu().numpy() for k, v in logits.items()}
        return [{k: from_canvas(b[j], it.meta.box, it.meta.orig_size) for k, b in binary.items()}
                for j, it in enumerate(items)]


def predict_shard(cache: FeatureCache, shard: int, predictor: Predictor, pred_dir: Path,
                  batch_size: int = 8) -> dict:
    """Masks of one shard written as PNG; returns the unit {"items": [...]} of statistics.
    Images are batched by canvas size, in item order."""
    metas = [m for m in cache.items if m.shard == shard]
    rows: dict[int, dict] = {}
    for batch in same_size_batches([m.box for m in metas], batch_size):
        items = [cache.read(metas[i].index) for i in batch]
        for item, masks in zip(items, predictor.batch_masks(items)):
            meta = item.meta
            atomic_write_bytes(pred_dir / meta.category / f"{meta.stem}.png",
                               _png_bytes(masks["pac"]))
            rows[meta.index] = {
                "category": meta.category, "stem": meta.stem, "index": meta.index,
                "stats": {v: image_stats(masks[v], item.mask, meta.category, meta.stem).to_dict()
                          for v in VARIANTS}}
    return {"items": [rows[m.index] for m in metas]}


def _png_bytes(mask: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray((mask.astype(np.uint8) * 255)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- the stage

@dataclass
class PredictResult:
    up_to_date: bool = False
    n_images: int = 0
    seconds: float = 0.0
    predictions_dir: Path | None = None
    report_json: Path | None = None
    headline: list[str] = field(default_factory=list)


def run_predict(cfg: Config, split: str, force: bool = False, log: Callable[[str], None] = print,
                progress: bool = True, executor: str | None = None) -> PredictResult:
    t0 = time.perf_counter()
    cache = open_split(cfg, split)
    params = stage_params(cfg, split)
    name = stage_name(split)
    rpath = report_path(cfg, split)
    if not force and judge(cfg, name, params, rpath.is_file()).state == "up-to-date":
        return PredictResult(up_to_date=True, report_json=rpath, predictions_dir=pred_dir_of(cfg, split))
    device = resolve_device(cfg.predict.device)
    models = load_models(cfg, device)
    fp = fingerprint(params)
    udir = cfg.run_dir / "stages" / f"predict_{split}_units"
    pdir = pred_dir_of(cfg, split)
    hashes = [s["hash"] for s in cache.manifest["shards"]]
    units: dict[int, dict] = {}
    for si, h in enumerate(hashes):
        u = None if force else read_json(udir / f"{h}.json")
        if u and u.get("fingerprint") == fp:
            units[si] = u
    todo = [si for si in range(len(hashes)) if si not in units]
    if todo:
        from tqdm import tqdm
        n_todo = sum(1 for m in cache.items if m.shard in set(todo))
        bar = tqdm(total=n_todo, unit="img", desc=f"predict {split}",
                   disable=not (progress and sys.stderr.isatty()), file=sys.stderr)
        scheduler = executor if executor is not None else cfg.dask.scheduler
        if scheduler:
            from .distributed import run_predict_shards
            results = run_predict_shards(cfg, cache, todo, pdir, scheduler)
        else:
            predictor = Predictor(models, device, cfg.predict.threshold)
            results = ((si, predict_shard(cache, si, predictor, pdir, cfg.predict.batch_size))
                       for si in todo)
        for si, unit in results:
            unit["fingerprint"] = fp
            atomic_write_json(udir / f"{hashes[si]}.json", unit)
            units[si] = unit
            bar.update(len(unit["items"]))
        bar.close()
    rows = [r for si in range(len(hashes)) for r in units[si]["items"]]
    report = build_report(cfg, split, rows)
    atomic_write_json(rpath, report)
    _write_human_reports(cfg, split, report, rows, cache)
    save_record(cfg, name, params)
    res = PredictResult(n_images=len(rows), seconds=time.perf_counter() - t0, predictions_dir=pdir,
                        report_json=rpath)
    res.headline = headline(report)
    return res


def pred_dir_of(cfg: Config, split: str) -> Path:
    return cfg.run_dir / "predictions" / split


def build_report(cfg: Config, split: str, rows: list[dict]) -> dict:
    if not rows:
        raise ValueError(f"split '{split}' has no usable images to evaluate")
    variants = {}
    for v in VARIANTS:
        stats = [ImageStats.from_dict(r["stats"][v]) for r in rows]
        variants[v] = summarize(stats)
    return {"split": split, "n_images": len(rows),
            "backbone": {"name": cfg.backbone.name, "weights": cfg.backbone.weights},
            "run": cfg.run.name, "variants": variants}


def headline(report: dict) -> list[str]:
    out = []
    for v in VARIANTS:
        m = report["variants"][v]["overall"]
        out.append(f"{v:<16} mIoU {m['miou']:.3f}  J {m['j_mean']:.3f}  F {m['boundary_f']:.3f}")
    return out


def _write_human_reports(cfg: Config, split: str, report: dict, rows: list[dict],
                         cache: FeatureCache) -> None:
    from .report import Thumb, write_reports
    per_image = [{"category": r["category"], "stem": r["stem"],
                  "j": {v: r["stats"][v]["j"] for v in VARIANTS},
                  "f": {v: r["stats"][v]["f"] for v in VARIANTS}} for r in rows]
    k = cfg.predict.thumbnails
    ranked = sorted(rows, key=lambda r: (r["stats"]["pac"]["j"], r["category"], r["stem"]))
    worst = ranked[:k]
    best = [r for r in ranked[::-1] if r not in worst][:k]
    pdir = pred_dir_of(cfg, split)

    def thumb(r: dict) -> Thumb:
        item = cache.read(r["index"])
        pred = np.asarray(Image.open(pdir / r["category"] / f"{r['stem']}.png")) > 127
        s = r["stats"]["pac"]
        return Thumb(r["category"], r["stem"], s["j"], s["f"], item.image, item.mask, pred)

    history = []
    mfile = cfg.run_dir / "metrics.jsonl"
    if mfile.is_file():
        history = [json.loads(line) for line in mfile.read_text().splitlines() if line.strip()]
    write_reports(cfg.run_dir, split, report, per_image, [thumb(r) for r in best],
                  [thumb(r) for r in worst], history)
