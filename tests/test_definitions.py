"""The metric definitions (pipeline/metrics/definitions.py) are the one list every reader of
metrics follows: the report's blocks hold exactly its metrics in its order, the overall table
shows each once, the headline metrics are those of `runs`, of its HTML page and of the CLI's
lines after stage 3."""

from __future__ import annotations

import pytest

from pipeline.commands.runs import RunRow, grid
from pipeline.metrics.definitions import (
    BLOCK_KEYS,
    HEADLINE,
    KEYS,
    METRICS,
    OVERALL_TABLE,
    RUNS_COLUMNS,
    Pooled,
    headline_names,
    metric,
)
from pipeline.metrics.masks import ImageStats, aggregate
from pipeline.report.runs_page import runs_view
from pipeline.report.stage import headline
from pipeline.report.view import METRIC_NOTES


def test_keys_are_unique_and_a_block_holds_them_in_order():
    assert len(set(KEYS)) == len(KEYS) == len(METRICS)
    stats = [
        ImageStats(tp=3, fp=1, fn=2, tn=10, j=0.5, f=0.25, category="a"),
        ImageStats(tp=0, fp=0, fn=0, tn=16, j=1.0, f=1.0, category="b"),
    ]
    block = aggregate(stats)
    assert list(block) == [*KEYS, "n_images"] and set(block) == BLOCK_KEYS
    assert all(0.0 <= block[k] <= 1.0 for k in KEYS) and block["n_images"] == 2


def test_each_metric_is_computed_from_the_pooled_statistics():
    p = Pooled(tp=3, fp=1, fn=2, tn=10, j=[0.5, 1.0], f=[0.25, 0.75])
    values = {m.key: m.compute(p) for m in METRICS}
    assert values["fg_iou"] == pytest.approx(3 / 6) and values["bg_iou"] == pytest.approx(10 / 13)
    assert values["miou"] == pytest.approx((3 / 6 + 10 / 13) / 2)
    assert values["accuracy"] == pytest.approx(13 / 16)
    assert values["precision"] == pytest.approx(3 / 4) and values["recall"] == pytest.approx(3 / 5)
    assert values["j_mean"] == pytest.approx(0.75) and values["boundary_f"] == pytest.approx(0.5)


def test_the_overall_table_shows_every_metric_once():
    assert sorted(m.key for m in OVERALL_TABLE) == sorted(KEYS)


def test_every_metric_has_its_labels_note_and_format():
    for m in METRICS:
        assert m.label and m.short and m.note and metric(m.key) is m
        assert m.text(0.8125) == format(0.8125, m.format)
        assert m.per_image in (None, "j", "f")
    shown = " / ".join(labels for labels, _ in METRIC_NOTES)
    assert all(m.label in shown for m in METRICS)


def test_the_headline_metrics_are_those_of_runs_its_page_and_the_cli():
    assert HEADLINE and all(m in METRICS for m in HEADLINE)
    assert headline_names() == "mIoU, J and F"
    assert [m for _, v, m in RUNS_COLUMNS if v == "pac"] == list(HEADLINE)
    row = RunRow("r", metrics={v: {m.key: 0.5 for m in HEADLINE} for _, v, _ in RUNS_COLUMNS})
    heads = grid([row])[0]
    page = runs_view([{"run": "r", "metrics": row.metrics}], "test")["columns"]
    assert page == [h for h in heads if h in {t for t, _, _ in RUNS_COLUMNS}]
    assert len(page) == len(RUNS_COLUMNS)
    block = {m.key: 0.5 for m in METRICS}
    lines = headline({"n_images": 1, "n_predicted": 1, "variants": {"pac": {"overall": block}}})
    assert all(f"{m.short} 0.500" in lines[0] for m in HEADLINE)
