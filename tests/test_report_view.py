"""Issue 22, "the report a researcher wants": the settings as used, best and worst images
spread over categories, J and F per category, a category palette apart from the variants'
and the error legend's, the threshold sweep (stage 3's units, exact at the configured
threshold, resumed units and earlier versions' units), and the runs page."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.variants import VARIANTS
from pipeline.inference import Predictor, _logit
from pipeline.metrics.masks import (
    SWEEP_THRESHOLDS,
    image_stats,
    sweep_counts,
    sweep_summary,
    sweep_thresholds,
)
from pipeline.report import write_reports
from pipeline.report.charts import CATEGORY_COLOURS
from pipeline.report.charts import plot_categories as _plot_categories
from pipeline.report.charts import plot_scatter as _plot_scatter
from pipeline.report.charts import plot_sweep as _plot_sweep
from pipeline.report.doc import parse_report
from pipeline.report.figures import _EXTRA_COLOURS, VARIANT_COLOURS
from pipeline.report.panels import LEGEND
from pipeline.report.stage import spread
from pipeline.stages import predict as predict_mod
from pipeline.stages.predict import run_predict
from tests.conftest import TINY_TRAIN, cli_sets, make_cfg, run_cli

QUIET = dict(log=lambda s: None, progress=False)


def _report(cfg, split="test") -> dict:
    return json.loads((cfg.run_dir / f"report_{split}.json").read_text())


# ----------------------------------------------------------------------------- the sweep


def test_sweep_thresholds():
    assert SWEEP_THRESHOLDS == tuple(round(0.05 * k, 2) for k in range(1, 20))
    assert SWEEP_THRESHOLDS[0] == 0.05 and SWEEP_THRESHOLDS[-1] == 0.95 and 0.5 in SWEEP_THRESHOLDS
    assert sweep_thresholds(0.5) == SWEEP_THRESHOLDS
    off = sweep_thresholds(0.37)
    assert len(off) == 20 and 0.37 in off and list(off) == sorted(off)


def test_levels_cut_exactly_where_the_mask_does():
    """A level > k exactly where the mask at sweep[k] is object, also for logits on the
    float32 neighbours of a threshold's logit (0.3: float32(logit) != logit)."""
    sweep = sweep_thresholds(0.3)
    k = sweep.index(0.3)
    edge = np.float32(_logit(0.3))
    vals = [
        edge,
        np.nextafter(edge, np.float32(-9)),
        np.nextafter(edge, np.float32(9)),
        np.float32(0.0),
        np.float32(-0.0),
        np.float32(_logit(0.95)),
        np.float32(-50),
    ]
    x = torch.tensor(np.array(vals, np.float32)).reshape(1, 1, 1, len(vals))
    pred = Predictor.__new__(Predictor)
    pred.device = torch.device("cpu")
    pred.logit_thresholds = dict.fromkeys(VARIANTS, _logit(0.3))
    pred._logits = lambda f, img, variants, *_: {v: x.clone() for v in variants}
    binary, levels = pred._binary(
        np.zeros((1, 1, 1, 4), np.float32),
        np.zeros((1, 1, len(vals), 3), np.uint8),
        ("pac",),
        None,
        sweep,
    )
    assert levels["pac"].dtype == np.uint8
    assert ((levels["pac"] > k) == binary["pac"]).all()
    for j, t in enumerate(sweep):  # every level: the comparison with that threshold's logit
        assert ((levels["pac"] > j) == (x[:, 0] > _logit(t)).numpy()).all()


def test_sweep_counts_and_summary_follow_metrics_rules():
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 20, (23, 31)).astype(np.uint8)
    gt = rng.random((23, 31)) > 0.6
    counts = sweep_counts(levels, gt, 19)
    for k in (0, 9, 18):
        s = image_stats(levels > k, gt)
        assert (counts["tp"][k], counts["fp"][k]) == (s.tp, s.fp)
    empty = np.zeros((4, 4), bool)
    c0 = sweep_counts(np.zeros((4, 4), np.uint8), empty, 19)  # nothing predicted, nothing there
    pts = sweep_summary(SWEEP_THRESHOLDS, [(c0, 0)])
    assert [p["j_mean"] for p in pts] == [1.0] * 19
    assert pts[0] == {"threshold": 0.05, "j_mean": 1.0, "precision": 1.0, "recall": 1.0}
    assert sweep_summary(SWEEP_THRESHOLDS, []) == []
    with pytest.raises(ValueError):
        sweep_counts(np.full((2, 2), 25, np.uint8), empty[:2, :2], 19)


def test_report_sweep_equals_report_metrics_at_the_threshold(trained):
    _, _, cfg = trained
    report = _report(cfg)
    sweep = report["threshold_sweep"]
    assert set(sweep) == set(VARIANTS)
    for v in VARIANTS:
        pts = sweep[v]
        assert [p["threshold"] for p in pts] == list(SWEEP_THRESHOLDS)
        assert all(set(p) == {"threshold", "j_mean", "precision", "recall"} for p in pts)
        assert all(0 <= p[k] <= 1 for p in pts for k in ("j_mean", "precision", "recall"))
        recall = [p["recall"] for p in pts]
        assert recall == sorted(recall, reverse=True)  # fewer object pixels as t grows
        at = next(p for p in pts if p["threshold"] == cfg.predict.threshold)
        overall = report["variants"][v]["overall"]
        for key in ("j_mean", "precision", "recall"):
            assert at[key] == overall[key], (v, key)  # exactly, not approximately
    assert parse_report(report).threshold_sweep["pac"][9].threshold == 0.5


