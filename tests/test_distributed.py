"""Stages 1 and 3 on a dask.distributed LocalCluster (2 worker processes on loopback): the
same cache and the same masks as a local run, also when a worker is killed mid-run."""

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.data.synth import make_dataset
from pipeline.stages.extract import run_extract
from pipeline.stages.predict import run_predict
from pipeline.stages.train import run_train
from tests.conftest import make_cfg, store_of, stored

distributed = pytest.importorskip("distributed")
quiet = dict(log=lambda s: None, progress=False)


def digest(folder, pattern):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob(pattern))
        if p.is_file() and p.suffix != ".lock"
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(
        tmp_path_factory.mktemp("dask") / "d",
        "obj_seg",
        {"train": 70, "test": 8},
        size=(64, 80),
        seed=5,
    )


@pytest.fixture(scope="module")
def cluster():
    from pipeline.executors import local_cluster

    with local_cluster(2) as c:
        yield c


def test_dask_extract_and_predict_equal_local(tmp_path, data, cluster):
    fast = ("train.epochs=1", "train.linear_epochs=2", "train.crop=64")
    local = make_cfg(tmp_path / "local", data, *fast)
    run_extract(local, **quiet)
    dask_cfg = make_cfg(tmp_path / "dask", data, *fast)
    res = run_extract(dask_cfg, executor=cluster.scheduler_address, **quiet)
    assert res.n_images == 156 and not res.errors
    assert digest(store_of(dask_cfg), "*") == digest(store_of(local), "*")

    # stage 3: train once, then predict locally and on the cluster from the same models
    run_train(local, **quiet)
    a = run_predict(local, "test", **quiet)
    report_local = a.report_json.read_text()
    preds_local = digest(a.predictions_dir, "*.png")
    import shutil

    shutil.rmtree(local.run_dir / "predictions")
    (local.run_dir / "stages" / "predict[test].json").unlink()
    shutil.rmtree(local.run_dir / "stages" / "predict_test_units")
    b = run_predict(local, "test", executor=cluster.scheduler_address, **quiet)
    assert digest(b.predictions_dir, "*.png") == preds_local
    # the same report, but for the measured seconds per image (its `timing`)
    assert {k: v for k, v in json.loads(b.report_json.read_text()).items() if k != "timing"} == {
        k: v for k, v in json.loads(report_local).items() if k != "timing"
    }


def test_local_cluster_leaves_the_environment_alone(tmp_path, data):
    """`local:1` (one worker of DASK_WORKER_THREADS task threads: two shards in flight sharing
    the worker's backbone) fills the same store as a local run, and leaves os.environ as it
    was."""
    import os

    before = dict(os.environ)
    cfg = make_cfg(tmp_path / "dask", data)
    res = run_extract(cfg, executor="local:1", **quiet)
    assert res.n_images == 156
    assert dict(os.environ) == before
    local = make_cfg(tmp_path / "local", data)
    run_extract(local, **quiet)
    assert digest(store_of(cfg), "*") == digest(store_of(local), "*")


