"""predict.threshold = "auto": the threshold chosen per variant on the validation split's
sweep (a recorded dependency), never on the split being scored; the refusals; segment and
export cut at the same chosen threshold (real runs on the synth dataset)."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.core.config import load_config
from pipeline.core.errors import CalibrationMissing, ConfigError
from pipeline.core.layout import RunLayout
from pipeline.core.variants import CANDIDATE, VARIANTS
from pipeline.data.holdout import held_out
from pipeline.data.synth import make_dataset
from pipeline.metrics.calibration import choose_thresholds, sweep_fingerprint
from pipeline.stages import predict as predict_stage
from pipeline.stages import thresholds as thresholds_mod
from pipeline.stages.extract import run_extract
from pipeline.stages.thresholds import Calibration, resolve_thresholds
from pipeline.stages.train import run_train
from pipeline.store import split_fingerprint
from tests.conftest import TINY_TRAIN, cli_sets, make_cfg, one_line_error, run_cli, stored

QUIET = {"log": lambda s: None, "progress": False}
VAL = ("data.val_split=val",)
AUTO = (*VAL, "predict.threshold=auto")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny run trained on train with validation split val, its three splits stored; val
    predicted at 0.5 (the sweep auto chooses from). Read only: tests copy it."""
    root = make_dataset(
        tmp_path_factory.mktemp("data") / "obj_seg",
        "obj_seg",
        {"train": 4, "val": 3, "test": 3},
        size=(96, 136),
        seed=3,
    )
    folder = tmp_path_factory.mktemp("auto_run")
    cfg = make_cfg(folder, root, *TINY_TRAIN, *VAL)
    run_extract(cfg, **QUIET)
    run_train(cfg, **QUIET)
    predict_stage.run_predict(cfg, "val", **QUIET)
    return folder, root


@pytest.fixture()
def run(base, tmp_path):
    folder, root = base
    shutil.copytree(folder, tmp_path / "run", symlinks=True)
    return tmp_path / "run", root


def cfg_of(run, *extra):
    return make_cfg(run[0], run[1], *TINY_TRAIN, *extra)


def report(cfg, split: str) -> dict:
    return json.loads((cfg.run_dir / f"report_{split}.json").read_text())


def models_fp(cfg) -> str:
    from pipeline.models.card import models_fingerprint

    fp, why = models_fingerprint(RunLayout.of(cfg).models)
    assert fp is not None, why
    return fp


def resolve(cfg, split: str | None, features_fp: str | None = None, fp: str | None = None):
    return resolve_thresholds(
        RunLayout.of(cfg),
        Calibration.from_config(cfg),
        split,
        fp or models_fp(cfg),
        features_fp if features_fp is not None else split_fingerprint(*stored(cfg), "val"),
    )


def test_config_takes_auto_only_with_a_validation_split():
    assert load_config(None, ["predict.threshold=auto", *VAL]).predict.threshold == "auto"
    assert load_config(None, [*AUTO, "predict.threshold=0.3"]).predict.threshold == 0.3
    with pytest.raises(ConfigError, match="neither data.val_split nor data.val_cut is set"):
        load_config(None, ["predict.threshold=auto"])
    with pytest.raises(ConfigError, match=r"'best' \(expected float or \"auto\"\)"):
        load_config(None, [*VAL, "predict.threshold=best"])
    with pytest.raises(ConfigError, match=r'0.0 \(a finite number in \(0, 1\) or "auto"\)'):
        load_config(None, [*VAL, "predict.threshold=0"])


def test_chosen_on_the_validation_sweep_alone(run):
    cfg = cfg_of(run, *AUTO)
    val = report(cfg, "val")
    chosen = resolve(cfg, "test")
    assert chosen.values == choose_thresholds(val, VARIANTS) and chosen.split == "val"
    assert set(chosen.values.values()) != {0.5}  # this fixture's choice is not the default
    assert chosen.fingerprint == sweep_fingerprint(val, VARIANTS)
    cal = chosen.to_json()
    assert cal["mode"] == "auto" and cal["source"] == "report_val.json"
    assert chosen.describe().startswith("auto, chosen on val: ")
    # every threshold used is a point of the report's sweep
    assert set(chosen.values.values()) <= set(chosen.sweep)
    # a number: the same for every variant, chosen on no split
    fixed = resolve(cfg_of(run, *VAL, "predict.threshold=0.4"), "test")
    assert fixed.to_json() == {
        "mode": "fixed",
        "thresholds": dict.fromkeys(VARIANTS, 0.4),
        "split": None,
    }