def test_sweep_at_a_threshold_off_the_grid(trained_copy):
    base, root, _ = trained_copy
    cfg = make_cfg(base, root, *TINY_TRAIN, "predict.threshold=0.37")
    run_predict(cfg, "test", **QUIET)
    report = _report(cfg)
    for v in VARIANTS:
        pts = report["threshold_sweep"][v]
        assert len(pts) == 20
        at = next(p for p in pts if p["threshold"] == 0.37)
        for key in ("j_mean", "precision", "recall"):
            assert at[key] == report["variants"][v]["overall"][key]


def test_units_without_sweep_are_recomputed_others_reused(trained_copy, monkeypatch):
    """A unit of an earlier version (no sweep counts) is computed again, shard by shard; a
    current unit is reused; the report, masks and per-image values come out the same."""
    base, root, cfg = trained_copy
    before = _report(cfg)
    pred_dir = cfg.run_dir / "predictions" / "test"
    masks = {p: p.read_bytes() for p in sorted(pred_dir.rglob("*.png"))}
    units = sorted((cfg.run_dir / "stages" / "predict_test_units").glob("*.json"))
    assert units and all("sweep" in json.loads(u.read_text()) for u in units)
    old = json.loads(units[0].read_text())
    del old["sweep"]
    for row in old["items"]:
        row.pop("sweep", None)
    units[0].write_text(json.dumps(old))
    (cfg.run_dir / "report_test.json").unlink()  # the stage must run, reading its units
    calls = []
    real = predict_mod.predict_shard
    monkeypatch.setattr(
        predict_mod,
        "predict_shard",
        lambda store, si, *a, **k: calls.append(si) or real(store, si, *a, **k),
    )
    run_predict(cfg, "test", **QUIET)
    assert len(calls) == 1  # only the old unit's shard
    after = _report(cfg)
    for key in ("threshold_sweep", "variants", "per_image", "n_images"):
        assert after[key] == before[key], key
    assert {p: p.read_bytes() for p in sorted(pred_dir.rglob("*.png"))} == masks
    assert "sweep" in json.loads(units[0].read_text())


# ----------------------------------------------------------------------------- the page


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text: list[str] = []
        self.links: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        for k in ("href", "src"):
            if a.get(k):
                self.links.append(a[k])

    def handle_data(self, data):
        self.text.append(data)


def _page(path: Path) -> _Text:
    p = _Text()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_settings_show_the_values_used(trained):
    _, _, cfg = trained
    assert cfg.backbone.layers == 0 and cfg.extract.precision == "auto"
    report = _report(cfg)
    assert report["resolved"]["backbone.layers"] == 2
    assert report["resolved"]["backbone.channels"] == 256  # mobilenet_v2: 96 + 160
    html = (cfg.run_dir / "report_test.html").read_text()
    row = re.search(r"<code>backbone\.layers</code><span>([^<]*)</span>", html)
    assert row and row.group(1) == "2 (256 channels)"
    row = re.search(r"<code>extract\.precision</code><span>([^<]*)</span>", html)
    assert row and row.group(1) == "fp32 (auto)"


def test_auto_device_resolved_in_a_hand_made_report(tmp_path):
    report = {
        "n_images": 0,
        "variants": {},
        "config": {"predict": {"device": "auto"}, "backbone": {"layers": 3}},
        "resolved": {"predict.device": "cuda:0", "backbone.layers": 3, "backbone.channels": 1152},
    }
    out = write_reports(tmp_path, "test", report, [], [], [])
    html = out["html"].read_text()
    assert "<code>predict.device</code><span>cuda:0 (auto)</span>" in html
    assert "<code>backbone.layers</code><span>3 (1152 channels)</span>" in html
    assert "Threshold sweep" not in html  # nothing scored, no sweep


def test_spread_over_categories():
    ranked = [{"category": "bear", "stem": f"{i:05d}"} for i in range(6)] + [
        {"category": "dog", "stem": "a"},
        {"category": "dog", "stem": "b"},
        {"category": "cat", "stem": "a"},
    ]
    got = spread(ranked, 4)
    assert [r["category"] for r in got] == ["bear", "bear", "dog", "cat"]  # rank order
    assert [r["stem"] for r in got if r["category"] == "bear"] == ["00000", "00001"]
    assert [r["category"] for r in spread(ranked, 3)] == ["bear", "dog", "cat"]
    assert len(spread(ranked, 9)) == 9 and spread(ranked, 0) == []
    assert spread(ranked[:6], 3) == ranked[:3]  # one category: fill in rank order


