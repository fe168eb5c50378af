"""The Markdown / HTML reports: contents, offline links, escaping, the headline, vector
figures, click-to-enlarge thumbnails, the variants side by side, the unannotated split,
other runs, the settings and provenance, overlay colours, curves, packaging."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
import urllib.parse
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import report as report_mod
from pipeline.core.fsutil import temporary_name
from pipeline.report import (
    CONTOUR_COLOUR,
    FN_COLOUR,
    FP_COLOUR,
    MASK_COLOUR,
    PANELS,
    TP_COLOUR,
    Thumb,
    VariantThumb,
    headline_text,
    overlay,
    plot_training_curves,
    thumbnail_strip,
    variant_strip,
    write_reports,
)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("linear_nearest", "linear_bilinear", "pac")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
ODD = "a<b&c"  # a category name with HTML special characters
SCRIPT = "<script>alert(1)</script>"
FIGURES = ("overall", "per_category", "per_image_j", "training_curves")


def metrics(miou: float, j: float, f: float, n: int) -> dict:
    return {
        "miou": miou,
        "fg_iou": round(miou - 0.05, 3),
        "bg_iou": round(miou + 0.05, 3),
        "accuracy": 0.951,
        "precision": 0.874,
        "recall": 0.862,
        "j_mean": j,
        "boundary_f": f,
        "n_images": n,
    }


def fake_report(categories=("bear", ODD)) -> dict:
    base = {
        "linear_nearest": (0.812, 0.734, 0.401),
        "linear_bilinear": (0.846, 0.771, 0.522),
        "pac": (0.912, 0.858, 0.713),
    }
    variants = {}
    for v, (m, j, f) in base.items():
        variants[v] = {
            "overall": metrics(m, j, f, 5),
            "per_category": {
                c: metrics(
                    round(m - 0.01 * (i + 1), 3),
                    round(j - 0.02 * i, 3),
                    round(f + 0.01 * i, 3),
                    2 + i,
                )
                for i, c in enumerate(categories)
            },
        }
    return {
        "split": "test",
        "n_images": 5,
        "n_predicted": 5,
        "backbone": {"name": "mobilenet_v2", "weights": "../shared/weights/mnv2.pt"},
        "run": "unit-test",
        "created": "2024-01-01T00:00:00",
        "config": {
            "backbone": {"name": "mobilenet_v2", "weights": "../shared/weights/mnv2.pt"},
            "train": {"lr": 0.0005, "epochs": 20, "batch_size": 4},
            "upsampler": {"hidden": 16, "channels": [4, 4, 4, 1], "residual": True},
            "predict": {"threshold": 0.5, "thumbnails": 6},
        },
        "fingerprints": {"features": "f00dfeed01234567", "models": "c0ffee0123456789"},
        "versions": {"vit-objseg": "0.1.0", "torch": "2.14.1"},
        "variants": variants,
    }


def fake_per_image(categories=("bear", ODD)) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for c in categories:
        for i in range(3):
            j = {v: float(rng.uniform(0.5, 1.0)) for v in VARIANTS}
            f = {v: float(rng.uniform(0.3, 1.0)) for v in VARIANTS}
            rows.append({"category": c, "stem": f"{i:05d}", "j": j, "f": f})
    return rows


def parsed_rows(rows: list[dict]) -> list:
    """Per-image rows as the report writer holds them (typed)."""
    return report_mod.parse_report({"per_image": rows}, strict=False).per_image


def fake_masks(h: int, w: int, shift: int = 4):
    yy, xx = np.mgrid[:h, :w]
    gt = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
    pred = (yy - h / 2) ** 2 + (xx - w / 2 - shift) ** 2 < (min(h, w) / 3) ** 2
    return gt, pred


def fake_thumb(
    category: str, stem: str, j: float, h: int = 48, w: int = 80, seed: int = 0
) -> Thumb:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    gt, pred = fake_masks(h, w)
    return Thumb(category, stem, j, j - 0.1, image, gt, pred)


def fake_variant_thumb(
    category: str, stem: str, h: int = 48, w: int = 80, seed: int = 0
) -> VariantThumb:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    gt, _ = fake_masks(h, w)
    masks = {v: fake_masks(h, w, shift)[1] for v, shift in zip(VARIANTS, (9, 6, 2), strict=True)}
    return VariantThumb(category, stem, image, gt, masks)


HISTORY = [{"phase": "linear", "epoch": e, "loss": 0.7 / (e + 1)} for e in range(4)] + [
    {
        "phase": "upsampler",
        "epoch": e,
        "loss": 0.3 / (e + 1),
        "val_miou": 0.8 + 0.02 * e,
        "val_miou_linear_bilinear": 0.78,
    }
    for e in range(3)
]


class RefCollector(HTMLParser):
    """The page as a browser reads it: links, visible text, images, thumbnail strips (their
    <img>, the link around it, their panel labels) and elements by id."""

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.text: list[str] = []
        self.imgs: list[dict] = []  # the attributes of every <img>
        self.strips: list[dict] = []  # per thumbnail strip: img, href (enlargement), labels
        self.ids: dict[str, list[str]] = {}  # element id -> its text
        self._stack: list[tuple[str, dict]] = []  # open elements (void elements excluded)
        self._label: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
            if len(self._stack) >= 2 and self._stack[-2][1].get("class") == "strip":
                assert self._stack[-1][0] == "a", "a strip's image is a link"
                self.strips.append({"img": a, "href": self._stack[-1][1].get("href"), "labels": []})
            return
        if tag in ("meta", "br", "wbr", "link", "hr", "input"):
            return
        self._stack.append((tag, a))
        if "id" in a:
            self.ids[a["id"]] = []
        if tag == "span" and len(self._stack) >= 2 and self._stack[-2][1].get("class") == "panels":
            self._label = []

    def handle_endtag(self, tag):
        if tag in ("img", "meta", "br", "wbr", "link", "hr", "input"):
            return
        if tag == "span" and self._label is not None:
            self.strips[-1]["labels"].append("".join(self._label))
            self._label = None
        if self._stack:
            self._stack.pop()

    def handle_data(self, data):
        self.text.append(data)
        for _, a in self._stack:
            if "id" in a:
                self.ids[a["id"]].append(data)
        if self._label is not None:
            self._label.append(data)

    @property
    def visible(self) -> str:
        return " ".join(" ".join(self.text).split())


def parse(text: str) -> RefCollector:
    parser = RefCollector()
    parser.feed(text)
    parser.close()
    return parser


def squash(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One report with everything (read-only for the tests that use it)."""
    report = fake_report()
    best = [fake_thumb("bear", "00002", 0.95, seed=1), fake_thumb(ODD, "00001", 0.9, seed=2)]
    worst = [fake_thumb(ODD, "00000", 0.31, seed=3)]
    paths = write_reports(
        tmp_path_factory.mktemp("written") / "run",
        "test",
        report,
        fake_per_image(),
        best,
        worst,
        HISTORY,
    )
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
    header = next(i for i, line in enumerate(lines) if line.startswith("| variant |"))
    for col in (
        "mIoU",
        "FG IoU",
        "BG IoU",
        "J mean",
        "Boundary F",
        "Accuracy",
        "Precision",
        "Recall",
        "images",
    ):
        assert col in lines[header]
    rows = {line.split("|")[1].strip(): line for line in lines[header + 2 : header + 5]}
    assert list(rows) == list(VARIANTS)  # in reading order
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
    # figures: the PNG copies, with links to the vector ones
    for key in FIGURES:
        assert f"](report_test_files/{key}.png)" in md
        assert f"](report_test_files/{key}.svg)" in md and f"](report_test_files/{key}.pdf)" in md
    # thumbnails: each row links to its enlargement
    for name in ("best_01", "best_02", "worst_01"):
        assert f"](report_test_files/{name}_full.jpg)" in md


