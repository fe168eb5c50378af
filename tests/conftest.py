"""Shared fixtures: a generated dataset in both layouts and a config pointing at it."""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.config import load_config  # noqa: E402
from pipeline.data.synth import make_dataset  # noqa: E402

SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pt"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    return make_dataset(
        tmp_path_factory.mktemp("synth") / "obj_seg",
        "obj_seg",
        {"train": 6, "test": 3},
        size=(96, 136),
        seed=1,
    )


@pytest.fixture(scope="session")
def synth_davis_root(tmp_path_factory) -> Path:
    return make_dataset(
        tmp_path_factory.mktemp("synth") / "davis",
        "davis2016",
        {"train": 4, "val": 2},
        size=(80, 112),
        seed=2,
    )


def cpu_sets(tmp_path: Path, data_root: Path, *extra: str, layout: str = "obj_seg") -> list[str]:
    """The KEY=VALUE overrides of a fast CPU run on `data_root`, everything under tmp_path."""
    return [
        f"data.root={data_root}",
        f"data.layout={layout}",
        f"paths.cache={tmp_path / 'cache'}",
        f"paths.outputs={tmp_path / 'outputs'}",
        "backbone.name=mobilenet_v2",
        "backbone.weights=random",
        "extract.batch_size=4",
        "extract.device=cpu",
        "extract.num_workers=2",
        "train.device=cpu",
        "predict.device=cpu",
        *extra,
    ]


def make_cfg(tmp_path: Path, data_root: Path, *extra: str, layout: str = "obj_seg"):
    """A config for a fast CPU run on generated data, with everything under tmp_path."""
    return load_config(
        ROOT / "configs" / "default.toml", cpu_sets(tmp_path, data_root, *extra, layout=layout)
    )


TINY_TRAIN = ("train.epochs=1", "train.linear_epochs=2", "train.crop=48")


def stored(cfg, mirror: bool = False) -> tuple:
    """(cache folder, feature key, dataset) of `cfg`'s store (`mirror`: of its mirrored
    features): the leading arguments of the store's functions."""
    from pipeline.models.devices import config_keys

    keys = config_keys(cfg)
    return cfg.paths.cache, keys.feature.mirrored(mirror), keys.data


def store_of(cfg, mirror: bool = False) -> Path:
    """The folder of `cfg`'s store (`mirror`: of its mirrored features)."""
    from pipeline.store import store_dir

    return store_dir(*stored(cfg, mirror)[:2])


def cli_sets(tmp_path: Path, data_root: Path, *extra: str) -> list[str]:
    """The `--set` arguments of the CLI equal to make_cfg(tmp_path, data_root, *TINY_TRAIN,
    *extra) (the config of trained_run)."""
    return [a for s in cpu_sets(tmp_path, data_root, *TINY_TRAIN, *extra) for a in ("--set", s)]


def trained_run(base: Path, data_root: Path, *extra: str):
    """make_cfg with a tiny training, then extract, train-head and predict the test split;
    returns the config."""
    from pipeline.stages.extract import run_extract
    from pipeline.stages.predict import run_predict
    from pipeline.stages.train import run_train

    cfg = make_cfg(base, data_root, *TINY_TRAIN, *extra)
    quiet = dict(log=lambda s: None, progress=False)
    run_extract(cfg, **quiet)
    run_train(cfg, **quiet)
    run_predict(cfg, "test", **quiet)
    return cfg


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synth_root):
    """Extract, train (tiny) and predict the test split of the generated data, once for the
    whole session: (base folder, data root, config). Read only: a test that writes into the
    run's folders (segment or export to the default paths, a stage rerun with other settings,
    damage) takes `trained_copy` instead, so that no test depends on another's leftovers."""
    base = tmp_path_factory.mktemp("seg_run")
    return base, synth_root, trained_run(base, synth_root)


def copy_run(trained, dest: Path):
    """A private copy of the session's trained run (its cache and outputs) under `dest`, and
    its config: (base folder, data root, config). Copying takes a fraction of a second,
    training again several."""
    base, root, _ = trained
    shutil.copytree(base, dest, symlinks=True)
    return dest, root, make_cfg(dest, root, *TINY_TRAIN)


@pytest.fixture()
def trained_copy(trained, tmp_path):
    """`trained`, copied for this test alone (it may write into the run's folders)."""
    return copy_run(trained, tmp_path / "run")


