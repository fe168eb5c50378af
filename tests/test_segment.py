"""`segment`: masks for any images with the run's models. Outputs and their names (nested
folders, file arguments, spaces, EXIF orientation), byte identity with `predict` on a cached
split, refusals (models of another backbone, no models, duplicate outputs), resumption, and
bad images skipped with exit 1."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.commands.segment import RECORD_FILE, run_segment
from tests.conftest import TINY_TRAIN, cli_sets, make_cfg, one_line_error, run_cli, synth_images

FAST = TINY_TRAIN


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_mask(mask_path: Path, size: tuple[int, int]) -> np.ndarray:
    """An 8-bit L PNG of `size` (w, h) holding only 0 and 255; returns it as bool."""
    with Image.open(mask_path) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == size, (
            mask_path,
            im.size,
            im.mode,
        )
        a = np.asarray(im)
    assert set(np.unique(a)) <= {0, 255}
    return a > 127


# ----------------------------------------------------------------------------- the contract


def test_masks_equal_predict_byte_for_byte(trained, tmp_path):
    """Every image of the cached test split: segment's mask file is predict's, byte for byte
    (same decoding, canvas, backbone forward, float16 features, heads and threshold)."""
    base, root, cfg = trained
    out = tmp_path / "seg"
    res = run_segment(cfg, [root / "test"], out, progress=False)
    preds = sorted((cfg.run_dir / "predictions" / "test").rglob("*.png"))
    assert len(preds) == 6 and not res.errors
    for p in preds:
        cat = p.parent.name
        mine = out / cat / "images" / p.name
        assert mine.read_bytes() == p.read_bytes(), mine
        with Image.open(root / "test" / cat / "images" / f"{p.stem}.jpg") as src:
            check_mask(mine, src.size)
            with Image.open(out / "overlays" / cat / "images" / f"{p.stem}.jpg") as ov:
                assert ov.format == "JPEG" and ov.size == src.size
    # the annotation PNGs in the folder are images too: segmented, never confused with the masks
    assert res.n_written == 12 and (out / "disc" / "annotations" / "00000.png").is_file()
    # the same images in another batch composition and order: the same bytes
    sub = tmp_path / "seg2"
    files = sorted((root / "test").rglob("images/*.jpg"), reverse=True)[:3]
    run_segment(cfg, files, sub, overlays=False, progress=False)
    for f in files:
        assert (sub / f"{f.stem}.png").read_bytes() == (
            cfg.run_dir / "predictions/test" / f.parent.parent.name / f"{f.stem}.png"
        ).read_bytes()
    assert not (sub / "overlays").exists()


def test_folders_files_spaces_hidden_and_link_loops(trained_copy, tmp_path):
    """(A copy of the run: the last command writes into the run's default output folder.)"""
    base, root, cfg = trained_copy
    photos = tmp_path / "photos"
    synth_images(
        photos,
        [
            "a/b/deep.jpg",
            "top.png",
            "with space.jpg",
            "UPPER.JPG",
            ".hidden.jpg",
            ".cache/skipped.jpg",
            "a/b/c.webp",
        ],
        root,
    )
    (photos / "notes.txt").write_text("not an image")
    (photos / "a" / "loop").symlink_to(photos, target_is_directory=True)  # a link loop
    single = tmp_path / "elsewhere" / "one shot.jpeg"
    synth_images(single.parent, [single.name], root)
    out = tmp_path / "out dir"
    r = run_cli(
        "segment", str(photos), str(single), "--out", str(out), *cli_sets(base, root), timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert re.fullmatch(
        rf"segment: 6 masks in [\d.]+ s, [\d.]+ images/s after loading the "
        rf"models -> "
        rf"{re.escape(str(out))}\n",
        r.stdout,
    ), r.stdout
    rels = {"a/b/deep.png", "top.png", "with space.png", "UPPER.png", "a/b/c.png", "one shot.png"}
    written = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert written == rels
    assert {
        p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.jpg")
    } == {r[:-4] + ".jpg" for r in rels}
    with Image.open(photos / "top.png") as im:
        check_mask(out / "top.png", im.size)
    # a rerun does nothing, quickly
    r = run_cli("segment", str(photos), str(single), "--out", str(out), *cli_sets(base, root))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"segment: 6 masks up-to-date -> {out}\n", r.stdout + r.stderr
    # default output folder: <outputs>/<run>/segment; --no-overlays; no dataset and no
    # feature store needed, and none written
    r = run_cli(
        "segment",
        str(single),
        "--no-overlays",
        *cli_sets(
            base, root, f"data.root={tmp_path / 'no-data'}", f"paths.cache={tmp_path / 'no-cache'}"
        ),
    )
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "no-cache").exists() and not (tmp_path / "no-data").exists()
    default = cfg.run_dir / "segment"
    assert (default / "one shot.png").is_file() and not (default / "overlays").exists()
    assert (default / "one shot.png").read_bytes() == (out / "one shot.png").read_bytes()


def test_exif_orientation_is_applied(trained, tmp_path):
    """A JPEG stored sideways with EXIF orientation 6: the mask has the displayed size and
    equals the mask of the displayed pixels saved without EXIF (so it is aligned)."""
    base, root, cfg = trained
    shown = np.full((72, 120, 3), (40, 90, 160), np.uint8)  # as a viewer shows it: H 72, W 120
    shown[:30, :40] = (220, 60, 40)  # the object, in the top-left corner only
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)  # 120 x 72 on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    (tmp_path / "in").mkdir()
    stored.save(tmp_path / "in" / "sideways.jpg", exif=exif.tobytes(), quality=95)
    from pipeline.data import load_image

    pixels = load_image(tmp_path / "in" / "sideways.jpg")
    assert pixels.shape == (72, 120, 3)
    assert pixels[:30, :40].mean(axis=(0, 1))[0] > 150
    assert pixels[40:, 60:].mean(axis=(0, 1))[0] < 100
    Image.fromarray(pixels).save(tmp_path / "in" / "plain.png")  # the same pixels, no EXIF
    out = tmp_path / "out"
    res = run_segment(cfg, [tmp_path / "in"], out, progress=False)
    assert res.n_written == 2 and not res.errors
    a = check_mask(out / "sideways.png", (120, 72))
    b = check_mask(out / "plain.png", (120, 72))
    assert np.array_equal(a, b)
    with Image.open(out / "overlays" / "sideways.jpg") as ov:
        assert ov.size == (120, 72)