def test_markdown_links_exist(written):
    paths, _ = written
    md = paths["md"].read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)]+)\)", md)
    assert len(links) > 10
    for link in links:
        assert not re.match(r"[a-z]+:", link), link
        assert (paths["md"].parent / urllib.parse.unquote(link)).is_file(), link


def test_html_links_are_local_and_exist(written):
    paths, _ = written
    text = paths["html"].read_text(encoding="utf-8")
    parser = parse(text)
    assert parser.refs, "the page references its figures"
    srcs = [i["src"] for i in parser.imgs]
    assert sorted(r for r in srcs if r.endswith(".svg")) == sorted(
        f"report_test_files/{k}.svg" for k in FIGURES
    )  # vector figures on the page
    assert len([r for r in srcs if r.endswith(".jpg")]) == 3  # thumbnails
    assert len(srcs) == 7
    base = paths["html"].parent
    for ref in parser.refs:
        assert not ref.lower().startswith(("http://", "https://", "//", "file:")), ref
        assert not Path(urllib.parse.unquote(ref)).is_absolute(), ref
        target = base / urllib.parse.unquote(ref.split("#")[0])
        assert target.is_file(), f"{ref} does not exist next to the HTML"
    for ref in srcs:
        assert ref.startswith("report_test_files/")
        head = (base / urllib.parse.unquote(ref)).read_bytes()[:8]
        if ref.endswith(".jpg"):
            assert head[:3] == JPEG_SIGNATURE
    assert "<script" not in text.lower() and "@import" not in text and "url(" not in text
    assert "loading=" not in text  # lazy images print blank
    # the folder is movable: copy it elsewhere, the links still resolve
    moved = base.parent / "moved"
    moved.mkdir()
    shutil.copy(paths["html"], moved)
    shutil.copy(paths["md"], moved)
    shutil.copytree(paths["files"], moved / paths["files"].name)
    for ref in parser.refs:
        assert (moved / urllib.parse.unquote(ref)).is_file()


def test_html_is_offline(written):
    """Nothing to fetch: no URL of the network anywhere in the page, no script, inline CSS;
    the SVG figures reference nothing outside themselves."""
    paths, _ = written
    text = paths["html"].read_text(encoding="utf-8")
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I)
    assert "<link" not in text and "<script" not in text.lower() and "<iframe" not in text
    assert "<style>" in text  # the CSS is inline
    for svg in paths["files"].glob("*.svg"):
        body = svg.read_text(encoding="utf-8")
        hrefs = re.findall(r'(?:xlink:)?href="([^"#][^"]*)"', body)
        assert hrefs == [], (svg.name, hrefs)  # only internal #references


