"""The refinement variants in stage 3 (core.variants.REFINED): in the report with metrics and
timing, and a change of a [refine] key recomputes stage 3 only (status names the key), its
pac masks untouched."""

from __future__ import annotations

import json

from pipeline.core.config import copy_config
from pipeline.core.layout import RunLayout
from pipeline.core.variants import REFINED, VARIANTS
from pipeline.stages.extract import status as extract_status
from pipeline.stages.predict import run_predict
from pipeline.stages.predict import status as predict_status
from pipeline.stages.train import status as train_status
from tests.conftest import cli_sets, run_cli

QUIET = dict(log=lambda s: None, progress=False)


def _pngs(cfg) -> dict[str, bytes]:
    folder = cfg.run_dir / "predictions" / "test"
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_refined_variants_are_reported_with_metrics_and_timing(trained):
    _, _, cfg = trained
    report = json.loads(RunLayout.of(cfg).report("test").read_text())
    assert set(REFINED) <= set(VARIANTS) == set(report["variants"])
    for v in REFINED:
        overall = report["variants"][v]["overall"]
        assert overall["n_images"] == report["n_images"] and 0 <= overall["j_mean"] <= 1
        assert set(report["davis"][v]) >= {"J", "F"} and len(report["threshold_sweep"][v]) > 1
        assert all(v in r["j"] and v in r["f"] for r in report["per_image"])
    seconds = report["timing"]["seconds_per_image"]
    assert set(seconds) == set(VARIANTS) and all(s > 0 for s in seconds.values())
    for v, (source, _) in REFINED.items():
        assert seconds[v] >= seconds[source]  # a refined variant's time includes its source's


def test_a_refine_key_recomputes_stage_3_only(trained_copy):
    base, root, cfg = trained_copy
    before = json.loads(RunLayout.of(cfg).report("test").read_text())
    masks = _pngs(cfg)
    changed = copy_config(cfg)
    changed.refine.guided_radius = 8
    sets = cli_sets(base, root, "refine.guided_radius=8")
    assert extract_status(changed, ["train", "test"]).up_to_date
    assert train_status(changed).up_to_date
    st = predict_status(changed, "test")
    assert not st.up_to_date and "refine.guided_radius: 32 -> 8" in st.why, st.why
    r = run_cli("status", *sets)
    assert "refine.guided_radius: 32 -> 8" in r.stdout, r.stdout
    res = run_predict(changed, "test", **QUIET)
    assert not res.up_to_date and predict_status(changed, "test").up_to_date
    after = json.loads(RunLayout.of(changed).report("test").read_text())
    assert after["config"]["refine"]["guided_radius"] == 8
    # the candidate's masks (what predict writes) and the other variants do not change
    assert _pngs(changed) == masks
    for v in VARIANTS:
        if v != "pac_guided":
            assert after["variants"][v] == before["variants"][v], v
