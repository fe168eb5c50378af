"""Stage 2: train the linear head and the PAC upsampler from the feature cache alone.

Phase 1 fits the linear head (1x1 conv) on patch-level soft targets; phase 2 fits the PAC
upsampler on full-resolution masks (random crops aligned to the patch grid). A checkpoint is
written atomically after every epoch; every epoch draws its randomness from (seed, phase,
epoch) alone, so a killed run resumes from its last checkpoint and ends with the same
weights as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .cache import CacheError, FeatureCache, atomic_write_bytes, atomic_write_json
from .config import Config
from .data import canvas_valid, to_canvas
from .extract import model_params, open_split, plan_split, resolve_device, split_params
from .models import LinearHead, PacUpsampler, UpsamplerSpec
from .stages import StageStatus, fingerprint, judge, save_record

STAGE = "train-head"
IGNORED_KEYS = {"train.device"}  # do not change the result


# ----------------------------------------------------------------------------- parameters

def stage_params(cfg: Config) -> dict:
    """Stage 1's parameters for the splits trained on, plus the training and model config."""
    mparams = model_params(cfg)
    params: dict = {}
    for split in filter(None, (cfg.data.train_split, cfg.data.val_split)):
        params.update(split_params(cfg, split, mparams, plan_split(cfg, split, mparams)))
    for section in ("train", "upsampler"):
        for k, v in getattr(cfg, section).__dict__.items():
            if f"{section}.{k}" not in IGNORED_KEYS:
                params[f"{section}.{k}"] = v
    params["data.train_split"] = cfg.data.train_split
    params["data.val_split"] = cfg.data.val_split
    return params


def model_dir(cfg: Config) -> Path:
    return cfg.run_dir / "models"


def status(cfg: Config) -> StageStatus:
    try:
        params = stage_params(cfg)
    except Exception as e:  # a dataset problem is reported by extract's line
        return StageStatus(STAGE, "stale", f"inputs unavailable: {str(e).splitlines()[0]}")
    d = model_dir(cfg)
    ok = (d / "linear_head.pt").is_file() and (d / "pac_upsampler.pt").is_file()
    return judge(cfg, STAGE, params, ok)


# ----------------------------------------------------------------------------- targets

