"""Reading a stored split: `FeatureStore`, a read-only, lazy, verified view of one split,
and `split_fingerprint`, its content fingerprint from the manifest alone."""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..core.errors import DataError, StoreError, UsageError
from ..core.fsutil import sha256_file
from ..core.hints import command
from ..core.keys import DatasetRef, FeatureKey
from ..data import Box, decode_image, list_splits
from .index import INDEX_FILE, locate_split, store_dir
from .manifest import ItemMeta, Manifest, ShardEntry, manifest_path, mark_bad, read_manifest
from .shards import unpack_mask


@dataclass
class CachedItem:
    meta: ItemMeta
    features: np.ndarray  # (h, w, C) as stored
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None  # (H, W) bool, None when not annotated


class FeatureStore:
    """Read-only, lazy, verified view of one stored split: the manifest is checked when the
    store is opened, each shard's size too, and each shard's sha256 the first time it is
    read in this process; anything wrong is a StoreError naming the shard and the repair.

    Open HDF5 files are kept in a small LRU; the object can be pickled (to worker processes)
    and reopens (and re-verifies) files there."""

    def __init__(self, split_dir: str | Path, max_open: int = 8, manifest: Manifest | None = None):
        """`manifest`: the split's, already read and checked (a selection of its shards,
        store.selection); None reads the folder's."""
        self.split_dir = Path(split_dir)
        why = ""
        if manifest is None:
            manifest, why = read_manifest(self.split_dir)
        if manifest is None:
            split = re.sub(r"-[0-9a-f]{16}$", "", self.split_dir.name)
            raise StoreError(
                f"{manifest_path(self.split_dir)}: {why}; run "
                f"`{command('extract-features', '--split', split)}`"
            )
        self.manifest = manifest
        self.split = manifest.split
        self.fingerprint = manifest.fingerprint
        self.items: list[ItemMeta] = []
        for si, shard in enumerate(manifest.shards):
            for slot, (cat, stem, src, h, w, top, left, bh, bw, ann) in enumerate(shard.rows):
                self.items.append(
                    ItemMeta(
                        len(self.items),
                        cat,
                        stem,
                        src,
                        (h, w),
                        Box(top, left, bh, bw),
                        bool(ann),
                        si,
                        slot,
                    )
                )
        for entry in manifest.shards:
            path = self.split_dir / entry.file
            size = path.stat().st_size if path.is_file() else -1
            if size != entry.bytes:
                self._damaged(entry, "missing" if size < 0 else "truncated")
        self._max_open = max_open
        self._open: OrderedDict[int, h5py.File] = OrderedDict()
        self._verified: set[int] = set()

    @classmethod
    def open(cls, cache: str | Path, key: FeatureKey, data: DatasetRef, split: str) -> FeatureStore:
        """The stored `split` of the dataset `data` in the store of `key` under `cache`;
        StoreError naming the command to run when it is missing or damaged, or a UsageError
        when the split has no manifest and the readable dataset has no such split."""
        split_dir = locate_split(cache, key, data, split)
        if split_dir is None or not manifest_path(split_dir).exists():  # is it a split at all?
            try:
                splits = list_splits(data.root, data.layout)
            except (DataError, OSError):  # no readable dataset: extract-features will say so
                splits = [split]
            if split not in splits:
                raise UsageError(
                    f"split '{split}' not found in {data.root} (splits: {', '.join(splits)})"
                )
        if split_dir is None:
            sdir = store_dir(cache, key)
            raise StoreError(
                f"{sdir}: no stored features of split '{split}' of {data.root}"
                f" for these settings; run "
                f"`{command('extract-features', '--split', split)}`"
            )
        store = cls(split_dir)
        if store.split != split:  # an index entry edited to name another split's folder
            raise StoreError(
                f"{split_dir.parent / INDEX_FILE}: names {split_dir.name} (split "
                f"'{store.split}') for split '{split}'; run "
                f"`{command('extract-features', '--split', split)}`"
            )
        return store

    def _damaged(self, entry: ShardEntry, what: str) -> None:
        raise StoreError(
            f"{self.split_dir / entry.file}: shard {what}; run "
            f"`{command('extract-features', '--split', self.split)}` to repair it"
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_verified"] = set()
        return state

    def _file(self, shard: int) -> h5py.File:
        f = self._open.get(shard)
        if f is None:
            entry = self.manifest.shards[shard]
            path = self.split_dir / entry.file
            if shard not in self._verified:
                try:
                    digest = sha256_file(path)
                except FileNotFoundError:
                    self._damaged(entry, "missing")
                if digest != entry.sha256:
                    mark_bad(path, entry.sha256, digest)
                    self._damaged(entry, "fails its checksum")
                self._verified.add(shard)
            try:
                f = h5py.File(path, "r")
            except OSError as e:
                raise StoreError(
                    f"{path}: unreadable shard ({e}); run "
                    f"`{command('extract-features', '--split', self.split)}`"
                ) from None
            self._open[shard] = f
            if len(self._open) > self._max_open:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(shard)
        return f

    def _group(self, index: int) -> h5py.Group:
        m = self.items[index]
        return self._file(m.shard)[f"{m.slot:05d}"]

    def features(self, index: int) -> np.ndarray:
        return self._group(index)["features"][()]

    def encoded_image(self, index: int) -> bytes:
        return self._group(index)["image"][()].tobytes()

    def image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8, decoded exactly as stage 1 decoded it."""
        return decode_image(self.encoded_image(index), self.split_dir / self.items[index].source)

    def mask(self, index: int) -> np.ndarray | None:
        """The annotation (H, W) bool at the original size, None when not annotated."""
        m = self.items[index]
        if not m.annotated:
            return None
        return unpack_mask(self._group(index)["mask"][()], m.orig_size[1])

    def read(self, index: int) -> CachedItem:
        return CachedItem(
            self.items[index], self.features(index), self.image(index), self.mask(index)
        )

    def annotated(self) -> list[int]:
        return [m.index for m in self.items if m.annotated]

    def categories(self) -> list[str]:
        return sorted({m.category for m in self.items})

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split_fingerprint(
    cache: str | Path, key: FeatureKey, data: DatasetRef, split: str
) -> str | None:
    """The content fingerprint of the stored `split` of `data` in the store of `key` under
    `cache`, or None when there is no valid manifest (reads it only)."""
    split_dir = locate_split(cache, key, data, split)
    m, _ = read_manifest(split_dir) if split_dir is not None else (None, "")
    return m.fingerprint if m is not None and m.split == split else None
