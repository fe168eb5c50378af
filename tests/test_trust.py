"""Trust: every stage depends on its upstream's outputs, damaged caches and models are found
and repaired by the plain stage command, no file is unpickled, and every fault is either the
correct result or a one-line error (status always exits 0)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import LockError, ModelError, StoreError
from pipeline.core.fsutil import exclusive_lock, lock_path
from pipeline.core.layout import RunLayout
from pipeline.data.synth import make_dataset
from pipeline.stages.extract import run_extract
from pipeline.stages.predict import run_predict
from pipeline.stages.train import run_train
from pipeline.store import locate_split
from tests.conftest import make_cfg, one_line_error, run_cli, store_of, stored

quiet = dict(log=lambda s: None, progress=False)
FAST = ("train.epochs=1", "train.linear_epochs=2", "train.crop=48", "train.batch_size=4")


def cli_sets(cfg, *extra: str) -> list[str]:
    out = []
    for s in [
        f"data.root={cfg.data.root}",
        f"paths.cache={cfg.paths.cache}",
        f"paths.outputs={cfg.paths.outputs}",
        "backbone.name=mobilenet_v2",
        "backbone.weights=random",
        "extract.batch_size=4",
        "extract.device=cpu",
        "train.device=cpu",
        "predict.device=cpu",
        *FAST,
        *extra,
    ]:
        out += ["--set", s]
    return out


def digest_tree(folder: Path, suffixes=(".h5", ".pt", ".png")) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in suffixes
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A complete run (all three stages) on generated data: two categories -> two shards per
    split. Tests copy it before damaging anything."""
    base = tmp_path_factory.mktemp("trained")
    root = make_dataset(base / "data", "obj_seg", {"train": 4, "test": 2}, size=(64, 80), seed=5)
    cfg = make_cfg(base, root, *FAST)
    run_extract(cfg, **quiet)
    run_train(cfg, **quiet)
    run_predict(cfg, "test", **quiet)
    return base


@pytest.fixture()
def run_copy(trained, tmp_path):
    """A private copy of the trained run and its config."""
    shutil.copytree(trained, tmp_path / "w")
    cfg = make_cfg(tmp_path / "w", tmp_path / "w" / "data", *FAST)
    assert run_extract(cfg, **quiet).up_to_date  # the moved dataset is found, and indexed
    return cfg


def status_lines(cfg, *extra) -> list[str]:
    r = run_cli("status", *cli_sets(cfg, *extra))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return r.stdout.splitlines()


# ----------------------------------------------------------------------------- stale models


def test_predict_refuses_models_trained_with_other_settings(run_copy):
    cfg = run_copy
    before = json.loads((cfg.run_dir / "report_test.json").read_text())
    r = run_cli("predict", *cli_sets(cfg, "train.lr=1e-3"))
    assert r.returncode == 1
    one_line_error(r, "train.lr: 0.002 -> 0.001", "train-head")
    assert json.loads((cfg.run_dir / "report_test.json").read_text()) == before  # untouched
    lines = status_lines(cfg, "train.lr=1e-3")
    assert lines[0] == "extract-features: up-to-date"
    assert lines[1].startswith("train-head: stale (") and "train.lr" in lines[1]
    assert lines[2].startswith("predict[test]: stale (waits for `python ")  # the program run
    assert (
        "cli.py train-head --set " in lines[2]
        and "--set train.lr=1e-3`: models trained with other settings (train.lr: 0.002 -> 0.001)"
        in lines[2]
    ), lines[2]
    # run retrains first, then predicts; afterwards all up to date
    r = run_cli("run", *cli_sets(cfg, "train.lr=1e-3"))
    assert r.returncode == 0, r.stderr
    assert "train-head: trained" in r.stdout and "predict [test]:" in r.stdout
    assert status_lines(cfg, "train.lr=1e-3") == [
        "extract-features: up-to-date",
        "train-head: up-to-date",
        "predict[test]: up-to-date",
    ]


def test_predict_does_not_run_while_train_head_trains(run_copy):
    cfg = run_copy
    with exclusive_lock(lock_path(cfg.run_dir, "models"), "training"):
        with pytest.raises(LockError, match="train-head is running"):
            run_predict(cfg, "test", force=True, **quiet)
    with exclusive_lock(lock_path(cfg.run_dir, "predict-test"), "another predict"):
        with pytest.raises(LockError, match="in use by another process"):
            run_predict(cfg, "test", force=True, **quiet)


def test_predict_needs_no_training_images(run_copy):
    cfg = run_copy
    shutil.rmtree(Path(cfg.data.root) / "train")
    res = run_predict(cfg, "test", force=True, **quiet)
    assert res.n_images == 4


# ----------------------------------------------------------------------------- damaged cache


