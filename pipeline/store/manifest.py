"""A stored split's manifest (written last: the split is complete) and the checks of its
shards against it: size, sha256, and the `.bad` marker a reader leaves on a shard that
failed its checksum.

The manifest lists every shard with its size and sha256 and carries a digest of its own
body, so an edited or damaged manifest, and a shard that is missing, truncated, unlisted or
fails its checksum, are all found. A split's content fingerprint is its manifest's digest: a
hash of the shards' checksums and items, i.e. of what stage 1 produced.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..core.fsutil import FileHasher, atomic_write_bytes, canonical_json, read_json, sha256_file
from ..core.keys import FORMAT_VERSION
from ..data import Box


@dataclass(frozen=True)
class ItemMeta:
    """Where one cached image lives, and how its canvas maps to the original image."""

    index: int
    category: str
    stem: str
    source: str  # image path relative to the data root
    orig_size: tuple[int, int]  # (H, W) in viewer orientation
    box: Box
    annotated: bool
    shard: int  # index into Manifest.shards
    slot: int  # position inside the shard


@dataclass(frozen=True)
class ShardEntry:
    file: str  # relative to the split folder
    hash: str  # of the shard's inputs
    bytes: int
    sha256: str
    rows: tuple  # per image: category, stem, source, H, W, box (top, left, h, w), annotated
    errors: tuple[str, ...]  # files of this shard that could not be used
    rejected: tuple[int, ...] = ()  # pixel counts of the images refused by data.max_pixels

    def to_json(self) -> dict:
        out = {
            "file": self.file,
            "hash": self.hash,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "items": [list(r) for r in self.rows],
            "errors": list(self.errors),
        }
        if self.rejected:  # absent when empty: manifests of earlier versions keep their digest
            out["rejected"] = list(self.rejected)
        return out

    @classmethod
    def from_json(cls, d: dict) -> ShardEntry:
        return cls(
            str(d["file"]),
            str(d["hash"]),
            int(d["bytes"]),
            str(d["sha256"]),
            tuple(tuple(r) for r in d["items"]),
            tuple(map(str, d["errors"])),
            tuple(int(p) for p in d.get("rejected", ())),
        )

    def retry(self, max_pixels: int) -> int:
        """How many of the images refused for their size data.max_pixels now accepts."""
        return sum(1 for p in self.rejected if p <= max_pixels)


@dataclass(frozen=True)
class Manifest:
    """A complete split: its shards with their checksums, and what it was computed from."""

    split: str
    feature_key: str
    data_digest: str  # of the split's image and mask files
    problems: tuple[str, ...]  # listing problems (files that could not be used)
    shards: tuple[ShardEntry, ...]

    def body(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "split": self.split,
            "feature_key": self.feature_key,
            "data_digest": self.data_digest,
            "problems": list(self.problems),
            "shards": [s.to_json() for s in self.shards],
        }

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.body())).hexdigest()

    @property
    def fingerprint(self) -> str:
        """The split's content fingerprint (what downstream stages depend on)."""
        return self.digest[:16]

    @property
    def errors(self) -> list[str]:
        return [*self.problems, *(e for s in self.shards for e in s.errors)]

    @property
    def n_images(self) -> int:
        return sum(len(s.rows) for s in self.shards)

    def to_json(self) -> dict:
        return {**self.body(), "digest": self.digest, "n_images": self.n_images}


def manifest_path(split_dir: Path) -> Path:
    return Path(split_dir) / "manifest.json"


def read_manifest(split_dir: Path) -> tuple[Manifest | None, str]:
    """The split's manifest, or None and why not ("no manifest", "manifest damaged", an
    older format). Never raises for a bad file: a damaged manifest is an absent one."""
    path = manifest_path(split_dir)
    obj = read_json(path)
    if obj is None:
        return None, ("manifest unreadable" if path.exists() else "no manifest")
    if not isinstance(obj, dict):
        return None, "manifest damaged"
    if obj.get("format") != FORMAT_VERSION:
        return None, f"cache format {obj.get('format')!r}, now {FORMAT_VERSION}"
    try:
        m = Manifest(
            str(obj["split"]),
            str(obj["feature_key"]),
            str(obj["data_digest"]),
            tuple(map(str, obj["problems"])),
            tuple(ShardEntry.from_json(s) for s in obj["shards"]),
        )
    except (KeyError, TypeError, ValueError):
        return None, "manifest damaged"
    if m.digest != obj.get("digest"):
        return None, "manifest damaged (its digest does not match its content)"
    return m, ""


def bad_marker(shard: Path) -> Path:
    """`<shard>.bad`: left by a reader that found the shard failing its checksum, so that
    `status` and `extract-features` know without trusting the checksum memo (written by any
    process or Dask worker without coordination; removed when the shard is rewritten)."""
    return shard.with_name(shard.name + ".bad")


def mark_bad(shard: Path, expected: str, found: str) -> None:
    """Leave bad_marker(shard) (best effort: a read-only cache still gets the error)."""
    with contextlib.suppress(OSError):
        atomic_write_bytes(bad_marker(shard), f"expected {expected}\nfound {found}\n".encode())


def check_shard(
    split_dir: Path, entry: ShardEntry, hasher: FileHasher | None, max_pixels: int | None = None
) -> str:
    """ "" when the shard file is present with the recorded size and sha256 (and, given
    `max_pixels`, holds no image refused for a size this limit accepts), else why not. A
    checksum failure is marked (mark_bad)."""
    path = Path(split_dir) / entry.file
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"shard {entry.file} missing"
    if size != entry.bytes:
        return f"shard {entry.file} truncated or resized ({size} of {entry.bytes} bytes)"
    if bad_marker(path).exists():
        return f"shard {entry.file} failed its checksum when read"
    digest = hasher.digest(path) if hasher is not None else sha256_file(path)
    if digest != entry.sha256:
        mark_bad(path, entry.sha256, digest)
        return f"shard {entry.file} fails its checksum"
    if max_pixels is not None and entry.retry(max_pixels):
        return (
            f"shard {entry.file}: {entry.retry(max_pixels)} image(s) refused by an earlier "
            "data.max_pixels now accepted"
        )
    return ""
