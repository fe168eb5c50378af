"""A stored split as a later stage reads it when ``data.val_cut`` holds sequences of the
training split out (data.holdout): the training split's store cut by sequence, never a second
copy. A shard holds the images of one category (sequence), so each side is a subset of the
training split's shards: the derived validation split (``<train>_heldout``) is the shards of
the held-out sequences, the training split the others. Each side's content fingerprint is
the digest of its own manifest (its name and its shards' checksums), so a stage depends on
exactly the shards it reads; stage 1 stores the training split whole, whatever val_cut is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..core.errors import ConfigError
from ..core.keys import DatasetRef, FeatureKey
from ..data.holdout import Holdout
from .index import locate_split
from .manifest import Manifest, read_manifest
from .reader import FeatureStore, split_fingerprint

__all__ = ["open_split", "selected_fingerprint", "stored_split"]


def stored_split(split: str, holdout: Holdout | None) -> str:
    """The split whose stored features `split` is read from (the training split for the
    derived validation split, else `split` itself)."""
    return holdout.train if holdout is not None and split == holdout.split else split


def _categories(m: Manifest) -> list[str]:
    return sorted({row[0] for s in m.shards for row in s.rows})


def _selected(m: Manifest, split: str, holdout: Holdout) -> Manifest:
    """The side `split` (the training split or the derived one) of the training split's
    manifest `m`: its sequences' shards. A shard without images stays with training."""
    train, val = holdout.parts(_categories(m))
    keep = set(val if split == holdout.split else train)
    shards = tuple(
        s for s in m.shards if (s.rows[0][0] in keep if s.rows else split == holdout.train)
    )
    problems = m.problems if split == holdout.train else ()
    return dataclasses.replace(m, split=split, shards=shards, problems=problems)


def _cut(split: str, holdout: Holdout | None) -> bool:
    return holdout is not None and split in (holdout.train, holdout.split)


def open_split(
    cache: str | Path, key: FeatureKey, data: DatasetRef, split: str, holdout: Holdout | None
) -> FeatureStore:
    """FeatureStore.open of `split`, cut by sequence when `holdout` concerns it (ConfigError
    when data.val_cut leaves no sequence to train on)."""
    store = FeatureStore.open(cache, key, data, stored_split(split, holdout))
    if holdout is None or not _cut(split, holdout):
        return store
    return FeatureStore(store.split_dir, manifest=_selected(store.manifest, split, holdout))


def selected_fingerprint(
    cache: str | Path, key: FeatureKey, data: DatasetRef, split: str, holdout: Holdout | None
) -> str | None:
    """split_fingerprint of `split` as open_split reads it (None: not stored, or data.val_cut
    leaves no sequence to train on: the stage's run says so)."""
    if holdout is None or not _cut(split, holdout):
        return split_fingerprint(cache, key, data, split)
    split_dir = locate_split(cache, key, data, holdout.train)
    m, _ = read_manifest(split_dir) if split_dir is not None else (None, "")
    if m is None or m.split != holdout.train:
        return None
    try:
        return _selected(m, split, holdout).fingerprint
    except ConfigError:  # run_* refuses it in one line
        return None