def test_html_content_and_escaping(written):
    paths, report = written
    text = paths["html"].read_text(encoding="utf-8")
    assert ODD not in text  # raw, it would be markup
    assert "a&lt;b&amp;c" in text
    visible = parse(text).visible
    assert ODD in visible  # and it reads right once parsed
    for v in VARIANTS:
        assert v in visible
    assert "0.912" in visible and "unit-test" in visible  # the run is shown
    assert "2024-01-01" not in visible  # unknown keys are ignored
    assert "Training curves" in visible and "Best images" in visible and "Worst images" in visible
    assert "a<b&c / 00001" in visible and "J 0.900" in visible  # thumbnail captions
    assert "false positive" in visible  # the legend


def test_autoescape_of_every_field(tmp_path):
    """A <script> in a category, an image name, the run, a config value or a fingerprint is
    text on the page, never markup (the templates are autoescaped), and Markdown escapes it."""
    report = fake_report(categories=("bear", SCRIPT))
    report["run"] = SCRIPT
    report["config"]["train"]["device"] = SCRIPT
    report["fingerprints"]["features"] = SCRIPT
    report["backbone"]["weights"] = SCRIPT
    per_image = fake_per_image(("bear", SCRIPT))
    per_image[0]["stem"] = SCRIPT
    best = [fake_thumb(SCRIPT, SCRIPT, 0.9, seed=1)]
    worst = [fake_thumb(SCRIPT, "00000", 0.3, seed=2)]
    paths = write_reports(
        tmp_path,
        "test",
        report,
        per_image,
        best,
        worst,
        HISTORY,
        variant_thumbs=[fake_variant_thumb(SCRIPT, "00000")],
        other_runs=[(SCRIPT, "../x/report_test.html")],
    )
    text = paths["html"].read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    parser = parse(text)
    assert parser.visible.count(SCRIPT) >= 8  # shown, as text, wherever it belongs
    md = paths["md"].read_text(encoding="utf-8")
    assert "<script>" not in md and "\\<script\\>" in md


def test_headline_is_pac_gain_over_bilinear(written):
    paths, report = written
    v = report["variants"]
    gains = {
        label: v["pac"]["overall"][k] - v["linear_bilinear"]["overall"][k]
        for k, label in (("miou", "mIoU"), ("j_mean", "J"), ("boundary_f", "F"))
    }
    expected = (
        "PAC upsampler: "
        + ", ".join(f"{g:+.3f} {label}" for label, g in gains.items())
        + " over bilinear upsampling (5 images)"
    )
    assert (
        expected == "PAC upsampler: +0.066 mIoU, +0.087 J, +0.191 F over bilinear "
        "upsampling (5 images)"
    )
    assert headline_text(report) == expected
    parser = parse(paths["html"].read_text(encoding="utf-8"))
    shown = squash("".join(parser.ids["headline"]))
    assert shown == expected
    numbers = [float(x) for x in re.findall(r"[+-]\d\.\d{3}", shown)]
    assert numbers == [round(g, 3) for g in gains.values()]
    assert f"**{expected}**" in paths["md"].read_text(encoding="utf-8")


def test_headline_signs_and_ties():
    report = fake_report()
    v = report["variants"]
    v["pac"]["overall"].update(miou=0.800, j_mean=0.7712, boundary_f=0.52204)
    v["linear_bilinear"]["overall"].update(miou=0.846, j_mean=0.771, boundary_f=0.522)
    assert headline_text(report) == (
        "PAC upsampler: -0.046 mIoU, \u00b10.000 J, \u00b10.000 F "
        "over bilinear upsampling (5 images)"
    )
    v["pac"]["overall"]["n_images"] = 1
    assert headline_text(report).endswith("(1 image)")
    v["pac"]["overall"] = None
    assert headline_text(report) is None


def test_figures_are_vector_and_valid(written, tmp_path):
    """Each figure as SVG (shown on the page: valid XML with an <svg> root and a size), PDF
    (for papers) and PNG (for the Markdown)."""
    paths, _ = written
    for key in FIGURES:
        svg = paths["files"] / f"{key}.svg"
        root = ET.parse(svg).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert root.get("width", "").endswith("pt") and root.get("viewBox")
        assert (paths["files"] / f"{key}.pdf").read_bytes()[:5] == b"%PDF-"
        assert (paths["files"] / f"{key}.png").read_bytes()[:8] == PNG_SIGNATURE
    # reproducible: the same report renders the same vector files (no dates, fixed ids)
    first = {p.name: p.read_bytes() for p in paths["files"].glob("*.svg")}
    first |= {p.name: p.read_bytes() for p in paths["files"].glob("*.pdf")}
    files = write_reports(tmp_path, "test", fake_report(), fake_per_image(), [], [], HISTORY)[
        "files"
    ]
    again = {p.name: p.read_bytes() for p in files.glob("*.svg")}
    again |= {p.name: p.read_bytes() for p in files.glob("*.pdf")}
    assert again == first


def test_plots_are_zoomed_to_the_data():
    """The overall dot plot's and the scatter's axes are around the values, not 0-1."""
    report = fake_report()
    parsed = report_mod.parse_report(report, strict=False)
    fig = report_mod.plot_overall(parsed.variants, parsed_rows(fake_per_image()))
    axes = fig.get_axes()
    assert len(axes) == 3
    lo, hi = axes[0].get_xlim()  # mIoU: values 0.812 .. 0.912
    assert 0.6 < lo < 0.812 and 0.912 < hi < 1.0
    rows = [
        {
            "category": "a" if i % 2 else "b",
            "stem": str(i),
            "j": {"linear_bilinear": 0.80 + 0.01 * i, "pac": 0.82 + 0.01 * i},
        }
        for i in range(10)
    ]
    fig = report_mod.plot_scatter(parsed_rows(rows), "linear_bilinear", "pac")
    ax = fig.get_axes()[0]
    assert ax.get_xlim() == ax.get_ylim()
    lo, hi = ax.get_xlim()
    assert 0.7 < lo < 0.80 and 0.91 < hi <= 1.005
    assert len(ax.collections) >= 2  # one colour per category
    assert report_mod.zoom([1.0, 1.0])[1] >= 1.0  # a point at 1 is not cut


