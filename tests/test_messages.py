"""Messages that used to mislead: a status change of a key that is absent from the
fingerprints at its default (`backbone.layers: 1 -> 2`, not "is new"), a backbone.layers the
backbone does not have (a usage error, not "run extract-features"), and a split the dataset
does not have (named as such, not "run extract-features --split nosuch")."""

from __future__ import annotations

import pytest
from PIL import Image

from pipeline.core.errors import ConfigError, StoreError, UsageError
from pipeline.core.fingerprints import ABSENT_AS, diff_params
from pipeline.core.registry import max_layers, resolve_layers
from pipeline.models.devices import config_keys
from pipeline.stages.base import StageState, judge, save_record
from pipeline.store import FeatureStore
from tests.conftest import cli_sets, make_cfg, one_line_error, run_cli, stored

# ----------------------------------------------------------------------------- diff_params


def test_diff_params_reads_absent_keys_as_their_default():
    assert diff_params({}, {"backbone.layers": 2}) == ["backbone.layers: 1 -> 2"]
    assert diff_params({"backbone.layers": 3}, {}) == ["backbone.layers: 3 -> 1"]
    assert diff_params({}, {"predict.tta": "flip"}) == ['predict.tta: "none" -> "flip"']
    assert diff_params({"predict.tta": "flip"}, {}) == ['predict.tta: "flip" -> "none"']
    assert diff_params({}, {"mirror": True}) == ["mirror: false -> true"]
    # explicit default against absent: no change
    assert diff_params({"backbone.layers": 1, "predict.tta": "none"}, {}) == []
    # keys without an absent-at value keep "is new" / "dropped"
    assert diff_params({"a": 1}, {"b": 2}) == ["a dropped", "b is new"]
    assert diff_params({"train.lr": 0.1}, {"train.lr": 0.2}) == ["train.lr: 0.1 -> 0.2"]


def test_status_line_names_old_and_new_layers(tmp_path):
    """Through judge, as `status` shows it: a record made at the default (key absent)."""
    old = StageState("train-head", {"features[train]": "abc"}, {"train.lr": 0.1})
    save_record(tmp_path, old)
    new = StageState(
        "train-head", {"features[train]": "abc"}, {"train.lr": 0.1, "backbone.layers": 2}
    )
    st = judge(tmp_path, new)
    assert st.line() == "train-head: stale (backbone.layers: 1 -> 2)", st.line()


def test_absent_as_matches_the_fingerprints(tmp_path, synth_root):
    """ABSENT_AS says what the producers leave out: feature_params at backbone.layers 1 and
    without mirror, tta_params at predict.tta none, the training params at the training
    options' defaults; other values are present."""

    def params(cfg, mirrored: bool) -> dict:
        keys = config_keys(cfg)
        feature = keys.feature.mirrored() if mirrored else keys.feature
        return {**feature.params(), **keys.predict.tta_params(), **keys.train.params()}

    cfg = make_cfg(tmp_path, synth_root, "backbone.layers=1", "predict.tta=none")
    got = params(cfg, mirrored=False)
    assert not set(ABSENT_AS) & set(got), got
    others = {
        "backbone.layers": 3,
        "mirror": True,
        "predict.tta": "flip",
        "train.region_loss": "dice",
        "train.region_weight": 0.5,
        "upsampler.bandwidth": "learned",
        "upsampler.upsample": "transposed",
        "data.val_cut": 1,
    }
    assert set(others) == set(ABSENT_AS)
    sets = [f"{k}={v}" for k, v in others.items() if k != "mirror"]
    got = params(make_cfg(tmp_path, synth_root, *sets), mirrored=True)
    assert {k: got[k] for k in ABSENT_AS} == others


# ----------------------------------------------------------------------------- backbone.layers


def test_resolve_layers_refuses_what_the_backbone_lacks():
    assert resolve_layers("mobilenet_v2", 0) == 2 and resolve_layers("dino_vits16", 0) == 1
    assert resolve_layers("mobilenet_v2", 4) == 4 and resolve_layers("dino_vits16", 12) == 12
    assert max_layers("mobilenet_v2") == 4
    with pytest.raises(ConfigError) as e:
        resolve_layers("mobilenet_v2", 12)
    msg = str(e.value)
    assert "\n" not in msg and "backbone.layers: 12" in msg and "1 to 4" in msg, msg
    assert isinstance(e.value, UsageError) and e.value.exit_code == 2


