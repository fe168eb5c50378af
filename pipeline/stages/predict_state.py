"""Whether stage 3 is up to date for a split: its deps (the models, the stored split and,
with predict.tta = "flip", its mirrored features), its params, and its outputs (the masks and
reports, checked against the sha256 the stage recorded through the run's stat memo)."""

from __future__ import annotations

import contextlib

from ..core.fingerprints import first_problems
from ..core.fsutil import FileHasher
from ..core.hints import command
from ..core.keys import Keys
from ..core.layout import RunLayout
from ..core.owned import RUN_LEGACY, is_marked
from ..models.card import models_fingerprint, read_card
from ..report.stage import REPORT_FORMAT
from ..store import selected_fingerprint, split_fingerprint, stored_split
from ..store.provenance import models_mismatch
from .base import StageState, load_record
from .predict_settings import PredictSettings
from .thresholds import Thresholds, resolve_thresholds, sweep_dependency


def stage_name(split: str) -> str:
    return f"predict[{split}]"


def stage_state(
    settings: PredictSettings,
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
    keys, run = settings.keys, settings.run
    unusable: dict[str, str] = {}
    if models_fp is None:
        models_fp, why = _usable_models(settings, check=recorded is None)
        if why:
            unusable["models"] = why
    extract = command("extract-features", "--split", stored_split(split, settings.holdout))
    deps: dict[str, str | None] = {"models": models_fp}
    repair = {"models": command("train-head"), f"features[{split}]": extract}
    if recorded is not None:
        deps.update({k: v for k, v in recorded.get("deps", {}).items() if k != "models"})
    else:
        deps[f"features[{split}]"] = (
            features_fp
            if features_fp is not None
            else selected_fingerprint(
                settings.cache, keys.feature, keys.data, split, settings.holdout
            )
        )
        cal = settings.calibration
        if cal.auto:
            deps[cal.dep], why = sweep_dependency(
                run, cal, split, models_fp, val_features(settings)
            )
            repair[cal.dep] = cal.repair_command()
            if why:
                unusable[cal.dep] = why
        if settings.flip:
            deps[f"mirrored[{split}]"] = (
                mirrored_fp
                if mirrored_fp is not None
                else split_fingerprint(settings.cache, keys.feature.mirrored(), keys.data, split)
            )
            repair[f"mirrored[{split}]"] = extract
    if not run.report(split).is_file():
        outs = "report missing"
    else:
        outs = first_problems(
            outs_problems(run, split, verify, writable=recorded is None)
        ) or _report_outdated(run, split)
    return StageState(stage_name(split), deps, keys.predict.params(), outs, repair, unusable)


def val_features(settings: PredictSettings) -> str | None:
    """The content fingerprint of the validation split's stored features now (None: none)."""
    keys, val = settings.keys, settings.calibration.val_split
    return selected_fingerprint(settings.cache, keys.feature, keys.data, val, settings.holdout)


def chosen_thresholds(settings: PredictSettings, split: str, models_fp: str) -> Thresholds:
    """The thresholds `split`'s masks are cut at with the models `models_fp`
    (stages.thresholds.resolve_thresholds: ConfigError or CalibrationMissing for "auto"
    without a usable validation sweep)."""
    feats = val_features(settings) if settings.calibration.auto else None
    return resolve_thresholds(settings.run, settings.calibration, split, models_fp, feats)


def _usable_models(settings: PredictSettings, check: bool) -> tuple[str | None, str]:
    """The fingerprint of the run's models and "" , or (None, why) when they were trained
    with other settings than `settings` ask for (`check`: compared at all)."""
    models_fp, _ = models_fingerprint(settings.run.models)
    card, _ = read_card(settings.run.models)
    if models_fp is not None and card is not None and check:
        why = models_mismatch(settings.cache, settings.keys, card["params"], card["deps"])
        if why:
            return None, f"trained with other settings ({why})"
    return models_fp, ""


def _report_outdated(run: RunLayout, split: str) -> str:
    """Why the split's reports are of an earlier format than REPORT_FORMAT ("" when current
    or when there is no record): compute() then rebuilds them from the current units."""
    rec = load_record(run.root, stage_name(split))
    if rec is None:
        return ""
    found = rec.get("report_format", 1)
    if isinstance(found, int) and not isinstance(found, bool) and found >= REPORT_FORMAT:
        return ""
    return (
        f"report of format {found!r}, now {REPORT_FORMAT} (adds the DAVIS aggregate): "
        "rebuilt from the stored per-image results"
    )


def outs_hasher(run: RunLayout, verify: bool = False, writable: bool = True) -> FileHasher:
    """The stat memo of the run's output checksums (in its stages/ folder)."""
    return FileHasher(
        run.outs_hashes, verify=verify, writable=writable and is_marked(run.root, RUN_LEGACY)
    )


def outs_problems(
    run: RunLayout, split: str, verify: bool = False, writable: bool = True
) -> list[str]:
    """The split's recorded outputs (masks, reports; paths relative to the run folder) that
    are missing or differ from what predict wrote. Records of earlier versions list none.
    `writable`: the stat memo may be refreshed (not by `runs`)."""
    rec = load_record(run.root, stage_name(split))
    outs = rec.get("outs") if rec is not None else None
    if not isinstance(outs, dict):
        return []
    hasher = outs_hasher(run, verify, writable)
    problems = []
    for rel, digest in outs.items():
        path = run.root / rel
        try:
            if not isinstance(digest, str) or hasher.digest(path) != digest:
                problems.append(f"{rel} changed")
        except (OSError, ValueError):
            problems.append(f"{rel} missing")
    hasher.save()
    return problems


def outputs(run: RunLayout, split: str, rows: list[dict]) -> dict[str, str]:
    """{path relative to the run folder: sha256} of what predict wrote for `split` (the masks
    as the units recorded them); the stat memo is filled here, so that the next `status`
    reads none of these files."""
    hasher = outs_hasher(run)
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


def no_mirrored_features(keys: Keys, split: str) -> str:
    """Why predict.tta = "flip" cannot be applied to `split` ("" when it can)."""
    if keys.predict.tta == "flip" and not keys.mirrored_splits([split]):
        return (
            f"predict.tta = flip: stage 1 stores no mirrored features for the training split "
            f"'{split}'; predict it with --set predict.tta=none"
        )
    return ""
