"""predict.tta = "flip": stage 1 stores the mirrored features of the predicted splits (its own
store, keyed like the features plus `mirror`), predict averages each variant's logits with
the mirror image's, segment and export do the same, and switching the key recomputes only
what it affects."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.commands.segment import run_segment
from pipeline.core.config import copy_config
from pipeline.core.layout import RunLayout
from pipeline.data import from_canvas, to_canvas
from pipeline.models.devices import config_keys
from pipeline.models.heads import load_models
from pipeline.stages.extract import extractor_of, run_extract
from pipeline.stages.extract import status as extract_status
from pipeline.stages.predict import run_predict
from pipeline.stages.predict import status as predict_status
from pipeline.stages.train import status as train_status
from pipeline.store import FeatureStore, locate_split
from tests.conftest import copy_run, one_line_error, run_cli, store_of, stored

quiet = dict(log=lambda s: None, progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory, trained):
    """A copy of the session's trained tiny run (the tests add the mirrored store and predict
    into it), predicted on the test split without and then with flip TTA."""
    base, synth_root, plain = copy_run(trained, tmp_path_factory.mktemp("tta") / "run")
    plain_report = json.loads(RunLayout.of(plain).report("test").read_text())
    shards = {p: p.stat().st_mtime_ns for p in store_of(plain).rglob("*.h5")}
    pdir = RunLayout.of(plain).predictions("test")
    plain_masks = {
        p.relative_to(pdir).as_posix(): np.asarray(Image.open(p)) > 127 for p in pdir.rglob("*.png")
    }
    flip = copy_config(plain, **{"predict.tta": "flip"})
    return base, synth_root, plain, flip, plain_report, shards, plain_masks


def test_mirrored_features_are_those_of_the_mirrored_canvas(run):
    _, _, plain, flip, *_ = run
    assert config_keys(flip).feature.mirrored().params() == {
        **config_keys(plain).feature.params(),
        "mirror": True,
    }
    res = run_extract(flip, ["train", "test"], **quiet)
    assert not res.up_to_date
    # the training split gets none: training never uses them
    assert locate_split(*stored(flip, mirror=True), "train") is None
    store = FeatureStore.open(*stored(flip), "test")
    mirror = FeatureStore.open(*stored(flip, mirror=True), "test")
    ex = extractor_of(flip)
    for i in range(len(store)):
        item = store.read(i)
        canvas = to_canvas(item.image, item.meta.box)
        expected = ex.launch([np.ascontiguousarray(canvas[:, ::-1])])()[0]
        np.testing.assert_array_equal(mirror.features(i), expected)
        assert not np.array_equal(mirror.features(i), item.features)
    assert extract_status(flip, ["train", "test"]).up_to_date


def test_flip_averages_the_mirror_images_logits(run):
    """predict's masks against the rule written out here with the models themselves."""
    _, _, plain, flip, plain_report, shards, plain_masks = run
    run_extract(flip, ["train", "test"], **quiet)
    assert train_status(flip).up_to_date  # the training input did not change
    assert not predict_status(flip, "test").up_to_date
    run_predict(flip, "test", **quiet)
    assert predict_status(flip, "test").up_to_date
    report = json.loads(RunLayout.of(flip).report("test").read_text())
    assert report["config"]["predict"]["tta"] == "flip" and "mirrored" in report["fingerprints"]
    # the features' shards were not rewritten for TTA
    assert {p: p.stat().st_mtime_ns for p in store_of(plain).rglob("*.h5")} == shards

    models = load_models(RunLayout.of(flip).models)
    store = FeatureStore.open(*stored(flip), "test")
    mirror = FeatureStore.open(*stored(flip, mirror=True), "test")
    threshold = math.log(flip.predict.threshold / (1 - flip.predict.threshold))
    agree = total = plain_agree = 0
    for i in range(len(store)):
        item = store.read(i)
        canvas = torch.from_numpy(np.array(to_canvas(item.image, item.meta.box)))
        canvas = canvas.permute(2, 0, 1)[None]

        def logits(feats: np.ndarray, image: torch.Tensor) -> torch.Tensor:
            f = torch.from_numpy(feats.astype(np.float32)).permute(2, 0, 1)[None]
            with torch.no_grad():
                return models.upsampler(f, image, models.head(f))[0, 0]

        own = logits(item.features, canvas)
        mean = (own + logits(mirror.features(i), canvas.flip(-1)).flip(-1)) / 2
        expected = from_canvas((mean > threshold).numpy(), item.meta.box, item.meta.orig_size)
        rel = f"{item.meta.category}/{item.meta.stem}.png"
        got = np.asarray(Image.open(RunLayout.of(flip).predictions("test") / rel)) > 127
        agree += int((got == expected).sum())
        total += got.size
        plain_agree += int((plain_masks[rel] == expected).sum())
    print(
        f"pixels off the rule: with TTA {total - agree}, without {total - plain_agree} of {total}"
    )
    # rounding of the threaded heads may flip a pixel at the threshold
    assert agree >= 0.999 * total
    # the rule can tell TTA from no TTA: the masks without it are far further off
    assert total - plain_agree > 10 * (total - agree) + 10

    # back to no TTA: nothing to extract, predict recomputes the first report's numbers
    assert run_extract(plain, ["train", "test"], **quiet).up_to_date
    assert not predict_status(plain, "test").up_to_date
    run_predict(plain, "test", **quiet)
    again = json.loads(RunLayout.of(plain).report("test").read_text())
    assert again["variants"] == plain_report["variants"]


def test_segment_and_export_apply_the_same_tta(run, tmp_path):
    base, root, plain, flip, *_ = run
    run_extract(flip, ["train", "test"], **quiet)
    run_predict(flip, "test", **quiet)
    out = tmp_path / "seg"
    res = run_segment(flip, [root / "test"], out, overlays=False, progress=False)
    assert not res.errors
    for p in RunLayout.of(flip).predictions("test").rglob("*.png"):
        assert (out / p.parent.name / "images" / p.name).read_bytes() == p.read_bytes(), p
    # the plain masks in that folder are no longer current: a plain rerun recomputes them
    assert run_segment(plain, [root / "test"], out, overlays=False, progress=False).n_written > 0

    from pipeline.commands.export import ExportSettings, build_program

    program = build_program(ExportSettings.of(flip), load_models(RunLayout.of(flip).models))
    assert program.mirror_tta
    x = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        one, mirrored = program(x), program(x.flip(-1)).flip(-1)
    torch.testing.assert_close(one, mirrored, rtol=1e-4, atol=1e-5)  # TTA makes it flip-symmetric


def test_training_split_with_tta_is_a_usage_error(run):
    base, root, plain, flip, *_ = run
    sets = []
    for key in (
        "data.root",
        "paths.cache",
        "paths.outputs",
        "backbone.name",
        "backbone.weights",
        "extract.device",
        "train.device",
        "predict.device",
        "train.epochs",
        "train.linear_epochs",
        "train.crop",
        "extract.batch_size",
        "extract.num_workers",
    ):
        sets += ["--set", f"{key}={flip.get(key)}"]
    r = run_cli("predict", "--split", "train", *sets, "--set", "predict.tta=flip")
    assert r.returncode == 2
    one_line_error(r, "predict.tta", "training split", "predict.tta=none")
    assert "no mirrored features" in predict_status(flip, "train").why
