"""Stage 2: train the linear head and the PAC upsampler from the feature cache alone.

Phase 1 fits the linear head (1x1 conv) on patch-level soft targets; phase 2 fits the PAC
upsampler on full-resolution masks (random crops aligned to the patch grid). A checkpoint is
written atomically after every epoch; every epoch draws its randomness from (seed, phase,
epoch) alone, so a killed run resumes from its last checkpoint and ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import runconfig
from ..core.config import Config, copy_config
from ..core.errors import DataError, TrainingDiverged
from ..core.fsutil import atomic_write_bytes
from ..core.hints import command
from ..core.layout import RunLayout
from ..models.backbones import get_spec
from ..models.devices import CpuFanout, config_keys, resolve_device
from ..models.heads import LinearHead, PacUpsampler, UpsamplerSpec, models_fingerprint, save_models
from ..report import save_training_curves
from ..store import FeatureStore, split_fingerprint
from .base import Context, Lock, Recording, StageState, StageStatus, judge, load_record, reproduce
from .checkpoints import CHECKPOINT, load_checkpoint, remove_checkpoints
from .train_data import TrainData, boundary_band, random_crop
from .train_loop import (
    CheckpointHook,
    HistoryHook,
    Hook,
    Phase,
    ProgressHook,
    ValidationHook,
    summed_grads,
    train_phases,
)

STAGE = "train-head"


# ----------------------------------------------------------------------------- the contract


def stage_state(cfg: Config, deps: dict[str, str | None] | None = None) -> StageState:
    """Stage 2 depends on the stored splits it reads (content fingerprints) and on its
    training settings; its output is the model set, intact or not."""
    keys = config_keys(cfg)
    if deps is None:
        deps = {
            f"features[{s}]": split_fingerprint(cfg.paths.cache, keys.feature, keys.data, s)
            for s in keys.train.splits
        }
    _, why = models_fingerprint(RunLayout.of(cfg).models)
    return StageState(
        STAGE,
        deps,
        keys.train.params(),
        why,
        {f"features[{s}]": command("extract-features", "--split", s) for s in keys.train.splits},
    )


def recorded_training_params(cfg: Config, rec: dict | None) -> dict[str, Any]:
    """The training key's params of a recorded config without reading a path: a local
    weights file is identified by the content hash that the training record `rec` holds
    (the file is an input outside the run folder, like the cache)."""
    if cfg.backbone.weights in ("pretrained", "random"):
        return config_keys(cfg).train.params()
    params = config_keys(copy_config(cfg, backbone__weights="random")).train.params()
    held = rec.get("params", {}).get("backbone.weights") if rec is not None else None
    params["backbone.weights"] = (
        held
        if isinstance(held, str) and held.startswith("sha256:")
        else f"file {cfg.backbone.weights}"
    )
    return params


class TrainStage:
    """Stage 2 as data: deps the stored splits' fingerprints, params the training settings,
    outs the model set (files checked against the card's checksums)."""

    in_run = True

    def name(self, _split: str) -> str:
        return STAGE

    def state(self, ctx: Context) -> StageState:
        if not ctx.recorded:
            return stage_state(ctx.cfg)
        rec = load_record(ctx.cfg.run_dir, STAGE)
        deps = dict(rec["deps"]) if rec is not None else {}
        _, why = models_fingerprint(RunLayout.of(ctx.cfg).models)
        return StageState(STAGE, deps, recorded_training_params(ctx.cfg, rec), why)

    def status(self, ctx: Context) -> StageStatus:
        return judge(ctx.cfg.run_dir, self.state(ctx))

    def run(self, ctx: Context, force: bool) -> TrainResult:
        return run_train(ctx.cfg, force=force)


def status(cfg: Config) -> StageStatus:
    return TrainStage().status(Context.of(cfg))


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


@dataclass
class Training(Recording[TrainResult]):
    """One run of stage 2, as the run template (`base.reproduce`) runs it."""

    cfg: Config
    stores: dict[str, FeatureStore]
    log: Callable[[str], None]
    progress: bool
    t0: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.label, self.run_dir = STAGE, self.cfg.run_dir
        self.lock = Lock(
            RunLayout.of(self.cfg).lock("models"), f"the models of run '{self.cfg.run.name}'"
        )

    def state(self) -> StageState:
        return stage_state(
            self.cfg, {f"features[{s}]": st.fingerprint for s, st in self.stores.items()}
        )

    def current(self, _state: StageState) -> TrainResult:
        if not runconfig.record_path(self.run_dir).exists():  # trained before records
            runconfig.write_record(self.cfg)
        return TrainResult(up_to_date=True, model_dir=RunLayout.of(self.cfg).models)

    def compute(
        self, state: StageState, force: bool
    ) -> tuple[TrainResult, StageState, dict[str, Any]]:
        cfg = self.cfg
        val_store = self.stores.get(cfg.data.val_split) if cfg.data.val_split else None
        history = _train(
            cfg, state, self.stores[cfg.data.train_split], val_store, force, self.log, self.progress
        )
        seconds = time.perf_counter() - self.t0
        return (
            TrainResult(seconds=seconds, model_dir=RunLayout.of(cfg).models, history=history),
            stage_state(cfg, state.deps),
            {"seconds": round(seconds, 1)},
        )

    def registered(self) -> list[Path]:
        return [used.split_dir for used in self.stores.values()]

    def finish(self) -> None:
        runconfig.write_record(self.cfg)  # <run>/config.toml: what `--run NAME` starts from
        remove_checkpoints(RunLayout.of(self.cfg).models)


def run_train(
    cfg: Config, force: bool = False, log: Callable[[str], None] = print, progress: bool = True
) -> TrainResult:
    """Stage 2 from the stored splits alone. Raises StoreError (naming the command to run)
    when a split is missing or damaged, LockError when another process trains this run."""
    t0 = time.perf_counter()
    keys = config_keys(cfg)
    stores = {
        s: FeatureStore.open(cfg.paths.cache, keys.feature, keys.data, s) for s in keys.train.splits
    }
    return reproduce(Training(cfg, stores, log, progress, t0), force, log)


@dataclass
class Models:
    """What stage 2 trains, on its device: the two heads, their optimisers, the schedule."""

    head: LinearHead
    up: PacUpsampler
    opt_head: torch.optim.Optimizer
    opt_up: torch.optim.Optimizer
    sched_up: torch.optim.lr_scheduler.LRScheduler

    def state(self, fp: str, history: list[dict]) -> dict:
        """A checkpoint's content (without its "next")."""
        return {
            "fingerprint": fp,
            "head": self.head.state_dict(),
            "opt_head": self.opt_head.state_dict(),
            "up": self.up.state_dict(),
            "opt_up": self.opt_up.state_dict(),
            "sched_up": self.sched_up.state_dict(),
            "history": history,
        }

    def load(self, ck: dict) -> None:
        self.head.load_state_dict(ck["head"])
        self.opt_head.load_state_dict(ck["opt_head"])
        self.up.load_state_dict(ck["up"])
        self.opt_up.load_state_dict(ck["opt_up"])
        self.sched_up.load_state_dict(ck["sched_up"])


def _models(cfg: Config, data: TrainData, patch: int, device: torch.device) -> Models:
    """The heads initialised from train.seed and normalised by the training features."""
    channels = data.features(0).shape[1]
    torch.manual_seed(cfg.train.seed)
    head = LinearHead(channels)
    up = PacUpsampler(UpsamplerSpec(channels, patch, **dict(cfg.upsampler.__dict__.items())))
    mean, std = data.feature_stats()
    head.norm.set_stats(mean, std)
    up.norm.set_stats(mean, std)
    head.to(device)
    up.to(device)
    opt_head = torch.optim.AdamW(
        head.parameters(), lr=cfg.train.linear_lr, weight_decay=cfg.train.weight_decay
    )
    opt_up = torch.optim.AdamW(
        up.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_up, T_max=max(1, cfg.train.epochs))
    return Models(head, up, opt_head, opt_up, sched)


def _train_data(
    cfg: Config, train_store: FeatureStore, val_store: FeatureStore | None, patch: int
) -> tuple[TrainData, TrainData | None]:
    data = TrainData(train_store, patch)
    if len(data) == 0:
        raise DataError(
            f"split '{cfg.data.train_split}' has no annotated image to train on "
            f"({len(train_store)} image(s), none with a mask)"
        )
    val = TrainData(val_store, patch) if val_store is not None else None
    return data, (val if val is not None and len(val) else None)


def _train(
    cfg: Config,
    state: StageState,
    train_store: FeatureStore,
    val_store: FeatureStore | None,
    force: bool,
    log: Callable[[str], None],
    progress: bool,
) -> list[dict]:
    """Train both phases (resuming from this training's checkpoint unless `force`), then
    save the models, the history and its curves."""
    fp = state.fingerprint
    device = resolve_device(cfg.train.device)
    mdir = RunLayout.of(cfg).models
    mdir.mkdir(parents=True, exist_ok=True)
    patch = get_spec(cfg.backbone.name).patch_size
    data, val = _train_data(cfg, train_store, val_store, patch)
    m = _models(cfg, data, patch, device)
    history: list[dict] = []
    start = {"linear": 1, "upsampler": 1}
    ck = None if force else load_checkpoint(mdir, fp, device, log)
    if ck is not None:
        m.load(ck)
        history, start = ck["history"], ck["next"]
        log(f"train-head: resuming from {mdir / CHECKPOINT} (next: {start})")
    # On CPU each image's forward and backward run in one thread with one intra-op thread,
    # images spread over run.threads threads, gradients summed in image order: the weights
    # do not depend on the thread count, and a busy machine slows training down in proportion
    # instead of stalling OpenMP's barriers (3.5x slower with 2 threads next to one busy process).
    fanout = CpuFanout() if device.type == "cpu" else None
    phases = _phases(cfg, m, data, patch, device, fanout, start)
    hooks: list[Hook] = [
        HistoryHook(history),
        CheckpointHook(
            mdir, lambda: m.state(fp, history), phases, lambda: _write_history(cfg, history)
        ),
    ]
    if val is not None:
        hooks.insert(0, ValidationHook("upsampler", m.head, m.up, val, device, fanout))
    hooks.append(ProgressHook(-(-len(data) // cfg.train.batch_size), history, log, progress))
    train_phases(
        phases,
        len(data),
        cfg.train.batch_size,
        hooks,
        lambda phase, epoch, what: _diverged(cfg, mdir, history, phase, epoch, what),
    )
    save_models(mdir, m.head, m.up, state.params, state.deps, patch)
    _write_history(cfg, history)
    save_training_curves(history, RunLayout.of(cfg).loss_curves)  # also shown by the reports
    return history


def _phases(
    cfg: Config,
    m: Models,
    data: TrainData,
    patch: int,
    device: torch.device,
    fanout: CpuFanout | None,
    start: dict,
) -> list[Phase]:
    """Phase 1, the linear head on patch targets; phase 2, the PAC upsampler on
    full-resolution masks (random crops), the head frozen."""
    seed = cfg.train.seed
    head_params = [p for p in m.head.parameters() if p.requires_grad]
    up_params = [p for p in m.up.parameters() if p.requires_grad]

    def linear_grads(idx: np.ndarray, _rng: np.random.Generator) -> tuple[float, float]:
        w_total = float(sum(data.targets[i][1].sum(dtype=np.float64) for i in idx))
        # read in this thread: the store's file handles are not shared between threads
        inputs = [(data.features(i), *data.targets[i]) for i in idx]

        def linear_loss(j: int) -> torch.Tensor:
            feats, target, weight = inputs[j]
            x = feats.flatten(2).squeeze(0).T.to(device)
            y = torch.from_numpy(target).flatten().to(device)
            w = torch.from_numpy(weight).flatten().to(device)
            logits = m.head(x[:, :, None, None]).flatten()
            bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
            return (bce * w).sum() / max(w_total, 1e-12)

        return sum(summed_grads(head_params, linear_loss, len(idx), fanout)), w_total

    def pac_grads(idx: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
        samples = [random_crop(data.full(i), patch, cfg.train.crop, rng) for i in idx]

        def pac_loss(j: int) -> torch.Tensor:
            feats, image, mask, valid = (t.to(device) for t in samples[j])
            logits = m.up(feats, image, m.head(feats))
            wmap = valid
            if cfg.train.boundary_weight > 0:
                wmap = valid * (1 + cfg.train.boundary_weight * boundary_band(mask))
            bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
            loss = (bce * wmap).sum() / valid.sum().clamp_min(1)
            return loss / len(samples)

        return sum(summed_grads(up_params, pac_loss, len(idx), fanout)), len(idx)

    def frozen() -> None:
        m.head.eval()
        m.head.requires_grad_(False)

    def pac_seed(epoch: int) -> None:
        torch.manual_seed(seed * 1_000_003 + epoch)

    return [
        Phase(
            "linear",
            "linear",
            "linear head",
            "train.linear_lr",
            cfg.train.linear_epochs,
            start["linear"],
            m.head,
            m.opt_head,
            linear_grads,
            lambda epoch: _epoch_rng(seed, 1, epoch),
            end=frozen,
        ),
        Phase(
            "upsampler",
            "PAC",
            "PAC upsampler",
            "train.lr",
            cfg.train.epochs,
            start["upsampler"],
            m.up,
            m.opt_up,
            pac_grads,
            lambda epoch: _epoch_rng(seed, 2, epoch),
            m.sched_up,
            pac_seed,
            per_epoch=True,
        ),
    ]


def _diverged(
    cfg: Config, mdir: Path, history: list[dict], phase: Phase, epoch: int, what: str
) -> TrainingDiverged:
    """The one-line error of a non-finite loss or weight: nothing of this epoch is
    recorded, the checkpoint of the last good epoch stays, no models are written."""
    done = history[-1] if history else None
    last = (
        f"the checkpoint after {'linear' if done['phase'] == 'linear' else 'PAC'} "
        f"epoch {done['epoch']} is kept in {mdir}"
        if done
        else "no checkpoint was written"
    )
    return TrainingDiverged(
        f"train-head: training diverged: the {phase.title}'s {what} in epoch "
        f"{epoch}/{phase.total}; lower {phase.lr_key} (now {cfg.get(phase.lr_key):g}) and run "
        f"again; {last}, no models were written"
    )


def _write_history(cfg: Config, history: list[dict]) -> None:
    """metrics.jsonl: one JSON object per epoch. Strict JSON (no NaN / Infinity): training
    stops before a non-finite row is recorded."""
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in history)
    atomic_write_bytes(RunLayout.of(cfg).history, text.encode())
