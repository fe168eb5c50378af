"""Stage 2: train the linear head and the PAC upsampler from the feature cache alone.

Phase 1 fits the linear head (1x1 conv) on patch-level soft targets; phase 2 fits the PAC
upsampler on full-resolution masks (random crops aligned to the patch grid). A checkpoint is
written atomically after every epoch; every epoch draws its randomness from (seed, phase,
epoch) alone, so a killed run resumes from its last checkpoint and ends with the same
weights as an uninterrupted one.

This module is the stage's contract and entry point and loads no torch when imported (so
`status` does not): the computation lives in train_compute, imported when training runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import runconfig
from ..core.config import Config, copy_config
from ..core.hints import command
from ..core.layout import RunLayout
from ..data.holdout import holdout_of, validation_split
from ..models.card import models_fingerprint
from ..models.devices import config_keys
from ..store import FeatureStore, open_split, selected_fingerprint, stored_split
from .base import Context, Lock, Recording, StageState, StageStatus, judge, load_record, reproduce
from .train_settings import TrainSettings

if TYPE_CHECKING:
    from ..core.keys import Keys, TrainKey

STAGE = "train-head"


# ----------------------------------------------------------------------------- the contract


def _models_problem(models: Path) -> str:
    """Why the model set in `models` is not intact ("": it is)."""
    return models_fingerprint(models)[1]


def read_splits(key: TrainKey) -> list[str]:
    """The splits stage 2 reads: the training split, and the validation split (data.val_split,
    or the one data.val_cut cuts from the training split's store)."""
    val = validation_split(key.train_split, key.val_split, key.val_cut)
    return [key.train_split] + ([val] if val else [])


def stored_deps(keys: Keys, cache: str | Path) -> dict[str, str | None]:
    """The content fingerprints of the stored splits training reads (None: absent), each
    side of a data.val_cut cut its own."""
    holdout = holdout_of(keys.train.train_split, keys.train.val_cut)
    return {
        f"features[{s}]": selected_fingerprint(cache, keys.feature, keys.data, s, holdout)
        for s in read_splits(keys.train)
    }


def stage_state(key: TrainKey, models: Path, deps: dict[str, str | None]) -> StageState:
    """Stage 2 depends on the stored splits it reads (content fingerprints `deps`) and on
    its training settings (`key`); its output is the model set in `models`, intact or not."""
    holdout = holdout_of(key.train_split, key.val_cut)
    return StageState(
        STAGE,
        deps,
        key.params(),
        _models_problem(models),
        {
            f"features[{s}]": command("extract-features", "--split", stored_split(s, holdout))
            for s in read_splits(key)
        },
    )


def recorded_weights(weights: str, rec: dict | None) -> str:
    """backbone.weights as training params name a local weights file without reading it:
    the content hash the training record `rec` holds (the file is an input outside the run
    folder, like the cache), else "file <path>"."""
    held = rec.get("params", {}).get("backbone.weights") if rec is not None else None
    return held if isinstance(held, str) and held.startswith("sha256:") else f"file {weights}"


class TrainStage:
    """Stage 2 as data: deps the stored splits' fingerprints, params the training settings,
    outs the model set (files checked against the card's checksums)."""

    in_run = True

    def name(self, _split: str) -> str:
        return STAGE

    def state(self, ctx: Context) -> StageState:
        cfg = ctx.cfg
        models = RunLayout.of(cfg).models
        if not ctx.recorded:
            keys = config_keys(cfg)
            return stage_state(keys.train, models, stored_deps(keys, cfg.paths.cache))
        rec = load_record(cfg.run_dir, STAGE)
        deps = dict(rec["deps"]) if rec is not None else {}
        if cfg.backbone.weights in ("pretrained", "random"):
            params = config_keys(cfg).train.params()
        else:  # a recorded run's weights file is not read
            params = config_keys(copy_config(cfg, backbone__weights="random")).train.params()
            params["backbone.weights"] = recorded_weights(cfg.backbone.weights, rec)
        return StageState(STAGE, deps, params, _models_problem(models))

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


@dataclass
class Training(Recording[TrainResult]):
    """One run of stage 2, as the run template (`base.reproduce`) runs it."""

    settings: TrainSettings
    key: TrainKey
    stores: dict[str, FeatureStore]
    write_run_config: Callable[[], Path]  # <run>/config.toml: what `--run NAME` starts from
    log: Callable[[str], None]
    progress: bool
    t0: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        layout = self.settings.layout
        self.label, self.run_dir = STAGE, layout.root
        self.lock = Lock(layout.lock("models"), f"the models of run '{self.settings.run_name}'")

    def state(self) -> StageState:
        deps: dict[str, str | None] = {
            f"features[{s}]": st.fingerprint for s, st in self.stores.items()
        }
        return stage_state(self.key, self.settings.layout.models, deps)

    def current(self, _state: StageState) -> TrainResult:
        if not runconfig.record_path(self.run_dir).exists():  # trained before records
            self.write_run_config()
        return TrainResult(up_to_date=True, model_dir=self.settings.layout.models)

    def compute(
        self, state: StageState, force: bool
    ) -> tuple[TrainResult, StageState, dict[str, Any]]:
        from .train_compute import train

        s = self.settings
        val_store = self.stores.get(s.val_split) if s.val_split else None
        history = train(
            s, state, self.stores[s.train_split], val_store, force, self.log, self.progress
        )
        seconds = time.perf_counter() - self.t0
        return (
            TrainResult(seconds=seconds, model_dir=s.layout.models, history=history),
            stage_state(self.key, s.layout.models, state.deps),
            {"seconds": round(seconds, 1)},
        )

    def registered(self) -> list[Path]:
        return list(dict.fromkeys(used.split_dir for used in self.stores.values()))

    def finish(self) -> None:
        from .checkpoints import remove_checkpoints

        self.write_run_config()
        remove_checkpoints(self.settings.layout.models)


def run_train(
    cfg: Config, force: bool = False, log: Callable[[str], None] = print, progress: bool = True
) -> TrainResult:
    """Stage 2 from the stored splits alone. Raises StoreError (naming the command to run)
    when a split is missing or damaged, LockError when another process trains this run."""
    from ..models.devices import config_keys

    t0 = time.perf_counter()
    keys = config_keys(cfg)
    holdout = holdout_of(keys.train.train_split, keys.train.val_cut)
    stores = {
        s: open_split(cfg.paths.cache, keys.feature, keys.data, s, holdout)
        for s in read_splits(keys.train)
    }
    record = partial(runconfig.write_record, cfg)
    job = Training(TrainSettings.of(cfg), keys.train, stores, record, log, progress, t0)
    return reproduce(job, force, log)