def synth_images(
    folder: Path, names: list[str], root: Path, size: tuple[int, int] | None = None, first: int = 0
) -> None:
    """Copies of the generated test images (from the `first`-th on) under `names` (format
    from the suffix), cropped to `size` (w, h) when given."""
    srcs = sorted((root / "test").rglob("images/*.jpg"))
    for k, name in enumerate(names, first):
        im = Image.open(srcs[k % len(srcs)]).convert("RGB")
        if size is not None:
            im = im.crop((0, 0, *size))
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        im.save(folder / name)


class _CliServer:
    """A warm interpreter (tests/cli_server.py) that has imported cli.py and the pipeline and
    forks one child process per CLI call. Restarted when the environment it started with has
    changed (other than PYTEST_CURRENT_TEST), so that nothing imported there saw another."""

    IGNORED_ENV = ("PYTEST_CURRENT_TEST",)

    def __init__(self) -> None:
        self.env = self._env()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "cli_server.py"), str(ROOT)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )

    @classmethod
    def _env(cls) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in cls.IGNORED_ENV}

    def usable(self) -> bool:
        return self.proc.poll() is None and self._env() == self.env

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):  # else left to the garbage collector
            if pipe is not None:
                pipe.close()

    def _line(self, timeout: float | None = None) -> int | None:
        out = self.proc.stdout
        assert out is not None
        if timeout is not None and not select.select([out], [], [], timeout)[0]:
            return None
        line = out.readline()  # unbuffered: never reads past the line
        if not line:
            raise RuntimeError("the CLI server ended")
        return int(line)

    def run(self, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="run_cli-") as d:
            out, err = Path(d) / "stdout", Path(d) / "stderr"
            req = {
                "args": args,
                "cwd": str(cwd),
                "env": dict(os.environ),
                "stdout": str(out),
                "stderr": str(err),
            }
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            pid = self._line()
            assert pid is not None
            code = None
            try:
                code = self._line(timeout)
            finally:
                if code is None:  # timed out, or interrupted: kill the child (not yet reaped)
                    os.kill(pid, signal.SIGKILL)
            if code is None:
                self._line()
                raise subprocess.TimeoutExpired(
                    [*CLI, *args], timeout, out.read_text(), err.read_text()
                )
            return subprocess.CompletedProcess(
                [*CLI, *args], code, out.read_text(), err.read_text()
            )


CLI = [sys.executable, str(ROOT / "cli.py")]
_server: list[_CliServer] = []  # the running one, started by the first run_cli


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` in `cwd`: its own process (exit code, stdout, stderr as text),
    killed after `timeout` s (subprocess.TimeoutExpired), like subprocess.run. The process is
    forked from a warm interpreter that has imported cli.py and the pipeline once, instead
    of starting Python and torch again (1.5 s a call); FRESH_CLI=1 in the environment, or a
    platform without fork, starts each one afresh."""
    cwd = Path(cwd)
    if os.environ.get("FRESH_CLI") or not hasattr(os, "fork") or not cwd.is_dir():
        return subprocess.run(
            [*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
    if _server and not _server[0].usable():
        _server.pop().close()
    if not _server:
        _server.append(_CliServer())
        atexit.register(lambda: [s.close() for s in _server])
    try:
        return _server[0].run(list(args), cwd, timeout)
    except BaseException:
        _server.pop().close()  # a timeout or an interrupted exchange: a new server next time
        raise


def one_line_error(r, *parts: str) -> str:
    """Assert that a CLI run printed exactly one `error:` line, no traceback, containing each
    of `parts`; return the line."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for p in parts:
        assert p in lines[0], (p, lines[0])
    return lines[0]


SHALLOW_VIT_DEPTH = 2  # blocks of the ViTs built by shallow_vits


def shallow_vits(monkeypatch, depth: int = SHALLOW_VIT_DEPTH) -> None:
    """Make create_backbone build the registry's ViTs with `depth` blocks instead of 12, for
    tests about plumbing (shapes, position embeddings, export, checkpoint keys), where the
    number of blocks changes nothing but the time. The registry's own builders run, with
    timm.create_model given depth=...; only the builders of the ViT entries are patched
    (undone with `monkeypatch`), never the config."""
    import timm

    from pipeline.core import registry
    from pipeline.models import backbones

    def shallow(build):
        def build_shallow(spec, pretrained):
            real = timm.create_model
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(
                    timm,
                    "create_model",
                    lambda *args, **kwargs: real(*args, **{**kwargs, "depth": depth}),
                )
                return build(spec, pretrained)

        return build_shallow

    for key in sorted({spec.builder for spec in registry.specs() if spec.kind == "vit"}):
        monkeypatch.setitem(backbones.BUILDERS, key, shallow(backbones.BUILDERS[key]))
