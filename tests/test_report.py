"""The Markdown / HTML reports: contents, offline links, escaping, overlay colours, curves."""
from __future__ import annotations

import shutil
import time
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pipeline.report import (CONTOUR_COLOUR, FN_COLOUR, FP_COLOUR, TP_COLOUR, Thumb, overlay,
                             plot_training_curves, write_reports)

VARIANTS = ("linear_nearest", "linear_bilinear", "pac")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
ODD = "a<b&c"  # a category name with HTML special characters


def metrics(miou: float, j: float, f: float, n: int) -> dict:
    return {"miou": miou, "fg_iou": round(miou - 0.05, 3), "bg_iou": round(miou + 0.05, 3),
            "accuracy": 0.951, "precision": 0.874, "recall": 0.862, "j_mean": j,
            "boundary_f": f, "n_images": n}


def fake_report(categories=("bear", ODD)) -> dict:
    base = {"linear_nearest": (0.812, 0.734, 0.401), "linear_bilinear": (0.846, 0.771, 0.522),
            "pac": (0.912, 0.858, 0.713)}
    variants = {}
    for k, (v, (m, j, f)) in enumerate(base.items()):
        variants[v] = {
            "overall": metrics(m, j, f, 5),
            "per_category": {c: metrics(round(m - 0.01 * (i + 1), 3), round(j - 0.02 * i, 3),
                                        round(f + 0.01 * i, 3), 2 + i)
                             for i, c in enumerate(categories)},
        }
    return {"split": "test", "n_images": 5,
            "backbone": {"name": "mobilenet_v2", "weights": "../shared/weights/mnv2.pt"},
            "run": "unit-test", "created": "2024-01-01T00:00:00", "config": {"x": 1},
            "variants": variants}


def fake_per_image(categories=("bear", ODD)) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for c in categories:
        for i in range(3):
            j = {v: float(rng.uniform(0.5, 1.0)) for v in VARIANTS}
            f = {v: float(rng.uniform(0.3, 1.0)) for v in VARIANTS}
            rows.append({"category": c, "stem": f"{i:05d}", "j": j, "f": f})
    return rows


def fake_thumb(category: str, stem: str, j: float, h: int = 48, w: int = 80,
               seed: int = 0) -> Thumb:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    gt = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
    pred = (yy - h / 2) ** 2 + (xx - w / 2 - 4) ** 2 < (min(h, w) / 3) ** 2
    return Thumb(category, stem, j, j - 0.1, image, gt, pred)


HISTORY = [{"phase": "linear", "epoch": e, "loss": 0.7 / (e + 1)} for e in range(4)] + \
          [{"phase": "upsampler", "epoch": e, "loss": 0.3 / (e + 1), "val_miou": 0.8 + 0.02 * e,
            "val_miou_linear_bilinear": 0.78} for e in range(3)]


class RefCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture
def written(tmp_path):
    report = fake_report()
    best = [fake_thumb("bear", "00002", 0.95, seed=1), fake_thumb(ODD, "00001", 0.9, seed=2)]
    worst = [fake_thumb(ODD, "00000", 0.31, seed=3)]
    paths = write_reports(tmp_path / "run", "test", report, fake_per_image(), best, worst, HISTORY)
    return paths, report


def test_write_reports_markdown(written):
    paths, report = written
    assert set(paths) == {"md", "html", "files"}
    assert paths["md"] == paths["md"].parent / "report_test.md" and paths["md"].is_file()
    assert paths["html"].name == "report_test.html" and paths["html"].is_file()
    assert paths["files"].name == "report_test_files" and paths["files"].is_dir()
    assert not (paths["md"].parent / "report_test.json").exists()  # the caller writes the JSON
    md = paths["md"].read_text(encoding="utf-8")
    assert "mobilenet_v2" in md and "test" in md.splitlines()[0]
    lines = md.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("| variant |"))
    for col in ("mIoU", "FG IoU", "BG IoU", "J mean", "Boundary F", "Accuracy", "Precision",
                "Recall", "images"):
        assert col in lines[header]
    rows = {l.split("|")[1].strip(): l for l in lines[header + 2: header + 5]}
    assert set(rows) == set(VARIANTS)
    for v in VARIANTS:
        o = report["variants"][v]["overall"]
        for k in ("miou", "fg_iou", "bg_iou", "j_mean", "boundary_f", "precision", "recall"):
            assert f"{o[k]:.3f}" in rows[v]
    assert "**0.912**" in rows["pac"] and "**0.912**" not in rows["linear_nearest"]
    assert "0.912" in md and "0.858" in md and "0.713" in md
    # the per-category tables, the notes
    for title in ("### mIoU", "### J mean", "### Boundary F"):
        assert title in md
    assert "bear" in md and "a\\<b&c" in md  # escaped for Markdown, renders as a<b&c
    assert "course convention" in md


