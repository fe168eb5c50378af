"""Hostile and odd inputs, end to end: a decompression bomb (a 20000x20000 PNG of 48 KB), a
file too long for data.max_pixels, a FIFO named x.jpg, a link y.jpg to /dev/zero, file and
folder names that are not UTF-8 (an old Latin-1 archive) and a file whose read fails with EIO.

Whatever could hang or exhaust memory on a regression (a FIFO, /dev/zero) runs in a CLI
subprocess with a time limit and an address-space limit, so it fails instead."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from PIL import Image

from pipeline.data.synth import make_dataset
from pipeline.store import FeatureStore, locate_split
from tests.conftest import ROOT, cli_sets, store_of, stored, trained_run

CAFE, ETE = b"caf\xe9", b"\xe9t\xe9"  # Latin-1 "café" and "été": not UTF-8
MEMORY_LIMIT = 8 << 30  # address space of a CLI subprocess (torch maps ~2 GiB)


def latin1_dataset(root: Path) -> Path:
    """The generated dataset with the category `disc` renamed b'caf\\xe9' and its image and
    annotation 00000 renamed b'\\xe9t\\xe9' in every split."""
    make_dataset(root, "obj_seg", {"train": 4, "test": 2}, size=(64, 96), seed=3)
    for split in ("train", "test"):
        d = os.fsencode(root / split)
        os.rename(d + b"/disc", d + b"/" + CAFE)
        for sub, ext in ((b"images", b".jpg"), (b"annotations", b".png")):
            folder = d + b"/" + CAFE + b"/" + sub + b"/"
            os.rename(folder + b"00000" + ext, folder + ETE + ext)
    return root


@pytest.fixture(scope="module")
def latin_run(tmp_path_factory):
    """extract, train-head (tiny) and predict on the Latin-1 dataset, in this process."""
    base = tmp_path_factory.mktemp("latin")
    root = latin1_dataset(base / "data")
    return base, root, trained_run(base, root)


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` with stdout strict UTF-8 (as in a UTF-8 locale: a name that is
    not UTF-8 printed there would raise; stderr keeps Python's backslashreplace), limited in
    time and address space. Paths may hold surrogates (passed as their original bytes)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        encoding="utf-8",
        errors="strict",
        timeout=timeout,
        preexec_fn=limit,
    )


def skipped_lines(stderr: str) -> list[str]:
    return [
        line.strip()[len("skipped: ") :]
        for line in stderr.splitlines()
        if line.strip().startswith("skipped: ")
    ]


def shown(path: Path | str) -> str:
    """A path as the CLI's stderr shows it (backslashreplace: \\udcXX per undecodable byte)."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def bomb(path: Path) -> Path:
    """A 20000x20000 PNG: 400 megapixels (1.2 GB decoded as RGB) in 48 KB."""
    Image.new("1", (20000, 20000)).save(path)
    return path


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# ----------------------------------------------------------------------------- names


