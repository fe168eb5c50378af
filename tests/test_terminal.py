"""What a person sees in the terminal and at install (issue 22, sections 1 and 2): a
torchvision built for another torch, a process out of threads and an offline hub are one line
each; `runs` is an aligned table (Markdown with --markdown) with each run's own split,
--filter and --keys; segment's plurals and rate; export's progress; `up-to-date` as the one
word for the state; no --force where nothing is computed; help for every option; lock files
in `.locks/` folders, never deleted."""

from __future__ import annotations

import importlib.abc
import json
import shutil
import sys
import threading
import urllib.error
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import cli as cli_mod
from pipeline.commands import runs as runs_mod
from pipeline.core import hints
from pipeline.core.config import copy_config
from pipeline.core.errors import BackboneError, EnvironmentProblem
from pipeline.core.fsutil import LOCKS, exclusive_lock, lock_path
from pipeline.core.registry import get_spec
from pipeline.models import backbones, weights
from pipeline.models.backbones import create_backbone
from pipeline.models.devices import CpuFanout
from pipeline.stages.predict import run_predict
from pipeline.store import RUNS_DIR, store_lock
from tests.conftest import cli_sets, copy_run, run_cli, store_of

QUIET = dict(log=lambda s: None, progress=False)
NMS = "operator torchvision::nms does not exist"


@pytest.fixture(autouse=True)
def _own_invocation(monkeypatch):
    """The CLI run in process (CliRunner) records its invocation for repair hints
    (pipeline/core/hints.py): restored after each test, so that no later test sees it."""
    monkeypatch.setattr(hints, "_current", hints.Invocation())


# ----------------------------------------------------------------------------- the command tree


def walk(group: click.Group, prefix: tuple[str, ...] = ()):
    """(path, command) of every command under `group`, groups included."""
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from walk(command, (*prefix, name))


def test_every_option_and_argument_has_help():
    """Each option has help text (--help itself excepted); each argument is described in its
    command's docstring, as click shows arguments there."""
    missing = []
    for path, command in [((), cli_mod.cli), *walk(cli_mod.cli)]:
        for param in command.params:
            if isinstance(param, click.Option):
                if "--help" in param.opts:
                    continue
                if not (param.help or "").strip():
                    missing.append(f"{' '.join(path)} {param.opts[0]}")
            elif (
                isinstance(param, click.Argument)
                and param.name.lower() not in (command.help or "").lower()
                and param.human_readable_name.lower() not in (command.help or "").lower()
            ):
                missing.append(f"{' '.join(path)} {param.name} (argument)")
    assert not missing, missing


READ_ONLY = [("status",), ("runs",), ("config", "show"), ("cache", "list"), ("cache", "gc")]
COMPUTING = [
    ("extract-features",),
    ("train-head",),
    ("predict",),
    ("run",),
    ("segment",),
    ("export",),
    ("demo",),
]


