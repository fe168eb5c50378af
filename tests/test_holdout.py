"""data.val_cut's choice of held-out sequences (pipeline.holdout)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.data.holdout import held_out, split_by_sequence

NAMES = ["bear", "blackswan", "bmx-bumps", "boat", "camel", "car-roundabout", "cows", "dog"]


def test_smallest_hashes_whatever_the_order():
    by_hash = sorted(NAMES, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    assert held_out(NAMES, 3) == sorted(by_hash[:3])
    assert held_out(reversed(NAMES), 3) == held_out(NAMES + NAMES, 3)
    # growing n only adds sequences (a sequence never leaves validation)
    assert set(held_out(NAMES, 2)) < set(held_out(NAMES, 3))


def test_every_sequence_on_exactly_one_side():
    train, val = split_by_sequence(NAMES, 2)
    assert sorted(train + val) == sorted(NAMES) and not set(train) & set(val)
    assert len(val) == 2


@pytest.mark.parametrize("n", [0, 8, 9, -1])
def test_training_keeps_one_sequence(n):
    with pytest.raises(ValueError, match="cannot hold out .* of 8 sequences"):
        held_out(NAMES, n)


# ----------------------------------------------------------------------------- data.val_cut
# on the synth dataset: a split cut by sequence from the training split's stored shards

QUIET = {"log": lambda s: None, "progress": False}
CUT = ("data.val_cut=1",)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """The synth dataset (two sequences per split) with its splits stored at val_cut = 0."""
    from pipeline.data.synth import make_dataset
    from pipeline.stages.extract import run_extract
    from tests.conftest import make_cfg

    root = make_dataset(
        tmp_path_factory.mktemp("data") / "obj_seg",
        "obj_seg",
        {"train": 3, "test": 2},
        size=(96, 136),
        seed=4,
    )
    base = tmp_path_factory.mktemp("cut")
    run_extract(make_cfg(base, root), **QUIET)
    return base, root


def _cfg(extracted, *extra):
    from tests.conftest import TINY_TRAIN, make_cfg

    return make_cfg(extracted[0], extracted[1], *TINY_TRAIN, *extra)


def _cache_files(cfg) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(Path(cfg.paths.cache).rglob("*.h5"))}


def test_the_heldout_split_is_a_cut_of_the_stored_training_split(extracted):
    from pipeline.data.holdout import holdout_of
    from pipeline.store import FeatureStore, open_split, selected_fingerprint
    from tests.conftest import stored

    cfg = _cfg(extracted, *CUT)
    whole = FeatureStore.open(*stored(cfg), "train")
    holdout = holdout_of("train", 1)
    train = open_split(*stored(cfg), "train", holdout)
    val = open_split(*stored(cfg), "train_heldout", holdout)
    assert val.split == "train_heldout" and val.categories() == held_out(whole.categories(), 1)
    assert sorted(train.categories() + val.categories()) == whole.categories()
    assert len(train) + len(val) == len(whole) and len(val) == 3
    # the same shard files, no copy: each side reads a subset of the training split's shards
    assert train.split_dir == val.split_dir == whole.split_dir
    assert {s.file for s in val.manifest.shards} < {s.file for s in whole.manifest.shards}
    assert whole.read(whole.items[0].index).features.shape == train.read(0).features.shape
    # each side's fingerprint is its own content; off, the training split's is the stored one
    fps = {train.fingerprint, val.fingerprint, whole.fingerprint}
    assert len(fps) == 3
    assert selected_fingerprint(*stored(cfg), "train_heldout", holdout) == val.fingerprint
    assert selected_fingerprint(*stored(cfg), "train", None) == whole.fingerprint


def test_val_cut_recomputes_no_features(extracted):
    from pipeline.stages.extract import run_extract
    from pipeline.stages.extract import status as extract_status

    cfg = _cfg(extracted, *CUT)
    before = _cache_files(cfg)
    assert extract_status(cfg).up_to_date
    run_extract(cfg, **QUIET)
    assert _cache_files(cfg) == before


def test_training_never_sees_the_heldout_sequences(extracted, monkeypatch):
    from pipeline.models.heads import read_card
    from pipeline.stages import train_data
    from pipeline.stages.train import run_train, status

    seen: list[list[str]] = []
    real = train_data.TrainData.__init__

    def spy(self, store, patch):
        real(self, store, patch)
        seen.append(sorted({store.items[i].category for i in self.indices}))

    monkeypatch.setattr(train_data.TrainData, "__init__", spy)
    cfg = _cfg(extracted, *CUT)
    run_train(cfg, **QUIET)
    heldout = held_out(["block", "disc"], 1)
    assert seen == [[c for c in ["block", "disc"] if c not in heldout], heldout]
    card, _ = read_card(cfg.run_dir / "models")
    assert card is not None and card["params"]["data.val_cut"] == 1
    assert status(cfg).up_to_date
    # another cut is other models: train-head is stale, naming the key
    st = status(_cfg(extracted, "data.val_cut=0"))
    assert st.state == "stale" and "data.val_cut" in st.why


def test_val_cut_leaving_nothing_to_train_on_is_one_line_exit_2(extracted):
    from tests.conftest import cli_sets, one_line_error, run_cli

    r = run_cli("train-head", *cli_sets(extracted[0], extracted[1], "data.val_cut=2"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    one_line_error(r, "bad value for data.val_cut: 2", "cannot hold out 2 of 2 sequences")


def test_val_cut_and_val_split_are_exclusive():
    from pipeline.core.config import load_config
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="data.val_cut: it makes the validation split"):
        load_config(None, ["data.val_cut=1", "data.val_split=val"])
    with pytest.raises(ConfigError, match="data.val_cut"):
        load_config(None, ["data.val_cut=-1"])
    assert load_config(None, ["data.val_cut=1", "predict.threshold=auto"]).data.val_cut == 1
