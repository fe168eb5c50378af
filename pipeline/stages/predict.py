"""Stage 3: masks for a split from the feature store and the trained models (no backbone, no
images on disk), and the IoU report of the three variants (linear head upsampled nearest /
bilinear, PAC upsampler) over the annotated images.

The models must match the current training settings (else a one-line error naming
train-head); the stage is up to date while the models' and the split's content fingerprints
and its own settings are unchanged. Work is done per store shard: the shard's masks are
written, then a small JSON "unit" with its per-image statistics is written atomically. A
killed run resumes at the first shard without a current unit; the report is assembled from
the units at the end. A unit also holds each annotated image's confusion counts at the sweep
thresholds (metrics.sweep_thresholds), counted while the logits are at hand: the report's
threshold sweep comes from the units, so a resumed run or Dask workers give the same one. A
unit without them (written by an earlier version) is recomputed, shard by shard; its masks
come out byte-identical.

The config is read once, into `predict_settings.PredictSettings`, at the entry points here
(`run_predict`, `status`, `PredictStage`); the stage's state is in `predict_state`, the unit
of work in `predict_shards`, the Markdown / HTML reports in `predict_report`. The module
loads no torch when imported (`status` does not compute): the inference path is imported
when the stage computes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import ConfigError
from ..core.fsutil import atomic_write_json, read_json
from ..core.layout import RunLayout
from ..core.progress import Progress, plural
from ..core.variants import VARIANTS
from ..executors import execute, scheduler_of
from ..report import stage as report_stage
from ..report.stage import REPORT_FORMAT, headline, resolved_settings
from ..store import FeatureStore, open_split
from .base import Context, Lock, Recording, StageState, StageStatus, judge, load_record, reproduce
from .predict_report import write_human_reports
from .predict_settings import PredictSettings
from .predict_shards import check_mirrored, predict_shard, predict_task, seconds_per_image
from .predict_state import (
    chosen_thresholds,
    no_mirrored_features,
    outputs,
    outs_problems,
    stage_name,
    stage_state,
)

if TYPE_CHECKING:
    import torch

    from ..core.config import Config
    from ..inference import Predictor
    from ..models.heads import TrainedModels

__all__ = [
    "VARIANTS",
    "PredictResult",
    "PredictStage",
    "run_predict",
    "stage_name",
    "stage_state",
    "status",
]


class PredictStage:
    """Stage 3 as data: deps the models (when trained for this config) and the stored split,
    params the report's settings, outs the masks and reports with their sha256."""

    in_run = True

    def name(self, split: str) -> str:
        return stage_name(split)

    def state(self, ctx: Context) -> StageState:
        return self._state(PredictSettings.of(ctx.cfg), ctx)

    def status(self, ctx: Context) -> StageStatus:
        settings = PredictSettings.of(ctx.cfg)
        why = no_mirrored_features(settings.keys, ctx.split)
        if why:
            return StageStatus(stage_name(ctx.split), "stale", why)
        return judge(settings.run.root, self._state(settings, ctx))

    @staticmethod
    def _state(settings: PredictSettings, ctx: Context) -> StageState:
        rec = load_record(settings.run.root, stage_name(ctx.split)) if ctx.recorded else None
        return stage_state(
            settings, ctx.split, verify=ctx.verify, recorded=(rec or {}) if ctx.recorded else None
        )

    def run(self, ctx: Context, force: bool) -> PredictResult:
        return run_predict(ctx.cfg, ctx.split, force=force)


def status(cfg: Config, split: str, verify: bool = False) -> StageStatus:
    """Stage 3's status for `split` (PredictStage.status)."""
    return PredictStage().status(Context.of(cfg, split, verify))


# ----------------------------------------------------------------------------- the stage


