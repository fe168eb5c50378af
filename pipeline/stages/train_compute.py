"""Stage 2's computation (imported when it trains, so that judging the stage loads no torch):
the heads and their optimisers, the two phases over the loop of train_loop, their losses, and
the files training writes besides the checkpoints (the models, the history, its curves)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import DataError, TrainingDiverged
from ..core.fsutil import atomic_write_bytes
from ..models.backbones import get_spec
from ..models.devices import CpuFanout, resolve_device
from ..models.heads import LinearHead, PacUpsampler, UpsamplerSpec, save_models
from ..models.losses import RegionLoss
from ..report import save_training_curves
from ..store import FeatureStore
from .base import StageState
from .checkpoints import CHECKPOINT, load_checkpoint
from .train_data import Sample, TrainData, boundary_band, random_crop
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
from .train_settings import TrainSettings


def epoch_rng(seed: int, phase: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch of one phase (1: linear, 2: PAC): a resumed run draws the
    same numbers as an uninterrupted one."""
    return np.random.default_rng([seed, phase, epoch])


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

    def freeze_head(self) -> None:
        """After phase 1: the linear head is fixed while the upsampler trains."""
        self.head.eval()
        self.head.requires_grad_(False)


def _models(s: TrainSettings, data: TrainData, patch: int, device: torch.device) -> Models:
    """The heads initialised from train.seed and normalised by the training features."""
    channels = data.features(0).shape[1]
    torch.manual_seed(s.seed)
    head = LinearHead(channels)
    up = PacUpsampler(UpsamplerSpec(channels, patch, **dict(s.upsampler)))
    mean, std = data.feature_stats()
    head.norm.set_stats(mean, std)
    up.norm.set_stats(mean, std)
    head.to(device)
    up.to(device)
    opt_head = torch.optim.AdamW(head.parameters(), lr=s.linear_lr, weight_decay=s.weight_decay)
    opt_up = torch.optim.AdamW(up.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_up, T_max=max(1, s.epochs))
    return Models(head, up, opt_head, opt_up, sched)


def _train_data(
    s: TrainSettings, train_store: FeatureStore, val_store: FeatureStore | None, patch: int
) -> tuple[TrainData, TrainData | None]:
    data = TrainData(train_store, patch)
    if len(data) == 0:
        raise DataError(
            f"split '{s.train_split}' has no annotated image to train on "
            f"({len(train_store)} image(s), none with a mask)"
        )
    val = TrainData(val_store, patch) if val_store is not None else None
    return data, (val if val is not None and len(val) else None)


