"""Stage 1 end to end: the cache's content and format, up-to-date detection, bad files,
the writer lock, and resumption after SIGKILL giving the same cache as a clean run."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import copy_config
from pipeline.core.errors import LockError, StoreError
from pipeline.core.fsutil import exclusive_lock
from pipeline.data import load_image, load_mask
from pipeline.data.synth import make_dataset
from pipeline.stages.extract import run_extract, status
from pipeline.store import FeatureStore, locate_split, store_lock
from tests.conftest import ROOT, SHARED_DATA, SHARED_WEIGHTS, make_cfg, run_cli, store_of, stored

quiet = dict(log=lambda s: None, progress=False)


def cache_digest(folder):
    """{relative path: sha256} of every file of a cache folder (lock files excluded)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix != ".lock"
    }


def test_extract_end_to_end(tmp_path, synth_root):
    cfg = make_cfg(tmp_path, synth_root)
    res = run_extract(cfg, **quiet)
    assert res.n_images == 18 and res.errors == [] and not res.up_to_date
    cache = FeatureStore.open(*stored(cfg), "train")
    assert len(cache) == 12 and cache.categories() == ["block", "disc"]
    item = cache.read(0)
    # 96x136 image, centre-cropped to 96x128 -> a 6x8 grid of MobileNetV2 features (the
    # default backbone.layers: 96 + 160 channels)
    assert item.features.shape == (6, 8, 256) and item.features.dtype == np.float16
    assert item.meta.box.as_tuple() == (0, 4, 96, 128) and item.meta.orig_size == (96, 136)
    src = synth_root / item.meta.source
    assert np.array_equal(item.image, load_image(src))
    assert np.array_equal(item.mask, load_mask(synth_root / "train/block/annotations/00000.png"))
    assert item.meta.source == "train/block/images/00000.jpg"
    assert np.isfinite(item.features.astype(np.float32)).all()
    # the second run is a no-op, and so are changes that do not affect features
    assert run_extract(cfg, **quiet).up_to_date
    cfg2 = copy_config(cfg, **{"extract.batch_size": 3, "extract.num_workers": 1})
    assert run_extract(cfg2, **quiet).up_to_date
    assert status(cfg2).state == "up-to-date"


def test_features_do_not_depend_on_batch_size(tmp_path, synth_root):
    a = make_cfg(tmp_path / "a", synth_root, "extract.batch_size=1")
    b = make_cfg(tmp_path / "b", synth_root, "extract.batch_size=5")
    run_extract(a, ["test"], **quiet)
    run_extract(b, ["test"], **quiet)
    ca, cb = FeatureStore.open(*stored(a), "test"), FeatureStore.open(*stored(b), "test")
    for i in range(len(ca)):
        np.testing.assert_allclose(
            ca.features(i).astype(np.float32),
            cb.features(i).astype(np.float32),
            rtol=1e-2,
            atol=1e-2,
        )


def test_config_change_marks_stale_and_recomputes(tmp_path, synth_root):
    cfg = make_cfg(tmp_path, synth_root)
    run_extract(cfg, ["test"], **quiet)
    assert status(cfg, ["test"]).state == "up-to-date"
    cfg_pad = copy_config(cfg, **{"extract.fit": "pad"})
    st = status(cfg_pad, ["test"])
    assert st.state == "stale" and 'extract.fit: "crop" -> "pad"' in st.why
    res = run_extract(cfg_pad, ["test"], **quiet)
    assert res.n_images == 6
    features = FeatureStore.open(*stored(cfg_pad), "test").read(0).features
    assert features.shape == (6, 9, 256)  # 96x144 canvas
    assert store_of(cfg_pad) != store_of(cfg)


