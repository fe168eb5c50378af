"""`runs`: two runs that differ in train.lr show exactly that key as their difference, with
their metrics and whether each is up to date; their report JSONs record their configs."""
import json

from pipeline.synth import make_dataset
from tests.conftest import run_cli

FAST = ["train.epochs=1", "train.linear_epochs=2", "train.crop=48", "train.batch_size=4"]


def test_two_runs_differ_in_exactly_train_lr(tmp_path):
    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 3, "test": 2}, size=(64, 80), seed=6)
    base = []
    for s in [f"data.root={root}", f"paths.cache={tmp_path / 'cache'}",
              f"paths.outputs={tmp_path / 'outputs'}", "backbone.name=mobilenet_v2",
              "backbone.weights=random", "predict.device=cpu", "train.device=cpu", *FAST]:
        base += ["--set", s]
    for name, lr in (("slow", "1e-3"), ("fast", "5e-3")):
        r = run_cli("run", *base, "--set", f"run.name={name}", "--set", f"train.lr={lr}")
        assert r.returncode == 0, r.stderr
    reports = {n: json.loads((tmp_path / "outputs" / n / "report_test.json").read_text())
               for n in ("slow", "fast")}
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
    (tmp_path / "outputs" / "slow" / "models" / "linear_head.pt").write_bytes(b"x")
    r = run_cli("runs", *base)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "train.lr" in lines[0] and "pac mIoU" in lines[0]
    row_slow = next(line for line in lines if line.startswith("| slow "))
    row_fast = next(line for line in lines if line.startswith("| fast "))
    assert "0.001" in row_slow and row_slow.rstrip(" |").endswith("no")
    assert "0.005" in row_fast and row_fast.rstrip(" |").endswith("yes")
