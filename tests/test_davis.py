"""The DAVIS protocol's aggregation (pipeline.metrics.davis): statistics derived by hand on
short sequences, the frame list (order by stem, ends excluded), the means over sequences, and the
refusals. The comparison with the official davis2017-evaluation code on the shared val split
is benchmarks/davis_check.py (it needs the official code and its dependencies)."""

from __future__ import annotations

import math

import pytest

from pipeline.metrics.davis import (
    FRAMES_ALL,
    FRAMES_EXCLUDED_ENDS,
    davis_protocol,
    decay_edges,
    evaluated,
    statistics,
)


def test_decay_edges_by_hand():
    # e_k = round(1 + k (n - 1) / 4) - 1, halves rounded up
    assert decay_edges(1) == [0, 0, 0, 0, 0]
    assert decay_edges(2) == [0, 0, 1, 1, 1]  # 1, 1.25, 1.5 -> 2, 1.75, 2
    assert decay_edges(5) == [0, 1, 2, 3, 4]
    assert decay_edges(6) == [0, 1, 3, 4, 5]  # 1, 2.25, 3.5 -> 4, 4.75, 6
    assert decay_edges(10) == [0, 2, 5, 7, 9]  # 1, 3.25, 5.5 -> 6, 7.75, 10
    # past 256 frames the edges go on growing (the official code's uint8 edges would wrap)
    assert decay_edges(301) == [0, 75, 150, 225, 300]
    with pytest.raises(ValueError, match="at least one frame"):
        decay_edges(0)


def test_statistics_by_hand():
    s = statistics([1.0, 0.8, 0.6, 0.4, 0.2])
    assert s.mean == pytest.approx(0.6)
    assert s.recall == pytest.approx(3 / 5)
    # bins share their edge frames: first v[0..1], last v[3..4]
    assert s.decay == pytest.approx((1.0 + 0.8) / 2 - (0.4 + 0.2) / 2)
    # six frames, edges 0 1 3 4 5: first bin v[0..1], last v[4..5]
    s = statistics([0.9, 0.7, 0.0, 0.0, 0.5, 0.1])
    assert s.decay == pytest.approx(0.8 - 0.3)
    assert s.recall == pytest.approx(2 / 6)  # 0.5 itself is not above 0.5


def test_statistics_of_one_and_two_frames():
    assert statistics([0.7]).to_dict() == {"mean": 0.7, "recall": 1.0, "decay": 0.0}
    s = statistics([0.9, 0.3])  # bins v[0], v[0..1], v[1], v[1]
    assert s.decay == pytest.approx(0.6) and s.mean == pytest.approx(0.6) and s.recall == 0.5


@pytest.mark.parametrize("bad", [math.nan, -0.1, 1.5])
def test_statistics_refuse_values_outside_the_unit_interval(bad):
    with pytest.raises(ValueError, match=r"sequence 'x' J: per-frame values must lie in") as e:
        statistics([0.5, bad, 0.2], "sequence 'x' J")
    assert "at frame 1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="non-empty"):
        statistics([])


def test_evaluated_frames_sorted_without_ends():
    assert evaluated(["00004", "00000", "00002", "00006"]) == ["00002", "00004"]
    assert evaluated(["00004", "00000", "00002"], exclude_ends=False) == ["00000", "00002", "00004"]
    assert evaluated(["a", "b"]) == []
    with pytest.raises(ValueError, match="twice"):
        evaluated(["a", "a", "b"])


def frames(seq: str, js: list[float], fs: list[float] | None = None) -> list[tuple]:
    fs = js if fs is None else fs
    return [(seq, f"{2 * k:05d}", j, f) for k, (j, f) in enumerate(zip(js, fs, strict=True))]


