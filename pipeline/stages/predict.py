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
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.config import Config
from ..core.errors import ConfigError, StoreError
from ..core.fingerprints import first_problems
from ..core.fsutil import (
    FileHasher,
    atomic_write_json,
    read_json,
)
from ..core.hints import command
from ..core.layout import RunLayout
from ..core.owned import RUN_LEGACY, is_marked
from ..core.progress import Progress, plural
from ..executors import execute, scheduler_of
from ..inference import (
    VARIANTS,
    Predictor,
    _models_mismatch,
    checked_models,
)
from ..metrics.masks import sweep_thresholds
from ..models.devices import config_keys, resolve_device
from ..models.heads import TrainedModels, models_fingerprint, read_card
from ..report import stage as report_stage
from ..report.stage import REPORT_FORMAT, headline
from ..runconfig import portable_config, reproduces
from ..store import FeatureStore, split_fingerprint
from .base import Context, Lock, Recording, StageState, StageStatus, judge, load_record, reproduce
from .predict_shards import check_mirrored, predict_shard, predict_task

if TYPE_CHECKING:
    import torch


def stage_name(split: str) -> str:
    return f"predict[{split}]"


def report_path(cfg: Config, split: str) -> Path:
    return RunLayout.of(cfg).report(split)


def stage_state(
    cfg: Config,
    split: str,
    models_fp: str | None = None,
    features_fp: str | None = None,
    mirrored_fp: str | None = None,
    verify: bool = False,
    recorded: dict | None = None,
) -> StageState:
    """Stage 3 depends on the trained models and the stored split (content fingerprints),
    with predict.tta = "flip" also on the split's mirrored features, and on its own
    settings; its outputs are the masks and the reports, checked against the sha256 the
    stage recorded (through a stat memo; `verify`: rehashed).

    The models are a dependency only when they were trained for the current config (their
    card's training settings and stored splits): other models are unusable, and the stage
    waits for train-head (predict cannot retrain). `recorded`: the stage's record, whose
    feature deps stand in for the store's (`runs`: nothing outside the run folder read)."""
    keys = config_keys(cfg)
    unusable: dict[str, str] = {}
    if models_fp is None:
        models_fp, _ = models_fingerprint(RunLayout.of(cfg).models)
        card, _ = read_card(RunLayout.of(cfg).models)
        if models_fp is not None and card is not None and recorded is None:
            why = _models_mismatch(cfg.paths.cache, keys, card["params"], card["deps"])
            if why:
                models_fp, unusable["models"] = None, f"trained with other settings ({why})"
    extract = command("extract-features", "--split", split)
    deps: dict[str, str | None] = {"models": models_fp}
    repair = {"models": command("train-head"), f"features[{split}]": extract}
    if recorded is not None:
        deps.update({k: v for k, v in recorded.get("deps", {}).items() if k != "models"})
    else:
        deps[f"features[{split}]"] = (
            features_fp
            if features_fp is not None
            else split_fingerprint(cfg.paths.cache, keys.feature, keys.data, split)
        )
        if cfg.predict.tta == "flip":
            deps[f"mirrored[{split}]"] = (
                mirrored_fp
                if mirrored_fp is not None
                else split_fingerprint(cfg.paths.cache, keys.feature.mirrored(), keys.data, split)
            )
            repair[f"mirrored[{split}]"] = extract
    params = keys.predict.params()
    if not report_path(cfg, split).is_file():
        outs = "report missing"
    else:
        outs = first_problems(
            outs_problems(cfg, split, verify, writable=recorded is None)
        ) or _report_outdated(cfg, split)
    return StageState(stage_name(split), deps, params, outs, repair, unusable)