def test_changed_image_recomputes_only_its_shard(tmp_path):
    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 3}, size=(48, 64))
    cfg = make_cfg(tmp_path, root)
    run_extract(cfg, **quiet)
    before = cache_digest(store_of(cfg))
    img = root / "train/disc/images/00001.jpg"
    arr = load_image(img).copy()
    arr[:8] = 0
    Image.fromarray(arr).save(img)
    st = status(cfg)
    assert st.state == "stale" and "data[train] changed" in st.why
    old_dir = locate_split(*stored(cfg), "train")
    block = next(old_dir.glob("shards/block-*.h5"))
    inode = block.stat().st_ino
    res = run_extract(cfg, **quiet)
    after = cache_digest(store_of(cfg))
    # the split's new content has a folder of its own; the superseded one is gone
    new_dir = locate_split(*stored(cfg), "train")
    assert new_dir != old_dir and not old_dir.exists()

    def shards(digests):
        return {k.rsplit("/", 1)[1]: v for k, v in digests.items() if k.endswith(".h5")}

    was, now = shards(before), shards(after)
    # the disc shard was computed again, the block shard kept byte for byte (the same file)
    assert {k for k in was if k.startswith("disc-")}.isdisjoint(now)
    assert {k: v for k, v in was.items() if k.startswith("block-")} == {
        k: v for k, v in now.items() if k.startswith("block-")
    }
    assert (new_dir / "shards" / block.name).stat().st_ino == inode
    assert res.n_images == 3


def test_bad_files_are_reported_and_the_rest_is_cached(tmp_path):
    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 3}, size=(48, 64))
    (root / "train/disc/images/00000.jpg").write_bytes(b"garbage")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "train/block/annotations/00002.png")
    (root / "train/block/annotations/00001.png").unlink()
    cfg = make_cfg(tmp_path, root)
    # through the CLI: one line per file, a summary, exit 1
    r = run_cli("extract-features", *[a for s in _sets(cfg) for a in ("--set", s)])
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert any("disc/images/00000.jpg: corrupt" in line for line in lines)
    assert any("block/annotations/00002.png: mask size 10x10 differs" in line for line in lines)
    assert not any("00001" in line for line in lines)  # an image without annotation: no problem
    assert lines[-1] == (
        "error: 2 files could not be used (listed above); the other images are cached"
    )
    store = FeatureStore.open(*stored(cfg), "train")
    assert len(store) == 4
    unannotated = [m for m in store.items if not m.annotated]
    assert [(m.category, m.stem) for m in unannotated] == [("block", "00001")]
    assert store.mask(unannotated[0].index) is None
    # nothing changed: up to date (exit 0), with a reminder of the skipped files
    r = run_cli("extract-features", *[a for s in _sets(cfg) for a in ("--set", s)])
    assert r.returncode == 0 and "up-to-date" in r.stdout and "2 files were skipped" in r.stderr
    # the same through the API, with a forced recompute
    res = run_extract(cfg, force=True, **quiet)
    assert res.n_images == 4 and res.n_errors == 2


def _sets(cfg):
    return [
        f"data.root={cfg.data.root}",
        f"paths.cache={cfg.paths.cache}",
        f"paths.outputs={cfg.paths.outputs}",
        "backbone.name=mobilenet_v2",
        "backbone.weights=random",
        "extract.device=cpu",
        "extract.batch_size=4",
    ]


def test_empty_and_missing_dataset_errors(tmp_path):
    cfg = make_cfg(tmp_path, tmp_path / "nothing")
    r = run_cli("extract-features", *[a for s in _sets(cfg) for a in ("--set", s)])
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: dataset folder not found: {tmp_path / 'nothing'}"
    ]


def test_missing_upstream_names_the_command(tmp_path, synth_root):
    cfg = make_cfg(tmp_path, synth_root)
    with pytest.raises(
        StoreError,
        match="no stored features of split 'train' of .*; run "
        "`python cli.py extract-features --split train`",
    ):
        FeatureStore.open(*stored(cfg), "train")


def test_second_writer_is_refused_with_a_clear_message(tmp_path, synth_root):
    from pipeline.core.owned import claim_folder

    cfg = make_cfg(tmp_path, synth_root)
    claim_folder(cfg.paths.cache, "paths.cache")  # as the first writer did before locking
    with exclusive_lock(store_lock(store_of(cfg)), "held"):
        with pytest.raises(LockError, match="in use by another process"):
            run_extract(cfg, **quiet)


def test_reader_is_lazy_and_picklable(tmp_path, synth_root):
    import pickle

    cfg = make_cfg(tmp_path, synth_root)
    run_extract(cfg, ["test"], **quiet)
    cache = FeatureStore.open(*stored(cfg), "test")
    assert len(cache._open) == 0  # nothing opened by listing
    clone = pickle.loads(pickle.dumps(cache))
    assert np.array_equal(clone.features(2), cache.features(2))