def train(
    s: TrainSettings,
    state: StageState,
    train_store: FeatureStore,
    val_store: FeatureStore | None,
    force: bool,
    log: Callable[[str], None],
    progress: bool,
) -> list[dict]:
    """Train both phases (resuming from this training's checkpoint unless `force`), then
    save the models, the history and its curves."""
    device = resolve_device(s.device)
    mdir = s.layout.models
    mdir.mkdir(parents=True, exist_ok=True)
    patch = get_spec(s.backbone).patch_size
    data, val = _train_data(s, train_store, val_store, patch)
    m = _models(s, data, patch, device)
    history, start = _resume(m, mdir, state.fingerprint if not force else None, device, log)
    # On CPU each image's forward and backward run in one thread with one intra-op thread,
    # images spread over run.threads threads, gradients summed in image order: the weights
    # do not depend on the thread count, and a busy machine slows training down in proportion
    # instead of stalling OpenMP's barriers (3.5x slower with 2 threads next to one busy process).
    fanout = CpuFanout() if device.type == "cpu" else None
    phases = _phases(s, Losses(s, m, data, patch, device, fanout), start)
    hooks: list[Hook] = [
        HistoryHook(history),
        CheckpointHook(
            mdir,
            lambda: m.state(state.fingerprint, history),
            phases,
            lambda: write_history(s.layout.history, history),
        ),
    ]
    if val is not None:
        hooks.insert(0, ValidationHook("upsampler", m.head, m.up, val, device, fanout))
    hooks.append(ProgressHook(-(-len(data) // s.batch_size), history, log, progress))
    train_phases(
        phases,
        len(data),
        s.batch_size,
        hooks,
        lambda phase, epoch, what: _diverged(s, history, phase, epoch, what),
    )
    save_models(mdir, m.head, m.up, state.params, state.deps, patch)
    write_history(s.layout.history, history)
    save_training_curves(history, s.layout.loss_curves)  # also shown by the reports
    return history


def _resume(
    m: Models, mdir: Path, fp: str | None, device: torch.device, log: Callable[[str], None]
) -> tuple[list[dict], dict]:
    """The history so far and each phase's next epoch: from the checkpoint of the training
    `fp` in `mdir`, loaded into `m`, when there is one (`fp` None: start afresh)."""
    ck = None if fp is None else load_checkpoint(mdir, fp, device, log)
    if ck is None:
        return [], {"linear": 1, "upsampler": 1}
    m.load(ck)
    log(f"train-head: resuming from {mdir / CHECKPOINT} (next: {ck['next']})")
    return ck["history"], ck["next"]


# ----------------------------------------------------------------------------- the phases


def _phases(s: TrainSettings, losses: Losses, start: dict) -> list[Phase]:
    """Phase 1, the linear head on patch targets; phase 2, the PAC upsampler on
    full-resolution masks (random crops), the head frozen."""
    m = losses.models

    def pac_seed(epoch: int) -> None:
        torch.manual_seed(s.seed * 1_000_003 + epoch)

    linear = Phase(
        "linear",
        "linear",
        "linear head",
        "train.linear_lr",
        s.linear_epochs,
        start["linear"],
        m.head,
        m.opt_head,
        losses.linear_grads,
        lambda epoch: epoch_rng(s.seed, 1, epoch),
        end=m.freeze_head,
    )
    pac = Phase(
        "upsampler",
        "PAC",
        "PAC upsampler",
        "train.lr",
        s.epochs,
        start["upsampler"],
        m.up,
        m.opt_up,
        losses.pac_grads,
        lambda epoch: epoch_rng(s.seed, 2, epoch),
        m.sched_up,
        pac_seed,
        per_epoch=True,
    )
    return [linear, pac]


@dataclass
class Losses:
    """The two phases' losses and how one batch's gradients are summed from them (each
    image's loss alone, in image order: train_loop.summed_grads). The one place a loss term
    is added."""

    settings: TrainSettings
    models: Models
    data: TrainData
    patch: int
    device: torch.device
    fanout: CpuFanout | None
    # the trainable parameters of each head, taken before the linear head is frozen
    head_params: list[torch.Tensor] = field(init=False)
    up_params: list[torch.Tensor] = field(init=False)
    region: RegionLoss = field(init=False)  # train.region_loss x train.region_weight

    def __post_init__(self) -> None:
        self.region = RegionLoss(self.settings.region_loss, self.settings.region_weight)
        self.head_params = [p for p in self.models.head.parameters() if p.requires_grad]
        self.up_params = [p for p in self.models.up.parameters() if p.requires_grad]

    def linear_loss(
        self, inputs: tuple[torch.Tensor, np.ndarray, np.ndarray], w_total: float, n: int
    ) -> torch.Tensor:
        """One image's weighted BCE of the linear head on its soft patch targets (normalised
        by the batch's total patch weight `w_total`), plus a `1/n`-th of its region loss."""
        feats, target, weight = inputs
        x = feats.flatten(2).squeeze(0).T.to(self.device)
        y = torch.from_numpy(target).flatten().to(self.device)
        w = torch.from_numpy(weight).flatten().to(self.device)
        logits = self.models.head(x[:, :, None, None]).flatten()
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return (bce * w).sum() / max(w_total, 1e-12) + self.region(logits, y, w) / n

    def pac_loss(self, sample: Sample, n: int) -> torch.Tensor:
        """One crop's BCE of the PAC upsampler over its in-image pixels (the boundary band
        weighted up by train.boundary_weight) plus its region loss, a `1/n`-th of the
        batch's loss."""
        feats, image, mask, valid = (t.to(self.device) for t in sample)
        logits = self.models.up(feats, image, self.models.head(feats))
        wmap = valid
        if self.settings.boundary_weight > 0:
            wmap = valid * (1 + self.settings.boundary_weight * boundary_band(mask))
        bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
        loss = (bce * wmap).sum() / valid.sum().clamp_min(1) + self.region(logits, mask, valid)
        return loss / n

    def linear_grads(self, idx: np.ndarray, _rng: np.random.Generator) -> tuple[float, float]:
        data = self.data
        w_total = float(sum(data.targets[i][1].sum(dtype=np.float64) for i in idx))
        # read in this thread: the store's file handles are not shared between threads
        inputs = [(data.features(i), *data.targets[i]) for i in idx]
        losses = summed_grads(
            self.head_params,
            lambda j: self.linear_loss(inputs[j], w_total, len(idx)),
            len(idx),
            self.fanout,
        )
        return sum(losses), w_total

    def pac_grads(self, idx: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
        samples = [random_crop(self.data.full(i), self.patch, self.settings.crop, rng) for i in idx]
        losses = summed_grads(
            self.up_params, lambda j: self.pac_loss(samples[j], len(samples)), len(idx), self.fanout
        )
        return sum(losses), len(idx)


# ----------------------------------------------------------------------------- the endings


def _diverged(
    s: TrainSettings, history: list[dict], phase: Phase, epoch: int, what: str
) -> TrainingDiverged:
    """The one-line error of a non-finite loss or weight: nothing of this epoch is
    recorded, the checkpoint of the last good epoch stays, no models are written."""
    done = history[-1] if history else None
    last = (
        f"the checkpoint after {'linear' if done['phase'] == 'linear' else 'PAC'} "
        f"epoch {done['epoch']} is kept in {s.layout.models}"
        if done
        else "no checkpoint was written"
    )
    return TrainingDiverged(
        f"train-head: training diverged: the {phase.title}'s {what} in epoch "
        f"{epoch}/{phase.total}; lower {phase.lr_key} (now "
        f"{s.learning_rate(phase.lr_key):g}) and run again; {last}, no models were written"
    )


def write_history(path: Path, history: list[dict]) -> None:
    """metrics.jsonl at `path`: one JSON object per epoch. Strict JSON (no NaN / Infinity):
    training stops before a non-finite row is recorded."""
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in history)
    atomic_write_bytes(path, text.encode())