def test_thumbnails_link_to_enlargements(written):
    paths, _ = written
    parser = parse(paths["html"].read_text(encoding="utf-8"))
    assert len(parser.strips) == 3
    base = paths["html"].parent
    for strip in parser.strips:
        href, src = strip["href"], strip["img"]["src"]
        assert href and href != src and href.endswith("_full.jpg")
        with (
            Image.open(base / urllib.parse.unquote(href)) as big,
            Image.open(base / urllib.parse.unquote(src)) as small,
        ):
            assert big.format == "JPEG"
            assert big.size[1] > small.size[1]  # panels in rows, labelled: taller


def test_worst_images_show_the_variants_side_by_side(tmp_path):
    per_image = fake_per_image()
    r = per_image[3]  # a<b&c / 00000
    worst = [fake_thumb(ODD, "00000", r["j"]["pac"], seed=3)]
    vt = [fake_variant_thumb(ODD, "00000", seed=3), fake_variant_thumb("bear", "00001", seed=4)]
    paths = write_reports(
        tmp_path, "test", fake_report(), per_image, [], worst, None, variant_thumbs=vt
    )
    parser = parse(paths["html"].read_text(encoding="utf-8"))
    assert len(parser.strips) == 2  # the worst image, then the extra variant thumb
    labels = parser.strips[0]["labels"]
    assert labels[:2] == ["image", "ground truth"] and len(labels) == 5
    for label, v in zip(labels[2:], VARIANTS, strict=True):
        assert label.startswith(v) and f"J {r['j'][v]:.3f}" in label
    with Image.open(tmp_path / urllib.parse.unquote(parser.strips[0]["img"]["src"])) as im:
        assert im.size == (5 * 80 + 4 * report_mod.STRIP_GAP, 48)
    assert parser.strips[1]["img"]["alt"].startswith("bear / 00001")
    md = paths["md"].read_text(encoding="utf-8")
    assert "[variants](report_test_files/worst_01_full.jpg)" in md


def test_variant_strip_panels():
    h, w, gap = 12, 16, report_mod.STRIP_GAP
    image = np.full((h, w, 3), 100, np.uint8)
    gt = np.zeros((h, w), bool)
    gt[2:10, 2:10] = True
    masks = {"a": gt.copy(), "b": np.zeros((h, w), bool)}
    out, (pw, ph) = variant_strip(image, gt, masks)
    assert (pw, ph) == (w, h) and out.shape == (h, 4 * w + 3 * gap, 3)
    panels = [out[:, i * (w + gap) : i * (w + gap) + w] for i in range(4)]
    assert (panels[0] == image).all()
    np.testing.assert_array_equal(panels[2], overlay(image, gt, masks["a"]))
    np.testing.assert_array_equal(panels[3], overlay(image, gt, masks["b"]))
    with pytest.raises(ValueError):
        variant_strip(image, gt, {"a": gt[:5]})


def test_no_annotated_image(tmp_path):
    """A split without annotations: the page says so plainly, how many masks were written,
    and shows no empty table or plot."""
    report = fake_report()
    report.update(
        n_images=0,
        n_predicted=4,
        variants={v: {"overall": None, "per_category": {}} for v in VARIANTS},
    )
    paths = write_reports(tmp_path, "test", report, [], [], [], None)
    text = paths["html"].read_text(encoding="utf-8")
    parser = parse(text)
    message = squash("".join(parser.ids["headline"]))
    assert message == (
        "No image of the test split is annotated: 4 masks were written to "
        "predictions/test/, and there is nothing to score."
    )
    assert "<table" not in text and parser.imgs == []
    assert "PAC upsampler" not in parser.visible and "Overall" not in parser.visible
    assert "train.lr" in parser.visible  # the settings and provenance are still there
    assert list(paths["files"].iterdir()) == []
    md = paths["md"].read_text(encoding="utf-8")
    assert "**No image of the test split is annotated: 4 masks were written" in md
    assert "| variant |" not in md and "![" not in md
    # with training curves, those are shown (they are not empty)
    paths = write_reports(tmp_path, "test", report, [], [], [], HISTORY)
    assert [i["src"] for i in parse(paths["html"].read_text()).imgs] == [
        "report_test_files/training_curves.svg"
    ]


def test_other_runs_links(tmp_path):
    runs = [("lr 1e-3", "../lr 1e-3/report_test.html"), ("b&w", "../b&w/report_test.html")]
    paths = write_reports(tmp_path, "test", fake_report(), [], [], [], None, other_runs=runs)
    parser = parse(paths["html"].read_text(encoding="utf-8"))
    hrefs = [h for h in parser.refs if h.startswith("../")]
    assert hrefs == ["../lr%201e-3/report_test.html", "../b%26w/report_test.html"]
    assert "Other runs: lr 1e-3 b&w" in parser.visible
    md = paths["md"].read_text(encoding="utf-8")
    assert (
        "- Other runs: [lr 1e-3](../lr%201e-3/report_test.html), [b&w](../b%26w/report_test.html)"
    ) in md
    # none given: no such list
    paths = write_reports(tmp_path, "test", fake_report(), [], [], [], None)
    assert (
        "Other runs" not in paths["html"].read_text()
        and "Other runs" not in paths["md"].read_text()
    )