def test_shards_are_deterministic_hdf5(tmp_path, synth_root):
    """Two clean runs give byte-identical caches (no timestamps in the files)."""
    a = make_cfg(tmp_path / "a", synth_root)
    b = make_cfg(tmp_path / "b", synth_root)
    run_extract(a, **quiet)
    run_extract(b, **quiet)
    da, db = cache_digest(store_of(a)), cache_digest(store_of(b))
    shards = [k for k in da if k.endswith(".h5")]
    assert shards and all(da[k] == db[k] for k in shards)


def test_sigkill_then_resume_equals_clean_run(tmp_path):
    """Kill a running extraction at several instants; the resumed cache equals a clean one."""
    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 70, "test": 20}, size=(64, 80))
    clean = make_cfg(tmp_path / "clean", root)
    run_extract(clean, **quiet)
    expected = cache_digest(store_of(clean))

    killed = make_cfg(tmp_path / "killed", root)
    args = [sys.executable, str(ROOT / "cli.py"), "extract-features"] + [
        a for s in _sets(killed) for a in ("--set", s)
    ]
    shards = store_of(killed) / locate_split(*stored(clean), "train").name / "shards"  # same data

    def n_shards():
        return len(list(shards.glob("*.h5"))) if shards.is_dir() else 0

    # kill while the first shard is being written, then each time one more shard is complete
    for extra in (0, 1, 1):
        start = n_shards()
        p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t_end = time.time() + 60
        while time.time() < t_end and p.poll() is None:
            if shards.is_dir() and n_shards() >= start + extra:
                break
            time.sleep(0.002)
        assert p.poll() is None, "the extraction finished before it could be killed"
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert n_shards() < 4  # it really was interrupted
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = cache_digest(store_of(killed))
    assert got == expected


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED_DATA / "obj_seg").is_dir() or not SHARED_WEIGHTS.is_file(),
    reason="../shared/data/obj_seg or the MobileNetV2 weights are absent",
)
def test_real_images_with_pretrained_mobilenet(tmp_path):
    cfg = make_cfg(
        tmp_path,
        SHARED_DATA / "obj_seg",
        f"backbone.weights={SHARED_WEIGHTS}",
        "extract.batch_size=8",
    )
    res = run_extract(cfg, ["test"], **quiet)
    assert res.n_images == 35 and not res.errors
    cache = FeatureStore.open(*stored(cfg), "test")
    assert cache.categories() == ["bear", "dog"]
    item = cache.read(0)
    assert item.features.shape == (30, 53, 256) and item.image.shape == (480, 854, 3)
    # real features separate object from background: the mean feature of object patches
    # differs from the background's far more than features vary within the background
    f = item.features.astype(np.float32)
    m = item.mask[:480, 3:851].reshape(30, 16, 53, 16).mean(axis=(1, 3)) > 0.5
    gap = np.linalg.norm(f[m].mean(0) - f[~m].mean(0))
    spread = np.linalg.norm(f[~m].std(0))
    assert m.any() and gap > 0.5 * spread


def test_backbone_layers_changes_the_feature_key_and_the_channels(tmp_path, synth_root):
    """backbone.layers = 1 keeps the key of stores made before the setting existed; another
    value is another store, whose features have the concatenated channels; 0 (the default)
    is the backbone's measured default: 2 for mobilenet_v2, 1 for the ViTs."""
    from pipeline.models.devices import config_keys

    auto, one, two = (make_cfg(tmp_path, synth_root, f"backbone.layers={n}") for n in (0, 1, 2))
    assert auto.backbone.layers == 0 and "backbone.layers" not in config_keys(one).feature.params()
    assert store_of(auto) == store_of(two) != store_of(one)
    vit = make_cfg(tmp_path, synth_root, "backbone.name=dino_vits16")
    assert "backbone.layers" not in config_keys(vit).feature.params()
    for cfg, channels in ((one, 96), (two, 96 + 160)):
        run_extract(cfg, ["test"], log=lambda s: None, progress=False)
        store = FeatureStore(locate_split(*stored(cfg), "test"))
        assert store.read(0).features.shape[-1] == channels