def _report_outdated(cfg: Config, split: str) -> str:
    """Why the split's reports are of an earlier format than REPORT_FORMAT ("" when current
    or when there is no record): compute() then rebuilds them from the current units."""
    rec = load_record(cfg.run_dir, stage_name(split))
    if rec is None:
        return ""
    found = rec.get("report_format", 1)
    if isinstance(found, int) and not isinstance(found, bool) and found >= REPORT_FORMAT:
        return ""
    return (
        f"report of format {found!r}, now {REPORT_FORMAT} (adds the DAVIS aggregate): "
        "rebuilt from the stored per-image results"
    )


def outs_hasher(cfg: Config, verify: bool = False, writable: bool = True) -> FileHasher:
    """The stat memo of the run's output checksums (in its stages/ folder)."""
    return FileHasher(
        RunLayout.of(cfg).outs_hashes,
        verify=verify,
        writable=writable and is_marked(cfg.run_dir, RUN_LEGACY),
    )


def outs_problems(
    cfg: Config, split: str, verify: bool = False, writable: bool = True
) -> list[str]:
    """The split's recorded outputs (masks, reports; paths relative to the run folder) that
    are missing or differ from what predict wrote. Records of earlier versions list none.
    `writable`: the stat memo may be refreshed (not by `runs`)."""
    rec = load_record(cfg.run_dir, stage_name(split))
    outs = rec.get("outs") if rec is not None else None
    if not isinstance(outs, dict):
        return []
    hasher = outs_hasher(cfg, verify, writable)
    problems = []
    for rel, digest in outs.items():
        path = cfg.run_dir / rel
        try:
            if not isinstance(digest, str) or hasher.digest(path) != digest:
                problems.append(f"{rel} changed")
        except (OSError, ValueError):
            problems.append(f"{rel} missing")
    hasher.save()
    return problems


def _outputs(cfg: Config, split: str, rows: list[dict]) -> dict[str, str]:
    """{path relative to the run folder: sha256} of what predict wrote for `split` (the masks
    as the units recorded them); the stat memo is filled here, so that the next `status`
    reads none of these files."""
    hasher = outs_hasher(cfg)
    run = RunLayout.of(cfg)
    files = [
        run.report(split),
        run.report(split, ".md"),
        run.report(split, ".html"),
        *sorted(run.report_files(split).rglob("*")),
    ]
    outs = {run.rel(p): hasher.digest(p) for p in files if p.is_file()}
    pdir = run.rel(run.predictions(split))
    for r in rows:
        if isinstance(r.get("mask"), str):
            rel = f"{pdir}/{r['category']}/{r['stem']}.png"
            outs[rel] = r["mask"]
            with contextlib.suppress(OSError):  # checked (and reported) by status
                hasher.digest(run.root / rel)
    hasher.save()
    return outs


def _no_mirrored_features(cfg: Config, split: str) -> str:
    """Why predict.tta = "flip" cannot be applied to `split` ("" when it can)."""
    if cfg.predict.tta == "flip" and not config_keys(cfg).mirrored_splits([split]):
        return (
            f"predict.tta = flip: stage 1 stores no mirrored features for the training split "
            f"'{split}'; predict it with --set predict.tta=none"
        )
    return ""


class PredictStage:
    """Stage 3 as data: deps the models (when trained for this config) and the stored split,
    params the report's settings, outs the masks and reports with their sha256."""

    in_run = True

    def name(self, split: str) -> str:
        return stage_name(split)

    def state(self, ctx: Context) -> StageState:
        rec = load_record(ctx.cfg.run_dir, stage_name(ctx.split)) if ctx.recorded else None
        return stage_state(
            ctx.cfg, ctx.split, verify=ctx.verify, recorded=(rec or {}) if ctx.recorded else None
        )

    def status(self, ctx: Context) -> StageStatus:
        why = _no_mirrored_features(ctx.cfg, ctx.split)
        if why:
            return StageStatus(stage_name(ctx.split), "stale", why)
        return judge(ctx.cfg.run_dir, self.state(ctx))

    def run(self, ctx: Context, force: bool) -> PredictResult:
        return run_predict(ctx.cfg, ctx.split, force=force)