def test_impossible_layers_is_a_usage_error_before_any_store(tmp_path, synth_root):
    """No store exists: train-head, predict and export say backbone.layers, not
    "no manifest; run extract-features" (exit 2)."""
    sets = cli_sets(tmp_path, synth_root, "backbone.layers=12")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "in" / "x.jpg")
    for cmd in (
        ["train-head"],
        ["predict"],
        ["export"],
        ["status"],
        ["segment", str(tmp_path / "in")],
    ):
        r = run_cli(*cmd, *sets)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        line = one_line_error(r, "backbone.layers: 12", "mobilenet_v2 offers 1 to 4")
        assert "extract-features" not in line and "manifest" not in line, line


# ----------------------------------------------------------------------------- unknown split


def test_open_names_a_split_the_dataset_lacks(tmp_path, synth_root):
    cfg = make_cfg(tmp_path, synth_root)
    with pytest.raises(UsageError) as e:
        FeatureStore.open(*stored(cfg), "nosuch")
    assert str(e.value) == f"split 'nosuch' not found in {synth_root} (splits: test, train)"
    # a split that exists but is not extracted: the old advice stands
    with pytest.raises(StoreError) as e:
        FeatureStore.open(*stored(cfg), "test")
    assert "no stored features of split 'test'" in str(
        e.value
    ) and "extract-features --split test" in str(e.value)
    # no readable dataset: the old advice too (extract-features will name the problem)
    cfg = make_cfg(tmp_path, tmp_path / "no_dataset")
    with pytest.raises(StoreError) as e:
        FeatureStore.open(*stored(cfg), "nosuch")
    assert "extract-features --split nosuch" in str(e.value)


def test_predict_unknown_split_cli(tmp_path, synth_root):
    r = run_cli("predict", "--split", "nosuch", *cli_sets(tmp_path, synth_root))
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = one_line_error(r, f"split 'nosuch' not found in {synth_root}", "(splits: test, train)")
    assert "extract-features" not in line, line


# ----------------------------------------------------------------------------- out of memory


def test_an_allocator_failure_is_one_line_exit_1(capsys):
    """torch's CPU allocator raises a plain RuntimeError: the CLI boundary makes it (and
    MemoryError) one line with the keys to lower; any other RuntimeError stays a bug."""
    import cli

    def alloc() -> None:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
            "can't allocate memory: you tried to allocate 100000000000 bytes.\n"
            "more"
        )

    for boom in (alloc, lambda: [0] * (1 << 62)):
        with pytest.raises(SystemExit) as e:
            cli.guarded(boom)
        assert e.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1
            and err[0].startswith("error: out of memory")
            and "upsampler.hidden" in err[0]
        ), err

    def bug() -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.guarded(bug)


# ----------------------------------------------------------------------------- red-team cases


def test_config_files_that_are_not_files_and_odd_set_values(tmp_path):
    from pipeline.core.config import load_config

    for path, why in (
        ("/dev/zero", "not a regular file"),
        (str(tmp_path), "not a regular file"),
        (str(tmp_path / "none.toml"), "not found"),
    ):
        with pytest.raises(ConfigError, match=why):
            load_config(path)
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b'\xef\xbb\xbf[run]\nname = "x"\n')
    assert load_config(bom).run.name == "x"
    # a bare number for a string key is the string
    assert load_config(None, ["run.name=2024", "data.test_split=2024"]).run.name == "2024"


def test_an_edited_model_card_is_one_line(tmp_path):
    import json as json_

    from pipeline.core.errors import ModelError
    from pipeline.models.heads import (
        LinearHead,
        PacUpsampler,
        UpsamplerSpec,
        load_models,
        save_models,
    )

    save_models(tmp_path, LinearHead(5), PacUpsampler(UpsamplerSpec(5, 16)), {}, {}, 16)
    card = json_.loads((tmp_path / "models.json").read_text())
    card["head"]["in_channels"] = "abc"
    (tmp_path / "models.json").write_text(json_.dumps(card))
    with pytest.raises(ModelError, match="do not match their card"):
        load_models(tmp_path)


def test_a_multi_line_library_message_is_one_error_line(capsys):
    import cli

    def hdf5() -> None:
        raise OSError(28, "Can't write data (file write failed: time = x,\n filename = y)", "f.h5")

    with pytest.raises(SystemExit):
        cli.guarded(hdf5)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: f.h5:"), err
