"""predict.threshold = "auto": the choice from a validation report's threshold sweep
(pipeline.calibration), its objective, ties and refusals."""

from __future__ import annotations

import math

import pytest

from pipeline.metrics.calibration import choose_threshold, choose_thresholds, sweep_fingerprint
from pipeline.metrics.masks import SWEEP_THRESHOLDS


def sweep(j_of, extra: tuple[float, ...] = ()) -> list[dict]:
    ts = sorted({*SWEEP_THRESHOLDS, *extra})
    return [{"threshold": t, "j_mean": j_of(t), "precision": 0.5, "recall": 0.5} for t in ts]


def test_the_best_mean_j_on_the_grid():
    assert choose_threshold(sweep(lambda t: 1 - abs(t - 0.3))) == 0.3
    # a point off the grid (where the validation masks were made) is no candidate
    assert (
        choose_threshold(sweep(lambda t: 0.99 if t == 0.33 else 1 - abs(t - 0.3), extra=(0.33,)))
        == 0.3
    )


def test_ties_go_to_the_threshold_nearest_half_then_lower():
    assert choose_threshold(sweep(lambda t: 0.8)) == 0.5
    assert choose_threshold(sweep(lambda t: 0.8 if t in (0.2, 0.7, 0.8) else 0.1)) == 0.7
    assert choose_threshold(sweep(lambda t: 0.8 if t in (0.4, 0.6) else 0.1)) == 0.4


def test_per_variant_and_refusals():
    report = {
        "threshold_sweep": {
            "a": sweep(lambda t: 1 - abs(t - 0.25)),
            "b": sweep(lambda t: 1 - abs(t - 0.6)),
        }
    }
    assert choose_thresholds(report, ["a", "b"]) == {"a": 0.25, "b": 0.6}
    with pytest.raises(ValueError, match="no threshold sweep of variant 'c'"):
        choose_thresholds(report, ["c"])
    with pytest.raises(ValueError, match="no threshold_sweep"):
        choose_thresholds({"variants": {}}, ["a"])
    short = sweep(lambda t: 0.5)[:-1]
    with pytest.raises(ValueError, match="lacks threshold 0.95"):
        choose_threshold(short)
    bad = sweep(lambda t: math.nan if t == 0.5 else 0.5)
    with pytest.raises(ValueError, match="bad sweep point"):
        choose_threshold(bad, "variant 'a'")


def test_fingerprint_follows_what_the_choice_reads():
    a = {"threshold_sweep": {"pac": sweep(lambda t: t / 2)}}
    b = {"threshold_sweep": {"pac": sweep(lambda t: t / 2)}}
    for p in b["threshold_sweep"]["pac"]:
        p["precision"] = 0.9  # not read by the choice
    assert sweep_fingerprint(a, ["pac"]) == sweep_fingerprint(b, ["pac"])
    b["threshold_sweep"]["pac"][3]["j_mean"] = 0.01
    assert sweep_fingerprint(a, ["pac"]) != sweep_fingerprint(b, ["pac"])