def status(cfg: Config, split: str, verify: bool = False) -> StageStatus:
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

    cfg: Config
    split: str
    store: FeatureStore
    mirror: FeatureStore | None
    models: TrainedModels
    device: torch.device
    progress: bool
    executor: str | None
    t0: float

    def __post_init__(self) -> None:
        self.label, self.run_dir = f"predict [{self.split}]", self.cfg.run_dir
        self.lock = Lock(
            RunLayout.of(self.cfg).lock(f"predict-{self.split}"),
            f"predict [{self.split}] of run '{self.cfg.run.name}'",
        )

    @property
    def mirror_fp(self) -> str | None:
        return self.mirror.fingerprint if self.mirror is not None else None

    def state(self) -> StageState:
        return stage_state(
            self.cfg, self.split, self.models.fingerprint, self.store.fingerprint, self.mirror_fp
        )

    def current(self, _state: StageState) -> PredictResult:
        return PredictResult(
            up_to_date=True,
            report_json=report_path(self.cfg, self.split),
            predictions_dir=pred_dir_of(self.cfg, self.split),
            split=self.split,
        )

    def compute(
        self, state: StageState, force: bool
    ) -> tuple[PredictResult, StageState, dict[str, Any]]:
        cfg, split, store, mirror = self.cfg, self.split, self.store, self.mirror
        fp = state.fingerprint
        udir = RunLayout.of(cfg).units(split)
        hashes = [s.hash for s in store.manifest.shards]
        sweep = sweep_thresholds(cfg.predict.threshold)
        units = _current_units(cfg, split, udir, hashes, fp, sweep, force)
        predictor = Predictor(self.models, self.device, cfg.predict.threshold)
        todo = [si for si in range(len(hashes)) if si not in units]
        if todo:
            self._predict_shards(todo, predictor, fp, sweep, units, udir, hashes)
        rows = [r for si in range(len(hashes)) for r in units[si]["items"]]
        fingerprints = {"features": store.fingerprint, "models": self.models.fingerprint}
        if self.mirror_fp is not None:
            fingerprints["mirrored"] = self.mirror_fp
        report = build_report(
            cfg,
            split,
            rows,
            fingerprints,
            sweep,
            report_stage.resolved_settings(config_keys(cfg).feature, str(self.device)),
        )
        rpath = report_path(cfg, split)
        atomic_write_json(rpath, report)
        _write_human_reports(cfg, split, report, rows, store, predictor, mirror)
        done = StageState(state.name, state.deps, state.params, "", state.upstream)
        outs = _outputs(cfg, split, rows)
        res = PredictResult(
            n_images=report["n_images"],
            n_predicted=report["n_predicted"],
            predictions_dir=pred_dir_of(cfg, split),
            report_json=rpath,
            split=split,
            headline=headline(report),
        )
        return res, done, {"outs": outs, "report_format": REPORT_FORMAT}

    def _predict_shards(
        self,
        todo: list[int],
        predictor: Predictor,
        fp: str,
        sweep: Sequence[float],
        units: dict[int, dict],
        udir: Path,
        hashes: list[str],
    ) -> None:
        """Predict the shards `todo` (locally or on Dask), each unit written as it comes."""
        cfg, store, mirror = self.cfg, self.store, self.mirror
        pdir = pred_dir_of(cfg, self.split)
        todo_set = set(todo)
        n_todo = sum(1 for m in store.items if m.shard in todo_set)
        bar = Progress(n_todo, f"predict {self.split}", enabled=self.progress)

        def remote() -> Iterator[tuple[str, tuple]]:
            wcfg = portable_config(cfg)
            sdir = str(store.split_dir.resolve())
            mdir = str(mirror.split_dir.resolve()) if mirror is not None else None
            return (
                (
                    f"predict-{fp}-{si}",
                    (
                        wcfg,
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
                (
                    si,
                    predict_shard(
                        store, si, predictor, pdir, cfg.predict.batch_size, mirror, sweep
                    ),
                )
                for si in todo
            )

        for si, unit in execute(scheduler_of(cfg, self.executor), predict_task, remote, local):
            unit["fingerprint"] = fp
            atomic_write_json(udir / f"{hashes[si]}.json", unit)
            units[si] = unit
            bar.update(len(unit["items"]))
        bar.close()

    def registered(self) -> list[Path]:
        return [used.split_dir for used in (self.store, self.mirror) if used is not None]


def _current_units(
    cfg: Config,
    split: str,
    udir: Path,
    hashes: list[str],
    fp: str,
    sweep: Sequence[float],
    force: bool,
) -> dict[int, dict]:
    """The split's units that are current (same fingerprint and sweep, masks intact), by
    shard; an earlier version's unit (no sweep counts) is computed again."""
    units: dict[int, dict] = {}
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
        bad = {rel for rel in (x.rsplit(" ", 1)[0] for x in outs_problems(cfg, split))}
        pfx = RunLayout.of(cfg).rel(pred_dir_of(cfg, split))
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
    t0 = time.perf_counter()
    keys = config_keys(cfg)
    store = FeatureStore.open(cfg.paths.cache, keys.feature, keys.data, split)
    mirror = open_mirrored(cfg, store)
    device = resolve_device(cfg.predict.device)
    with checked_models(
        RunLayout.of(cfg), keys, cfg.paths.cache, device, functools.partial(reproduces, cfg)
    ) as models:
        job = Prediction(cfg, split, store, mirror, models, device, progress, executor, t0)
        res = reproduce(job, force, log)
    if not res.up_to_date:
        res.seconds = time.perf_counter() - t0
    return res


def open_mirrored(cfg: Config, store: FeatureStore) -> FeatureStore | None:
    """The mirrored features of `store`'s split when predict.tta = "flip" (checked to match
    it), else None. Stage 1 stores none for the training split: a usage error."""
    if cfg.predict.tta != "flip":
        return None
    why = _no_mirrored_features(cfg, store.split)
    if why:
        raise ConfigError(why)
    keys = config_keys(cfg)
    mirror = FeatureStore.open(cfg.paths.cache, keys.feature.mirrored(), keys.data, store.split)
    check_mirrored(store, mirror)
    return mirror


def pred_dir_of(cfg: Config, split: str) -> Path:
    return RunLayout.of(cfg).predictions(split)


def build_report(
    cfg: Config,
    split: str,
    rows: list[dict],
    fingerprints: dict[str, str],
    sweep: Sequence[float] = (),
    resolved: dict | None = None,
) -> dict:
    """report_<split>.json's content from the units' rows (see report.stage.build_report)."""
    return report_stage.build_report(
        cfg.to_dict(), split, rows, fingerprints, VARIANTS, sweep, resolved
    )


def _write_human_reports(
    cfg: Config,
    split: str,
    report: dict,
    rows: list[dict],
    store: FeatureStore,
    predictor: Predictor,
    mirror: FeatureStore | None,
) -> None:
    """The Markdown and HTML reports (report.stage.write_human_reports); the worst images'
    masks of every variant computed again by `predictor`, as the pass computed them."""

    def shown(row: dict) -> report_stage.Shown:
        item = store.read(row["index"])
        if item.mask is None:  # scored from this very store (its fingerprint is in the units')
            raise StoreError(
                f"{store.split_dir}: {item.meta.source} is scored but has no "
                "annotation; rerun predict with --force"
            )
        mirrored = None if mirror is None else [mirror.features(item.meta.index)]
        return report_stage.Shown(
            item.image, item.mask, lambda: predictor.batch_masks([item], mirrored)[0]
        )

    report_stage.write_human_reports(
        RunLayout.of(cfg), split, report, rows, cfg.predict.thumbnails, shown
    )