def command_at(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli_mod.cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", READ_ONLY)
def test_commands_that_compute_nothing_take_no_force(path):
    opts = {o for p in command_at(path).params for o in getattr(p, "opts", [])}
    assert "--force" not in opts and "--config" in opts and "--set" in opts
    r = CliRunner().invoke(cli_mod.cli, [*path, "--force"])
    assert r.exit_code == 2 and "No such option '--force'" in r.output, r.output


@pytest.mark.parametrize("path", COMPUTING)
def test_commands_that_compute_take_force(path):
    assert "--force" in {o for p in command_at(path).params for o in getattr(p, "opts", [])}


# ----------------------------------------------------------------------------- torch / torchvision


class _BrokenVision(importlib.abc.MetaPathFinder):
    """Importing torchvision (or timm, which imports it) fails as a torchvision built for
    another torch does: its operators do not register."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torchvision", "timm"):
            raise RuntimeError(NMS)
        return None


@pytest.fixture()
def broken_vision(monkeypatch):
    for name in list(sys.modules):
        if name.split(".")[0] in ("torchvision", "timm"):
            monkeypatch.delitem(sys.modules, name)
    finder = _BrokenVision()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    return finder


@pytest.mark.parametrize("name", ["mobilenet_v2", "dino_vits16"])
def test_torchvision_for_another_torch_is_one_line(broken_vision, name):
    from importlib import metadata

    import torch

    with pytest.raises(EnvironmentProblem) as e:
        create_backbone(name, "random")
    msg = str(e.value)
    assert "\n" not in msg and NMS in msg
    assert f"torch {torch.__version__}" in msg
    assert f"torchvision {metadata.version('torchvision')}" in msg
    assert "pip install --force-reinstall torch==" in msg and "download.pytorch.org/whl/" in msg


def test_torchvision_mismatch_through_the_cli(broken_vision, tmp_path, synth_root):
    r = CliRunner().invoke(cli_mod.cli, ["extract-features", *cli_sets(tmp_path, synth_root)])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and NMS in errors[0] and "torchvision" in errors[0], r.output
    assert "Traceback" not in r.output


def test_other_import_errors_are_not_taken_for_a_mismatch(monkeypatch):
    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torchvision_missing_probe":
                raise ImportError("No module named 'torchvision_missing_probe'")
            return None

    monkeypatch.setattr(sys, "meta_path", [Missing(), *sys.meta_path])
    with pytest.raises(ImportError):
        backbones.import_vision("torchvision_missing_probe")


def test_read_only_commands_import_no_torch(tmp_path):
    """config show, runs and the cache commands build no backbone: a broken torchvision
    cannot stop them (they import neither torchvision nor timm; config show not even torch)."""
    code = (
        "import sys, runpy; sys.argv = ['cli.py', 'config', 'show']\n"
        "try:\n    runpy.run_path('cli.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))"
    )
    import subprocess

    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(cli_mod.__file__).parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


# ----------------------------------------------------------------------------- threads


@pytest.fixture()
def no_threads(monkeypatch):
    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)


def test_no_thread_in_cpu_fanout_is_one_line(no_threads):
    with pytest.raises(EnvironmentProblem) as e:
        CpuFanout(3).map(lambda i: i, 4)
    msg = str(e.value)
    assert "\n" not in msg and "run.threads" in msg and "cannot start a thread" in msg


def test_no_thread_in_extract_is_one_line(no_threads, tmp_path, synth_root):
    r = CliRunner().invoke(cli_mod.cli, ["extract-features", *cli_sets(tmp_path, synth_root)])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "run.threads" in errors[0], r.output
    assert "Traceback" not in r.output


def test_other_runtime_errors_pass_unchanged():
    from pipeline.core.errors import thread_limits

    with pytest.raises(RuntimeError, match="something else"), thread_limits("x"):
        raise RuntimeError("something else")


# ----------------------------------------------------------------------------- offline hub

HF_OFFLINE = (
    "An error happened while trying to locate the file on the Hub and we cannot find "
    "the requested files in the local cache. Please check your connection and try "
    "again or make sure your Internet connection is on."
)


@pytest.mark.parametrize("name", ["dino_vits16", "mobilenet_v2"])
def test_offline_message_keeps_the_whole_first_line_and_names_the_url(monkeypatch, name):
    import timm
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError(HF_OFFLINE + "\nTraceback line\n")

    monkeypatch.setattr(weights, "_resolves", lambda host: True)
    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(BackboneError) as e:
        create_backbone(name, "pretrained")
    msg = str(e.value)
    assert "\n" not in msg and "Traceback line" not in msg
    assert HF_OFFLINE in msg  # whole, not cut mid-word
    spec = get_spec(name)
    assert spec.checkpoint_url in msg and spec.checkpoint_hint in msg
    assert "--set backbone.weights=" in msg


def test_a_very_long_first_line_is_cut_at_a_word():
    line = weights._first_line(OSError("word " * 200))
    assert line.endswith("word ...") and len(line) < 420


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def two_runs(trained, tmp_path_factory):
    """Two copies of the session's run: `a` (its recorded test split: test) and `b`, whose
    recorded data.test_split is `train` and which has a train report too."""
    base, root, cfg = copy_run(trained, tmp_path_factory.mktemp("runs22") / "run")
    out = Path(cfg.paths.outputs)
    a = cfg.run_dir
    shutil.copytree(a, out / "a", symlinks=True)
    shutil.copytree(a, out / "b", symlinks=True)
    shutil.rmtree(a)
    record = out / "b" / "config.toml"
    text = record.read_text()
    assert 'test_split = "test"' in text
    record.write_text(text.replace('test_split = "test"', 'test_split = "train"'))
    run_predict(copy_config(cfg, run__name="b", data__test_split="train"), "train", **QUIET)
    return base, root, cfg


def test_each_run_is_listed_with_its_own_split(two_runs):
    base, root, cfg = two_runs
    outputs = Path(cfg.paths.outputs)
    rows = {r.run: r for r in runs_mod.collect(outputs, cfg.data.test_split)}
    assert rows["a"].split == "test" and rows["b"].split == "train"
    train_report = json.loads((Path(cfg.paths.outputs) / "b" / "report_train.json").read_text())
    test_report = json.loads((Path(cfg.paths.outputs) / "a" / "report_test.json").read_text())
    assert rows["b"].metrics["pac"]["miou"] == train_report["variants"]["pac"]["overall"]["miou"]
    assert rows["a"].metrics["pac"]["miou"] == test_report["variants"]["pac"]["overall"]["miou"]
    assert rows["b"].n_images == train_report["n_images"]
    # --split: every run with that split
    assert {r.split for r in runs_mod.collect(outputs, "val", "test")} == {"test"}


def test_runs_prints_an_aligned_table(two_runs):
    base, root, cfg = two_runs
    r = run_cli("runs", *cli_sets(base, root))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    head = lines[0]
    assert head.startswith("run ") and "|" not in head and head.endswith("up-to-date")
    assert "data.test_split" in head  # the two records differ in it
    at = head.index("up-to-date")
    states = [line[at:] for line in lines[1:]]
    assert len(lines) == 3 and all(s in ("yes", "no", "?") for s in states), lines
    # numbers end where their header ends (right-aligned)
    end = head.index("pac mIoU") + len("pac mIoU")
    assert all(line[end - 5 : end].replace(".", "").isdigit() for line in lines[1:]), lines
    # --markdown: the same cells in a Markdown table
    md = run_cli("runs", "--markdown", *cli_sets(base, root)).stdout.splitlines()
    assert md[0].startswith("| run | split |") and md[1].startswith("|---|---|")
    assert len(md) == 4


def test_runs_filter_and_keys(two_runs):
    base, root, cfg = two_runs
    sets = cli_sets(base, root)
    r = run_cli(
        "runs", "--filter", "data.test_split=train", "--keys", "train.lr,backbone.name", *sets
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith("b ")
    assert lines[0].split()[:4] == ["run", "split", "train.lr", "backbone.name"]
    assert "mobilenet_v2" in lines[1]
    rows = json.loads(
        run_cli(
            "runs", "--json", "--filter", "run=[ab]", "--filter", "train.epochs=1", *sets
        ).stdout
    )
    assert sorted(row["run"] for row in rows) == ["a", "b"]
    rows = json.loads(run_cli("runs", "--json", "--filter", "train.epochs=7", *sets).stdout)
    assert rows == []
    r = run_cli("runs", "--filter", "train.epochs=7", *sets)
    assert r.returncode == 0 and "match the --filter" in r.stdout
    r = run_cli("runs", "--filter", "train.lrr=1", *sets)
    assert r.returncode == 2 and "train.lrr" in r.stderr and "did you mean train.lr" in r.stderr
    r = run_cli("runs", "--keys", "nope", *sets)
    assert r.returncode == 2 and "--keys nope: not a config key" in r.stderr


def test_weights_paths_are_shortened():
    rows = [
        runs_mod.RunRow("x", params={"backbone.weights": "/home/u/w/dino.pth"}),
        runs_mod.RunRow("y", params={"backbone.weights": "random"}),
        runs_mod.RunRow("z", params={"backbone.weights": "/home/u/old/dino.pth"}),
    ]
    heads, cells, _ = runs_mod.grid(rows)
    col = heads.index("backbone.weights")
    assert [c[col] for c in cells] == ["w/dino.pth", "random", "old/dino.pth"]
    assert runs_mod.short_paths(["/a/b/c.pt"]) == {"/a/b/c.pt": "c.pt"}
    # the JSON keeps the whole path
    assert runs_mod.as_json(rows)[0]["params"]["backbone.weights"] == "/home/u/w/dino.pth"


# ----------------------------------------------------------------------------- locks


def test_lock_files_live_in_locks_folders_and_survive_cache_gc(trained, tmp_path):
    base, root, cfg = copy_run(trained, tmp_path / "run")
    cache, run_dir = Path(cfg.paths.cache), cfg.run_dir
    locks = sorted(p for p in [*cache.rglob("*.lock"), *run_dir.rglob("*.lock")])
    assert locks and all(p.parent.name == LOCKS for p in locks), locks
    store = store_of(cfg)
    assert store_lock(store) in locks and store not in store_lock(store).parents
    assert lock_path(run_dir, "models") in locks
    # cache gc removes the store no run uses, never its lock file
    shutil.rmtree(run_dir)
    shutil.rmtree(store / RUNS_DIR)  # the copy's registrations name the session's run
    r = run_cli("cache", "gc", "--yes", *cli_sets(base, root))
    assert r.returncode == 0 and "removed" in r.stdout, r.stdout + r.stderr
    assert not store.exists() and store_lock(store).is_file()


def test_a_held_store_lock_stops_cache_gc(trained, tmp_path):
    base, root, cfg = copy_run(trained, tmp_path / "run")
    store = store_of(cfg)
    shutil.rmtree(cfg.run_dir)
    shutil.rmtree(store / RUNS_DIR)
    with exclusive_lock(store_lock(store), "held"):
        r = run_cli("cache", "gc", "--yes", *cli_sets(base, root))
    assert r.returncode == 0 and "in use by another process" in r.stderr, r.stderr
    assert store.is_dir()


# ----------------------------------------------------------------------------- export, segment


def test_export_says_what_it_does(trained, tmp_path, monkeypatch):
    base, root, cfg = copy_run(trained, tmp_path / "run")
    out = tmp_path / "m.pt2"
    r = run_cli("export", "--out", str(out), *cli_sets(base, root), timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "export: computing (no earlier result)", lines
    assert lines[1].startswith("export: loading the backbone (mobilenet_v2)")
    assert lines[2].startswith("export: tracing with torch.export on a (2, 3, ")
    assert lines[3].startswith("export: traced in ") and "saving" in lines[3]
    assert lines[4].startswith(f"export: {out} (") and len(lines) == 5
    r = run_cli("export", "--out", str(out), *cli_sets(base, root))
    assert r.stdout == f"export: up-to-date -> {out}\n"


def test_segment_says_one_mask(trained, tmp_path):
    base, root, cfg = copy_run(trained, tmp_path / "run")
    image = next(Path(root).rglob("*.jpg"))
    r = run_cli(
        "segment",
        str(image),
        "--out",
        str(tmp_path / "seg"),
        "--no-overlays",
        *cli_sets(base, root),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("segment: 1 mask in "), r.stdout
    assert "images/s after loading the models -> " in r.stdout
    r = run_cli(
        "segment",
        str(image),
        "--out",
        str(tmp_path / "seg"),
        "--no-overlays",
        *cli_sets(base, root),
    )
    assert r.stdout == f"segment: 1 mask up-to-date -> {tmp_path / 'seg'}\n"
