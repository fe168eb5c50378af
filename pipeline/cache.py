"""The stage-1 feature cache: content-addressed HDF5 shards plus a manifest per split.

Layout under `<paths.cache>/features/<backbone>-<model key>/`:
    model.json                     what the model key stands for (backbone, weights, ...)
    <split>/shards/<cat>-<k>-<hash>.h5   one shard = up to SHARD_SIZE images of one category
    <split>/manifest.json          written last, atomically: the split is complete
    .lock                          held (flock) by the one process writing this cache

A shard's name carries the hash of everything that determines its content (the model key,
the image and mask paths and their sha256), so a shard file that exists is complete and
current: it is written under a temporary name and renamed into place. An interrupted run
leaves at most a temporary file, which the next run ignores and removes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from .data import Box

FORMAT_VERSION = 2  # 2: bit-packed masks
SHARD_SIZE = 64  # images per shard: the unit of resumption and of distributed work


class CacheError(Exception):
    """A one-line, user-facing problem with the cache (missing, locked, unreadable)."""


# ----------------------------------------------------------------------------- atomic files

def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable ({e})") from None


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (released by the OS if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise CacheError(f"{what} is locked by another process (pid {holder}): wait for it "
                             f"to finish (lock file {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- shards

@dataclass
class ShardRecord:
    """One image as stored in a shard."""
    features: np.ndarray  # (h, w, C)
    image: np.ndarray  # (H, W, 3) uint8, original size
    mask: np.ndarray  # (H, W) bool, original size
    category: str
    stem: str
    source: str  # image path relative to the data root
    box: Box


def write_shard(path: Path, records: list[ShardRecord], attrs: dict) -> int:
    """Write a complete shard atomically (temporary name, fsync, rename). Returns its size.

    Deterministic: the same records give the same bytes (no timestamps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w", libver=("earliest", "v110"), track_order=True) as f:
        for k, v in sorted(attrs.items()):
            f.attrs[k] = v
        f.attrs["n"] = len(records)
        for i, r in enumerate(records):
            g = f.create_group(f"{i:05d}", track_order=True)
            g.create_dataset("features", data=r.features, track_times=False)
            # Contiguous, unfiltered datasets only: chunked storage makes the file layout
            # depend on when the chunk cache is flushed, so equal values could give
            # unequal files. Camera pixels shrink < 2x under deflate at ~10x the write
            # cost, so images stay raw; masks are bit-packed (8x smaller).
            g.create_dataset("image", data=r.image, track_times=False)
            g.create_dataset("mask", data=pack_mask(r.mask), track_times=False)
            g.attrs["category"] = r.category
            g.attrs["stem"] = r.stem
            g.attrs["source"] = r.source
            g.attrs["orig_size"] = np.array(r.image.shape[:2], np.int64)
            g.attrs["box"] = np.array(r.box.as_tuple(), np.int64)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    size = tmp.stat().st_size
    os.replace(tmp, path)
    return size


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """bool (H, W) -> uint8 (H, ceil(W / 8)), bits packed along rows."""
    return np.packbits(mask.astype(bool), axis=1)


def unpack_mask(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of pack_mask."""
    return np.unpackbits(packed, axis=1, count=width).astype(bool)


def remove_temporaries(folder: Path) -> None:
    """Delete temporary files left by killed writers (never complete shards)."""
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


# ----------------------------------------------------------------------------- reader

@dataclass(frozen=True)
class ItemMeta:
    """Where one cached image lives, and how its canvas maps to the original image."""
    index: int
    category: str
    stem: str
    source: str
    orig_size: tuple[int, int]  # (H, W)
    box: Box
    shard: int  # index into FeatureCache.shard_files
    slot: int  # position inside the shard


@dataclass
class CachedItem:
    meta: ItemMeta
    features: np.ndarray  # (h, w, C) as stored
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool


class FeatureCache:
    """Read-only, lazy view of one split of the cache: nothing is loaded until asked for.

    Open HDF5 files are kept in a small LRU; the object can be pickled (to worker processes)
    and reopens files there."""

    def __init__(self, split_dir: str | Path, max_open: int = 8):
        self.split_dir = Path(split_dir)
        manifest = read_json(self.split_dir / "manifest.json")
        if manifest is None:
            raise CacheError(f"no complete feature cache in {self.split_dir}")
        self.manifest = manifest
        self.split: str = manifest["split"]
        self.fingerprint: str = manifest["fingerprint"]
        self.shard_files: list[str] = [s["file"] for s in manifest["shards"]]
        self.items: list[ItemMeta] = []
        for si, shard in enumerate(manifest["shards"]):
            for slot, (cat, stem, src, h, w, top, left, bh, bw) in enumerate(shard["items"]):
                self.items.append(ItemMeta(len(self.items), cat, stem, src, (h, w),
                                           Box(top, left, bh, bw), si, slot))
        self.feature_shape: tuple[int, ...] | None = None
        self._max_open = max_open
        self._open: OrderedDict[int, h5py.File] = OrderedDict()

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def _file(self, shard: int) -> h5py.File:
        f = self._open.get(shard)
        if f is None:
            path = self.split_dir / self.shard_files[shard]
            try:
                f = h5py.File(path, "r")
            except OSError as e:
                raise CacheError(f"{path}: unreadable shard ({e}); rerun extract-features") from None
            self._open[shard] = f
            if len(self._open) > self._max_open:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(shard)
        return f

    def group(self, index: int) -> h5py.Group:
        m = self.items[index]
        return self._file(m.shard)[f"{m.slot:05d}"]

    def features(self, index: int) -> np.ndarray:
        return self.group(index)["features"][()]

    def read(self, index: int) -> CachedItem:
        g = self.group(index)
        return CachedItem(self.items[index], g["features"][()], g["image"][()],
                          self.mask(index))

    def mask(self, index: int) -> np.ndarray:
        """The annotation (H, W) bool at the original size."""
        return unpack_mask(self.group(index)["mask"][()], self.items[index].orig_size[1])

    def categories(self) -> list[str]:
        return sorted({m.category for m in self.items})

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