def test_html_links_are_local_and_exist(written):
    paths, _ = written
    text = paths["html"].read_text(encoding="utf-8")
    parser = RefCollector()
    parser.feed(text)
    parser.close()
    assert parser.refs, "the page references its figures"
    srcs = [r for r in parser.refs if r.endswith((".png", ".jpg"))]
    assert len([r for r in srcs if r.endswith(".png")]) == 4  # charts and training curves
    assert len([r for r in srcs if r.endswith(".jpg")]) == 3  # thumbnails
    base = paths["html"].parent
    for ref in parser.refs:
        assert not ref.lower().startswith(("http://", "https://", "//", "file:")), ref
        assert not Path(urllib.parse.unquote(ref)).is_absolute(), ref
        target = base / urllib.parse.unquote(ref.split("#")[0])
        assert target.is_file(), f"{ref} does not exist next to the HTML"
    for ref in srcs:
        assert ref.startswith("report_test_files/")
        head = (base / urllib.parse.unquote(ref)).read_bytes()[:8]
        assert head == PNG_SIGNATURE if ref.endswith(".png") else head[:3] == JPEG_SIGNATURE
    assert "<script" not in text.lower() and "@import" not in text and "url(" not in text
    # the folder is movable: copy it elsewhere, the links still resolve
    moved = base.parent / "moved"
    moved.mkdir()
    shutil.copy(paths["html"], moved)
    shutil.copytree(paths["files"], moved / paths["files"].name)
    for ref in srcs:
        assert (moved / urllib.parse.unquote(ref)).is_file()


def test_html_content_and_escaping(written):
    paths, report = written
    text = paths["html"].read_text(encoding="utf-8")
    assert ODD not in text  # raw, it would be markup
    assert "a&lt;b&amp;c" in text
    parser = RefCollector()
    parser.feed(text)
    visible = "".join(parser.text)
    assert ODD in visible  # and it reads right once parsed
    for v in VARIANTS:
        assert v in visible
    assert "0.912" in visible and "unit-test" in visible  # the run is shown
    assert "2024-01-01" not in visible  # unknown keys are ignored
    assert "Training curves" in visible and "Best images" in visible and "Worst images" in visible
    assert "a<b&c / 00001" in visible and "J 0.900" in visible  # thumbnail captions
    assert "false positive" in visible  # the legend


