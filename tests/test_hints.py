"""Repair hints name the program the user ran (`vit-objseg` installed, `python cli.py` from a
checkout) and carry their --config / --set / --run (pipeline/core/hints.py): pasted, a hint acts
on the user's dataset and settings, not the defaults."""

from __future__ import annotations

import shlex
import subprocess
import sys

from pipeline.core import hints
from tests.conftest import ROOT, cpu_sets, one_line_error, run_cli


def test_command_carries_the_invocation(monkeypatch):
    monkeypatch.setattr(hints, "_current", hints.Invocation())
    assert hints.command("train-head") == "python cli.py train-head"  # no CLI: the default
    hints.invoked(
        "/opt/venv/bin/vit-objseg",
        "my conf.toml",
        ["data.root=/d x", "run.name=a"],
        "a",
        ["train-head", "predict"],
    )
    carried = "--config 'my conf.toml' --set 'data.root=/d x' --set run.name=a"
    assert hints.command("extract-features", "--split", "test") == (
        f"vit-objseg extract-features --split test {carried}"
    )  # takes no --run
    assert hints.command("predict") == f"vit-objseg predict --run a {carried}"
    assert hints.command("train-head", "--run", "b", "--set", "run.name=NEW") == (
        f"vit-objseg train-head --run b --set run.name=NEW {carried}"
    )  # one --run: b
    hints.invoked("../main/cli.py", None, [])
    assert hints.command("config show") == "python ../main/cli.py config show"


def _hint(line: str) -> list[str]:
    """The command a one-line error asks to run, as an argument list."""
    return shlex.split(line.split("run `", 1)[1].split("`", 1)[0])


def test_hint_after_set_data_root_extracts_that_dataset(tmp_path, synth_root):
    """predict on a dataset given by --set: the hint names the program as run and carries
    the --set; pasted as it is, it extracts that dataset, and predict then asks for
    train-head with the same options."""
    sets = [a for s in cpu_sets(tmp_path, synth_root) for a in ("--set", s)]
    r = run_cli("predict", *sets)
    assert r.returncode == 1
    argv = _hint(
        one_line_error(r, "extract-features --split test", f"--set data.root={synth_root}")
    )
    assert argv == ["python", str(ROOT / "cli.py"), "extract-features", "--split", "test", *sets]
    r = run_cli(*argv[2:])
    assert r.returncode == 0, r.stderr
    r = run_cli("predict", *sets)
    assert r.returncode == 1
    assert _hint(one_line_error(r, "train-head")) == [
        "python",
        str(ROOT / "cli.py"),
        "train-head",
        *sets,
    ]


def test_installed_program_is_named(tmp_path, synth_root):
    """Run as the installed console script (its argv[0] is the script `vit-objseg`, as pip's
    wrapper runs `cli:cli`), the hint says `vit-objseg`."""
    sets = [a for s in cpu_sets(tmp_path, synth_root) for a in ("--set", s)]
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "sys.argv[0] = '/opt/venv/bin/vit-objseg'; from cli import cli; cli()"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "predict", *sets],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 1
    assert _hint(one_line_error(r)) == ["vit-objseg", "extract-features", "--split", "test", *sets]
