"""Content identity that `cp -p`, `rsync -t` and bit rot cannot fool: the checksum memo is
keyed by a stat stamp with the inode and ctime, a reader that finds a shard failing its
checksum marks it for repair, and `status --verify` rehashes everything."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.commands.segment import run_segment
from pipeline.core.errors import StoreError
from pipeline.core.fsutil import FileHasher, sha256_file, stat_stamp
from pipeline.stages import extract, train
from pipeline.stages.extract import run_extract
from pipeline.stages.predict import run_predict
from pipeline.stages.train import run_train
from pipeline.store import bad_marker, locate_split, read_manifest
from tests.conftest import TINY_TRAIN, cli_sets, make_cfg, run_cli, stored, synth_images

QUIET = dict(log=lambda s: None, progress=False)


def cp_p(src: Path, dst: Path) -> None:
    """Replace `dst` by other bytes of the same size with its mtime restored (`cp -p`)."""
    st = dst.stat()
    data = bytearray(src.read_bytes()[: st.st_size].ljust(st.st_size, b"\0"))
    assert bytes(data) != dst.read_bytes()
    tmp = dst.with_name(dst.name + ".new")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, dst)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (dst.stat().st_size, dst.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_memo_is_not_fooled_by_same_size_and_mtime(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"A" * 100)
    memo = tmp_path / "memo.json"
    h = FileHasher(memo)
    first = h.digest(f)
    h.save()
    # in place, same size, mtime restored (ctime cannot be restored)
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.write(b"B")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert FileHasher(memo).digest(f) == sha256_file(f) != first
    # replaced by another file (new inode), same size and mtime
    g = tmp_path / "b.bin"
    g.write_bytes(b"C" * 100)
    cp_p(g, f)
    assert FileHasher(memo).digest(f) == sha256_file(f)
    assert len(stat_stamp(f.stat())) == 5


@pytest.fixture()
def data_copy(synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    return root


def test_a_dataset_image_replaced_with_cp_p_is_recomputed(data_copy, tmp_path):
    cfg = make_cfg(tmp_path, data_copy, *TINY_TRAIN)
    run_extract(cfg, ["test"], **QUIET)
    imgs = sorted((data_copy / "test").rglob("images/*.jpg"))
    cp_p(imgs[1], imgs[0])
    st = extract.status(cfg, ["test"])
    assert st.state == "stale" and "data[test] changed" in st.why, st.line()
    res = run_extract(cfg, ["test"], **QUIET)
    assert not res.up_to_date and res.n_images == 3  # the category's shard only


def test_a_segment_input_replaced_with_cp_p_is_recomputed(trained, synth_root, tmp_path):
    cfg = trained[2]
    src = tmp_path / "in"
    synth_images(src, ["p.jpg", "q.jpg"], synth_root)
    out = tmp_path / "out"
    assert run_segment(cfg, [src], out, progress=False).n_written == 2
    cp_p(src / "q.jpg", src / "p.jpg")
    res = run_segment(cfg, [src], out, progress=False)
    assert (res.n_written, res.n_current) == (1, 1)


def _forge_memo(cfg, shard: Path) -> None:
    """Make the memo say the (corrupted) shard has its recorded checksum: what bit rot looks
    like to a memo keyed by stat (the stamp does not change when the disk flips bits)."""
    memo_path = Path(cfg.paths.cache) / ".file_hashes.json"
    memo = json.loads(memo_path.read_text())
    key = str(shard.resolve())
    m, _ = read_manifest(shard.parent.parent)
    good = next(e.sha256 for e in m.shards if shard.name in e.file)
    memo[key] = [stat_stamp(shard.stat()), good]
    memo_path.write_text(json.dumps(memo))


def test_bit_rot_in_a_shard_is_marked_by_its_reader_and_repaired(synth_root, tmp_path):
    """A shard corrupted without a stat change: the memo says intact, train-head's reader
    finds the checksum mismatch and marks the shard; then status says stale, plain
    extract-features recomputes that shard only, and train-head runs."""
    cfg = make_cfg(tmp_path, synth_root, *TINY_TRAIN)
    run_extract(cfg, **QUIET)
    split_dir = locate_split(*stored(cfg), "train")
    shard = sorted((split_dir / "shards").glob("*.h5"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(shard, "r+b") as fh:
        fh.write(bytes(data))
    _forge_memo(cfg, shard)
    assert extract.status(cfg).up_to_date  # fooled, as a stat memo is by bit rot
    with pytest.raises(StoreError, match="fails its checksum"):
        run_train(cfg, **QUIET)
    assert bad_marker(shard).is_file()
    st = extract.status(cfg)
    assert st.state == "stale" and "failed its checksum when read" in st.why, st.line()
    m, _ = read_manifest(split_dir)
    rows = {e.file.split("/")[-1]: len(e.rows) for e in m.shards}
    assert len(rows) > 1
    res = run_extract(cfg, **QUIET)
    assert not res.up_to_date and res.n_images == rows[shard.name], res  # that shard only
    assert not bad_marker(shard).exists()
    assert extract.status(cfg).up_to_date
    run_train(cfg, **QUIET)
    assert train.status(cfg).up_to_date


def test_status_verify_rehashes_and_marks_what_it_finds(synth_root, tmp_path):
    cfg = make_cfg(tmp_path, synth_root, *TINY_TRAIN)
    run_extract(cfg, **QUIET)
    shard = sorted((locate_split(*stored(cfg), "test") / "shards").glob("*.h5"))[-1]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    with open(shard, "r+b") as fh:
        fh.write(bytes(data))
    _forge_memo(cfg, shard)
    sets = cli_sets(tmp_path, synth_root)
    r = run_cli("status", *sets)
    assert r.returncode == 0 and "extract-features: up-to-date" in r.stdout, r.stdout
    r = run_cli("status", "--verify", *sets)
    assert r.returncode == 0, r.stderr
    assert "extract-features: stale" in r.stdout and shard.name in r.stdout, r.stdout
    assert bad_marker(shard).is_file()
    # plain status now knows too, and plain extract-features repairs that shard only
    assert "extract-features: stale" in run_cli("status", *sets).stdout
    m, _ = read_manifest(shard.parent.parent)
    n = next(len(e.rows) for e in m.shards if e.file.endswith(shard.name))
    res = run_extract(cfg, ["test"], **QUIET)
    assert not res.up_to_date and res.n_images == n < m.n_images
    assert extract.status(cfg, ["test"]).up_to_date


def test_predict_after_cp_p_of_a_dataset_image_is_stale(data_copy, tmp_path):
    """End to end: the wrong-report-with-exit-0 case. After `cp -p` over an image, `run`
    recomputes its features, so the report is of the new content."""
    cfg = make_cfg(tmp_path, data_copy, *TINY_TRAIN)
    run_extract(cfg, **QUIET)
    run_train(cfg, **QUIET)
    before = json.loads(run_predict(cfg, "test", **QUIET).report_json.read_text())
    imgs = sorted((data_copy / "test").rglob("images/*.jpg"))
    cp_p(imgs[2], imgs[0])
    run_extract(cfg, **QUIET)
    res = run_predict(cfg, "test", **QUIET)
    assert not res.up_to_date
    after = json.loads(res.report_json.read_text())
    assert after["fingerprints"]["features"] != before["fingerprints"]["features"]


def test_predict_outputs_are_verified_and_only_the_damage_repaired(trained_copy):
    """A deleted or replaced mask, a deleted report figure or an edited Markdown report:
    status says stale naming it, a plain predict restores it (recomputing only the shard of
    a bad mask) and everything else is left as it was."""
    from pipeline.stages import predict as predict_stage

    cfg = trained_copy[2]
    pdir = cfg.run_dir / "predictions" / "test"
    masks = sorted(pdir.rglob("*.png"))
    clean = {p: p.read_bytes() for p in masks}
    md = cfg.run_dir / "report_test.md"
    md_clean = md.read_bytes()
    figure = sorted((cfg.run_dir / "report_test_files").rglob("*.*"))[0]
    masks[0].unlink()
    masks[1].write_bytes(masks[2].read_bytes())
    md.write_text("edited")
    figure.unlink()
    st = predict_stage.status(cfg, "test")
    assert st.state == "stale", st.line()
    for what in (masks[0].name, "report_test.md"):
        assert what in st.why, st.line()
    untouched = {
        p: p.stat().st_mtime_ns
        for p in masks[3:]
        if p.parent != masks[0].parent and p.parent != masks[1].parent
    }
    assert untouched  # the test can see a shard recomputed that needed not be
    res = run_predict(cfg, "test", **QUIET)
    assert not res.up_to_date
    assert {p: p.read_bytes() for p in masks} == clean
    assert md.read_bytes() == md_clean and figure.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in untouched.items())  # other shards kept
    assert predict_stage.status(cfg, "test").up_to_date
    # bit rot in a mask (no stat change) is seen by --verify only
    data = bytearray(masks[4].read_bytes())
    data[-20] ^= 1
    st_before = masks[4].stat()
    with open(masks[4], "r+b") as fh:
        fh.write(bytes(data))
    memo = json.loads((cfg.run_dir / "stages" / ".outs_hashes.json").read_text())
    memo[str(masks[4].resolve())][0] = stat_stamp(masks[4].stat())  # the stat memo fooled
    (cfg.run_dir / "stages" / ".outs_hashes.json").write_text(json.dumps(memo))
    assert predict_stage.status(cfg, "test").up_to_date
    assert predict_stage.status(cfg, "test", verify=True).state == "stale"
    assert st_before.st_size == masks[4].stat().st_size
