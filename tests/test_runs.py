"""`runs`: two runs that differ in train.lr show exactly that key as their difference, with
their metrics and whether each is up to date; their report JSONs record their configs. A
damaged report or stage record is a row that says so (never a traceback, never NaN in the
JSON); up to date is judged in the run folder as listed (copied, moved, another working
folder); a `|` in a run name keeps the table's columns."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.commands import runs as runs_mod
from pipeline.data.synth import make_dataset
from tests.conftest import make_cfg, run_cli, trained_run

FAST = ["train.epochs=1", "train.linear_epochs=2", "train.crop=48", "train.batch_size=4"]
RELATIVE = ("paths.outputs=outputs", "paths.cache=cache")  # as with the default config


def test_two_runs_differ_in_exactly_train_lr(tmp_path):
    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 3, "test": 2}, size=(64, 80), seed=6)
    base = []
    for s in [
        f"data.root={root}",
        f"paths.cache={tmp_path / 'cache'}",
        f"paths.outputs={tmp_path / 'outputs'}",
        "backbone.name=mobilenet_v2",
        "backbone.weights=random",
        "predict.device=cpu",
        "train.device=cpu",
        *FAST,
    ]:
        base += ["--set", s]
    for name, lr in (("slow", "1e-3"), ("fast", "5e-3")):
        r = run_cli("run", *base, "--set", f"run.name={name}", "--set", f"train.lr={lr}")
        assert r.returncode == 0, r.stderr
    reports = {
        n: json.loads((tmp_path / "outputs" / n / "report_test.json").read_text())
        for n in ("slow", "fast")
    }
    assert reports["slow"]["config"]["train"]["lr"] == 1e-3
    assert reports["fast"]["config"]["train"]["lr"] == 5e-3

    r = run_cli("runs", "--json", *base)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert sorted(row["run"] for row in rows) == ["fast", "slow"]
    for row in rows:
        assert set(row["params"]) == {"train.lr"}
        rep = reports[row["run"]]
        assert row["metrics"]["pac"]["miou"] == rep["variants"]["pac"]["overall"]["miou"]
        assert row["up_to_date"] is True and row["train_seconds"] > 0
    pac = [row["metrics"]["pac"]["miou"] for row in rows]
    assert pac == sorted(pac, reverse=True)  # best first

    # the table, and a run made stale by damaging its models
    (tmp_path / "outputs" / "slow" / "models" / "linear_head.safetensors").write_bytes(b"x")
    r = run_cli("runs", "--markdown", *base)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "train.lr" in lines[0] and "pac mIoU" in lines[0]
    row_slow = next(line for line in lines if line.startswith("| slow "))
    row_fast = next(line for line in lines if line.startswith("| fast "))
    assert "0.001" in row_slow and row_slow.rstrip(" |").endswith("no")
    assert "0.005" in row_fast and row_fast.rstrip(" |").endswith("yes")


# ----------------------------------------------------------------------------- one tiny run


@pytest.fixture(scope="module")
def run_base(tmp_path_factory, synth_root) -> Path:
    """A folder holding one tiny trained and predicted run, `outputs/default`, made from
    inside that folder with relative paths.outputs and paths.cache (as with the default
    config). Tests copy the run before they change anything."""
    base = tmp_path_factory.mktemp("runs_base")
    here = Path.cwd()
    os.chdir(base)
    try:
        trained_run(base, synth_root, *RELATIVE)
    finally:
        os.chdir(here)
    assert (base / "outputs" / "default" / "report_test.json").is_file()
    return base


def copies(run_base: Path, outputs: Path, *names: str) -> None:
    """Copies of the fixture's run under `outputs`, one per name."""
    for name in names:
        shutil.copytree(run_base / "outputs" / "default", outputs / name, symlinks=True)


def listed(outputs: Path, synth_root: Path, split: str = "test") -> dict[str, dict]:
    """runs --json of `outputs`, in process: run name -> row; the rows are strict JSON."""
    cfg = make_cfg(outputs.parent, synth_root, f"paths.outputs={outputs}")
    rows = runs_mod.as_json(runs_mod.collect(Path(cfg.paths.outputs), cfg.data.test_split, split))
    json.dumps(rows, allow_nan=False)  # raises on NaN / Infinity
    return {row["run"]: row for row in rows}


def table_of(outputs: Path, synth_root: Path) -> list[str]:
    cfg = make_cfg(outputs.parent, synth_root, f"paths.outputs={outputs}")
    rows = runs_mod.collect(Path(cfg.paths.outputs), cfg.data.test_split, "test")
    return runs_mod.markdown(rows).splitlines()


def columns(line: str) -> list[str]:
    """The cells of a Markdown table line, split on unescaped `|` only."""
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