def _shard(cfg, split="test", k=0) -> Path:
    return sorted((locate_split(*stored(cfg), split) / "shards").glob("*.h5"))[k]


def stage_lines(cfg) -> list[str]:
    """What `status` prints, in this process (its three checks, as cli.status runs them)."""
    from pipeline.stages import extract, train
    from pipeline.stages import predict as predict_stage

    return [
        extract.status(cfg).line(),
        train.status(cfg).line(),
        predict_stage.status(cfg, "test").line(),
    ]


@pytest.mark.parametrize(
    "damage, why",
    [
        ("flip", "fails its checksum"),
        ("truncate", "truncated"),
        ("delete", "missing"),
        ("unlist", "manifest damaged"),
        ("garbage_manifest", "manifest"),
    ],
)
def test_damaged_cache_is_found_and_repaired_by_plain_extract(run_copy, damage, why):
    """In this process (the stage functions the commands call); the CLI's exit code and
    one-line error for a reader refusing a damaged cache are checked for one case."""
    cfg = run_copy
    sdir = store_of(cfg)
    clean = digest_tree(sdir)
    report = (cfg.run_dir / "report_test.json").read_text()
    shard = _shard(cfg)
    manifest = locate_split(*stored(cfg), "test") / "manifest.json"
    if damage == "flip":  # corrupt bytes in place: same size
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "delete":
        shard.unlink()
    elif damage == "unlist":
        m = json.loads(manifest.read_text())
        m["shards"] = m["shards"][1:]
        manifest.write_text(json.dumps(m))
    else:
        manifest.write_text("{ not json")
    lines = stage_lines(cfg)
    assert lines[0].startswith("extract-features: stale (") and why in lines[0], lines
    # readers refuse in one line naming the repair (exit 1 through the CLI)
    with pytest.raises(StoreError) as e:
        run_predict(cfg, "test", force=True, **quiet)
    assert "extract-features" in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert e.value.exit_code == 1
    if damage == "flip":
        r = run_cli("predict", "--force", *cli_sets(cfg))
        assert r.returncode == 1
        one_line_error(r, "extract-features")
    # plain extract-features repairs (recomputing at most the bad shard), then all is as before
    logged: list[str] = []
    res = run_extract(cfg, log=logged.append, progress=False)
    assert not res.up_to_date and not res.errors
    said = "\n".join(logged)
    assert (
        "0 images to extract" in said
        if damage in ("unlist", "garbage_manifest")
        else "2 images to extract, 2 already cached" in said
    ), said
    assert digest_tree(sdir) == clean
    assert stage_lines(cfg)[0] == "extract-features: up-to-date"
    # `run`: every stage up to date again, the report unchanged
    assert run_extract(cfg, ["train", "test"], **quiet).up_to_date
    assert run_train(cfg, **quiet).up_to_date
    assert run_predict(cfg, "test", **quiet).up_to_date
    assert (cfg.run_dir / "report_test.json").read_text() == report


def test_reader_verifies_checksums_even_when_the_memo_is_fooled(run_copy):
    """A shard damaged with its size and mtime kept: status's memo cannot see it, the reader
    does (it hashes every shard it opens)."""
    cfg = run_copy
    shard = _shard(cfg, "train")
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0x01
    shard.write_bytes(bytes(data))
    import os

    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(StoreError, match="fails its checksum.*extract-features"):
        run_train(cfg, force=True, **quiet)


def test_old_cache_format_is_stale_with_the_reason(run_copy):
    cfg = run_copy
    # a store made by the previous format, and none of the current one
    old = store_of(cfg).with_name("old-format")
    store_of(cfg).rename(old)
    features = json.loads((old / "features.json").read_text())
    (old / "features.json").write_text(json.dumps({**features, "format": 2}))
    assert status_lines(cfg)[0] == "extract-features: stale (format: 2 -> 3)"


def test_garbage_stage_records_are_absent_not_tracebacks(run_copy):
    cfg = run_copy
    for p in (cfg.run_dir / "stages").glob("*.json"):
        p.write_text("\x00garbage")
    lines = status_lines(cfg)
    assert lines[0] == "extract-features: up-to-date"  # the store itself is intact
    assert lines[1] == "train-head: stale (stage record unreadable)"
    assert lines[2].startswith("predict[test]: stale (stage record unreadable")


# ----------------------------------------------------------------------------- damaged models


def test_damaged_model_makes_train_head_stale_and_is_repaired(run_copy):
    cfg = run_copy
    mdir = RunLayout.of(cfg).models
    clean = digest_tree(mdir)
    (mdir / "pac_upsampler.safetensors").write_bytes(
        (mdir / "pac_upsampler.safetensors").read_bytes()[:50]
    )
    lines = status_lines(cfg)
    assert lines[1].startswith("train-head: stale (") and "damaged" in lines[1], lines
    r = run_cli("predict", "--force", *cli_sets(cfg))
    assert r.returncode == 1
    one_line_error(r, "pac_upsampler.safetensors", "train-head")
    r = run_cli("train-head", *cli_sets(cfg))
    assert r.returncode == 0, r.stderr
    assert digest_tree(mdir) == clean  # retrained to the same weights
    assert status_lines(cfg)[1] == "train-head: up-to-date"