def test_settings_and_provenance(written):
    """The training settings (so two runs' reports differ visibly) with the values that
    differ from the defaults highlighted, and the fingerprints and versions."""
    paths, report = written
    text = paths["html"].read_text(encoding="utf-8")
    visible = parse(text).visible
    for key, value in (
        ("train.lr", "0.0005"),
        ("train.epochs", "20"),
        ("upsampler.channels", "[4, 4, 4, 1]"),
        ("upsampler.residual", "true"),
        ("backbone.name", "mobilenet_v2"),
        ("predict.threshold", "0.5"),
    ):
        assert f"{key} {value}" in visible
    assert "predict.thumbnails" not in visible.split("Provenance")[0]  # not a training setting
    assert re.search(r'<div class="changed[^"]*"><code>train\.lr</code><span>0\.0005</span>', text)
    assert re.search(r'<div class=""><code>train\.epochs</code>', text)  # the default: plain
    for k, v in report["fingerprints"].items():
        assert f"{k} fingerprint {v}" in visible
    assert "torch version 2.14.1" in visible
    md = paths["md"].read_text(encoding="utf-8")
    assert "| train.lr | **0.0005** |" in md and "| train.epochs | 20 |" in md
    assert "- models fingerprint: c0ffee0123456789" in md


def test_rewrite_drops_stale_files_and_handles_minimal_inputs(tmp_path):
    report = fake_report(categories=("bear",))
    del report["run"]
    many = [fake_thumb("bear", f"{i:05d}", 0.5, seed=i) for i in range(4)]
    paths = write_reports(tmp_path, "val", report, fake_per_image(("bear",)), many, [], HISTORY)
    assert len(list(paths["files"].glob("best_*_full.jpg"))) == 4
    # numpy scalars and missing values render too
    report["variants"]["pac"]["overall"]["miou"] = np.float32(0.5)
    report["variants"]["pac"]["overall"]["n_images"] = np.int64(5)
    report["variants"]["pac"]["overall"]["boundary_f"] = float("nan")
    del report["variants"]["pac"]["overall"]["recall"]
    for key in ("config", "fingerprints", "versions", "n_predicted"):
        del report[key]
    killed = temporary_name(paths["files"])  # what a writer killed mid-way left: removed
    killed.mkdir()
    (killed / "best_01.jpg").write_bytes(b"half")
    temporary_name(paths["md"]).write_bytes(b"half")
    paths = write_reports(tmp_path, "val", report, [], many[:1], [], None)
    pac_row = next(
        line for line in paths["md"].read_text().splitlines() if line.startswith("| pac |")
    )
    assert "| 0.500 |" in pac_row and pac_row.count("\u2014") == 2 and pac_row.endswith("| 5 |")
    assert sorted(p.name for p in paths["files"].iterdir()) == [
        "best_01.jpg",
        "best_01_full.jpg",
        "overall.pdf",
        "overall.png",
        "overall.svg",
        "per_category.pdf",
        "per_category.png",
        "per_category.svg",
    ]
    assert "Training curves" not in paths["html"].read_text()
    assert "Provenance" not in paths["html"].read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_training_curves_of_stage_2_are_shown_not_drawn_again(tmp_path, monkeypatch):
    """Given the curves train-head saved (save_training_curves), the report copies them:
    the same files and page as drawing them from the history, and no drawing."""
    drawn = write_reports(tmp_path / "drawn", "test", fake_report(), [], [], [], HISTORY)
    curves = report_mod.save_training_curves(HISTORY, tmp_path / "run" / "loss_curves")
    assert [p.name for p in curves] == ["loss_curves.svg", "loss_curves.pdf", "loss_curves.png"]

    def no_drawing(history):
        raise AssertionError("the training curves were drawn again")

    monkeypatch.setattr(report_mod, "training_figure", no_drawing)
    shown = write_reports(
        tmp_path / "shown", "test", fake_report(), [], [], [], None, curves=curves
    )
    for ext in ("svg", "pdf", "png"):
        name = f"training_curves.{ext}"
        assert (shown["files"] / name).read_bytes() == (drawn["files"] / name).read_bytes()
    assert shown["html"].read_bytes() == drawn["html"].read_bytes()
    assert shown["md"].read_bytes() == drawn["md"].read_bytes()