def test_latin1_names_round_trip(latin_run, monkeypatch):
    """Stage 1 stores the names (bytes attrs where not UTF-8, str as before where UTF-8),
    predict writes the mask at predictions/<same bytes>/<same bytes>.png, report_<split>.json
    escapes the names (\\udcXX: os.fsencode of the loaded name gives the bytes back), and the
    HTML and Markdown reports are valid UTF-8 showing U+FFFD."""
    base, root, cfg = latin_run
    pred = os.fsencode(cfg.run_dir / "predictions" / "test")
    assert sorted(os.listdir(pred)) == [b"block", CAFE]
    assert sorted(os.listdir(pred + b"/" + CAFE)) == [b"00001.png", ETE + b".png"]

    raw = (cfg.run_dir / "report_test.json").read_bytes()
    assert raw.isascii() and b"caf\\udce9" in raw
    report = json.loads(raw)
    names = {(os.fsencode(r["category"]), os.fsencode(r["stem"])) for r in report["per_image"]}
    assert (CAFE, ETE) in names and (CAFE, b"00001") in names

    for ext in ("html", "md"):
        text = (cfg.run_dir / f"report_test.{ext}").read_bytes().decode("utf-8")  # strict
        assert "caf\ufffd" in text and "\ufffdt\ufffd" in text, ext

    with FeatureStore.open(*stored(cfg), "test") as store:
        latin = [m.index for m in store.items if os.fsencode(m.category) == CAFE]
        assert {os.fsencode(store.items[i].stem) for i in latin} == {ETE, b"00001"}
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # a stored image has no limit
        assert store.image(latin[0]).shape == (64, 96, 3)
    shards = sorted((store.split_dir / "shards").glob("*.h5"))
    encodings = {}
    for shard in shards:
        with h5py.File(shard, "r") as f:
            for g in f.values():
                dt = g.attrs.get_id("category").dtype
                encodings[os.fsencode(g.attrs["category"])] = h5py.check_string_dtype(dt).encoding
    assert encodings == {b"block": "utf-8", CAFE: "ascii"}  # UTF-8 names: str, as before


# ----------------------------------------------------------------------------- segment


def test_segment_hostile_folder(latin_run, tmp_path):
    """segment on a folder holding a Latin-1-named image, a 400 MP PNG, a 10 GB sparse
    ".jpg", a FIFO x.jpg, a link y.jpg to /dev/zero and a corrupt Latin-1-named file: one
    line each on stderr (nothing hangs, nothing is read whole), the good mask is written at
    its bytes name, .segment.json escapes the name, exit 1, stdout strict UTF-8 survives."""
    base, root, cfg = latin_run
    inp = tmp_path / "in"
    inp.mkdir()
    src = os.fsencode(root / "test") + b"/" + CAFE + b"/images/" + ETE + b".jpg"
    shutil.copyfile(src, os.fsencode(inp) + b"/" + ETE + b".jpg")
    bomb(inp / "big.png")
    sparse(inp / "huge.jpg", 10 << 30)
    os.mkfifo(inp / "x.jpg")
    (inp / "y.jpg").symlink_to("/dev/zero")
    bad = os.fsdecode(os.fsencode(inp) + b"/" + CAFE + b".jpg")
    Path(bad).write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    r = run_cli("segment", *cli_sets(base, root), str(inp), "--out", str(out))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = skipped_lines(r.stderr)
    assert len(lines) == 5, r.stderr
    by_file = {line.split(": ", 1)[0]: line for line in lines}
    assert set(by_file) == {
        shown(p) for p in (inp / "big.png", inp / "huge.jpg", inp / "x.jpg", inp / "y.jpg", bad)
    }, lines
    big = by_file[str(inp / "big.png")]
    assert "20000x20000" in big and "400 megapixels" in big and "data.max_pixels" in big
    assert "data.max_pixels" in by_file[str(inp / "huge.jpg")]
    assert by_file[str(inp / "x.jpg")].endswith("not a regular file (a FIFO)")
    assert by_file[str(inp / "y.jpg")].endswith("not a regular file (a character device)")
    assert "\\udce9" in shown(bad) and "corrupt" in by_file[shown(bad)]
    assert "segment: 1 mask in " in r.stdout, r.stdout
    assert os.listdir(os.fsencode(out)).count(ETE + b".png") == 1
    raw = (out / ".segment.json").read_bytes()
    assert raw.isascii()
    assert ETE + b".png" in {os.fsencode(k) for k in json.loads(raw)["masks"]}


# ----------------------------------------------------------------------------- stage 1