def test_protocol_excludes_each_sequence_ends_and_averages_over_sequences():
    # seq a: 6 frames, the evaluated four are 0.8 0.6 0.4 0.2 (first / last 0 and 1 dropped)
    a = frames("a", [0.0, 0.8, 0.6, 0.4, 0.2, 1.0], [1.0, 0.9, 0.9, 0.7, 0.7, 0.0])
    # seq b: 3 frames, only the middle one is evaluated
    b = frames("b", [0.1, 0.3, 0.1], [0.2, 0.6, 0.2])
    rows = list(reversed(a)) + b  # order of the rows does not matter: stems do
    out = davis_protocol(rows)
    assert out["frames"] == FRAMES_EXCLUDED_ENDS
    assert out["n_sequences"] == 2 and out["skipped"] == {}
    pa, pb = out["per_sequence"]["a"], out["per_sequence"]["b"]
    assert pa["n_frames"] == 4 and pb["n_frames"] == 1
    # a, four frames: edges 0 1 2 2 3 -> first bin v[0..1], last v[2..3]
    assert pa["J"] == pytest.approx({"mean": 0.5, "recall": 0.5, "decay": 0.7 - 0.3})
    assert pa["F"] == pytest.approx({"mean": 0.8, "recall": 1.0, "decay": 0.9 - 0.7})
    assert pb["J"] == pytest.approx({"mean": 0.3, "recall": 0.0, "decay": 0.0})
    assert pb["F"] == pytest.approx({"mean": 0.6, "recall": 1.0, "decay": 0.0})
    # over sequences, not over frames (the frame mean of J would be 2.3 / 5)
    assert out["J"] == pytest.approx({"mean": 0.4, "recall": 0.25, "decay": 0.2})
    assert out["F"] == pytest.approx({"mean": 0.7, "recall": 1.0, "decay": 0.1})
    assert out["J&F"] == pytest.approx(0.55)


def test_protocol_on_every_frame():
    out = davis_protocol(frames("a", [0.0, 0.8, 0.6, 0.4, 0.2, 1.0]), exclude_ends=False)
    assert out["frames"] == FRAMES_ALL
    assert out["per_sequence"]["a"]["n_frames"] == 6
    assert out["J"]["mean"] == pytest.approx(0.5)
    # edges 0 1 3 4 5: first v[0..1] = 0.4, last v[4..5] = 0.6
    assert out["J"]["decay"] == pytest.approx(-0.2)


def test_sequence_too_short_is_skipped_and_said():
    out = davis_protocol(frames("long", [0.2, 0.4, 0.6]) + frames("short", [0.9, 0.9]))
    assert out["skipped"] == {"short": 2}
    assert list(out["per_sequence"]) == ["long"]
    assert out["J"]["mean"] == pytest.approx(0.4)
    none = davis_protocol(frames("short", [0.9, 0.9]))
    assert none["n_sequences"] == 0 and none["J&F"] is None
    assert none["J"] == {"mean": None, "recall": None, "decay": None}
    assert davis_protocol([])["skipped"] == {}


def test_protocol_refuses_a_frame_twice_and_bad_values():
    with pytest.raises(ValueError, match="frame '00000' listed twice"):
        davis_protocol(frames("a", [0.5, 0.5]) + frames("a", [0.5]))
    with pytest.raises(ValueError, match=r"sequence 'a' frame '00002': F must lie in \[0, 1\]"):
        davis_protocol(frames("a", [0.5, 0.5, 0.5], [0.5, math.nan, 0.5]))
    # a bad value in an excluded end frame is refused too
    with pytest.raises(ValueError, match="J must lie in"):
        davis_protocol(frames("a", [-1.0, 0.5, 0.5]))


def test_per_variant_from_report_rows():
    from pipeline.metrics.davis import per_variant

    rows = [
        {
            "category": "a",
            "stem": f"{k:05d}",
            "j": {"x": 0.1 * k, "y": 0.5},
            "f": {"x": 0.2, "y": 0.05 * k},
        }
        for k in range(5)
    ]
    out = per_variant(rows, ["x", "y"])
    assert set(out) == {"x", "y"}
    assert out["x"]["J"]["mean"] == pytest.approx(0.2)  # frames 1..3: 0.1 0.2 0.3
    assert out["y"]["F"]["mean"] == pytest.approx(0.1)
    assert out["x"] == davis_protocol([("a", r["stem"], r["j"]["x"], r["f"]["x"]) for r in rows])