# ----------------------------------------------------------------------------- refusals


def test_refuses_models_of_another_backbone_or_training(trained, tmp_path):
    base, root, cfg = trained
    synth_images(tmp_path / "in", ["x.jpg"], root)
    out = tmp_path / "out"
    for extra in ("backbone.name=dino_vits16", "train.lr=1e-3"):
        r = run_cli(
            "segment", str(tmp_path / "in"), "--out", str(out), *cli_sets(base, root, extra)
        )
        assert r.returncode == 1
        line = one_line_error(r, "train-head", extra.split("=")[0])
        assert r.stdout == "", line
    assert not list(out.rglob("*.png"))


def test_no_models_is_one_line(trained, tmp_path):
    base, root, cfg = trained
    synth_images(tmp_path / "in", ["x.jpg"], root)
    r = run_cli("segment", str(tmp_path / "in"), *cli_sets(base, root, "run.name=untrained"))
    assert r.returncode == 1
    one_line_error(r, "no trained models", "train-head")
    assert not (base / "outputs" / "untrained" / "segment").exists()


def test_two_images_for_one_mask_is_an_error_before_any_work(trained, tmp_path):
    base, root, cfg = trained
    synth_images(tmp_path / "in", ["a.jpg", "a.png", "b.jpg"], root)
    out = tmp_path / "out"
    r = run_cli("segment", str(tmp_path / "in"), "--out", str(out), *cli_sets(base, root))
    assert r.returncode == 1
    one_line_error(r, str(tmp_path / "in" / "a.jpg"), str(tmp_path / "in" / "a.png"))
    assert not out.exists()
    synth_images(tmp_path / "other", ["b.png"], root)
    r = run_cli(
        "segment",
        str(tmp_path / "in" / "b.jpg"),
        str(tmp_path / "other" / "b.png"),
        "--out",
        str(out),
        *cli_sets(base, root),
    )
    assert r.returncode == 1
    one_line_error(r, "b.jpg", str(tmp_path / "other" / "b.png"))
    assert not out.exists()
    r = run_cli("segment", str(tmp_path / "empty-does-not-exist"), *cli_sets(base, root))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("segment", str(tmp_path / "empty"), *cli_sets(base, root))
    assert r.returncode == 1
    one_line_error(r, "no images")


# ------------------------------------------------------------------------ resumption, bad images


