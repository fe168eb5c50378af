"""Several datasets in one feature cache, stores made before the index, `cache list` and
`cache gc`, and read-only commands that create nothing."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.core.config import copy_config
from pipeline.core.errors import StoreError
from pipeline.data.synth import make_dataset
from pipeline.stages.extract import run_extract
from pipeline.stages.predict import run_predict
from pipeline.stages.train import run_train
from pipeline.store import (
    INDEX_FILE,
    FeatureStore,
    locate_split,
    split_fingerprint,
)
from tests.conftest import TINY_TRAIN, make_cfg, run_cli, store_of, stored

quiet = dict(log=lambda s: None, progress=False)


def _sets(cfg) -> list[str]:
    out = []
    for s in (
        f"data.root={cfg.data.root}",
        f"paths.cache={cfg.paths.cache}",
        f"paths.outputs={cfg.paths.outputs}",
        f"run.name={cfg.run.name}",
        "backbone.name=mobilenet_v2",
        "backbone.weights=random",
        "extract.device=cpu",
        "train.device=cpu",
        "predict.device=cpu",
        *TINY_TRAIN,
    ):
        out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Dataset `a` extracted, trained and predicted; dataset `b` (other images, the same
    split names) extracted into the same cache afterwards, as run `b`."""
    base = tmp_path_factory.mktemp("two")
    a_root = make_dataset(base / "a", "obj_seg", {"train": 3, "test": 2}, size=(48, 64), seed=1)
    b_root = make_dataset(base / "b", "obj_seg", {"train": 3, "test": 2}, size=(48, 64), seed=2)
    a = make_cfg(base, a_root, *TINY_TRAIN, "run.name=a")
    run_extract(a, **quiet)
    run_train(a, **quiet)
    run_predict(a, "test", **quiet)
    b = copy_config(a, data__root=str(b_root), run__name="b")
    run_extract(b, **quiet)
    return base, a, b


def _copy(two, tmp_path):
    base, a, b = two
    shutil.copytree(base, tmp_path / "w")
    moved = {
        "paths__cache": str(tmp_path / "w" / "cache"),
        "paths__outputs": str(tmp_path / "w" / "outputs"),
    }
    return (tmp_path / "w", copy_config(a, **moved), copy_config(b, **moved))


# ----------------------------------------------------------------------------- several datasets


def test_two_datasets_share_a_cache_without_evicting_each_other(two, tmp_path):
    base, a, b = _copy(two, tmp_path)
    assert split_fingerprint(*stored(a), "train") != split_fingerprint(*stored(b), "train")
    assert (
        locate_split(*stored(a), "train").parent == locate_split(*stored(b), "train").parent
    )  # one store
    # back to a: nothing recomputed, its models and report current
    assert run_extract(a, **quiet).up_to_date
    assert run_train(a, **quiet).up_to_date
    assert run_predict(a, "test", **quiet).up_to_date
    r = run_cli("status", *_sets(a))
    assert r.stdout.splitlines() == [
        "extract-features: up-to-date",
        "train-head: up-to-date",
        "predict[test]: up-to-date",
    ], r.stdout
    # and b's stored splits are its own
    assert FeatureStore.open(*stored(b), "test").fingerprint == split_fingerprint(
        *stored(b), "test"
    )
    assert run_extract(b, **quiet).up_to_date


def test_store_made_before_the_index_is_adopted_not_recomputed(two, tmp_path):
    base, a, b = _copy(two, tmp_path)
    sdir = store_of(a)
    fps = {s: split_fingerprint(*stored(a), s) for s in ("train", "test")}
    for folder in [p for p in sdir.iterdir() if p.is_dir() and p.name != "runs"]:
        shutil.rmtree(folder) if folder != locate_split(
            *stored(a), folder.name.rsplit("-", 1)[0]
        ) else folder.rename(sdir / folder.name.rsplit("-", 1)[0])  # the old layout
    (sdir / INDEX_FILE).unlink()
    # readers find the old folders without the index ...
    assert {s: split_fingerprint(*stored(a), s) for s in fps} == fps
    assert run_train(a, **quiet).up_to_date
    # ... and stage 1 adopts them as they are
    res = run_extract(a, **quiet)
    assert res.up_to_date, res
    index = json.loads((sdir / INDEX_FILE).read_text())["splits"]
    assert sorted(index.values()) == ["test", "train"]
    assert {s: split_fingerprint(*stored(a), s) for s in fps} == fps


# ----------------------------------------------------------------------------- list and gc


def test_cache_list_shows_stores_splits_and_runs(two, tmp_path):
    base, a, b = _copy(two, tmp_path)
    r = run_cli("cache", "list", *_sets(a))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert store_of(a).name in out and "mobilenet_v2" in out
    assert out.count("  train [train-") == 2 and out.count("  test [test-") == 2, out
    assert str(a.data.root) in out and str(b.data.root) in out
    assert f"runs: {a.run_dir.resolve()}" in out, out