def test_auto_reads_only_the_validation_report(run, monkeypatch):
    cfg = cfg_of(run, *AUTO)
    read: list[str] = []
    real = thresholds_mod.read_doc
    monkeypatch.setattr(thresholds_mod, "read_doc", lambda p: read.append(p.name) or real(p))
    resolve(cfg, "test")
    assert read == ["report_val.json"]


def test_the_validation_split_itself_is_refused(run):
    cfg = cfg_of(run, *AUTO)
    with pytest.raises(ConfigError, match="chooses the threshold on the validation split 'val'"):
        resolve(cfg, "val")


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("record", "split 'val' not predicted by this run"),
        ("edited", "report_val.json is not the report predict wrote"),
        ("models", "split 'val' predicted with other models"),
        ("features", "split 'val' predicted from other stored features"),
        ("tta", "split 'val' predicted with predict.tta = none"),
    ],
)
def test_a_missing_or_stale_sweep_names_the_command(run, damage, why):
    cfg = cfg_of(run, *AUTO)
    run_layout = RunLayout.of(cfg)
    cal = Calibration.from_config(cfg)
    fp, feats = models_fp(cfg), split_fingerprint(*stored(cfg), "val")
    if damage == "record":
        run_layout.record("predict[val]").unlink()
    elif damage == "edited":
        path = run_layout.report("val")
        path.write_text(path.read_text() + " ")
    elif damage == "models":
        fp = "0" * 16
    elif damage == "features":
        feats = "1" * 16
    else:
        cal = Calibration("auto", "val", "flip")
    with pytest.raises(CalibrationMissing) as e:
        resolve_thresholds(run_layout, cal, "test", fp, feats)
    assert why in str(e.value)
    assert "predict --split val --set predict.threshold=0.5" in str(e.value)


def test_segment_cuts_at_the_chosen_threshold(run):
    from pipeline.commands.segment import run_segment

    cfg = cfg_of(run, *AUTO)
    pac = resolve(cfg, None).values[CANDIDATE]
    images = sorted((run[1] / "test").rglob("images/*.jpg"))[:2]
    run_segment(cfg, images, run[0] / "auto", overlays=False, progress=False)
    fixed = cfg_of(run, *VAL, f"predict.threshold={pac}")
    run_segment(fixed, images, run[0] / "fixed", overlays=False, progress=False)
    for img in images:
        name = f"{img.stem}.png"
        assert (run[0] / "auto" / name).read_bytes() == (run[0] / "fixed" / name).read_bytes()
    # at 0.5 the masks differ (the chosen threshold is not the default here)
    half = cfg_of(run, *VAL, "predict.threshold=0.5")
    run_segment(half, images, run[0] / "half", overlays=False, progress=False)
    if pac != 0.5:
        assert any(
            (run[0] / "auto" / f"{i.stem}.png").read_bytes()
            != (run[0] / "half" / f"{i.stem}.png").read_bytes()
            for i in images
        )