def strict_loads(text: str) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------------------- damaged files

RAW = "@@RAW@@"  # a placeholder replaced by raw JSON text (NaN, Infinity, 1e999)


def at(doc: dict, path: str) -> tuple[dict, str]:
    *parents, last = path.split(".")
    for p in parents:
        doc = doc[p]
    return doc, last


def setter(path: str, value: Any) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        parent, key = at(doc, path)
        parent[key] = value

    return edit


def deleter(path: str) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        parent, key = at(doc, path)
        del parent[key]

    return edit


REPORT, TRAIN, PREDICT = "report_test.json", "stages/train-head.json", "stages/predict[test].json"
MIOU = "variants.pac.overall.miou"

DAMAGE = {  # id: (file, edit of the parsed JSON or None, raw text for RAW, expected words)
    "string-for-number": (REPORT, setter(MIOU, "n/a"), None, f'{MIOU} is a string ("n/a")'),
    "list-for-dict": (REPORT, setter("variants.pac", []), None, "variants.pac is a list"),
    "nan": (REPORT, setter(MIOU, RAW), "NaN", "non-finite number NaN"),
    "infinity": (REPORT, setter(MIOU, RAW), "Infinity", "non-finite number Infinity"),
    "overflow": (REPORT, setter(MIOU, RAW), "1e999", "1e999 out of range"),
    "huge-int": (REPORT, setter("n_images", RAW), "9" * 400, "out of range"),
    "out-of-range": (REPORT, setter(MIOU, 1.5), None, "not a number in [0, 1]"),
    "missing-key": (REPORT, deleter(MIOU), None, f"{MIOU} missing"),
    "missing-variant": (REPORT, deleter("variants.pac"), None, "variants.pac missing"),
    "count-as-string": (REPORT, setter("n_images", "3"), None, "n_images is a string"),
    "bad-config": (REPORT, setter("config.train.lr", "fast"), None, "train.lr"),
    "not-an-object": (REPORT, None, "[1, 2]", "is a list"),
    "garbled": (REPORT, None, '{"split": "test", "n_images": 3, "vari', "not valid JSON"),
    "record-seconds-string": (TRAIN, setter("seconds", "fast"), None, "seconds is a string"),
    "record-seconds-overflow": (TRAIN, setter("seconds", RAW), "1e999", "out of range"),
    "record-params-list": (TRAIN, setter("params", []), None, "params is a list"),
    "record-deps-number": (PREDICT, setter("deps.models", 5), None, "deps.models is a number"),
    "record-outs-outside": (
        PREDICT,
        setter("outs", {"../../x": "0"}),
        None,
        "not a path inside the run folder",
    ),
}


def damage(run_dir: Path, file: str, edit: Callable[[dict], None] | None, raw: str | None) -> None:
    path = run_dir / file
    if edit is None:
        path.write_text(raw or "")
        return
    doc = json.loads(path.read_text())
    edit(doc)
    text = json.dumps(doc, indent=1)
    path.write_text(text.replace(f'"{RAW}"', raw) if raw is not None else text)


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_file_is_a_row_that_says_so(run_base, synth_root, tmp_path, case):
    """A hand-edited or garbled report or stage record: that run's row says `damaged:`,
    naming the file and the field; the other run is listed as usual; strict JSON."""
    file, edit, raw, words = DAMAGE[case]
    out = tmp_path / "outputs"
    copies(run_base, out, "good", "bad")
    damage(out / "bad", file, edit, raw)
    rows = listed(out, synth_root)
    bad, good = rows["bad"], rows["good"]
    assert bad["damaged"] is not None and str(out / "bad" / file) in bad["damaged"], bad
    assert words in bad["damaged"], bad["damaged"]
    assert bad["up_to_date"] is None
    report = json.loads((run_base / "outputs" / "default" / REPORT).read_text())
    assert good["damaged"] is None and good["up_to_date"] is True, good
    assert good["metrics"]["pac"]["miou"] == report["variants"]["pac"]["overall"]["miou"]
    if file == REPORT:
        assert list(rows) == ["good", "bad"]  # a run without metrics is listed last

    lines = table_of(out, synth_root)
    bad_line = next(line for line in lines if line.startswith("| bad "))
    assert "damaged: " in bad_line and file in bad_line
    assert all(len(columns(line)) == len(columns(lines[0])) for line in lines)


