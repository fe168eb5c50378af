"""The stage mechanism: stages as data (deps, params, outs) judged by one function against
their record; the ordered stage list that `status`, `run` and `runs` iterate; stage 1's record
kept with the store it describes; predict's models a declared dependency."""

from __future__ import annotations

import json
import shutil

from pipeline.core.config import copy_config
from pipeline.stages import workflow
from pipeline.stages.base import Context, StageState, judge_record, save_record
from pipeline.stages.extract import STAGE as EXTRACT
from pipeline.stages.extract import run_extract
from pipeline.stages.predict import PredictStage, stage_state
from pipeline.stages.predict_settings import PredictSettings
from pipeline.store import locate_split
from tests.conftest import cli_sets, run_cli, stored


def _rec(state: StageState) -> dict:
    return {"params": state.params, "deps": state.deps, "fingerprint": state.fingerprint}


# ----------------------------------------------------------------------------- judge_record


def test_judge_record_decides_from_deps_params_and_outs():
    state = StageState("s", {"features[train]": "a"}, {"train.lr": 0.1})
    assert judge_record(None, state).line() == "s: missing"
    assert judge_record(None, state, damaged=True).line() == "s: stale (stage record unreadable)"
    assert judge_record(_rec(state), state).line() == "s: up-to-date"
    moved = StageState("s", {"features[train]": "b"}, {"train.lr": 0.2})
    assert (
        judge_record(_rec(state), moved).line()
        == "s: stale (train.lr: 0.1 -> 0.2; features[train] changed)"
    )
    broken = StageState("s", state.deps, state.params, "models/pac.safetensors changed")
    assert judge_record(_rec(state), broken).line() == "s: stale (models/pac.safetensors changed)"


def test_an_absent_dep_names_its_command_and_an_unusable_one_says_why():
    rec = _rec(StageState("p", {"models": "m1"}, {}))
    absent = StageState("p", {"models": None}, {}, upstream={"models": "vit-objseg train-head"})
    assert judge_record(rec, absent).why == "needs models: run `vit-objseg train-head`"
    unusable = StageState(
        "p",
        {"models": None},
        {},
        upstream={"models": "vit-objseg train-head"},
        unusable={"models": "trained with other settings (train.lr: 1 -> 2)"},
    )
    want = (
        "waits for `vit-objseg train-head`: models trained with other settings (train.lr: 1 -> 2)"
    )
    assert judge_record(rec, unusable).why == want
    # without a record of its own, the stage still says what it waits for (not "missing")
    assert judge_record(None, unusable).line() == f"p: stale ({want})"


# ----------------------------------------------------------------------------- the list


def test_status_and_run_iterate_the_stage_list(trained_copy):
    base, root, cfg = trained_copy
    names = [stage.name("test") for stage in workflow.STAGES]
    assert names == ["extract-features", "train-head", "predict[test]"]
    r = run_cli("status", *cli_sets(base, root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{n}: up-to-date" for n in names]
    r = run_cli("run", *cli_sets(base, root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "extract-features: up-to-date",
        "train-head: up-to-date",
        f"predict [test]: up-to-date; report {cfg.run_dir / 'report_test.json'}",
    ]


# ----------------------------------------------------------------------------- stage 1


def test_stage_one_keeps_its_record_with_the_store(trained_copy):
    """No copy in the run folder: another run on the same cache finds stage 1 up to date, and
    other feature settings are explained from the store made before."""
    base, root, cfg = trained_copy
    assert not (cfg.run_dir / "stages" / f"{EXTRACT}.json").exists()
    other = copy_config(cfg, run__name="other")
    assert next(workflow.statuses(Context.of(other))).line() == f"{EXTRACT}: up-to-date"
    assert not other.run_dir.exists()  # status wrote nothing there
    fp16 = copy_config(cfg, extract__feature_dtype="float32")
    assert (
        next(workflow.statuses(Context.of(fp16))).line()
        == f'{EXTRACT}: stale (extract.feature_dtype: "float16" -> "float32")'
    )


def test_stage_one_data_change_and_damage_are_told_apart(trained_copy):
    base, root, cfg = trained_copy
    manifest = locate_split(*stored(cfg), "test") / "manifest.json"
    doc = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**doc, "digest": "0" * 64}))
    line = next(workflow.statuses(Context.of(cfg))).line()
    assert (
        line == f"{EXTRACT}: stale (test: manifest damaged (its digest does not match its content))"
    ), line
    manifest.write_text(json.dumps(doc))
    moved = copy_config(cfg, data__root=str(base / "data"))  # a moved dataset is the same
    shutil.copytree(root, base / "data")
    line = next(workflow.statuses(Context.of(moved))).line()
    assert line.startswith(f"{EXTRACT}: stale (test: stored, not indexed for "), line
    assert run_extract(moved, log=lambda s: None, progress=False).up_to_date  # indexed only
    assert next(workflow.statuses(Context.of(moved))).line() == f"{EXTRACT}: up-to-date"
    image = sorted((base / "data" / "test").rglob("*.jpg"))[0]
    image.write_bytes(image.read_bytes() + b"\0")
    line = next(workflow.statuses(Context.of(moved))).line()
    assert line == f"{EXTRACT}: stale (data[test] changed)", line


# ----------------------------------------------------------------------------- predict


def test_predict_declares_the_models_trained_for_its_config(trained_copy):
    base, root, cfg = trained_copy
    state = stage_state(PredictSettings.of(cfg), "test")
    assert state.deps["models"] is not None and not state.unusable
    other = copy_config(cfg, train__lr=0.5)
    state = stage_state(PredictSettings.of(other), "test")
    assert state.deps["models"] is None
    assert state.unusable["models"].startswith("trained with other settings (train.lr: ")
    # a record made by predict with these models: the stage waits, it is not merely "changed"
    save_record(other.run_dir, stage_state(PredictSettings.of(cfg), "test"))
    st = PredictStage().status(Context.of(other))
    assert st.why.startswith("waits for `python cli.py train-head`"), st.why