def test_killed_worker_is_retried_and_leaves_no_partial_shard(tmp_path, data, cluster):
    """One worker is made to stop in the middle of writing a shard (its temporary file
    complete, not yet renamed) and is killed there: the extraction was still running (fewer
    shards complete than the run has), the scheduler ran that shard's task again (after the
    worker it was on died), and the cache equals a local run's, with no temporary file left.
    Deterministic: the kill waits for the worker to say where it is, never for a time."""
    local = make_cfg(tmp_path / "local", data)
    run_extract(local, **quiet)
    n_total = len(list(store_of(local).rglob("*.h5")))
    cfg = make_cfg(tmp_path / "dask", data)
    stopped = tmp_path / "stopped"  # written by the worker where it stops: the shard's tmp path
    result = {}

    def stop_mid_write(flag: str) -> None:
        """On the victim worker: the first shard's checksum (taken on its complete temporary
        file, before the rename) says where it is, then waits to be killed."""
        import pipeline.store.shards as store

        real = store.sha256_file

        def stopping(path):
            digest = real(path)
            if str(path).endswith(".tmp"):
                with open(flag + ".part", "w") as f:
                    f.write(str(path))
                os.replace(flag + ".part", flag)
                while True:
                    time.sleep(1)
            return digest

        store.sha256_file = stopping

    def work():
        result["res"] = run_extract(cfg, executor=cluster.scheduler_address, **quiet)

    with distributed.Client(cluster.scheduler_address) as client:
        pids = client.run(os.getpid)  # {worker address: pid}
        victim = sorted(pids)[0]
        client.run(stop_mid_write, str(stopped), workers=[victim])
        t = threading.Thread(target=work)
        t.start()
        t_end = time.time() + 300  # a bound on the wait only; the test never asserts a time
        while time.time() < t_end and t.is_alive() and not stopped.exists():
            time.sleep(0.01)
        assert stopped.exists(), "the victim worker never reached a shard's write"
        tmp = Path(stopped.read_text())
        assert tmp.is_file()  # a partial (unrenamed) shard is on disk when the worker dies
        complete = [p for p in store_of(cfg).rglob("*.h5") if not p.name.startswith(".")]
        assert len(complete) < n_total  # the extraction was still running
        os.kill(pids[victim], signal.SIGKILL)
        t.join(300)
        assert not t.is_alive()
        key = "extract-" + tmp.name[1:].split(".h5.")[0].rsplit("-", 1)[1]
        story = client.run_on_scheduler(
            lambda dask_scheduler: [tuple(s[:3]) for s in dask_scheduler.story(key)]
        )
    # the scheduler gave the task to a worker again after the kill: twice into "processing"
    assert [s[2] for s in story].count("processing") >= 2, story
    assert result["res"].n_images == 156
    got, want = digest(store_of(cfg), "*"), digest(store_of(local), "*")
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
    assert not tmp.exists() and not list(store_of(cfg).rglob("*.tmp"))


def test_worker_reopens_a_re_extracted_split(tmp_path):
    """A persistent worker keys the stores it keeps by content fingerprint: after the split is
    re-extracted (new content) it reads the new manifest, not the first one it opened."""
    from PIL import Image

    from pipeline.stages.predict import predict_task
    from pipeline.stages.predict_settings import PredictSettings
    from pipeline.store import FeatureStore, locate_split

    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 2, "test": 1}, size=(48, 64), seed=8)
    cfg = make_cfg(tmp_path, root, "train.epochs=1", "train.linear_epochs=1", "train.crop=32")
    run_extract(cfg, **quiet)
    run_train(cfg, **quiet)
    models_fp = json.loads((cfg.run_dir / "models" / "models.json").read_text())["fingerprint"]
    sdir = str(locate_split(*stored(cfg), "test"))
    first = FeatureStore(sdir)
    settings = PredictSettings.of(cfg).portable()
    _, unit = predict_task(settings, sdir, first.fingerprint, 0, str(tmp_path / "p"), models_fp)
    # a new image in the first category's shard changes the split's content
    src = root / "test" / first.items[0].category / "images"
    Image.open(next(src.glob("*.jpg"))).save(src / "zz_new.jpg")
    run_extract(cfg, **quiet)
    sdir = str(locate_split(*stored(cfg), "test"))  # the new content's folder
    second = FeatureStore(sdir)
    assert second.fingerprint != first.fingerprint
    _, unit2 = predict_task(settings, sdir, second.fingerprint, 0, str(tmp_path / "p"), models_fp)
    assert [r["stem"] for r in unit2["items"]] == [m.stem for m in second.items if m.shard == 0]
    assert "zz_new" in [r["stem"] for r in unit2["items"]]


def test_local_workers_keep_glibc_malloc_defaults():
    """The local:N workers' nanny does not set MALLOC_TRIM_THRESHOLD_ (Dask's default sets it,
    which freezes glibc's mmap threshold and doubles a CPU forward's time per image)."""
    from pipeline.executors import connect

    with connect("local:1") as client:
        envs = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert list(envs.values()) == [None]
