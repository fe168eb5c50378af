"""Stage 2's settings below its entry point: the training keys of one config, built once
(`TrainSettings.of`) where `run_train` turns the config into what training takes. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.layout import RunLayout
from ..data.holdout import validation_split

if TYPE_CHECKING:
    from ..core.config import Config


@dataclass(frozen=True)
class TrainSettings:
    """What stage 2's training reads of the config: the run, the device, the schedule, the
    losses' weights and the upsampler's architecture."""

    layout: RunLayout  # the run folder: its models, history and curves
    run_name: str  # run.name
    backbone: str  # backbone.name (its patch size)
    device: str  # train.device ("auto" | "cpu" | "cuda[:N]")
    seed: int
    epochs: int  # the PAC upsampler's
    linear_epochs: int
    batch_size: int
    crop: int  # random crop side in pixels (0: whole images)
    lr: float  # the PAC upsampler's
    linear_lr: float
    weight_decay: float
    boundary_weight: float
    region_loss: str  # "none" | "dice" | "lovasz"
    region_weight: float
    upsampler: tuple[tuple[str, Any], ...]  # the [upsampler] keys: UpsamplerSpec's keywords
    train_split: str
    val_split: str  # "": no validation during training (data.val_split, or data.val_cut's)

    @classmethod
    def of(cls, cfg: Config) -> TrainSettings:
        t = cfg.train
        return cls(
            RunLayout.of(cfg),
            cfg.run.name,
            cfg.backbone.name,
            t.device,
            t.seed,
            t.epochs,
            t.linear_epochs,
            t.batch_size,
            t.crop,
            t.lr,
            t.linear_lr,
            t.weight_decay,
            t.boundary_weight,
            t.region_loss,
            t.region_weight,
            tuple(cfg.upsampler.__dict__.items()),
            cfg.data.train_split,
            validation_split(cfg.data.train_split, cfg.data.val_split, cfg.data.val_cut),
        )

    def learning_rate(self, key: str) -> float:
        """The configured value of the learning-rate key `key` ("train.lr" | "train.linear_lr")."""
        return {"train.lr": self.lr, "train.linear_lr": self.linear_lr}[key]
