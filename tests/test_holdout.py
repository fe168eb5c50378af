"""data.val_cut's choice of held-out sequences (pipeline.holdout)."""

from __future__ import annotations

import hashlib

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