def test_rewrite_drops_stale_files_and_handles_minimal_inputs(tmp_path):
    report = fake_report(categories=("bear",))
    del report["run"]
    many = [fake_thumb("bear", f"{i:05d}", 0.5, seed=i) for i in range(4)]
    paths = write_reports(tmp_path, "val", report, fake_per_image(("bear",)), many, [], HISTORY)
    assert len(list(paths["files"].glob("best_*.jpg"))) == 4
    # numpy scalars and missing values render too
    report["variants"]["pac"]["overall"]["miou"] = np.float32(0.5)
    report["variants"]["pac"]["overall"]["n_images"] = np.int64(5)
    report["variants"]["pac"]["overall"]["boundary_f"] = float("nan")
    del report["variants"]["pac"]["overall"]["recall"]
    paths = write_reports(tmp_path, "val", report, [], many[:1], [], None)
    pac_row = next(l for l in paths["md"].read_text().splitlines() if l.startswith("| pac |"))
    assert "| 0.500 |" in pac_row and pac_row.count("\u2014") == 2 and pac_row.endswith("| 5 |")
    assert sorted(p.name for p in paths["files"].iterdir()) == [
        "best_01.jpg", "per_category_miou.png", "variants.png"]
    assert "Training curves" not in paths["html"].read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_write_reports_is_fast(tmp_path):
    thumbs = [fake_thumb("bear", f"{i:05d}", 0.5, h=480, w=854, seed=i) for i in range(12)]
    plot_training_curves(HISTORY, tmp_path / "warm.png")  # matplotlib's import is not the point
    # CPU time, not wall time: the budget is < 2 s on an idle machine, and the test must not
    # flake on a loaded CI runner
    t0 = time.process_time()
    write_reports(tmp_path, "test", fake_report(), fake_per_image() * 50, thumbs[:6], thumbs[6:],
                  HISTORY)
    assert time.process_time() - t0 < 2.0


def test_overlay_size():
    image = np.zeros((480, 854, 3), np.uint8)
    mask = np.zeros((480, 854), bool)
    out = overlay(image, mask, mask)
    assert out.dtype == np.uint8 and out.shape == (180, 320, 3)
    assert overlay(image, mask, mask, max_side=100).shape == (56, 100, 3)
    tall = overlay(np.zeros((500, 50, 3), np.uint8), np.zeros((500, 50), bool),
                   np.zeros((500, 50), bool), max_side=200)
    assert tall.shape == (200, 20, 3)
    small = overlay(np.zeros((10, 12, 3), np.uint8), np.zeros((10, 12), bool),
                    np.zeros((10, 12), bool))
    assert small.shape == (10, 12, 3)  # never upscaled
    with pytest.raises(ValueError):
        overlay(image, mask[:10], mask)


def test_overlay_colours():
    grey = 100
    image = np.full((12, 12, 3), grey, np.uint8)
    gt = np.zeros((12, 12), bool)
    gt[2:10, 2:10] = True  # object; its outline is the ring at rows/cols 2 and 9
    pred = np.zeros((12, 12), bool)
    pred[2:10, 5:12] = True  # misses cols 2-4, spills into cols 10-11
    out = overlay(image, gt, pred).astype(int)

    def dominant(px):
        return int(np.argmax(px))

    assert tuple(out[0, 0]) == (grey, grey, grey)  # true negative: untouched
    tp, fp, fn = out[5, 6], out[5, 11], out[5, 3]
    assert dominant(tp) == 1 and tp[1] > grey  # green
    assert dominant(fp) == 0 and fp[0] > grey  # red
    assert dominant(fn) == 2 and fn[2] > grey  # blue
    for px, colour in ((tp, TP_COLOUR), (fp, FP_COLOUR), (fn, FN_COLOUR)):
        # a tint: each channel between the grey's and the colour's
        assert all(min(grey, c) <= p <= max(grey, c) for p, c in zip(px, colour))
    assert tuple(out[2, 2]) == CONTOUR_COLOUR and tuple(out[9, 6]) == CONTOUR_COLOUR
    assert tuple(out[5, 9]) == CONTOUR_COLOUR and tuple(out[5, 10]) != CONTOUR_COLOUR


def test_plot_training_curves(tmp_path):
    assert plot_training_curves([], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    out = plot_training_curves(HISTORY, tmp_path / "sub" / "curves.png")
    assert out == tmp_path / "sub" / "curves.png"
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    only_linear = plot_training_curves(HISTORY[:4], tmp_path / "linear.png")
    assert only_linear.read_bytes()[:8] == PNG_SIGNATURE


def test_no_pyplot_no_display(tmp_path):
    """Headless and side-effect free: pyplot (and so a GUI backend) is never imported."""
    import os
    import subprocess
    import sys
    code = ("import sys; from pipeline.report import plot_training_curves as p; "
            f"p([{{'phase': 'linear', 'epoch': 0, 'loss': 1.0}}], {str(tmp_path / 'c.png')!r}); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND")}
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_SIGNATURE
