"""The Markdown / HTML reports: contents, offline links, escaping, overlay colours, curves."""
from __future__ import annotations

import re
import shutil
import time
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from PIL import Image

from pipeline import report as report_mod
from pipeline.report import (CONTOUR_COLOUR, FN_COLOUR, FP_COLOUR, MASK_COLOUR, PANELS,
                             TP_COLOUR, Thumb, overlay, plot_training_curves, thumbnail_strip,
                             write_reports)

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
        self.imgs: list[dict] = []  # the attributes of every <img>
        self.strips: list[dict] = []  # per thumbnail strip: its <img> and its panel labels
        self._stack: list[str] = []  # class of each open element (void elements excluded)
        self._label: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]
        a = dict(attrs)
        cls = a.get("class") or ""
        if tag == "img":
            self.imgs.append(a)
            if self._stack and self._stack[-1] == "strip":
                self.strips.append({"img": a, "labels": []})
            return
        self._stack.append(cls)
        if tag == "span" and "panels" in self._stack[-2:-1]:
            self._label = []

    def handle_endtag(self, tag):
        if tag == "img":
            return
        if tag == "span" and self._label is not None:
            self.strips[-1]["labels"].append("".join(self._label))
            self._label = None
        if self._stack:
            self._stack.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self._label is not None:
            self._label.append(data)


def parse(text: str) -> RefCollector:
    parser = RefCollector()
    parser.feed(text)
    parser.close()
    return parser


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
    assert "loading=" not in text  # lazy images print blank
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


# ----------------------------------------------------------------------------- thumbnail strips

def strip_width(panel_w: int) -> int:
    return len(PANELS) * panel_w + (len(PANELS) - 1) * report_mod.STRIP_GAP


def test_html_thumbnails_are_four_panel_strips(written):
    paths, _ = written
    text = paths["html"].read_text(encoding="utf-8")
    parser = parse(text)
    assert len(parser.strips) == 3  # 2 best + 1 worst, one strip (one file) each
    assert len(PANELS) == 4 and PANELS == ("image", "ground truth", "prediction", "errors")
    for strip in parser.strips:
        assert strip["labels"] == list(PANELS)  # one label per panel, in order
        img = strip["img"]
        assert "loading" not in img
        with Image.open(paths["html"].parent / urllib.parse.unquote(img["src"])) as im:
            assert im.format == "JPEG"
            size = im.size
        # the fixture's 80x48 images are not downscaled: four 80x48 panels side by side
        assert size == (strip_width(80), 48)
        # shown at most at the stored size (never upscaled), with the stored aspect ratio
        w, h = int(img["width"]), int(img["height"])
        assert w <= size[0] and h <= size[1]
        assert abs(w / h - size[0] / size[1]) < 0.02
        assert img["alt"].endswith(", ".join(PANELS))
    assert "ground truth" in "".join(parser.text) and "errors" in "".join(parser.text)