def test_extract_features_hostile_dataset(latin_run, tmp_path):
    """extract-features on the Latin-1 dataset plus a 400 MP PNG, a file too long for
    data.max_pixels, a FIFO x.jpg and a link y.jpg to /dev/zero: one line each, the other
    images cached, exit 1; the rerun is up to date (exit 0) instead of failing again."""
    _, latin_root, _ = latin_run
    root = tmp_path / "data"
    shutil.copytree(latin_root, root)
    images = Path(os.fsdecode(os.fsencode(root / "train") + b"/" + CAFE + b"/images"))
    bomb(images / "big.png")
    sparse(images / "long.jpg", (16 << 20) + 8 * 1_000_000 + 1)
    os.mkfifo(images / "x.jpg")
    (images / "y.jpg").symlink_to("/dev/zero")
    args = ("extract-features", *cli_sets(tmp_path, root, "data.max_pixels=1000000"))
    r = run_cli(*args)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = skipped_lines(r.stderr)
    by_file = {line.split(": ", 1)[0]: line for line in lines}
    assert set(by_file) == {shown(images / n) for n in ("big.png", "long.jpg", "x.jpg", "y.jpg")}
    assert "20000x20000" in by_file[shown(images / "big.png")]
    assert "data.max_pixels = 1000000" in by_file[shown(images / "long.jpg")]
    assert "not a regular file (a FIFO)" in by_file[shown(images / "x.jpg")]
    assert "not a regular file (a character device)" in by_file[shown(images / "y.jpg")]
    assert "extract-features: 12 images" in r.stdout, r.stdout
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "extract-features: up-to-date" in again.stdout


def test_read_error_names_the_file_in_the_cli(tmp_path):
    """An image whose read fails with EIO (a link to /proc/self/mem: a regular file, EIO at
    offset 0): the CLI's line names it, `<path>: Input/output error`, no traceback."""
    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 1}, size=(32, 32))
    link = root / "train" / "disc" / "images" / "mem.jpg"
    link.symlink_to("/proc/self/mem")
    r = run_cli("extract-features", *cli_sets(tmp_path, root))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert any(
        f"{link}: " in line and "Input/output error" in line for line in r.stderr.splitlines()
    ), r.stderr
    assert "error: Input/output error" not in r.stderr.splitlines()  # the line before the fix


def test_raising_max_pixels_retries_only_the_shards_it_refused(tmp_path):
    """Stage 1 with data.max_pixels below one category's image size: those images are
    skipped (exit 1 path) and the others cached; the rerun is up to date; raising the limit
    recomputes only the shard of the refused images, and no other stage key changes."""
    from pipeline.stages import extract
    from pipeline.stages.extract import run_extract
    from pipeline.store import read_manifest
    from tests.conftest import make_cfg

    root = make_dataset(
        tmp_path / "data", "obj_seg", {"train": 4, "test": 2}, size=(64, 96), seed=4
    )
    big = sorted((root / "test").iterdir())[0]  # one category: its images 4x the area
    for img in (big / "images").iterdir():
        Image.open(img).resize((192, 128)).save(img)
    for ann in (big / "annotations").iterdir():
        Image.open(ann).resize((192, 128), Image.NEAREST).save(ann)
    quiet = dict(log=lambda s: None, progress=False)
    small = make_cfg(tmp_path, root, "data.max_pixels=10000")
    first = run_extract(small, **quiet)
    n_big = len(list((big / "images").iterdir()))
    assert first.n_errors == n_big and all("data.max_pixels" in e for e in first.errors)
    again = run_extract(small, **quiet)
    assert again.up_to_date and again.n_errors == n_big
    large = make_cfg(tmp_path, root, "data.max_pixels=30000")
    assert store_of(large) == store_of(small)  # not part of the feature key
    st = extract.status(large)
    assert st.state == "stale" and "data.max_pixels" in st.why, st.line()
    res = run_extract(large, **quiet)
    assert not res.up_to_date and res.n_errors == 0
    assert res.n_images == n_big  # that category's shard only
    m, _ = read_manifest(locate_split(*stored(large), "test"))
    assert m.n_images == len(list((root / "test").rglob("images/*.jpg"))) and not m.errors
