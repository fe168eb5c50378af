"""Stage 2's training loop, in the way of detectron2's TrainerBase + hooks: one loop over the
phases (the linear head, then the PAC upsampler), each a list of epochs of batches, and the
hooks that act around it (progress, divergence, validation, history, checkpoint), so the
phases only say how one batch's gradients are computed.

Every epoch draws its randomness from (seed, phase, epoch) alone (`Phase.rng`), so a killed
run resumes from its last checkpoint and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import TrainingDiverged
from ..core.progress import Progress, plural
from ..metrics.masks import miou
from ..models.devices import CpuFanout
from .checkpoints import save_checkpoint


class Samples(Protocol):
    """What validation reads of a split (train_data.TrainData): its images' tensors."""

    def __len__(self) -> int: ...

    def full(self, k: int, /) -> tuple[torch.Tensor, ...]:
        """The k-th image's features, canvas image, mask and valid area."""
        ...


@dataclass
class Phase:
    """One training phase: what it trains and how one batch's gradients are computed."""

    key: str  # "linear" | "upsampler": its history rows and the checkpoint's "next"
    short: str  # "linear" | "PAC": its progress bar and its messages
    title: str  # "linear head" | "PAC upsampler"
    lr_key: str  # the config key to lower when it diverges
    total: int  # its configured number of epochs
    first: int  # the first epoch to train (a resumed run starts later)
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    # (indices of a batch, the epoch's rng) -> (summed loss, its weight), grads set
    grads: Callable[[np.ndarray, np.random.Generator], tuple[float, float]]
    rng: Callable[[int], np.random.Generator]  # the epoch's generator
    scheduler: Any = None  # stepped after each epoch
    begin_epoch: Callable[[int], None] = lambda epoch: None
    end: Callable[[], None] = lambda: None  # after the phase (the head frozen)
    per_epoch: bool = False  # each epoch's loss shown (the bar, a log line)

    @property
    def epochs(self) -> range:
        return range(self.first, self.total + 1)

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]


class Hook:
    """What acts around the loop; each method does nothing unless overridden."""

    def before_phase(self, phase: Phase, /) -> None:
        """Before the phase's first epoch."""

    def after_step(self, phase: Phase, epoch: int, loss: float, /) -> None:
        """After a batch (its mean loss)."""

    def after_epoch(self, phase: Phase, epoch: int, row: dict, /) -> None:
        """After an epoch whose history row is `row` (a hook may add to it)."""

    def after_phase(self, phase: Phase, /) -> None:
        """After the phase's last epoch."""

    def abort(self) -> None:
        """The training diverged: before the error is raised."""


def train_phases(
    phases: Sequence[Phase],
    n: int,
    batch_size: int,
    hooks: Sequence[Hook],
    diverged: Callable[[Phase, int, str], TrainingDiverged],
) -> None:
    """Train each phase over its epochs of batches of the `n` images (an epoch's order drawn
    from its rng); `diverged` makes the error of a non-finite loss or weight."""

    def fail(phase: Phase, epoch: int, what: str) -> TrainingDiverged:
        for h in hooks:
            h.abort()
        return diverged(phase, epoch, what)

    for phase in phases:
        for h in hooks:
            h.before_phase(phase)
        for epoch in phase.epochs:
            row = train_epoch(phase, epoch, n, batch_size, hooks, fail)
            for h in hooks:
                h.after_epoch(phase, epoch, row)
        for h in hooks:
            h.after_phase(phase)
        phase.end()


def train_epoch(
    phase: Phase,
    epoch: int,
    n: int,
    batch_size: int,
    hooks: Sequence[Hook],
    fail: Callable[[Phase, int, str], TrainingDiverged],
) -> dict:
    """One epoch of `phase` over the `n` images in its rng's order; its history row."""
    rng = phase.rng(epoch)
    phase.begin_epoch(epoch)
    order = rng.permutation(n)
    phase.module.train()
    total, weight_sum = 0.0, 0.0
    for b in range(0, n, batch_size):
        loss, weight = phase.grads(order[b : b + batch_size], rng)
        if not math.isfinite(loss):
            raise fail(phase, epoch, f"loss became {loss}")
        phase.optimizer.step()
        total += loss * weight
        weight_sum += weight
        for h in hooks:
            h.after_step(phase, epoch, loss * weight / weight)
    if phase.scheduler is not None:
        phase.scheduler.step()
    epoch_loss = total / max(weight_sum, 1e-12)
    if not (math.isfinite(epoch_loss) and finite(phase.params)):
        raise fail(phase, epoch, "weights became non-finite")
    return {"phase": phase.key, "epoch": epoch, "loss": epoch_loss}