@dataclass
class PredictResult:
    up_to_date: bool = False
    n_images: int = 0  # scored (annotated)
    n_predicted: int = 0
    seconds: float = 0.0
    predictions_dir: Path | None = None
    report_json: Path | None = None
    headline: list[str] = field(default_factory=list)
    split: str = ""
    ok: bool = True

    def lines(self) -> list[tuple[str, bool]]:
        """What the command reports (text, to stderr)."""
        if self.up_to_date:
            return [(f"predict [{self.split}]: up-to-date; report {self.report_json}", False)]
        return [
            (
                f"predict [{self.split}]: {plural(self.n_predicted, 'image')} in "
                f"{self.seconds:.1f} s "
                f"({self.n_images} annotated, scored); masks in {self.predictions_dir}",
                False,
            ),
            (f"report: {self.report_json} (also .md and .html)", False),
            *((f"  {line}", False) for line in self.headline),
        ]


@dataclass
class Prediction(Recording[PredictResult]):
    """One run of stage 3 for a split, as the run template (`base.reproduce`) runs it."""

    settings: PredictSettings
    split: str
    store: FeatureStore
    mirror: FeatureStore | None
    models: TrainedModels
    device: torch.device
    progress: bool
    executor: str | None
    t0: float

    def __post_init__(self) -> None:
        run = self.settings.run
        self.label, self.run_dir = f"predict [{self.split}]", run.root
        self.lock = Lock(
            run.lock(f"predict-{self.split}"), f"predict [{self.split}] of run '{run.name}'"
        )

    @property
    def mirror_fp(self) -> str | None:
        return self.mirror.fingerprint if self.mirror is not None else None

    def state(self) -> StageState:
        return stage_state(
            self.settings,
            self.split,
            self.models.fingerprint,
            self.store.fingerprint,
            self.mirror_fp,
        )

    def current(self, _state: StageState) -> PredictResult:
        return PredictResult(
            up_to_date=True,
            report_json=self.settings.run.report(self.split),
            predictions_dir=self.settings.run.predictions(self.split),
            split=self.split,
        )

    def compute(
        self, state: StageState, force: bool
    ) -> tuple[PredictResult, StageState, dict[str, Any]]:
        from ..inference import Predictor

        settings, split, store, run = self.settings, self.split, self.store, self.settings.run
        fp = state.fingerprint
        hashes = [s.hash for s in store.manifest.shards]
        sweep = settings.thresholds.sweep
        units = _current_units(run, split, hashes, fp, sweep, force)
        refine = settings.keys.predict.refine
        predictor = Predictor(self.models, self.device, settings.thresholds.values, refine)
        todo = [si for si in range(len(hashes)) if si not in units]
        if todo:
            self._predict_shards(todo, predictor, fp, sweep, units, hashes)
        rows = [r for si in range(len(hashes)) for r in units[si]["items"]]
        fingerprints = {"features": store.fingerprint, "models": self.models.fingerprint}
        if self.mirror_fp is not None:
            fingerprints["mirrored"] = self.mirror_fp
        resolved = resolved_settings(settings.keys.feature, str(self.device))
        seconds = seconds_per_image([units[si] for si in range(len(hashes))])
        chosen = settings.thresholds
        if chosen.auto:
            resolved["predict.threshold"] = chosen.describe()
        report = report_stage.build_report(
            settings.config,
            split,
            rows,
            fingerprints,
            VARIANTS,
            sweep,
            resolved,
            seconds=seconds,
            calibration=chosen.to_json(),
        )
        atomic_write_json(run.report(split), report)
        thumbnails = settings.keys.predict.thumbnails
        write_human_reports(run, thumbnails, report, rows, store, predictor, self.mirror)
        done = StageState(state.name, state.deps, state.params, "", state.upstream)
        res = PredictResult(
            n_images=report["n_images"],
            n_predicted=report["n_predicted"],
            predictions_dir=run.predictions(split),
            report_json=run.report(split),
            split=split,
            headline=headline(report),
        )
        return res, done, {"outs": outputs(run, split, rows), "report_format": REPORT_FORMAT}

    def _predict_shards(
        self,
        todo: list[int],
        predictor: Predictor,
        fp: str,
        sweep: Sequence[float],
        units: dict[int, dict],
        hashes: list[str],
    ) -> None:
        """Predict the shards `todo` (locally or on Dask), each unit written as it comes."""
        settings, store, mirror = self.settings, self.store, self.mirror
        pdir = settings.run.predictions(self.split)
        udir = settings.run.units(self.split)
        todo_set = set(todo)
        n_todo = sum(1 for m in store.items if m.shard in todo_set)
        bar = Progress(n_todo, f"predict {self.split}", enabled=self.progress)

        def remote() -> Iterator[tuple[str, tuple]]:
            on_worker = settings.portable()
            sdir = str(store.split_dir.resolve())
            mdir = str(mirror.split_dir.resolve()) if mirror is not None else None
            return (
                (
                    f"predict-{fp}-{si}",
                    (
                        on_worker,
                        sdir,
                        store.fingerprint,
                        si,
                        str(pdir.resolve()),
                        self.models.fingerprint,
                        mdir,
                        self.mirror_fp,
                    ),
                )
                for si in todo
            )

        def local() -> Iterator[tuple[int, dict]]:
            return (
                (si, predict_shard(store, si, predictor, pdir, settings.batch_size, mirror, sweep))
                for si in todo
            )

        where = scheduler_of(settings.scheduler, self.executor)
        for si, unit in execute(where, predict_task, remote, local):
            unit["fingerprint"] = fp
            atomic_write_json(udir / f"{hashes[si]}.json", unit)
            units[si] = unit
            bar.update(len(unit["items"]))
        bar.close()

    def registered(self) -> list[Path]:
        return [used.split_dir for used in (self.store, self.mirror) if used is not None]


