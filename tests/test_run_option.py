"""A run remembers its config: train-head records it in the run folder (config.toml), and
`--run NAME` on segment, predict, export, status, train-head and config show starts from that
record, with --config and --set on top; a key that would make the run's models stale is
refused (status reports it); runs trained before records fall back to their report."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.core.config import config_from_dict, copy_config, load_config, to_toml
from pipeline.core.errors import StoreError
from pipeline.runconfig import RECORD, recordable
from pipeline.stages.train import run_train
from tests.conftest import make_cfg, one_line_error, run_cli

quiet = dict(log=lambda s: None, progress=False)


def where(cfg, *extra: str) -> list[str]:
    """Only where the run is (paths.outputs) and its cache: the rest comes from --run."""
    sets = [f"paths.outputs={cfg.paths.outputs}", f"paths.cache={cfg.paths.cache}", *extra]
    return [a for s in sets for a in ("--set", s)]


def image_of(root: Path) -> Path:
    return sorted((root / "test").rglob("images/*.jpg"))[0]


def shown(cfg, *args: str, cwd: Path) -> str:
    r = run_cli("config", "show", "--run", cfg.run.name, *where(cfg), *args, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return r.stdout


# ----------------------------------------------------------------------------- the record


def test_train_head_records_the_effective_config(trained):
    _, _, cfg = trained
    record = cfg.run_dir / RECORD
    assert load_config(record) == cfg  # every key, paths absolute (they are, here)
    assert not list(cfg.run_dir.glob(f".{RECORD}*"))  # written atomically: no temporary left


def test_the_record_holds_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None, ["data.root=data/x", "paths.cache=c", "paths.outputs=o", "backbone.weights=w/file.pt"]
    )
    rec = recordable(cfg)
    assert rec.data.root == str(tmp_path / "data" / "x")
    assert rec.paths.cache == str(tmp_path / "c")
    assert rec.backbone.weights == str(tmp_path / "w" / "file.pt")
    assert (
        copy_config(
            rec,
            data__root="data/x",
            paths__cache="c",
            paths__outputs="o",
            backbone__weights="w/file.pt",
        )
        == cfg
    )  # nothing else changed


def test_no_record_without_completed_training(tmp_path, synth_root):
    cfg = make_cfg(tmp_path, synth_root)
    with pytest.raises(StoreError):  # nothing extracted: train-head refuses before training
        run_train(cfg, **quiet)
    assert not (cfg.run_dir / RECORD).exists()


def test_an_up_to_date_train_head_records_a_run_trained_before(trained_copy):
    _, _, cfg = trained_copy
    (cfg.run_dir / RECORD).unlink()
    assert run_train(cfg, **quiet).up_to_date
    assert load_config(cfg.run_dir / RECORD) == cfg


# ----------------------------------------------------------------------------- using a run


def test_segment_and_predict_use_the_run_as_trained(trained, tmp_path):
    _, root, cfg = trained
    img = image_of(root)
    # from another folder, with the default config's other settings (dino_vits16,
    # 10 epochs, ...): without --run the models are refused, naming --run
    r = run_cli("segment", str(img), *where(cfg), "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert r.returncode == 1
    one_line_error(
        r,
        "trained with other settings",
        "train-head",
        "add `--run default` to use the run as it was trained",
    )
    r = run_cli(
        "segment",
        str(img),
        "--run",
        "default",
        *where(cfg),
        "--out",
        str(tmp_path / "a"),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    mask = tmp_path / "a" / f"{img.stem}.png"
    predicted = cfg.run_dir / "predictions" / "test" / img.parent.parent.name / mask.name
    assert mask.read_bytes() == predicted.read_bytes()
    r = run_cli("predict", "--run", "default", *where(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "up-to-date" in r.stdout
    r = run_cli("status", "--run", "default", *where(cfg), cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout.splitlines() == [
        "extract-features: up-to-date",
        "train-head: up-to-date",
        "predict[test]: up-to-date",
    ]


def test_config_show_prints_the_record_that_loads_back_equal(trained, tmp_path):
    _, _, cfg = trained
    text = shown(cfg, cwd=tmp_path)
    (tmp_path / "saved.toml").write_text(text)
    assert load_config(tmp_path / "saved.toml") == cfg
    # the recorded paths.outputs and run.name are never read: the run is where it is found
    record = cfg.run_dir / RECORD
    assert f'outputs = "{cfg.paths.outputs}"' in record.read_text()


CHANGES = {
    "train.epochs=3": "train.epochs: 1 -> 3",
    "backbone.name=dino_vits16": 'backbone.name: "mobilenet_v2" -> "dino_vits16"',
    "extract.feature_dtype=float32": 'extract.feature_dtype: "float16" -> "float32"',
}


@pytest.mark.parametrize("command", ["segment", "predict", "export"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_key_that_would_make_the_models_stale_is_refused(trained, tmp_path, command, change):
    _, root, cfg = trained
    args = {
        "segment": [str(image_of(root)), "--out", str(tmp_path / "o")],
        "predict": [],
        "export": ["--out", str(tmp_path / "m.pt2")],
    }[command]
    r = run_cli(command, *args, "--run", "default", *where(cfg, change), cwd=tmp_path)
    assert r.returncode == 2
    one_line_error(
        r,
        "--run default",
        CHANGES[change],
        "would make the run's models stale",
        "drop that --set",
        "--set run.name=NEW",
    )
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.pt2").exists()


def test_keys_that_do_not_touch_the_models_are_layered(trained, tmp_path):
    _, _, cfg = trained
    text = shown(
        cfg, "--set", "predict.threshold=0.3", "--set", "extract.batch_size=2", cwd=tmp_path
    )
    (tmp_path / "c.toml").write_text(text)
    assert load_config(tmp_path / "c.toml") == copy_config(
        cfg, predict__threshold=0.3, extract__batch_size=2
    )


def test_a_config_file_is_layered_on_the_record(trained, tmp_path):
    _, root, cfg = trained
    conf = tmp_path / "mine.toml"
    # its run.name does not move --run; its keys are layered on the record, key by key
    conf.write_text('[run]\nname = "elsewhere"\n[predict]\nthreshold = 0.25\n')
    text = shown(cfg, "--config", str(conf), cwd=tmp_path)
    (tmp_path / "c.toml").write_text(text)
    assert load_config(tmp_path / "c.toml") == copy_config(cfg, predict__threshold=0.25)
    conf.write_text("[train]\nepochs = 4\n")
    r = run_cli(
        "segment",
        str(image_of(root)),
        "--run",
        "default",
        "--config",
        str(conf),
        *where(cfg),
        "--out",
        str(tmp_path / "o"),
        cwd=tmp_path,
    )
    assert r.returncode == 2
    one_line_error(r, "train.epochs: 1 -> 4", "--config key")


def test_status_reports_the_change_and_exits_0(trained, tmp_path):
    _, _, cfg = trained
    r = run_cli("status", "--run", "default", *where(cfg, "train.epochs=3"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1] == "train-head: stale (train.epochs: 1 -> 3)"
    assert lines[2].startswith("predict[test]: stale (waits for")


def test_train_head_never_replaces_a_runs_models_under_a_changed_config(trained_copy):
    base, _, cfg = trained_copy
    card = (
        (cfg.run_dir / "models").stat().st_mtime_ns,
        sorted(p.read_bytes() for p in (cfg.run_dir / "models").iterdir() if p.is_file()),
    )
    r = run_cli("train-head", "--run", "default", *where(cfg, "train.epochs=2"), cwd=base)
    assert r.returncode == 2
    one_line_error(r, "--run default", "train.epochs: 1 -> 2", "not replaced", "--set run.name=NEW")
    assert card == (
        (cfg.run_dir / "models").stat().st_mtime_ns,
        sorted(p.read_bytes() for p in (cfg.run_dir / "models").iterdir() if p.is_file()),
    )
    # the way out: a new run that starts from this one's config
    r = run_cli(
        "train-head", "--run", "default", *where(cfg, "train.epochs=2", "run.name=longer"), cwd=base
    )
    assert r.returncode == 0, r.stderr
    assert "trained" in r.stdout
    assert load_config(cfg.run_dir.parent / "longer" / RECORD) == copy_config(
        cfg, train__epochs=2, run__name="longer"
    )
    r = run_cli("train-head", "--run", "default", *where(cfg), cwd=base)
    assert r.returncode == 0 and "up-to-date" in r.stdout, r.stderr


def test_a_moved_run_is_found_where_it_is(trained, tmp_path):
    _, root, cfg = trained
    shutil.copytree(cfg.run_dir, tmp_path / "elsewhere" / "moved", symlinks=True)
    moved = copy_config(cfg, paths__outputs=str(tmp_path / "elsewhere"), run__name="moved")
    text = shown(moved, cwd=tmp_path)
    (tmp_path / "c.toml").write_text(text)
    assert load_config(tmp_path / "c.toml") == moved
    r = run_cli("status", "--run", "moved", *where(moved), cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout.splitlines()[1:] == ["train-head: up-to-date", "predict[test]: up-to-date"]
    r = run_cli("segment", str(image_of(root)), "--run", "moved", *where(moved), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "elsewhere" / "moved" / "segment" / f"{image_of(root).stem}.png").is_file()


# ----------------------------------------------------------------------------- no record


def test_a_run_trained_before_records_uses_its_report(trained_copy, tmp_path):
    base, _, cfg = trained_copy
    (cfg.run_dir / RECORD).unlink()
    text = shown(cfg, cwd=tmp_path)
    report = json.loads((cfg.run_dir / "report_test.json").read_text())
    recorded = copy_config(
        config_from_dict(report["config"]),
        paths__cache=cfg.paths.cache,
        paths__outputs=cfg.paths.outputs,
    )  # the --set ones
    assert text == to_toml(recorded) and recorded == cfg
    # a report edited by hand into something that is no config: one line naming it
    report["config"]["train"]["lr"] = "fast"
    (cfg.run_dir / "report_test.json").write_text(json.dumps(report))
    r = run_cli("status", "--run", "default", *where(cfg), cwd=tmp_path)
    assert r.returncode == 2
    one_line_error(r, "report_test.json", "train.lr")
    for p in cfg.run_dir.glob("report_*.json"):
        p.unlink()
    r = run_cli("segment", str(tmp_path), "--run", "default", *where(cfg), cwd=tmp_path)
    assert r.returncode == 2
    one_line_error(r, "no recorded config", "--config / --set instead of --run")


# ----------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "edit,parts",
    [
        (lambda t: t.replace("lr = 0.002", "lr = -1.0"), ["train.lr", RECORD]),
        (lambda t: t + "\n[train]\nlr = 1\n", ["cannot parse", RECORD]),
        (lambda t: t.replace("[run]", "[run]\nevil = 1"), ["unknown config key 'run.evil'"]),
        (lambda t: t.replace('name = "default"', 'name = "../x"'), ["run.name"]),
    ],
)
def test_a_hand_edited_record_is_one_line(trained_copy, tmp_path, edit, parts):
    _, _, cfg = trained_copy
    record = cfg.run_dir / RECORD
    record.write_text(edit(record.read_text()))
    r = run_cli("config", "show", "--run", "default", *where(cfg), cwd=tmp_path)
    assert r.returncode == 2
    one_line_error(r, *parts)


def test_recorded_outputs_and_name_are_not_read(trained_copy, tmp_path):
    _, _, cfg = trained_copy
    record = cfg.run_dir / RECORD
    text = record.read_text().replace('name = "default"', 'name = "other"')
    record.write_text(text.replace(f'outputs = "{cfg.paths.outputs}"', 'outputs = "/nowhere"'))
    (tmp_path / "c.toml").write_text(shown(cfg, cwd=tmp_path))
    assert load_config(tmp_path / "c.toml") == cfg


def test_a_record_that_did_not_train_the_models_is_refused(trained_copy, tmp_path):
    base, root, cfg = trained_copy
    record = cfg.run_dir / RECORD
    record.write_text(record.read_text().replace("epochs = 1", "epochs = 7"))
    r = run_cli(
        "segment",
        str(image_of(root)),
        "--run",
        "default",
        *where(cfg),
        "--out",
        str(tmp_path / "o"),
        cwd=tmp_path,
    )
    assert r.returncode == 1
    line = one_line_error(r, "trained with other settings", "train.epochs: 1 -> 7")
    assert "add `--run" not in line  # the record does not reproduce them: no such advice


def test_a_record_that_is_a_fifo_is_one_line(trained_copy, tmp_path):
    _, _, cfg = trained_copy
    record = cfg.run_dir / RECORD
    record.unlink()
    os.mkfifo(record)  # never opened (it would hang)
    r = run_cli("status", "--run", "default", *where(cfg), cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    one_line_error(r, "not a regular file")


@pytest.mark.parametrize(
    "name,parts",
    [
        ("missing", ["no run folder", "runs there: default"]),
        ("a/b", ["bad value for --run"]),
        ("..", ["bad value for --run"]),
        ("", ["bad value for --run"]),
    ],
)
def test_run_names_that_are_no_run(trained, tmp_path, name, parts):
    _, _, cfg = trained
    r = run_cli("predict", "--run", name, *where(cfg), cwd=tmp_path)
    assert r.returncode == 2
    one_line_error(r, *parts)