def test_model_file_bytes_flipped_are_found(run_copy):
    cfg = run_copy
    p = RunLayout.of(cfg).models / "linear_head.safetensors"
    data = bytearray(p.read_bytes())
    data[-30] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="fails its checksum.*train-head"):
        run_predict(cfg, "test", force=True, **quiet)


class _Marker:
    """Unpickling this object would create a file: proof that code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_corrupt_and_malicious_checkpoints_are_discarded(run_copy, tmp_path):
    cfg = run_copy
    mdir = RunLayout.of(cfg).models
    clean = digest_tree(mdir)
    marker = tmp_path / "pwned"
    for payload in ("truncated", "malicious"):
        ck = mdir / "checkpoint.pt"
        if payload == "truncated":
            ck.write_bytes(b"PK\x03\x04 truncated")
        else:
            import io

            buf = io.BytesIO()
            torch.save({"fingerprint": "x", "evil": _Marker(str(marker))}, buf)
            ck.write_bytes(buf.getvalue())
        # a matching checksum, so that only the safe loader stands between the file and code
        (mdir / "checkpoint.pt.sha256").write_text(hashlib.sha256(ck.read_bytes()).hexdigest())
        r = run_cli("train-head", "--force", *cli_sets(cfg))
        assert r.returncode == 0, r.stderr
        assert not marker.exists()
        assert digest_tree(mdir) == clean


# ----------------------------------------------------------------------------- one-line errors


def test_one_line_errors(run_copy, tmp_path):
    cfg = run_copy
    r = run_cli("status", *cli_sets(cfg, "data.root="))
    assert r.returncode == 2
    one_line_error(r, "data.root")
    # outputs under a regular file: a filesystem error, one line, exit 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("train-head", "--force", *cli_sets(cfg, f"paths.outputs={blocker / 'out'}"))
    assert r.returncode == 1
    one_line_error(r, str(blocker))


def test_an_unreachable_scheduler_is_one_line_after_a_bounded_wait(run_copy, monkeypatch):
    """The client is given CONNECT_TIMEOUT_S (it never waits longer, nor retries), and the
    error names the address in one line (exit 1). Checked, not timed: the bound is what the
    client is given; the real connection attempt runs with the bound set to 1 s."""
    distributed = pytest.importorskip("distributed")
    from pipeline import executors
    from pipeline.core.errors import ExecutorError

    cfg = run_copy
    given = []

    def unreachable(address, **kwargs):
        given.append((address, kwargs.get("timeout")))
        raise OSError(f"Timed out trying to connect to {address}")

    with monkeypatch.context() as m:
        m.setattr(distributed, "Client", unreachable)
        with pytest.raises(ExecutorError), executors.connect("tcp://127.0.0.1:9"):
            pass
    assert given == [("tcp://127.0.0.1:9", executors.CONNECT_TIMEOUT_S)]
    monkeypatch.setattr(executors, "CONNECT_TIMEOUT_S", 1)
    with pytest.raises(ExecutorError) as e:
        run_extract(cfg, force=True, executor="tcp://127.0.0.1:9", **quiet)
    msg = str(e.value)
    assert "tcp://127.0.0.1:9" in msg and "within 1 s" in msg and "\n" not in msg, msg
    assert e.value.exit_code == 1


def test_split_without_usable_images_is_one_line(tmp_path):
    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 2, "test": 1}, size=(48, 64))
    for p in (root / "test").rglob("images/*.jpg"):
        p.write_bytes(b"not a jpeg")
    cfg = make_cfg(tmp_path, root, *FAST)
    assert run_cli("extract-features", *cli_sets(cfg)).returncode == 1  # lists the 2 bad files
    assert run_cli("train-head", *cli_sets(cfg)).returncode == 0
    r = run_cli("predict", *cli_sets(cfg))
    assert r.returncode == 1
    one_line_error(r, "test", "no usable image")


def test_duplicate_stems_stop_extraction_in_one_line(tmp_path):
    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 1}, size=(48, 64))
    from PIL import Image

    img = root / "train/disc/images/00000.jpg"
    Image.open(img).save(img.with_suffix(".png"))
    cfg = make_cfg(tmp_path, root, *FAST)
    r = run_cli("extract-features", *cli_sets(cfg))
    assert r.returncode == 1
    one_line_error(r, "00000.jpg", "00000.png")
