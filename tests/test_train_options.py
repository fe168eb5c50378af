"""The region loss and upsampler options (issue 29): a run trained with each one trains,
saves, reloads (the card records the option, the weights' shapes are checked against it)
and predicts; changing the key makes stage 2 stale and keeps the features."""

import json

import pytest

from pipeline.core.config import copy_config
from pipeline.core.errors import ModelError
from pipeline.core.layout import RunLayout
from pipeline.models.heads import CARD_FILE, load_models
from pipeline.stages.extract import status as extract_status
from pipeline.stages.predict import run_predict
from pipeline.stages.predict import status as predict_status
from pipeline.stages.train import run_train, status

quiet = dict(log=lambda s: None, progress=False)

OPTIONS = [
    ("train.region_loss", "dice", "none"),
    ("train.region_loss", "lovasz", "none"),
    ("upsampler.bandwidth", "learned", "fixed"),
    ("upsampler.upsample", "transposed", "bilinear"),
]


def _losses(cfg) -> list[float]:
    rows = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in rows]


@pytest.mark.parametrize("key, value, default", OPTIONS)
def test_a_run_trained_with_an_option_saves_reloads_and_predicts(trained_copy, key, value, default):
    _, _, base = trained_copy
    before = _losses(base)
    cfg = copy_config(base, **{key: value})
    st = status(cfg)
    assert st.state == "stale" and f"{key}: {default!r} -> {value!r}".replace("'", '"') in st.why
    assert extract_status(cfg).state == "up-to-date"
    assert not run_train(cfg, **quiet).up_to_date
    assert status(cfg).state == "up-to-date" and status(base).state == "stale"
    if key == "train.region_loss":  # the term is part of the loss both heads minimise
        assert all(a != b for a, b in zip(_losses(cfg), before, strict=True))
    mdir = RunLayout.of(cfg).models
    models = load_models(mdir)
    assert models.params[key] == value
    section, name = key.split(".")
    if section == "upsampler":
        assert getattr(models.upsampler.spec, name) == value
    run_predict(cfg, "test", **quiet)
    assert predict_status(cfg, "test").state == "up-to-date"
    report = json.loads((cfg.run_dir / "report_test.json").read_text())
    assert report["n_predicted"] == report["n_images"] > 0
    assert report["config"][section][name] == value


@pytest.mark.parametrize("name, value", [("bandwidth", "learned"), ("upsample", "transposed")])
def test_weights_that_do_not_fit_the_cards_upsampler_are_refused(trained_copy, name, value):
    """The card says how to build the upsampler; safetensors weights of another shape (or
    with a parameter more) are refused in one line naming train-head."""
    _, _, base = trained_copy
    cfg = copy_config(base, **{f"upsampler.{name}": value})
    run_train(cfg, **quiet)
    card_path = RunLayout.of(cfg).models / CARD_FILE
    card = json.loads(card_path.read_text())
    assert card["upsampler"][name] == value
    card["upsampler"][name] = {"bandwidth": "fixed", "upsample": "bilinear"}[name]
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelError, match="do not match their card.*train-head"):
        load_models(card_path.parent)