def _current_units(
    run: RunLayout,
    split: str,
    hashes: list[str],
    fp: str,
    sweep: Sequence[float],
    force: bool,
) -> dict[int, dict]:
    """The split's units that are current (same fingerprint and sweep, masks intact), by
    shard; an earlier version's unit (no sweep counts) is computed again."""
    units: dict[int, dict] = {}
    udir = run.units(split)
    for si, h in enumerate(hashes):
        u = None if force else read_json(udir / f"{h}.json")
        if (
            isinstance(u, dict)
            and u.get("fingerprint") == fp
            and isinstance(u.get("items"), list)
            and u.get("sweep") == list(sweep)
        ):
            units[si] = u
    if not force and units:  # masks found missing or changed: their shards again
        bad = {rel for rel in (x.rsplit(" ", 1)[0] for x in outs_problems(run, split))}
        pfx = run.rel(run.predictions(split))
        for si in [
            si
            for si, u in units.items()
            if any(
                f"{pfx}/{r.get('category')}/{r.get('stem')}.png" in bad
                for r in u["items"]
                if isinstance(r, dict)
            )
        ]:
            del units[si]
    return units


def run_predict(
    cfg: Config,
    split: str,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    executor: str | None = None,
) -> PredictResult:
    """Stage 3 for a split: needs the stored split and the run's models, never the images."""
    from ..inference import checked_models
    from ..models.devices import resolve_device
    from ..runconfig import reproduces

    t0 = time.perf_counter()
    settings = PredictSettings.of(cfg)
    keys = settings.keys
    store = open_split(settings.cache, keys.feature, keys.data, split, settings.holdout)
    mirror = open_mirrored(settings, store)
    device = resolve_device(settings.device)
    as_trained = functools.partial(reproduces, cfg)
    with checked_models(settings.run, keys, settings.cache, device, as_trained) as models:
        settings = dataclasses.replace(
            settings, chosen=chosen_thresholds(settings, split, models.fingerprint)
        )
        job = Prediction(settings, split, store, mirror, models, device, progress, executor, t0)
        res = reproduce(job, force, log)
    if not res.up_to_date:
        res.seconds = time.perf_counter() - t0
    return res


def open_mirrored(settings: PredictSettings, store: FeatureStore) -> FeatureStore | None:
    """The mirrored features of `store`'s split when predict.tta = "flip" (checked to match
    it), else None. Stage 1 stores none for the training split: a usage error."""
    if not settings.flip:
        return None
    keys = settings.keys
    why = no_mirrored_features(keys, store.split)
    if why:
        raise ConfigError(why)
    mirror = FeatureStore.open(settings.cache, keys.feature.mirrored(), keys.data, store.split)
    check_mirrored(store, mirror)
    return mirror