def test_cli_lists_damaged_runs_in_strict_json(run_base, synth_root, tmp_path):
    """Through the CLI: a string for a metric in one report and Infinity in another run's
    training record are two damaged rows; the sound run is listed; exit 0, no traceback,
    and `--json` is strict JSON."""
    out = tmp_path / "outputs"
    copies(run_base, out, "good", "edited", "infinite")
    damage(out / "edited", REPORT, setter(MIOU, "n/a"), None)
    damage(out / "infinite", TRAIN, setter("seconds", RAW), "Infinity")
    sets = ["--set", f"paths.outputs={out}"]
    r = run_cli("runs", "--json", *sets, cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    rows = {row["run"]: row for row in strict_loads(r.stdout)}
    assert rows["good"]["up_to_date"] is True and rows["good"]["damaged"] is None
    assert "report_test.json" in rows["edited"]["damaged"]
    assert "train-head.json" in rows["infinite"]["damaged"]
    assert rows["infinite"]["train_seconds"] is None

    r = run_cli("runs", *sets, cwd=tmp_path)  # the plain table: damaged is the last column
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    at = r.stdout.splitlines()[0].index("up-to-date")
    assert sorted(line[at:].split(":")[0] for line in r.stdout.splitlines()[1:]) == [
        "damaged",
        "damaged",
        "yes",
    ]
    r = run_cli("runs", "--markdown", *sets, cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert sum("damaged: " in line for line in lines) == 2
    header = [c.strip() for c in columns(lines[0])]
    infinite = next(line for line in lines if line.startswith("| infinite "))
    assert columns(infinite)[header.index("train s")].strip() == "-"


# ----------------------------------------------------------------------------- up to date


def test_copied_run_folder_is_judged_where_it_is(run_base, synth_root, tmp_path, monkeypatch):
    """A run folder copied to another outputs folder (under another name) is up to date like
    the original; damaging the copy's models makes the copy stale, not the original; moving
    the whole outputs folder changes nothing. Listed from yet another working folder."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "elsewhere" / "outputs"
    copies(run_base, out, "copy")
    assert listed(out, synth_root)["copy"]["up_to_date"] is True

    (out / "copy" / "models" / "linear_head.safetensors").write_bytes(b"x")
    row = listed(out, synth_root)["copy"]
    assert row["up_to_date"] is False and "linear_head.safetensors" in row["why"], row
    assert listed(run_base / "outputs", synth_root)["default"]["up_to_date"] is True

    # a deleted mask, a hand-edited (still valid) report: stale, naming the file
    copies(run_base, out, "no-mask", "edited")
    mask = next((out / "no-mask" / "predictions" / "test").rglob("*.png"))
    mask.unlink()
    report = json.loads((out / "edited" / REPORT).read_text())
    report["variants"]["pac"]["overall"]["miou"] = 0.999
    (out / "edited" / REPORT).write_text(json.dumps(report))
    rows = listed(out, synth_root)
    assert rows["no-mask"]["up_to_date"] is False and mask.name in rows["no-mask"]["why"]
    assert (
        rows["edited"]["up_to_date"] is False
        and "report_test.json changed" in rows["edited"]["why"]
    )

    moved = tmp_path / "moved"
    copies(run_base, moved, "default")
    shutil.rmtree(out)
    assert listed(moved, synth_root)["default"]["up_to_date"] is True


def test_runs_from_another_working_folder(run_base, synth_root, tmp_path, monkeypatch):
    """The fixture's run recorded relative paths (outputs, cache): listed in place and from
    another working folder (through the CLI), it is up to date both times; a retrained
    copy whose report is older is stale in both."""
    monkeypatch.chdir(run_base)
    assert listed(Path("outputs"), synth_root)["default"]["up_to_date"] is True
    r = run_cli("runs", "--json", "--set", f"paths.outputs={run_base / 'outputs'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (row,) = strict_loads(r.stdout)
    assert row["run"] == "default" and row["up_to_date"] is True, row

    # the training record of other settings (as after retraining with another lr): stale
    out = tmp_path / "outputs"
    copies(run_base, out, "retrained")
    rec = json.loads((out / "retrained" / TRAIN).read_text())
    rec["fingerprint"] = "0" * 16
    rec["params"]["train.lr"] = 0.123
    (out / "retrained" / TRAIN).write_text(json.dumps(rec))
    row = listed(out, synth_root)["retrained"]
    assert row["up_to_date"] is False and "train.lr" in row["why"], row


# ----------------------------------------------------------------------------- the table


def test_pipe_and_newline_in_run_names_keep_the_columns(run_base, synth_root, tmp_path):
    out = tmp_path / "outputs"
    copies(run_base, out, "a|b", "two\nlines", "plain")
    lines = table_of(out, synth_root)
    assert len(lines) == 2 + 3  # header, rule, one line per run
    assert all(len(columns(line)) == len(columns(lines[0])) for line in lines)
    names = {columns(line)[0].strip() for line in lines[2:]}
    assert names == {"a\\|b", "two\\nlines", "plain"}