def test_worst_images_spread_in_the_report(trained):
    _, _, cfg = trained
    html = (cfg.run_dir / "report_test.html").read_text()
    worst = re.findall(r'<figure id="worst-\d+" class="\w+">\s*<figcaption><b>([^ ]+) /', html)
    cats = {r["category"] for r in _report(cfg)["per_image"]}
    assert len(worst) == min(cfg.predict.thumbnails, len(_report(cfg)["per_image"]))
    # every category shows up before any shows up a third time
    assert set(worst[: len(cats)]) == cats


def test_per_category_plot_shows_miou_j_and_f():
    from pipeline.report.doc import Metrics, VariantScores

    cats = ["blackswan", "bear"]
    vals = {
        "blackswan": {"miou": 0.595, "j_mean": 0.25, "boundary_f": 0.3},
        "bear": {"miou": 0.9, "j_mean": 0.85, "boundary_f": 0.7},
    }
    variants = {
        v: VariantScores(Metrics({"miou": 0.7}, 2), {c: Metrics(dict(vals[c]), 1) for c in cats})
        for v in VARIANTS
    }
    fig = _plot_categories(variants, cats)
    axes = fig.get_axes()
    assert [a.get_title(loc="left") for a in axes] == ["mIoU", "J mean", "Boundary F"]
    pac_j = [ln for ln in axes[1].get_lines() if ln.get_label() == "pac"][0]
    assert sorted(pac_j.get_xdata()) == [0.25, 0.85]


def _rgb(c: str) -> np.ndarray:
    return np.array([int(c[i : i + 2], 16) for i in (1, 3, 5)], float)


def test_category_palette_apart_from_variants_and_legend():
    others = [_rgb(c) for c in (*VARIANT_COLOURS.values(), *_EXTRA_COLOURS[:2])]
    others += [np.array(c, float) for _, c in LEGEND]
    assert len(set(CATEGORY_COLOURS)) == len(CATEGORY_COLOURS)
    for c in CATEGORY_COLOURS:
        assert min(np.linalg.norm(_rgb(c) - o) for o in others) > 80, c
        assert min(np.linalg.norm(_rgb(c) - _rgb(d)) for d in CATEGORY_COLOURS if d != c) > 40
    from pipeline.report.doc import ImageScores

    rows = [
        ImageScores(f"c{i}", "s", {"linear_bilinear": 0.5, "pac": 0.6}, {})
        for i in range(len(CATEGORY_COLOURS) + 3)
    ]
    fig = _plot_scatter(rows, "linear_bilinear", "pac")
    from matplotlib.colors import to_hex

    used = {to_hex(col.get_facecolor()[0]) for col in fig.get_axes()[0].collections[1:]}
    assert used <= set(CATEGORY_COLOURS) and len(used) == len(CATEGORY_COLOURS)


def test_sweep_in_the_html(trained):
    _, _, cfg = trained
    page = cfg.run_dir / "report_test.html"
    html = page.read_text()
    assert 'id="threshold-sweep"' in html
    assert "report_test_files/threshold_sweep.svg" in html
    assert (cfg.run_dir / "report_test_files" / "threshold_sweep.svg").is_file()
    report = parse_report(_report(cfg))
    fig = _plot_sweep(report.threshold_sweep, 0.5)
    ax_j = fig.get_axes()[0]
    marks = [ln for ln in ax_j.get_lines() if list(ln.get_xdata()) == [0.5, 0.5]]
    assert marks  # the configured threshold
    pac = [ln for ln in ax_j.get_lines() if ln.get_label() == "pac"][0]
    assert list(pac.get_ydata()) == [p.j_mean for p in report.threshold_sweep["pac"]]


# ----------------------------------------------------------------------------- runs page


def test_runs_page(trained_copy):
    base, root, cfg = trained_copy
    other = make_cfg(base, root, *TINY_TRAIN, "run.name=other", "predict.threshold=0.4")
    (other.run_dir / "stages").mkdir(parents=True)  # a run without a report yet
    r = run_cli("runs", "--html", *cli_sets(base, root))
    assert r.returncode == 0, r.stderr
    page = Path(cfg.paths.outputs) / "runs_test.html"
    assert f"runs page: {page}" in r.stderr
    p = _page(page)
    assert "script" not in p.tags and not any(re.match(r"\w+:", u) for u in p.links)
    assert p.links == ["default/report_test.html"]
    assert all((page.parent / u).is_file() for u in p.links)
    text = " ".join(" ".join(p.text).split())
    assert "default" in text and "other" in text and "up-to-date" in text
    pac = _report(cfg)["variants"]["pac"]["overall"]
    assert f"{pac['miou']:.3f}" in text and f"{pac['j_mean']:.3f}" in text
    assert math.isfinite(pac["miou"])
    # rewritten by the next `runs --html`; a file of the user's with that name is left alone
    assert run_cli("runs", "--html", *cli_sets(base, root)).returncode == 0
    page.write_text("<html>my notes</html>")
    r = run_cli("runs", "--html", *cli_sets(base, root))
    assert r.returncode == 2 and f"{page}: not a runs page written by vit-objseg" in r.stderr
    assert page.read_text() == "<html>my notes</html>"