def test_full_size_strips_are_stored_at_twice_their_css_size(tmp_path):
    thumbs = [fake_thumb("bear", "00000", 0.8, h=480, w=854, seed=1),
              fake_thumb("bear", "00001", 0.7, h=600, w=300, seed=2)]
    paths = write_reports(tmp_path, "test", fake_report(), [], thumbs, [], None)
    strips = parse(paths["html"].read_text(encoding="utf-8")).strips
    assert len(strips) == 2
    side = report_mod.PANEL_MAX_SIDE
    for strip, panel in zip(strips, ((side, round(480 * side / 854)), (side // 2, side))):
        f = tmp_path / urllib.parse.unquote(strip["img"]["src"])
        with Image.open(f) as im:
            assert im.size == (strip_width(panel[0]), panel[1])
            stored = im.size
        w, h = int(strip["img"]["width"]), int(strip["img"]["height"])
        # HiDPI-sharp: the page asks for half the stored pixels
        assert abs(2 * w - stored[0]) <= 1 and abs(2 * h - stored[1]) <= 1
        assert f.stat().st_size < 400_000  # JPEG ~85 (random noise: the worst case)


def test_thumbnail_strip_panels():
    h, w, gap = 12, 16, report_mod.STRIP_GAP
    grey = 100
    image = np.full((h, w, 3), grey, np.uint8)
    gt = np.zeros((h, w), bool)
    gt[2:10, 2:10] = True
    pred = np.zeros((h, w), bool)
    pred[2:10, 5:14] = True
    out, (pw, ph) = thumbnail_strip(image, gt, pred)
    assert (pw, ph) == (w, h)  # small: never upscaled
    assert out.dtype == np.uint8 and out.shape == (h, 4 * w + 3 * gap, 3)
    panels = [out[:, i * (w + gap): i * (w + gap) + w] for i in range(4)]
    for i in range(3):
        assert (out[:, i * (w + gap) + w: (i + 1) * (w + gap)] == 255).all()  # white gaps
    assert (panels[0] == image).all()  # (1) the image itself
    np.testing.assert_array_equal(panels[3], overlay(image, gt, pred))  # (4) the errors
    dim = round(grey * report_mod.MASK_DIM)
    for panel, mask in ((panels[1], gt), (panels[2], pred)):  # (2) ground truth, (3) prediction
        assert tuple(panel[0, 0]) == (dim, dim, dim)  # background dimmed
        assert tuple(panel[5, 6]) == MASK_COLOUR or panel[5, 6].min() > grey  # object bright
    assert tuple(panels[1][5, 2]) == MASK_COLOUR and tuple(panels[2][5, 2]) == (dim, dim, dim)
    assert tuple(panels[1][5, 12]) == (dim, dim, dim) and panels[2][5, 12].min() > grey

    big, (pw, ph) = thumbnail_strip(np.zeros((480, 854, 3), np.uint8),
                                    np.zeros((480, 854), bool), np.zeros((480, 854), bool))
    assert (pw, ph) == (report_mod.PANEL_MAX_SIDE, 270) and big.shape == (270, strip_width(pw), 3)
    with pytest.raises(ValueError):
        thumbnail_strip(image, gt[:5], pred)


# ----------------------------------------------------------------------------- best flags

def test_best_flags_use_unrounded_values():
    flags = report_mod._best_flags
    assert flags([0.9124, 0.9116, 0.5]) == [True, False, False]  # both shown as 0.912
    assert flags([0.9124, 0.9124, 0.5]) == [True, True, False]  # a true tie
    assert flags([np.float32(0.25), 0.25, float("nan"), None]) == [True, True, False, False]
    assert flags([0.9, float("nan")]) == [False, False]  # nothing to compete with
    assert flags([]) == []


def bold_cells(html_text: str) -> list[str]:
    return re.findall(r'<td class="best">([^<]*)</td>', html_text)


def test_near_ties_are_not_bolded(tmp_path):
    report = fake_report(categories=("bear",))
    v = report["variants"]
    v["pac"]["overall"]["miou"] = 0.9124
    v["linear_bilinear"]["overall"]["miou"] = 0.9116  # also shown as 0.912
    v["pac"]["overall"]["j_mean"] = 0.8004
    v["linear_bilinear"]["overall"]["j_mean"] = 0.8004  # a true tie
    v["pac"]["per_category"]["bear"]["boundary_f"] = 0.70051
    v["linear_nearest"]["per_category"]["bear"]["boundary_f"] = 0.70149  # both shown as 0.701
    paths = write_reports(tmp_path, "test", report, [], [], [], None)
    lines = paths["md"].read_text(encoding="utf-8").splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("| variant |"))
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
            for l in lines[header + 2: header + 5]}
    assert rows["pac"][0] == "**0.912**" and rows["linear_bilinear"][0] == "0.912"
    assert rows["pac"][3] == "**0.800**" and rows["linear_bilinear"][3] == "**0.800**"
    f_table = lines[lines.index("### Boundary F"):]
    bear = next(l for l in f_table if l.startswith("| bear |")).split("|")[3:-1]
    assert [c.strip() for c in bear] == ["**0.701**", "0.522", "0.701"]  # nearest, bilinear, pac
    text = paths["html"].read_text(encoding="utf-8")
    assert bold_cells(text).count("0.912") == 1 and bold_cells(text).count("0.800") == 2
    assert bold_cells(text).count("0.701") == 1


def test_css_fits_narrow_screens(written):
    """The findings at a 360 px viewport: no fixed minimum wider than the screen."""
    paths, _ = written
    text = paths["html"].read_text(encoding="utf-8")
    css = text[text.index("<style>"): text.index("</style>")]
    assert "max-content 1fr" not in css  # dl.notes: a long term no longer pushes the page wide
    assert not re.search(r"minmax\(\d+px", css)  # grids use minmax(min(Npx,100%), ...) or 0
    assert "@media (max-width:600px)" in css