def test_cache_gc_removes_only_what_no_live_run_uses(two, tmp_path):
    base, a, b = _copy(two, tmp_path)
    wide = copy_config(a, extract__feature_dtype="float32", run__name="wide")
    run_extract(wide, ["test"], **quiet)  # a second store, which no run uses
    unused = store_of(wide)
    before = sorted(p.relative_to(base) for p in base.rglob("*"))
    r = run_cli("cache", "gc", *_sets(a))
    assert r.returncode == 0, r.stderr
    assert f"would remove {unused}" in r.stdout and "--yes" in r.stdout, r.stdout
    assert sorted(p.relative_to(base) for p in base.rglob("*")) == before  # a dry run
    r = run_cli("cache", "gc", "--yes", *_sets(a))
    assert r.returncode == 0, r.stderr
    assert not unused.exists()
    # the store run a uses stays, b's splits with it (indexed), and run a is current
    assert run_extract(a, **quiet).up_to_date and run_extract(b, **quiet).up_to_date
    assert run_predict(a, "test", **quiet).up_to_date
    # a run registered from another outputs folder keeps its store while its folder exists
    elsewhere = copy_config(wide, paths__outputs=str(tmp_path / "other"))
    run_extract(elsewhere, **quiet)
    run_train(elsewhere, **quiet)
    assert "nothing to remove" in run_cli("cache", "gc", "--yes", *_sets(a)).stdout
    shutil.rmtree(elsewhere.run_dir)
    r = run_cli("cache", "gc", "--yes", *_sets(a))
    assert f"removed {store_of(elsewhere)}" in r.stdout, r.stdout
    assert not store_of(elsewhere).exists()


# ----------------------------------------------------------------------------- read-only


@pytest.mark.parametrize(
    "command", [("status",), ("runs",), ("cache", "list"), ("cache", "gc"), ("config", "show")]
)
def test_read_only_commands_create_nothing(command, tmp_path, synth_root):
    work = tmp_path / "fresh"
    work.mkdir()
    r = run_cli(
        *command,
        "--set",
        f"data.root={synth_root}",
        "--set",
        "backbone.name=mobilenet_v2",
        "--set",
        "backbone.weights=random",
        cwd=work,
    )
    assert r.returncode == 0, r.stderr
    assert list(work.iterdir()) == []


# ----------------------------------------------------------------------------- hostile


def test_an_index_edited_to_name_another_split_is_refused_and_repaired(two, tmp_path):
    base, a, b = _copy(two, tmp_path)
    sdir = store_of(a)
    index = json.loads((sdir / INDEX_FILE).read_text())
    keys = {k.rsplit(":", 1)[1]: k for k in index["splits"] if str(a.data.root) in k}
    good = dict(index["splits"])
    index["splits"][keys["train"]] = good[keys["test"]]  # train -> test's folder
    (sdir / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(StoreError, match=f"{INDEX_FILE}: names test-.*for split 'train'"):
        run_train(a, force=True, **quiet)
    assert split_fingerprint(*stored(a), "train") is None
    r = run_cli("status", *_sets(a))
    assert r.stdout.splitlines()[0] == "extract-features: stale (data[train] changed)", r.stdout
    logged: list[str] = []
    res = run_extract(a, log=logged.append, progress=False)
    assert res.up_to_date, logged  # re-indexed, nothing computed
    assert json.loads((sdir / INDEX_FILE).read_text())["splits"] == good
    assert run_train(a, **quiet).up_to_date


def test_cache_gc_leaves_links_and_foreign_folders_alone(two, tmp_path):
    base, a, b = _copy(two, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(store_of(a), elsewhere)
    (store_of(a).parent / "linked").symlink_to(elsewhere, target_is_directory=True)
    r = run_cli("cache", "gc", "--yes", *_sets(a))
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "features.json").is_file()  # not followed
    # a cache folder the tool did not make: refused, nothing removed
    foreign = tmp_path / "foreign"
    shutil.copytree(tmp_path / "w" / "cache", foreign)
    (foreign / ".vit-objseg.json").unlink()
    (foreign / ".file_hashes.json").unlink(missing_ok=True)
    for runs in foreign.glob("features/*/runs"):
        shutil.rmtree(runs)  # no run uses its stores: all would be garbage
    wide = copy_config(a, paths__cache=str(foreign), paths__outputs=str(tmp_path / "none"))
    before = sorted(foreign.rglob("*"))
    r = run_cli("cache", "gc", "--yes", *_sets(wide))
    assert r.returncode == 2 and "not a cache folder made by vit-objseg" in r.stderr, r.stderr
    assert sorted(foreign.rglob("*")) == before