def test_hand_edited_report_renders_what_is_sound(tmp_path):
    """A report dict that is not what stage 3 writes (a string for a number, a list for an
    object, NaN, a huge number, a row that is not an object) is read once, leniently: the
    unsound fields show as a dash, the rest as usual; no crash."""
    report = fake_report(categories=("bear",))
    v = report["variants"]
    v["pac"]["overall"]["miou"] = "n/a"
    v["pac"]["overall"]["j_mean"] = float("nan")
    v["linear_nearest"] = []
    v["linear_bilinear"]["per_category"] = ["bear"]
    v["pac"]["per_category"]["bear"]["boundary_f"] = 1e999
    report.update(
        n_images="5",
        config=[1],
        fingerprints="x",
        versions={"torch": {"a": 1}},
        backbone=["x"],
        run={"name": "old"},
    )
    rows = fake_per_image(("bear",))
    rows[0]["j"] = "high"
    rows[1]["j"]["pac"] = None
    rows.append([1, 2])
    paths = write_reports(tmp_path, "test", report, rows, [], [], None)
    lines = paths["md"].read_text(encoding="utf-8").splitlines()
    pac = next(line for line in lines if line.startswith("| pac |")).split("|")[2:-1]
    assert pac[0].strip() == "\u2014" and pac[3].strip() == "\u2014"  # mIoU, J mean
    assert "0.862" in pac[1]  # FG IoU, sound
    assert not any(line.startswith("| linear_nearest |") for line in lines)
    visible = parse(paths["html"].read_text(encoding="utf-8")).visible
    assert (paths["files"] / "per_image_j.svg").is_file() and "name: old" in visible
    with pytest.raises(report_mod.Damaged, match=r'n_images is a string \("5"\)'):
        report_mod.parse_report(report, required=VARIANTS)  # read strictly: the first one
    report["n_images"] = 5
    with pytest.raises(report_mod.Damaged, match="variants.linear_nearest is a list"):
        report_mod.parse_report(report, required=VARIANTS)


def test_write_reports_lays_out_each_figure_once(tmp_path, monkeypatch):
    """The work a report does not do twice: each of the four figures is laid out once and
    saved once per format (SVG, PDF, PNG) with that layout (the layout engine would otherwise
    run again on every save: a third of the report's time). Counted, not timed: the speed
    target itself is benchmarks/report.py."""
    from matplotlib import layout_engine
    from matplotlib.figure import Figure

    layouts: dict = {}  # figure -> layout runs (the figures kept alive: no id reuse)
    saves: dict = {}  # figure -> savefig calls

    def counting(counts: dict, real, fig_of):
        def wrapper(self, *args, **kwargs):
            fig = fig_of(self, *args)
            counts[fig] = counts.get(fig, 0) + 1
            return real(self, *args, **kwargs)

        return wrapper

    for engine in (layout_engine.ConstrainedLayoutEngine, layout_engine.TightLayoutEngine):
        monkeypatch.setattr(
            engine, "execute", counting(layouts, engine.execute, lambda _, fig: fig)
        )
    monkeypatch.setattr(Figure, "savefig", counting(saves, Figure.savefig, lambda fig, *_: fig))
    thumbs = [fake_thumb("bear", f"{i:05d}", 0.5, h=480, w=854, seed=i) for i in range(4)]
    paths = write_reports(
        tmp_path, "test", fake_report(), fake_per_image() * 50, thumbs[:2], thumbs[2:], HISTORY
    )
    assert sorted(p.name for p in paths["files"].glob("*.svg")) == sorted(
        f"{key}.svg" for key in FIGURES
    )
    assert list(saves.values()) == [3] * len(FIGURES)  # one save per format, no more
    assert layouts and set(layouts) <= set(saves)
    assert list(layouts.values()) == [1] * len(layouts), list(layouts.values())


def test_overlay_size():
    image = np.zeros((480, 854, 3), np.uint8)
    mask = np.zeros((480, 854), bool)
    out = overlay(image, mask, mask)
    assert out.dtype == np.uint8 and out.shape == (180, 320, 3)
    assert overlay(image, mask, mask, max_side=100).shape == (56, 100, 3)
    tall = overlay(
        np.zeros((500, 50, 3), np.uint8),
        np.zeros((500, 50), bool),
        np.zeros((500, 50), bool),
        max_side=200,
    )
    assert tall.shape == (200, 20, 3)
    small = overlay(
        np.zeros((10, 12, 3), np.uint8), np.zeros((10, 12), bool), np.zeros((10, 12), bool)
    )
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
        assert all(min(grey, c) <= p <= max(grey, c) for p, c in zip(px, colour, strict=True))
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
    svg = plot_training_curves(HISTORY, tmp_path / "curves.svg")  # the format of the suffix
    assert ET.parse(svg).getroot().tag.endswith("svg")
    assert plot_training_curves(HISTORY, tmp_path / "curves.pdf").read_bytes()[:5] == b"%PDF-"


