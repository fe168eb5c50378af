"""Stage 2: train the linear head and the PAC upsampler from the feature cache alone.

Phase 1 fits the linear head (1x1 conv) on patch-level soft targets; phase 2 fits the PAC
upsampler on full-resolution masks (random crops aligned to the patch grid). A checkpoint is
written atomically after every epoch; every epoch draws its randomness from (seed, phase,
epoch) alone, so a killed run resumes from its last checkpoint and ends with the same
weights as an uninterrupted one.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import runconfig
from ..core.config import Config, copy_config
from ..core.errors import DataError, StoreError, TrainingDiverged
from ..core.fsutil import atomic_write_bytes, sha256_bytes
from ..core.hints import command
from ..core.layout import RunLayout
from ..core.progress import Progress, plural
from ..data.dataset import canvas_valid, to_canvas
from ..inference import model_dir
from ..metrics.masks import miou
from ..models.backbones import get_spec
from ..models.devices import CpuFanout, resolve_device
from ..models.heads import LinearHead, PacUpsampler, UpsamplerSpec, models_fingerprint, save_models
from ..params import training_params
from ..report import save_training_curves
from ..store.feature_store import FeatureStore, split_fingerprint
from .base import Context, Lock, StageState, StageStatus, judge, load_record, reproduce

STAGE = "train-head"
# decoded training images kept in memory (JPEG decoding per crop is slow)
IMAGE_MEMO_BYTES = 4 << 30


# ----------------------------------------------------------------------------- the contract

def _splits(cfg: Config) -> list[str]:
    return [cfg.data.train_split] + ([cfg.data.val_split] if cfg.data.val_split else [])


def stage_state(cfg: Config, deps: dict[str, str | None] | None = None) -> StageState:
    """Stage 2 depends on the stored splits it reads (content fingerprints) and on its
    training settings; its output is the model set, intact or not."""
    if deps is None:
        deps = {f"features[{s}]": split_fingerprint(cfg, s) for s in _splits(cfg)}
    _, why = models_fingerprint(model_dir(cfg))
    return StageState(STAGE, deps, training_params(cfg), why,
                      {f"features[{s}]": command("extract-features", "--split", s)
                       for s in _splits(cfg)})


def recorded_training_params(cfg: Config, rec: dict | None) -> dict[str, Any]:
    """training_params of a recorded config without reading a path: a local weights file is
    identified by the content hash that the training record `rec` holds (the file is an
    input outside the run folder, like the cache)."""
    if cfg.backbone.weights in ("pretrained", "random"):
        return training_params(cfg)
    params = training_params(copy_config(cfg, backbone__weights="random"))
    held = rec.get("params", {}).get("backbone.weights") if rec is not None else None
    params["backbone.weights"] = (held if isinstance(held, str) and held.startswith("sha256:")
                                  else f"file {cfg.backbone.weights}")
    return params


class TrainStage:
    """Stage 2 as data: deps the stored splits' fingerprints, params the training settings,
    outs the model set (files checked against the card's checksums)."""
    in_run = True

    def name(self, split: str) -> str:
        return STAGE

    def state(self, ctx: Context) -> StageState:
        if not ctx.recorded:
            return stage_state(ctx.cfg)
        rec = load_record(ctx.cfg.run_dir, STAGE)
        deps = dict(rec["deps"]) if rec is not None else {}
        _, why = models_fingerprint(model_dir(ctx.cfg))
        return StageState(STAGE, deps, recorded_training_params(ctx.cfg, rec), why)

    def status(self, ctx: Context) -> StageStatus:
        return judge(ctx.cfg.run_dir, self.state(ctx))

    def run(self, ctx: Context, force: bool) -> TrainResult:
        return run_train(ctx.cfg, force=force)


def status(cfg: Config) -> StageStatus:
    return TrainStage().status(Context.of(cfg))


# ----------------------------------------------------------------------------- targets

def patch_targets(mask: np.ndarray, valid: np.ndarray,
                  patch: int) -> tuple[np.ndarray, np.ndarray]:
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
    """Per-image training tensors of the annotated images of a stored split, read lazily
    (decoded images are kept in memory up to IMAGE_MEMO_BYTES)."""

    def __init__(self, store: FeatureStore, patch: int):
        self.store = store
        self.patch = patch
        self.indices = store.annotated()
        self.targets: list[tuple[np.ndarray, np.ndarray]] = []
        for i in self.indices:
            meta = store.items[i]
            mask = to_canvas(self._mask(i), meta.box)
            self.targets.append(patch_targets(mask, canvas_valid(meta.box, meta.orig_size), patch))
        self._images: dict[int, torch.Tensor] = {}
        self._image_bytes = 0

    def __len__(self) -> int:
        return len(self.indices)

    def _mask(self, i: int) -> np.ndarray:
        """The annotation of stored item i, one of `indices`."""
        mask = self.store.mask(i)
        if mask is None:  # annotated() lists it: the store changed under us
            raise StoreError(f"{self.store.split_dir}: item {i} has lost its annotation; "
                             "rerun extract-features")
        return mask

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std over all patches of all images (float64 sums)."""
        n, s1, s2 = 0, 0.0, 0.0
        for i in self.indices:
            raw = self.store.features(i)
            f = raw.astype(np.float64).reshape(-1, raw.shape[-1])
            n += f.shape[0]
            s1 = s1 + f.sum(0)
            s2 = s2 + (f * f).sum(0)
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
        return torch.from_numpy(mean).float(), torch.from_numpy(std).float()

    def features(self, k: int) -> torch.Tensor:
        """(1, C, h, w) float32 of the k-th training image."""
        feats = self.store.features(self.indices[k]).astype(np.float32)
        return torch.from_numpy(feats).permute(2, 0, 1)[None]

    def _canvas_image(self, k: int) -> torch.Tensor:
        img = self._images.get(k)
        if img is None:
            i = self.indices[k]
            canvas = to_canvas(self.store.image(i), self.store.items[i].box)
            img = torch.from_numpy(np.array(canvas)).permute(2, 0, 1)[None]
            if self._image_bytes + img.numel() <= IMAGE_MEMO_BYTES:
                self._images[k] = img
                self._image_bytes += img.numel()
        return img

    def full(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """features (1,C,h,w), canvas image uint8 (1,3,Hc,Wc), mask and valid (1,1,Hc,Wc)
        float."""
        i = self.indices[k]
        meta = self.store.items[i]
        box = meta.box
        canvas_mask = np.ascontiguousarray(to_canvas(self._mask(i), box))
        mask = torch.from_numpy(canvas_mask)[None, None].float()
        valid = torch.from_numpy(canvas_valid(box, meta.orig_size))[None, None].float()
        return self.features(k), self._canvas_image(k), mask, valid


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
    ok: bool = True

    def lines(self) -> list[tuple[str, bool]]:
        """What the command reports (text, to stderr)."""
        if self.up_to_date:
            return [(f"{STAGE}: up-to-date", False)]
        return [(f"{STAGE}: trained in {self.seconds:.1f} s; models in {self.model_dir}", False)]


def _epoch_rng(seed: int, phase: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, phase, epoch])


CHECKPOINT = "checkpoint.pt"
# the one before: the last good state if the newest is damaged
CHECKPOINT_PREV = "checkpoint.prev.pt"


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _save_checkpoint(mdir: Path, obj: dict) -> None:
    """Rotate the newest checkpoint to CHECKPOINT_PREV, then write the new one and its
    checksum; a kill at any point leaves at least one intact checkpoint or none."""
    cur, prev = mdir / CHECKPOINT, mdir / CHECKPOINT_PREV
    if cur.is_file() and _checksum_path(cur).is_file():
        os.replace(cur, prev)
        os.replace(_checksum_path(cur), _checksum_path(prev))
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(cur, data)
    atomic_write_bytes(_checksum_path(cur), sha256_bytes(data).encode())


def _load_checkpoint(mdir: Path, fp: str, device, log: Callable[[str], None]) -> dict | None:
    """The newest intact checkpoint of this training (same fingerprint), read without
    unpickling; damaged ones are discarded with a note."""
    for name in (CHECKPOINT, CHECKPOINT_PREV):
        path = mdir / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        try:
            ok = _checksum_path(path).read_text().strip() == sha256_bytes(data)
        except FileNotFoundError:
            ok = False
        ck = None
        if ok:
            try:
                ck = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError):
                ck = None
        if not isinstance(ck, dict):
            log(f"train-head: note: {path} is damaged; discarded")
            path.unlink(missing_ok=True)
            _checksum_path(path).unlink(missing_ok=True)
            continue
        if ck.get("fingerprint") == fp:
            return ck
    return None


def _remove_checkpoints(mdir: Path) -> None:
    for name in (CHECKPOINT, CHECKPOINT_PREV):
        (mdir / name).unlink(missing_ok=True)
        _checksum_path(mdir / name).unlink(missing_ok=True)


def _confusion(logits: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    pred = (logits > 0).float()
    v = valid > 0
    tp = ((pred == 1) & (mask == 1) & v).sum().item()
    fp = ((pred == 1) & (mask == 0) & v).sum().item()
    fn = ((pred == 0) & (mask == 1) & v).sum().item()
    tn = ((pred == 0) & (mask == 0) & v).sum().item()
    return np.array([tp, fp, fn, tn], np.int64)


@dataclass
class Training:
    """One run of stage 2, as the run template (`base.reproduce`) runs it."""
    cfg: Config
    stores: dict[str, FeatureStore]
    log: Callable[[str], None]
    progress: bool
    t0: float = field(default_factory=time.perf_counter)
    label = STAGE

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def lock(self) -> Lock:
        return Lock(RunLayout.of(self.cfg).lock("models"),
                    f"the models of run '{self.cfg.run.name}'")

    def state(self) -> StageState:
        return stage_state(self.cfg, {f"features[{s}]": st.fingerprint
                                      for s, st in self.stores.items()})

    def current(self, state: StageState) -> TrainResult:
        if not runconfig.record_path(self.run_dir).exists():  # trained before records
            runconfig.write_record(self.cfg)
        return TrainResult(up_to_date=True, model_dir=model_dir(self.cfg))

    def compute(self, state: StageState, force: bool
                ) -> tuple[TrainResult, StageState, dict[str, Any]]:
        cfg = self.cfg
        val_store = self.stores.get(cfg.data.val_split) if cfg.data.val_split else None
        history = _train(cfg, state, self.stores[cfg.data.train_split], val_store, force,
                         self.log, self.progress)
        seconds = time.perf_counter() - self.t0
        return (TrainResult(seconds=seconds, model_dir=model_dir(cfg), history=history),
                stage_state(cfg, state.deps), {"seconds": round(seconds, 1)})

    def registered(self) -> list[Path]:
        return [used.split_dir for used in self.stores.values()]

    def finish(self) -> None:
        runconfig.write_record(self.cfg)  # <run>/config.toml: what `--run NAME` starts from
        _remove_checkpoints(model_dir(self.cfg))


def run_train(cfg: Config, force: bool = False, log: Callable[[str], None] = print,
              progress: bool = True) -> TrainResult:
    """Stage 2 from the stored splits alone. Raises StoreError (naming the command to run)
    when a split is missing or damaged, LockError when another process trains this run."""
    t0 = time.perf_counter()
    stores = {s: FeatureStore.open(cfg, s) for s in _splits(cfg)}
    return reproduce(Training(cfg, stores, log, progress, t0), force, log)


def _train(cfg: Config, state: StageState, train_store: FeatureStore,
           val_store: FeatureStore | None, force: bool, log: Callable[[str], None],
           progress: bool) -> list[dict]:
    fp = state.fingerprint
    device = resolve_device(cfg.train.device)
    mdir = model_dir(cfg)
    mdir.mkdir(parents=True, exist_ok=True)
    patch = get_spec(cfg.backbone.name).patch_size
    data = TrainData(train_store, patch)
    if len(data) == 0:
        raise DataError(f"split '{cfg.data.train_split}' has no annotated image to train on "
                        f"({len(train_store)} image(s), none with a mask)")
    val = TrainData(val_store, patch) if val_store is not None else None
    if val is not None and len(val) == 0:
        val = None
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
    opt_head = torch.optim.AdamW(head.parameters(), lr=cfg.train.linear_lr,
                                 weight_decay=cfg.train.weight_decay)
    opt_up = torch.optim.AdamW(up.parameters(), lr=cfg.train.lr,
                               weight_decay=cfg.train.weight_decay)
    sched_up = torch.optim.lr_scheduler.CosineAnnealingLR(opt_up, T_max=max(1, cfg.train.epochs))
    history: list[dict] = []
    start = {"linear": 1, "upsampler": 1}

    ck = None if force else _load_checkpoint(mdir, fp, device, log)
    if ck is not None:
        head.load_state_dict(ck["head"])
        opt_head.load_state_dict(ck["opt_head"])
        up.load_state_dict(ck["up"])
        opt_up.load_state_dict(ck["opt_up"])
        sched_up.load_state_dict(ck["sched_up"])
        history = ck["history"]
        start = ck["next"]
        log(f"train-head: resuming from {mdir / CHECKPOINT} (next: {start})")

    def checkpoint(next_epoch: dict) -> None:
        _save_checkpoint(mdir, {"fingerprint": fp,
                                "head": head.state_dict(), "opt_head": opt_head.state_dict(),
                                "up": up.state_dict(), "opt_up": opt_up.state_dict(),
                                "sched_up": sched_up.state_dict(), "history": history,
                                "next": next_epoch})
        _write_history(cfg, history)

    bs = cfg.train.batch_size
    n = len(data)
    n_batches = -(-n // bs)
    # On CPU each image's forward and backward run in one thread with one intra-op thread,
    # images spread over run.threads threads, gradients summed in image order: the weights
    # do not depend on the thread count, and a busy machine slows training down in proportion
    # instead of stalling OpenMP's barriers (3.5x slower with 2 threads next to one busy process).
    fanout = CpuFanout() if device.type == "cpu" else None
    head_params = [p for p in head.parameters() if p.requires_grad]
    up_params = [p for p in up.parameters() if p.requires_grad]

    def diverged(phase: str, epoch: int, what: str, bar: Progress) -> TrainingDiverged:
        """The one-line error of a non-finite loss or weight: nothing of this epoch is
        recorded, the checkpoint of the last good epoch stays, no models are written."""
        bar.close()
        linear = phase == "linear"
        name, key = ("linear head", "train.linear_lr") if linear else ("PAC upsampler", "train.lr")
        total = cfg.train.linear_epochs if linear else cfg.train.epochs
        done = history[-1] if history else None
        last = (f"the checkpoint after {'linear' if done['phase'] == 'linear' else 'PAC'} "
                f"epoch {done['epoch']} is kept in {mdir}" if done else "no checkpoint was written")
        return TrainingDiverged(
            f"train-head: training diverged: the {name}'s {what} in epoch {epoch}/{total}; "
            f"lower {key} (now {cfg.get(key):g}) and run again; {last}, no models were written")

    def finite_weights(params: Sequence[torch.Tensor]) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in params)

    # ---- phase 1: the linear head on patch targets
    linear_epochs = range(start["linear"], cfg.train.linear_epochs + 1)
    t_phase = time.perf_counter()
    bar = Progress(len(linear_epochs) * n_batches, "train-head linear", unit="batch",
                   enabled=progress)
    for epoch in linear_epochs:
        rng = _epoch_rng(cfg.train.seed, 1, epoch)
        order = rng.permutation(n)
        head.train()
        total, weight_sum = 0.0, 0.0
        for b in range(0, n, bs):
            idx = order[b:b + bs]
            w_total = float(sum(data.targets[i][1].sum(dtype=np.float64) for i in idx))
            # read in this thread: the store's file handles are not shared between threads
            inputs = [(data.features(i), *data.targets[i]) for i in idx]

            def linear_loss(j: int, inputs=inputs, w_total=w_total) -> torch.Tensor:
                feats, target, weight = inputs[j]
                x = feats.flatten(2).squeeze(0).T.to(device)
                y = torch.from_numpy(target).flatten().to(device)
                w = torch.from_numpy(weight).flatten().to(device)
                logits = head(x[:, :, None, None]).flatten()
                bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
                return (bce * w).sum() / max(w_total, 1e-12)

            losses = _summed_grads(head_params, linear_loss, len(idx), fanout)
            if not math.isfinite(sum(losses)):
                raise diverged("linear", epoch, f"loss became {sum(losses)}", bar)
            opt_head.step()
            total += sum(losses) * w_total
            weight_sum += w_total
            bar.update()
        epoch_loss = total / max(weight_sum, 1e-12)
        row = {"phase": "linear", "epoch": epoch, "loss": epoch_loss}
        if not (math.isfinite(epoch_loss) and finite_weights(head_params)):
            raise diverged("linear", epoch, "weights became non-finite", bar)
        history.append(row)
        checkpoint({"linear": epoch + 1, "upsampler": 1})
    bar.close()
    if len(linear_epochs):
        log(f"train-head: linear head, {plural(len(linear_epochs), 'epoch')} in "
            f"{time.perf_counter() - t_phase:.1f} s, loss {history[-1]['loss']:.4f}")

    head.eval()
    head.requires_grad_(False)

    # ---- phase 2: the PAC upsampler on full-resolution masks
    pac_epochs = range(start["upsampler"], cfg.train.epochs + 1)
    t_phase = time.perf_counter()
    bar = Progress(len(pac_epochs) * n_batches, "train-head pac", unit="batch", enabled=progress)
    for epoch in pac_epochs:
        rng = _epoch_rng(cfg.train.seed, 2, epoch)
        torch.manual_seed(cfg.train.seed * 1_000_003 + epoch)
        order = rng.permutation(n)
        up.train()
        total, count = 0.0, 0
        for b in range(0, n, bs):
            idx = order[b:b + bs]
            samples = [random_crop(data.full(i), patch, cfg.train.crop, rng) for i in idx]

            def pac_loss(j: int, samples=samples) -> torch.Tensor:
                feats, image, mask, valid = (t.to(device) for t in samples[j])
                logits = up(feats, image, head(feats))
                wmap = valid
                if cfg.train.boundary_weight > 0:
                    wmap = valid * (1 + cfg.train.boundary_weight * boundary_band(mask))
                bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
                loss = (bce * wmap).sum() / valid.sum().clamp_min(1)
                return loss / len(samples)

            losses = _summed_grads(up_params, pac_loss, len(idx), fanout)
            if not math.isfinite(sum(losses)):
                raise diverged("upsampler", epoch, f"loss became {sum(losses)}", bar)
            opt_up.step()
            batch_loss = sum(losses) * len(idx)
            total += batch_loss
            count += len(idx)
            bar.set_postfix(f"epoch {epoch}/{cfg.train.epochs} loss {batch_loss / len(idx):.4f}")
            bar.update()
        sched_up.step()
        epoch_loss = total / max(count, 1)
        row = {"phase": "upsampler", "epoch": epoch, "loss": epoch_loss}
        if not (math.isfinite(epoch_loss) and finite_weights(up_params)):
            raise diverged("upsampler", epoch, "weights became non-finite", bar)
        if val is not None:
            row.update(_validate(head, up, val, device, fanout))
        history.append(row)
        checkpoint({"linear": cfg.train.linear_epochs + 1, "upsampler": epoch + 1})
        log(f"train-head: pac epoch {epoch}/{cfg.train.epochs} loss {row['loss']:.4f}"
            + (f" val mIoU {row['val_miou']:.3f}" if "val_miou" in row else ""))
    bar.close()
    if len(pac_epochs):
        log(f"train-head: PAC upsampler, {plural(len(pac_epochs), 'epoch')} in "
            f"{time.perf_counter() - t_phase:.1f} s, loss {history[-1]['loss']:.4f}")

    save_models(mdir, head, up, state.params, state.deps, patch)
    _write_history(cfg, history)
    save_training_curves(history, RunLayout.of(cfg).loss_curves)  # also shown by the reports
    return history


def _summed_grads(params: Sequence[torch.Tensor], loss_of: Callable[[int], torch.Tensor], n: int,
                  fanout: CpuFanout | None) -> list[float]:
    """Set each parameter's .grad to the sum over j < n of the gradient of loss_of(j),
    each computed alone (on CPU: in parallel, one thread per image) and summed in index
    order, so the result does not depend on the thread count. Returns the losses."""
    def one(j: int) -> tuple[float, tuple]:
        loss = loss_of(j)
        return loss.item(), torch.autograd.grad(loss, params, allow_unused=True)

    results = fanout.map(one, n) if fanout is not None else [one(j) for j in range(n)]
    for k, p in enumerate(params):
        total = None
        for _, grads in results:
            if grads[k] is not None:
                total = grads[k] if total is None else total + grads[k]
        p.grad = total
    return [loss for loss, _ in results]


@torch.no_grad()
def _validate(head, up, val: TrainData, device, fanout: CpuFanout | None) -> dict:
    up.eval()
    conf_lin = np.zeros(4, np.int64)
    conf_pac = np.zeros(4, np.int64)

    def one(sample) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            feats, image, mask, valid = (t.to(device) for t in sample)
            base = head(feats)
            lin = _confusion(F.interpolate(base, size=mask.shape[-2:], mode="bilinear",
                                           align_corners=False), mask, valid)
            return lin, _confusion(up(feats, image, base), mask, valid)

    step = 8
    for k in range(0, len(val), step):
        samples = [val.full(i) for i in range(k, min(k + step, len(val)))]  # read in this thread

        def nth(j: int, samples: list = samples) -> tuple[np.ndarray, np.ndarray]:
            return one(samples[j])
        parts = (fanout.map(nth, len(samples)) if fanout is not None
                 else [one(x) for x in samples])
        for lin, pac in parts:
            conf_lin += lin
            conf_pac += pac
    up.train()
    return {"val_miou": miou(*map(int, conf_pac)),
            "val_miou_linear_bilinear": miou(*map(int, conf_lin))}


def _write_history(cfg: Config, history: list[dict]) -> None:
    """metrics.jsonl: one JSON object per epoch. Strict JSON (no NaN / Infinity): training
    stops before a non-finite row is recorded."""
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in history)
    atomic_write_bytes(RunLayout.of(cfg).history, text.encode())