def finite(params: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


# ----------------------------------------------------------------------------- the hooks


@dataclass
class ProgressHook(Hook):
    """A progress bar per phase, each epoch's loss (phases `per_epoch`) and a phase's summary."""

    n_batches: int
    history: list[dict]
    log: Callable[[str], None]
    enabled: bool
    bar: Progress | None = None
    t_phase: float = 0.0

    def before_phase(self, phase: Phase) -> None:
        self.t_phase = time.perf_counter()
        self.bar = Progress(
            len(phase.epochs) * self.n_batches,
            f"train-head {phase.short.lower()}",
            unit="batch",
            enabled=self.enabled,
        )

    def after_step(self, phase: Phase, epoch: int, loss: float) -> None:
        assert self.bar is not None
        if phase.per_epoch:
            self.bar.set_postfix(f"epoch {epoch}/{phase.total} loss {loss:.4f}")
        self.bar.update()

    def after_epoch(self, phase: Phase, epoch: int, row: dict) -> None:
        if phase.per_epoch:
            self.log(
                f"train-head: {phase.short.lower()} epoch {epoch}/{phase.total} loss "
                f"{row['loss']:.4f}"
                + (f" val mIoU {row['val_miou']:.3f}" if "val_miou" in row else "")
            )

    def after_phase(self, phase: Phase) -> None:
        self.abort()
        if len(phase.epochs):
            self.log(
                f"train-head: {phase.title}, {plural(len(phase.epochs), 'epoch')} in "
                f"{time.perf_counter() - self.t_phase:.1f} s, "
                f"loss {self.history[-1]['loss']:.4f}"
            )

    def abort(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class ValidationHook(Hook):
    """The validation split's mIoU after each epoch of the phase `key` (the PAC upsampler)."""

    key: str
    head: torch.nn.Module
    up: torch.nn.Module
    val: Samples
    device: torch.device
    fanout: CpuFanout | None

    def after_epoch(self, phase: Phase, _epoch: int, row: dict) -> None:
        if phase.key == self.key:
            row.update(validate(self.head, self.up, self.val, self.device, self.fanout))


@dataclass
class HistoryHook(Hook):
    """Each epoch's row appended to the history (what metrics.jsonl holds)."""

    history: list[dict]

    def after_epoch(self, _phase: Phase, _epoch: int, row: dict) -> None:
        self.history.append(row)


@dataclass
class CheckpointHook(Hook):
    """A checkpoint after each epoch (with the next epoch of every phase), and the history
    written with it."""

    mdir: Path
    state: Callable[[], dict]  # the fingerprint, models', optimisers' and history's state
    phases: Sequence[Phase]
    write_history: Callable[[], None]

    def after_epoch(self, phase: Phase, epoch: int, _row: dict) -> None:
        k = [p.key for p in self.phases].index(phase.key)
        nxt = {
            p.key: p.total + 1 if i < k else epoch + 1 if i == k else 1
            for i, p in enumerate(self.phases)
        }
        save_checkpoint(self.mdir, {**self.state(), "next": nxt})
        self.write_history()


# ----------------------------------------------------------------------------- gradients


def summed_grads(
    params: Sequence[torch.Tensor],
    loss_of: Callable[[int], torch.Tensor],
    n: int,
    fanout: CpuFanout | None,
) -> list[float]:
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
def validate(
    head: torch.nn.Module,
    up: torch.nn.Module,
    val: Samples,
    device: torch.device,
    fanout: CpuFanout | None,
) -> dict:
    up.eval()
    conf_lin = np.zeros(4, np.int64)
    conf_pac = np.zeros(4, np.int64)

    def one(sample: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            feats, image, mask, valid = (t.to(device) for t in sample)
            base = head(feats)
            lin = confusion(
                F.interpolate(base, size=mask.shape[-2:], mode="bilinear", align_corners=False),
                mask,
                valid,
            )
            return lin, confusion(up(feats, image, base), mask, valid)

    step = 8
    for k in range(0, len(val), step):
        samples = [val.full(i) for i in range(k, min(k + step, len(val)))]  # read in this thread

        def nth(j: int, samples: list = samples) -> tuple[np.ndarray, np.ndarray]:
            return one(samples[j])

        parts = fanout.map(nth, len(samples)) if fanout is not None else [one(x) for x in samples]
        for lin, pac in parts:
            conf_lin += lin
            conf_pac += pac
    up.train()
    return {
        "val_miou": miou(*map(int, conf_pac)),
        "val_miou_linear_bilinear": miou(*map(int, conf_lin)),
    }


def confusion(logits: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    pred = (logits > 0).float()
    v = valid > 0
    tp = ((pred == 1) & (mask == 1) & v).sum().item()
    fp = ((pred == 1) & (mask == 0) & v).sum().item()
    fn = ((pred == 0) & (mask == 1) & v).sum().item()
    tn = ((pred == 0) & (mask == 0) & v).sum().item()
    return np.array([tp, fp, fn, tn], np.int64)