def test_no_pyplot_no_display(tmp_path):
    """Headless and side-effect free: pyplot (and so a GUI backend) is never imported."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from pipeline.report import plot_training_curves as p; "
        f"p([{{'phase': 'linear', 'epoch': 0, 'loss': 1.0}}], {str(tmp_path / 'c.png')!r}); "
        "from tests.test_report import fake_report, fake_per_image, HISTORY; "
        "from pipeline.report import write_reports; "
        f"write_reports({str(tmp_path / 'r')!r}, 't', fake_report(), fake_per_image(), [], [], "
        "HISTORY); assert 'matplotlib.pyplot' not in sys.modules"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND")}
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "r" / "report_t_files" / "per_image_j.svg").is_file()


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
    thumbs = [
        fake_thumb("bear", "00000", 0.8, h=480, w=854, seed=1),
        fake_thumb("bear", "00001", 0.7, h=600, w=300, seed=2),
    ]
    paths = write_reports(tmp_path, "test", fake_report(), [], thumbs, [], None)
    strips = parse(paths["html"].read_text(encoding="utf-8")).strips
    assert len(strips) == 2
    side = report_mod.PANEL_MAX_SIDE
    for strip, panel in zip(
        strips, ((side, round(480 * side / 854)), (side // 2, side)), strict=True
    ):
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
    panels = [out[:, i * (w + gap) : i * (w + gap) + w] for i in range(4)]
    for i in range(3):
        assert (out[:, i * (w + gap) + w : (i + 1) * (w + gap)] == 255).all()  # white gaps
    assert (panels[0] == image).all()  # (1) the image itself
    np.testing.assert_array_equal(panels[3], overlay(image, gt, pred))  # (4) the errors
    dim = round(grey * report_mod.MASK_DIM)
    for panel in (panels[1], panels[2]):  # (2) ground truth, (3) prediction: both hold (5, 6)
        assert tuple(panel[0, 0]) == (dim, dim, dim)  # background dimmed
        assert tuple(panel[5, 6]) == MASK_COLOUR or panel[5, 6].min() > grey  # object bright
    assert tuple(panels[1][5, 2]) == MASK_COLOUR and tuple(panels[2][5, 2]) == (dim, dim, dim)
    assert tuple(panels[1][5, 12]) == (dim, dim, dim) and panels[2][5, 12].min() > grey

    big, (pw, ph) = thumbnail_strip(
        np.zeros((480, 854, 3), np.uint8), np.zeros((480, 854), bool), np.zeros((480, 854), bool)
    )
    assert (pw, ph) == (report_mod.PANEL_MAX_SIDE, 270) and big.shape == (270, strip_width(pw), 3)
    with pytest.raises(ValueError):
        thumbnail_strip(image, gt[:5], pred)


# ----------------------------------------------------------------------------- best flags


def test_best_flags_use_unrounded_values():
    flags = report_mod.best_flags
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
    header = next(i for i, line in enumerate(lines) if line.startswith("| variant |"))
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in lines[header + 2 : header + 5]
    }
    assert rows["pac"][0] == "**0.912**" and rows["linear_bilinear"][0] == "0.912"
    assert rows["pac"][3] == "**0.800**" and rows["linear_bilinear"][3] == "**0.800**"
    f_table = lines[lines.index("### Boundary F") :]
    bear = next(line for line in f_table if line.startswith("| bear |")).split("|")[3:-1]
    assert [c.strip() for c in bear] == ["**0.701**", "0.522", "0.701"]  # nearest, bilinear, pac
    text = paths["html"].read_text(encoding="utf-8")
    assert bold_cells(text).count("0.912") == 1 and bold_cells(text).count("0.800") == 2
    assert bold_cells(text).count("0.701") == 1


def test_css_fits_narrow_screens(written):
    """The findings at a 360 px viewport: no fixed minimum wider than the screen."""
    paths, _ = written
    text = paths["html"].read_text(encoding="utf-8")
    css = text[text.index("<style>") : text.index("</style>")]
    assert "max-content 1fr" not in css  # dl.notes: a long term no longer pushes the page wide
    assert not re.search(r"minmax\(\d+px", css)  # grids use minmax(min(Npx,100%), ...) or 0
    assert "@media (max-width:600px)" in css


# ----------------------------------------------------------------------------- packaging


def test_templates_ship_with_the_package():
    """A non-editable `pip install .` must carry the templates: pyproject's package-data
    globs match every file of pipeline/report/templates/, and jinja2 is a dependency."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    deps = meta["project"]["dependencies"]
    assert any(re.match(r"jinja2\b", d, re.I) for d in deps)
    globs = meta["tool"]["setuptools"]["package-data"]["pipeline.report"]
    assert "pipeline.report" in meta["tool"]["setuptools"]["packages"]
    files = sorted(
        p.relative_to(ROOT / "pipeline" / "report")
        for p in report_mod.TEMPLATE_DIR.iterdir()
        if p.is_file()
    )
    assert {str(f) for f in files} >= {
        "templates/report.html.j2",
        "templates/report.md.j2",
        "templates/report.css",
    }
    for f in files:
        assert any(f.match(g) for g in globs), f"{f} is not package data"
    assert report_mod.TEMPLATE_DIR == Path(report_mod.__file__).with_name("templates")


# ----------------------------------------------------------------------------- stage 3's report


def test_stage_3_reads_each_shown_image_once(trained_copy, monkeypatch):
    """Stage 3's report reads each best or worst image from the store once (the worst images
    with every variant's masks, the best with the pac mask written), on top of the pass
    itself; the strips and figures it writes are those of the run's first report."""
    from pipeline.stages import predict as predict_stage
    from pipeline.store import FeatureStore

    cfg = trained_copy[2]
    files = cfg.run_dir / "report_test_files"
    written = {p.name: p.read_bytes() for p in files.iterdir()}
    reads: dict[int, int] = {}
    real = FeatureStore.read

    def counted(self, index):
        reads[index] = reads.get(index, 0) + 1
        return real(self, index)

    monkeypatch.setattr(FeatureStore, "read", counted)
    predict_stage.run_predict(cfg, "test", force=True, log=lambda s: None, progress=False)
    report = json.loads((cfg.run_dir / "report_test.json").read_text())
    shown = min(2 * cfg.predict.thumbnails, report["n_images"])
    assert sorted(reads.values(), reverse=True)[:shown] == [2] * shown  # the pass, the report
    assert max(reads.values()) == 2 and sum(reads.values()) == report["n_predicted"] + shown
    assert {p.name: p.read_bytes() for p in files.iterdir()} == written


# ----------------------------------------------------------------------------- DAVIS protocol