def patch_targets(mask: np.ndarray, valid: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft patch targets from a canvas mask (Hc, Wc): each patch's target is the fraction of
    its in-image pixels that are object; its weight is the fraction of it inside the image
    (0 for a patch made only of padding)."""
    h, w = mask.shape[0] // patch, mask.shape[1] // patch
    m = (mask & valid)[:h * patch, :w * patch].reshape(h, patch, w, patch).sum(axis=(1, 3))
    v = valid[:h * patch, :w * patch].reshape(h, patch, w, patch).sum(axis=(1, 3))
    target = np.where(v > 0, m / np.maximum(v, 1), 0.0).astype(np.float32)
    return target, (v / float(patch * patch)).astype(np.float32)


# ----------------------------------------------------------------------------- data

class TrainData:
    """Per-image training tensors read lazily from the cache."""

    def __init__(self, cache: FeatureCache, patch: int):
        self.cache = cache
        self.patch = patch
        self.targets: list[tuple[np.ndarray, np.ndarray]] = []
        for i in range(len(cache)):
            meta = cache.items[i]
            mask = to_canvas(cache.mask(i), meta.box)
            self.targets.append(patch_targets(mask, canvas_valid(meta.box, meta.orig_size), patch))

    def __len__(self) -> int:
        return len(self.cache)

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std over all patches of all images (float64 sums)."""
        n, s1, s2 = 0, 0.0, 0.0
        for i in range(len(self)):
            raw = self.cache.features(i)
            f = raw.astype(np.float64).reshape(-1, raw.shape[-1])
            n += f.shape[0]
            s1 = s1 + f.sum(0)
            s2 = s2 + (f * f).sum(0)
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
        return torch.from_numpy(mean).float(), torch.from_numpy(std).float()

    def features(self, i: int) -> torch.Tensor:
        """(1, C, h, w) float32."""
        return torch.from_numpy(self.cache.features(i).astype(np.float32)).permute(2, 0, 1)[None]

    def full(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """features (1,C,h,w), canvas image uint8 (1,3,Hc,Wc), mask and valid (1,1,Hc,Wc) float."""
        item = self.cache.read(i)
        box = item.meta.box
        image = torch.from_numpy(np.ascontiguousarray(to_canvas(item.image, box))).permute(2, 0, 1)[None]
        mask = torch.from_numpy(np.ascontiguousarray(to_canvas(item.mask, box)))[None, None].float()
        valid = torch.from_numpy(canvas_valid(box, item.meta.orig_size))[None, None].float()
        feats = torch.from_numpy(item.features.astype(np.float32)).permute(2, 0, 1)[None]
        return feats, image, mask, valid


def random_crop(sample, patch: int, crop: int, rng: np.random.Generator):
    """A crop of `crop` pixels (rounded down to whole patches) at a random patch position."""
    feats, image, mask, valid = sample
    h, w = feats.shape[-2:]
    cp = max(1, crop // patch) if crop > 0 else max(h, w)
    ch, cw = min(cp, h), min(cp, w)
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    sl = (slice(y * patch, (y + ch) * patch), slice(x * patch, (x + cw) * patch))
    return (feats[..., y:y + ch, x:x + cw], image[..., sl[0], sl[1]],
            mask[..., sl[0], sl[1]], valid[..., sl[0], sl[1]])


def boundary_band(mask: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """1 where a pixel lies within `radius` of the mask boundary, else 0."""
    k = 2 * radius + 1
    dil = F.max_pool2d(mask, k, stride=1, padding=radius)
    ero = -F.max_pool2d(-mask, k, stride=1, padding=radius)
    return (dil - ero).clamp(0, 1)


# ----------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    up_to_date: bool = False
    seconds: float = 0.0
    model_dir: Path | None = None
    history: list | None = None


def _epoch_rng(seed: int, phase: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, phase, epoch])


def _save_torch(path: Path, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _confusion(logits: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    pred = (logits > 0).float()
    v = valid > 0
    tp = ((pred == 1) & (mask == 1) & v).sum().item()
    fp = ((pred == 1) & (mask == 0) & v).sum().item()
    fn = ((pred == 0) & (mask == 1) & v).sum().item()
    tn = ((pred == 0) & (mask == 0) & v).sum().item()
    return np.array([tp, fp, fn, tn], np.int64)


def _miou(c: np.ndarray) -> float:
    tp, fp, fn, tn = c
    fg = tp / (tp + fp + fn) if tp + fp + fn else 1.0
    bg = tn / (tn + fp + fn) if tn + fp + fn else 1.0
    return float((fg + bg) / 2)


def run_train(cfg: Config, force: bool = False, log: Callable[[str], None] = print,
              progress: bool = True) -> TrainResult:
    """Stage 2. Raises CacheError (naming the command to run) when the cache is missing."""
    t0 = time.perf_counter()
    train_cache = open_split(cfg, cfg.data.train_split)
    val_cache = open_split(cfg, cfg.data.val_split) if cfg.data.val_split else None
    if len(train_cache) == 0:
        raise CacheError(f"the cache of split '{cfg.data.train_split}' holds no usable image")
    params = stage_params(cfg)
    st = judge(cfg, STAGE, params, (model_dir(cfg) / "pac_upsampler.pt").is_file()
               and (model_dir(cfg) / "linear_head.pt").is_file())
    if st.state == "up-to-date" and not force:
        return TrainResult(up_to_date=True, model_dir=model_dir(cfg))
    fp = fingerprint(params)
    device = resolve_device(cfg.train.device)
    mdir = model_dir(cfg)
    mdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = mdir / "checkpoint.pt"

    from .backbones import get_spec
    patch = get_spec(cfg.backbone.name).patch_size
    data = TrainData(train_cache, patch)
    val = TrainData(val_cache, patch) if val_cache is not None and len(val_cache) else None
    channels = data.features(0).shape[1]

    torch.manual_seed(cfg.train.seed)
    head = LinearHead(channels)
    spec = UpsamplerSpec(channels, patch, **{k: v for k, v in cfg.upsampler.__dict__.items()})
    up = PacUpsampler(spec)
    mean, std = data.feature_stats()
    head.norm.set_stats(mean, std)
    up.norm.set_stats(mean, std)
    head.to(device)
    up.to(device)
    opt_head = torch.optim.AdamW(head.parameters(), lr=cfg.train.linear_lr, weight_decay=cfg.train.weight_decay)
    opt_up = torch.optim.AdamW(up.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched_up = torch.optim.lr_scheduler.CosineAnnealingLR(opt_up, T_max=max(1, cfg.train.epochs))
    history: list[dict] = []
    start = {"linear": 1, "upsampler": 1}

    if ckpt_path.is_file() and not force:
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck.get("fingerprint") == fp:
            head.load_state_dict(ck["head"])
            opt_head.load_state_dict(ck["opt_head"])
            up.load_state_dict(ck["up"])
            opt_up.load_state_dict(ck["opt_up"])
            sched_up.load_state_dict(ck["sched_up"])
            history = ck["history"]
            start = ck["next"]
            log(f"train-head: resuming from {ckpt_path} (next: {start})")

    def checkpoint(next_epoch: dict) -> None:
        _save_torch(ckpt_path, {"fingerprint": fp, "head": head.state_dict(), "opt_head": opt_head.state_dict(),
                                "up": up.state_dict(), "opt_up": opt_up.state_dict(),
                                "sched_up": sched_up.state_dict(), "history": history, "next": next_epoch})
        _write_history(cfg, history)

    from tqdm import tqdm
    bs = cfg.train.batch_size
    n = len(data)
    show = progress and sys.stderr.isatty()

    # ---- phase 1: the linear head on patch targets
    for epoch in range(start["linear"], cfg.train.linear_epochs + 1):
        rng = _epoch_rng(cfg.train.seed, 1, epoch)
        order = rng.permutation(n)
        head.train()
        total, weight_sum = 0.0, 0.0
        for b in tqdm(range(0, n, bs), desc=f"linear {epoch}/{cfg.train.linear_epochs}",
                      disable=not show, leave=False, file=sys.stderr):
            idx = order[b:b + bs]
            x = torch.cat([data.features(i).flatten(2).squeeze(0).T for i in idx]).to(device)
            y = torch.cat([torch.from_numpy(data.targets[i][0]).flatten() for i in idx]).to(device)
            w = torch.cat([torch.from_numpy(data.targets[i][1]).flatten() for i in idx]).to(device)
            logits = head(x[:, :, None, None]).flatten()
            loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum() / w.sum()
            opt_head.zero_grad(set_to_none=True)
            loss.backward()
            opt_head.step()
            total += loss.item() * w.sum().item()
            weight_sum += w.sum().item()
        row = {"phase": "linear", "epoch": epoch, "loss": total / max(weight_sum, 1e-12)}
        history.append(row)
        checkpoint({"linear": epoch + 1, "upsampler": 1})

    head.eval()
    head.requires_grad_(False)

    # ---- phase 2: the PAC upsampler on full-resolution masks
    for epoch in range(start["upsampler"], cfg.train.epochs + 1):
        rng = _epoch_rng(cfg.train.seed, 2, epoch)
        torch.manual_seed(cfg.train.seed * 1_000_003 + epoch)
        order = rng.permutation(n)
        up.train()
        total, count = 0.0, 0
        bar = tqdm(range(0, n, bs), desc=f"pac {epoch}/{cfg.train.epochs}", disable=not show,
                   leave=False, file=sys.stderr)
        for b in bar:
            opt_up.zero_grad(set_to_none=True)
            batch_loss = 0.0
            idx = order[b:b + bs]
            for i in idx:
                feats, image, mask, valid = (t.to(device) for t in random_crop(data.full(i), patch, cfg.train.crop, rng))
                base = head(feats)
                logits = up(feats, image, base)
                wmap = valid
                if cfg.train.boundary_weight > 0:
                    wmap = valid * (1 + cfg.train.boundary_weight * boundary_band(mask))
                loss = (F.binary_cross_entropy_with_logits(logits, mask, reduction="none") * wmap).sum() \
                    / valid.sum().clamp_min(1)
                (loss / len(idx)).backward()
                batch_loss += loss.item()
            opt_up.step()
            total += batch_loss
            count += len(idx)
            if show:
                bar.set_postfix(loss=f"{batch_loss / len(idx):.4f}")
        sched_up.step()
        row = {"phase": "upsampler", "epoch": epoch, "loss": total / max(count, 1)}
        if val is not None:
            row.update(_validate(head, up, val, device))
        history.append(row)
        checkpoint({"linear": cfg.train.linear_epochs + 1, "upsampler": epoch + 1})
        log(f"train-head: pac epoch {epoch}/{cfg.train.epochs} loss {row['loss']:.4f}"
            + (f" val mIoU {row['val_miou']:.3f}" if "val_miou" in row else ""))

    _save_torch(mdir / "linear_head.pt", {"in_channels": channels, "patch_size": patch,
                                          "state_dict": head.state_dict(), "fingerprint": fp})
    _save_torch(mdir / "pac_upsampler.pt", {"spec": spec.to_dict(), "state_dict": up.state_dict(),
                                            "fingerprint": fp})
    _write_history(cfg, history)
    with contextlib.suppress(Exception):
        from .report import plot_training_curves
        plot_training_curves(history, cfg.run_dir / "loss_curves.png")
    save_record(cfg, STAGE, params)
    ckpt_path.unlink(missing_ok=True)
    return TrainResult(seconds=time.perf_counter() - t0, model_dir=mdir, history=history)


@torch.no_grad()
def _validate(head, up, val: TrainData, device) -> dict:
    up.eval()
    conf_lin = np.zeros(4, np.int64)
    conf_pac = np.zeros(4, np.int64)
    for i in range(len(val)):
        feats, image, mask, valid = (t.to(device) for t in val.full(i))
        base = head(feats)
        conf_lin += _confusion(F.interpolate(base, size=mask.shape[-2:], mode="bilinear",
                                             align_corners=False), mask, valid)
        conf_pac += _confusion(up(feats, image, base), mask, valid)
    up.train()
    return {"val_miou": _miou(conf_pac), "val_miou_linear_bilinear": _miou(conf_lin)}


def _write_history(cfg: Config, history: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in history)
    atomic_write_bytes(cfg.run_dir / "metrics.jsonl", text.encode())


# ----------------------------------------------------------------------------- loading

@dataclass
class TrainedModels:
    head: LinearHead
    upsampler: PacUpsampler
    patch_size: int
    fingerprint: str


def load_models(cfg: Config, device: torch.device | str = "cpu") -> TrainedModels:
    """The trained models of this run; CacheError naming the command to run when absent."""
    d = model_dir(cfg)
    try:
        h = torch.load(d / "linear_head.pt", map_location=device, weights_only=False)
        u = torch.load(d / "pac_upsampler.pt", map_location=device, weights_only=False)
    except FileNotFoundError:
        raise CacheError(f"no trained models in {d}: run `python cli.py train-head` first") from None
    head = LinearHead(h["in_channels"])
    head.load_state_dict(h["state_dict"])
    up = PacUpsampler(UpsamplerSpec(**u["spec"]))
    up.load_state_dict(u["state_dict"])
    return TrainedModels(head.to(device).eval(), up.to(device).eval(), h["patch_size"], u["fingerprint"])