def test_rerun_recomputes_only_what_changed(trained, tmp_path):
    base, root, cfg = trained
    src = tmp_path / "in"
    synth_images(src, ["p.jpg", "q.jpg", "r.jpg"], root)
    out = tmp_path / "out"
    first = run_segment(cfg, [src], out, progress=False)
    assert (first.n_written, first.n_current) == (3, 0)
    assert (out / RECORD_FILE).is_file()
    stamps = {n: os.stat(out / f"{n}.png").st_mtime_ns for n in "pqr"}
    again = run_segment(cfg, [src], out, progress=False)
    assert (again.n_written, again.n_current) == (0, 3)
    # touched, same content: nothing recomputed (the record compares sha256)
    os.utime(src / "q.jpg", ns=(1, 1))
    assert run_segment(cfg, [src], out, progress=False).n_written == 0
    # one image replaced: only it
    synth_images(src, ["q.jpg"], root, first=4)
    res = run_segment(cfg, [src], out, progress=False)
    assert (res.n_written, res.n_current) == (1, 2)
    assert os.stat(out / "p.png").st_mtime_ns == stamps["p"]
    assert os.stat(out / "r.png").st_mtime_ns == stamps["r"]
    assert os.stat(out / "q.png").st_mtime_ns != stamps["q"]
    # a deleted mask or overlay is written again
    (out / "p.png").unlink()
    (out / "overlays" / "r.jpg").unlink()
    assert run_segment(cfg, [src], out, progress=False).n_written == 2
    # other settings (the threshold) or --force: everything
    other = make_cfg(base, root, *FAST, "predict.threshold=0.7")
    assert run_segment(other, [src], out, progress=False).n_written == 3
    assert run_segment(other, [src], out, progress=False).n_written == 0
    assert run_segment(other, [src], out, force=True, progress=False).n_written == 3


def test_bad_image_is_skipped_and_exit_1(trained, tmp_path):
    base, root, cfg = trained
    src = tmp_path / "in"
    synth_images(src, ["good1.jpg", "good2.png"], root)
    (src / "broken.jpg").write_bytes(b"not a jpeg at all")
    good = (src / "good1.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (src / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "out"
    r = run_cli("segment", str(src), "--out", str(out), *cli_sets(base, root))
    assert r.returncode == 1, r.stderr
    skipped = [line for line in r.stderr.splitlines() if line.startswith("  skipped: ")]
    assert len(skipped) == 3, r.stderr
    for name in ("broken.jpg", "truncated.jpg", "dangling.png"):
        assert sum(name in line for line in skipped) == 1, (name, skipped)
    one_line_error(r, "3 images or folders could not be segmented")
    assert r.stdout.startswith("segment: 2 masks in ")
    assert {p.name for p in out.glob("*.png")} == {"good1.png", "good2.png"}
    # a rerun retries the bad ones only, and a repaired one is then written
    shutil.copy(src / "good1.jpg", src / "broken.jpg")
    r = run_cli("segment", str(src), "--out", str(out), *cli_sets(base, root))
    # one mask (singular), the rate counted after the models were loaded
    assert r.returncode == 1 and "segment: 1 mask in " in r.stdout, r.stdout
    assert "images/s after loading the models; 2 up-to-date -> " in r.stdout, r.stdout
    assert (out / "broken.png").read_bytes() == (out / "good1.png").read_bytes()


def test_a_killed_segment_loses_at_most_the_masks_in_flight(trained, tmp_path):
    """SIGKILL-like stop (os._exit, no cleanup) after 9 file writes: every image whose mask
    and overlay were written is current on the rerun (the record is written ahead of each
    batch's files), so the rerun computes exactly the others. Counted, never timed."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    base, root, cfg = trained
    src, out = tmp_path / "in", tmp_path / "out"
    names = [f"i{k:02d}" for k in range(10)]
    synth_images(src, [f"{n}.jpg" for n in names], root)
    script = f"""
import os, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
import pipeline.commands.segment as seg
from tests.conftest import TINY_TRAIN, make_cfg
cfg = make_cfg(Path({str(base)!r}), Path({str(root)!r}), *TINY_TRAIN)
real, calls = seg.atomic_write_bytes, []
def killing(path, data):
    calls.append(path)
    if len(calls) > 9:
        os._exit(9)
    real(path, data)
seg.atomic_write_bytes = killing
seg.run_segment(cfg, [Path({str(src)!r})], Path({str(out)!r}), progress=False)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 9, r.stderr
    complete = [
        n
        for n in names
        if (out / f"{n}.png").is_file() and (out / "overlays" / f"{n}.jpg").is_file()
    ]
    assert 4 <= len(complete) < 10
    res = run_segment(cfg, [src], out, progress=False)
    assert (res.n_written, res.n_current) == (10 - len(complete), len(complete))


def test_a_side_longer_than_a_jpeg_overlay_allows_is_one_bad_image(trained, tmp_path):
    """A 1 x 66000 image: with overlays it is one skipped image naming the file and the way
    out (--no-overlays); without, its mask is written."""
    base, root, cfg = trained
    src = tmp_path / "in"
    synth_images(src, ["ok.jpg"], root)
    Image.fromarray(np.zeros((16, 66000, 3), np.uint8)).save(src / "long.png")
    res = run_segment(cfg, [src], tmp_path / "out", progress=False)
    assert res.n_written == 1 and len(res.errors) == 1
    assert "long.png" in res.errors[0] and "--no-overlays" in res.errors[0]
    res = run_segment(cfg, [src / "long.png"], tmp_path / "out2", overlays=False, progress=False)
    assert res.n_written == 1 and not res.errors
    check_mask(tmp_path / "out2" / "long.png", (66000, 16))