def test_davis_table_in_both_reports(tmp_path):
    from pipeline.metrics.davis import per_variant

    report = fake_report()
    rows = fake_per_image()
    report["davis"] = per_variant(rows, VARIANTS)
    paths = write_reports(tmp_path / "run", "test", report, parsed_rows(rows), [], [], None)
    pac = report["davis"]["pac"]
    assert pac["n_sequences"] == 2 and pac["per_sequence"]["bear"]["n_frames"] == 1
    md = paths["md"].read_text(encoding="utf-8")
    lines = md.splitlines()
    head = lines.index("## DAVIS protocol")
    table = next(i for i in range(head, len(lines)) if lines[i].startswith("| variant |"))
    assert "J&F" in lines[table] and "J decay" in lines[table]
    row = next(line for line in lines[table:] if line.startswith("| pac |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == [
        "pac",
        f"{pac['J']['mean']:.3f}",
        f"{pac['J']['recall']:.3f}",
        f"{pac['J']['decay']:+.3f}".replace("+0.000", "\u00b10.000"),
        f"{pac['F']['mean']:.3f}",
        f"{pac['F']['recall']:.3f}",
        f"{pac['F']['decay']:+.3f}".replace("+0.000", "\u00b10.000"),
        f"{pac['J&F']:.3f}",
    ]
    assert "except each sequence's first and last" in md and "over 2 sequences" in md
    page = parse(paths["html"].read_text(encoding="utf-8"))
    assert "davis-protocol" in page.ids
    assert f"{pac['J&F']:.3f}" in page.visible and "J&F" in page.visible


def test_report_without_davis_field_has_no_table(written):
    paths, _ = written
    assert "## DAVIS protocol" not in paths["md"].read_text(encoding="utf-8")
    assert "davis-protocol" not in parse(paths["html"].read_text(encoding="utf-8")).ids


def test_davis_field_read_strictly():
    from pipeline.core.jsondoc import Damaged
    from pipeline.metrics.davis import per_variant

    report = fake_report()
    report["davis"] = per_variant(fake_per_image(), VARIANTS)
    parsed = report_mod.parse_report(report)
    assert parsed.davis["pac"].jf == pytest.approx(report["davis"]["pac"]["J&F"])
    assert parsed.davis["pac"].j == pytest.approx(report["davis"]["pac"]["J"])
    empty = per_variant([], VARIANTS)  # no sequence evaluated: nulls, read as absent
    assert report_mod.parse_report({**report, "davis": empty}).davis["pac"].jf is None
    report["davis"]["pac"]["F"]["decay"] = 1.5
    with pytest.raises(
        Damaged,
        match=r"davis.pac.F.decay is a number \(1.5\), not a number in "
        r"\[-1, 1\]",
    ):
        report_mod.parse_report(report)
    assert "decay" not in report_mod.parse_report(report, strict=False).davis["pac"].f


def test_stage_3_report_has_the_davis_aggregate(trained):
    from pipeline.metrics.davis import FRAMES_EXCLUDED_ENDS, per_variant

    cfg = trained[2]
    report = json.loads((cfg.run_dir / "report_test.json").read_text())
    assert set(report["davis"]) == set(report["variants"])
    assert report["davis"] == per_variant(report["per_image"], list(report["variants"]))
    pac = report["davis"]["pac"]
    assert pac["frames"] == FRAMES_EXCLUDED_ENDS and pac["per_sequence"]
    counts: dict[str, int] = {}
    for r in report["per_image"]:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    assert {s: b["n_frames"] + 2 for s, b in pac["per_sequence"].items()} == {
        c: n for c, n in counts.items() if n >= 3
    }
    assert pac["skipped"] == {c: n for c, n in counts.items() if n < 3}


def test_report_of_an_earlier_format_is_rebuilt_from_the_units(trained_copy, monkeypatch):
    """A run predicted before the DAVIS aggregate (its record has no report_format) is stale;
    predicting again rebuilds the reports from the stored units: no shard is predicted again
    and no mask is rewritten."""
    from pipeline.stages import predict as predict_stage
    from pipeline.stages.base import load_record, record_path

    cfg = trained_copy[2]
    rpath = cfg.run_dir / "report_test.json"
    old = json.loads(rpath.read_text())
    del old["davis"]
    rec_file = record_path(cfg.run_dir, "predict[test]")
    rec = json.loads(rec_file.read_text())
    del rec["report_format"]
    rec_file.write_text(json.dumps(rec))
    st = predict_stage.status(cfg, "test")
    assert st.state == "stale" and "report of format 1, now 2" in st.why
    masks = {
        p: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in (cfg.run_dir / "predictions" / "test").rglob("*.png")
    }
    assert masks

    def no_shard(*a, **k):
        raise AssertionError("a shard was predicted again")

    monkeypatch.setattr(predict_stage, "predict_shard", no_shard)
    res = predict_stage.run_predict(cfg, "test", log=lambda s: None, progress=False)
    assert not res.up_to_date
    new = json.loads(rpath.read_text())
    # the same report (paths aside: the copy's folders differ), with the aggregate added
    assert "davis" in new
    assert {k: v for k, v in new.items() if k not in ("davis", "config")} == {
        k: v for k, v in old.items() if k != "config"
    }
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in masks} == masks
    assert load_record(cfg.run_dir, "predict[test]")["report_format"] == 2
    assert predict_stage.status(cfg, "test").up_to_date
