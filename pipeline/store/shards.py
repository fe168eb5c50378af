"""A shard file: up to SHARD_SIZE images of one category with their features, encoded image
bytes and bit-packed masks, written atomically (under a temporary name, then renamed into
place) and then its receipt (size, sha256, items). Deterministic: the same records give
the same bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from ..core.fsutil import atomic_file, atomic_write_json, sha256_file
from ..data import Box
from .manifest import ShardEntry, bad_marker
from .plan import ShardTask


@dataclass
class ShardRecord:
    """One image as stored in a shard."""

    features: np.ndarray  # (h, w, C)
    encoded: bytes  # the image file's bytes, as read
    mask: np.ndarray | None  # (H, W) bool, None when not annotated
    orig_size: tuple[int, int]  # (H, W) of the decoded image
    category: str
    stem: str
    source: str  # image path relative to the data root
    box: Box


def write_shard(
    task: ShardTask, records: list[ShardRecord], errors: list[str], rejected: tuple[int, ...] = ()
) -> ShardEntry:
    """Write a complete shard atomically (fsutil.atomic_file), then its receipt.
    `rejected`: the pixel counts of the images refused by data.max_pixels.

    Deterministic: the same records give the same bytes (no timestamps)."""
    path = task.path
    with atomic_file(path) as tmp:
        with h5py.File(tmp, "w", libver=("earliest", "v110"), track_order=True) as f:
            for k, v in sorted(task.attrs.items()):
                f.attrs[k] = v
            f.attrs["n"] = len(records)
            for i, r in enumerate(records):
                g = f.create_group(f"{i:05d}", track_order=True)
                # Contiguous, unfiltered datasets only: chunked storage makes the file layout
                # depend on when the chunk cache is flushed, so equal values could give
                # unequal files. The image is kept as its encoded file (a JPEG is ~10x
                # smaller than its pixels); masks are bit-packed (8x smaller).
                g.create_dataset("features", data=r.features, track_times=False)
                g.create_dataset(
                    "image", data=np.frombuffer(r.encoded, np.uint8), track_times=False
                )
                if r.mask is not None:
                    g.create_dataset("mask", data=pack_mask(r.mask), track_times=False)
                for key in ("category", "stem", "source"):
                    # a name as str when it is UTF-8 (as before: no format change), else as
                    # its file-system bytes (os.fsencode: h5py refuses the surrogates that
                    # stand for the undecodable bytes of a Latin-1 name)
                    name = getattr(r, key)
                    try:
                        name.encode("utf-8")
                    except UnicodeEncodeError:
                        name = os.fsencode(name)
                    g.attrs[key] = name
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
    bad_marker(path).unlink(missing_ok=True)
    rows = tuple(
        (r.category, r.stem, r.source, *r.orig_size, *r.box.as_tuple(), int(r.mask is not None))
        for r in records
    )
    entry = ShardEntry(task.file, task.hash, size, digest, rows, tuple(errors), tuple(rejected))
    atomic_write_json(task.receipt, entry.to_json())
    return entry


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """bool (H, W) -> uint8 (H, ceil(W / 8)), bits packed along rows."""
    return np.packbits(mask.astype(bool), axis=1)


def unpack_mask(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of pack_mask."""
    return np.unpackbits(packed, axis=1, count=width).astype(bool)