def test_segment_without_a_validation_sweep_is_one_line_exit_1(run):
    cfg = cfg_of(run, *AUTO)
    RunLayout.of(cfg).record("predict[val]").unlink()
    images = sorted((run[1] / "test").rglob("images/*.jpg"))[:1]
    r = run_cli(
        "segment", str(images[0]), "--out", str(run[0] / "seg"), *cli_sets(run[0], run[1], *AUTO)
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    one_line_error(
        r,
        "no usable threshold sweep of the validation split",
        "predict --split val --set predict.threshold=0.5",
    )


# ----------------------------------------------------------------------------- stage 3


def test_predict_with_auto_says_which_split_chose(run):
    cfg = cfg_of(run, *AUTO)
    chosen = choose_thresholds(report(cfg, "val"), VARIANTS)
    predict_stage.run_predict(cfg, "test", **QUIET)
    rep = report(cfg, "test")
    cal = rep["calibration"]
    assert cal["mode"] == "auto" and cal["split"] == "val" and cal["thresholds"] == chosen
    assert rep["resolved"]["predict.threshold"].startswith("auto, chosen on val: ")
    # each variant's masks are cut at its own threshold: its J mean is the sweep's there
    for v, t in chosen.items():
        at = next(p for p in rep["threshold_sweep"][v] if p["threshold"] == t)
        assert rep["variants"][v]["overall"]["j_mean"] == pytest.approx(at["j_mean"], abs=1e-12)
    md = (cfg.run_dir / "report_test.md").read_text()
    assert "the threshold chosen on val" in md and f"pac ({chosen['pac']:g})" in md
    assert predict_stage.status(cfg, "test").up_to_date
    # the validation split predicted at another number: the same sweep, still up to date
    predict_stage.run_predict(cfg_of(run, *VAL, "predict.threshold=0.6"), "val", **QUIET)
    assert predict_stage.status(cfg, "test").up_to_date
    # its report edited: not the file predict wrote, the stage waits for the command
    rpath = cfg.run_dir / "report_val.json"
    rpath.write_text(rpath.read_text() + " ")
    st = predict_stage.status(cfg, "test")
    assert st.state == "stale" and "report_val.json is not the report predict wrote" in st.why
    assert "predict --split val --set predict.threshold=0.5" in st.why
    # a fixed threshold records where it came from too
    fixed = report(cfg_of(run, *VAL), "val")["calibration"]
    assert fixed == {"mode": "fixed", "thresholds": dict.fromkeys(VARIANTS, 0.6), "split": None}


def test_predict_refusals_exit_codes(run):
    sets = cli_sets(run[0], run[1], *AUTO)
    r = run_cli("predict", "--split", "val", *sets)
    assert r.returncode == 2, (r.stdout, r.stderr)
    one_line_error(r, "predict.threshold = auto", "--set predict.threshold=0.5")
    st = predict_stage.status(cfg_of(run, *AUTO), "val")
    assert st.state == "stale" and "predict it with a number" in st.why
    RunLayout.of(cfg_of(run, *AUTO)).record("predict[val]").unlink()
    r = run_cli("predict", "--split", "test", *sets)
    assert r.returncode == 1, (r.stdout, r.stderr)
    one_line_error(
        r,
        "no usable threshold sweep of the validation split",
        "predict --split val --set predict.threshold=0.5",
    )
    assert not (run[0] / "outputs" / "default" / "report_test.json").exists()


def test_auto_on_the_sequences_val_cut_holds_out(tmp_path):
    """A dataset with train and test only: data.val_cut makes the validation split."""
    root = make_dataset(
        tmp_path / "obj_seg", "obj_seg", {"train": 3, "test": 2}, size=(96, 136), seed=5
    )
    cut = ("data.val_cut=1",)
    cfg = make_cfg(tmp_path, root, *TINY_TRAIN, *cut)
    run_extract(cfg, **QUIET)
    run_train(cfg, **QUIET)
    auto = make_cfg(tmp_path, root, *TINY_TRAIN, *cut, "predict.threshold=auto")
    with pytest.raises(CalibrationMissing, match="predict --split train_heldout"):
        predict_stage.run_predict(auto, "test", **QUIET)
    predict_stage.run_predict(cfg, "train_heldout", **QUIET)
    val = report(cfg, "train_heldout")
    assert {r["category"] for r in val["per_image"]} == set(held_out(["block", "disc"], 1))
    predict_stage.run_predict(auto, "test", **QUIET)
    cal = report(auto, "test")["calibration"]
    assert cal["split"] == "train_heldout" and cal["thresholds"] == choose_thresholds(val, VARIANTS)
    with pytest.raises(ConfigError, match="'train_heldout', the split being predicted"):
        predict_stage.run_predict(auto, "train_heldout", **QUIET)
