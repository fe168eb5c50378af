"""What installing gives: Dask is an optional extra (everything but the scale-out runs
without it, and asking for a scheduler without it is one line naming the extra)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, cpu_sets, one_line_error

WITHOUT_DASK = (
    "import sys; sys.modules['dask'] = None; sys.modules['distributed'] = None; "
    f"sys.path.insert(0, {str(ROOT)!r}); sys.argv = ['cli.py'] + sys.argv[1:]; "
    "import cli; cli.cli()"
)


def run_without_dask(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a process where `import dask` / `import distributed` fail."""
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_DASK, *args], capture_output=True, text=True, timeout=600
    )


def test_everything_but_the_scale_out_runs_without_dask(synth_root, tmp_path):
    sets = [a for s in cpu_sets(tmp_path, synth_root) for a in ("--set", s)]
    r = run_without_dask("extract-features", "--split", "test", *sets)
    assert r.returncode == 0, r.stderr
    r = run_without_dask("extract-features", "--split", "test", "--scheduler", "local:2", *sets)
    assert r.returncode == 2
    one_line_error(r, "vit-objseg[dask]", "dask.scheduler")
    r = run_without_dask("config", "show", "--set", "dask.scheduler=local:2")
    assert r.returncode == 0 and 'scheduler = "local:2"' in r.stdout, r.stderr


def test_pyproject_declares_dask_as_an_extra():
    import tomllib

    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = " ".join(doc["project"]["dependencies"])
    extras = doc["project"]["optional-dependencies"]
    assert "dask" not in deps and any("distributed" in d for d in extras["dask"])
    assert {"test", "dev", "dask"} <= set(extras)
    assert all("<" not in d for d in doc["project"]["dependencies"] if d.startswith("torch"))
