"""The feature store: stage 1's output, and all that the later stages know about stage 1.

Layout under `<paths.cache>/features/<backbone>-<feature key>/` (a "store"):
    features.json                   what the feature key stands for (backbone, weights, ...)
    index.json                      which folder holds each dataset's split (see below)
    runs/<hash>.json                the runs whose models or reports use this store (cache gc)
    <folder>/shards/<cat>-<k>-<hash>.h5    up to SHARD_SIZE images of one category
    <folder>/shards/<cat>-<k>-<hash>.json  the shard's size, sha256 and items (its receipt)
    <folder>/manifest.json          written last: the split is complete

The one process writing a store holds (flock) `<paths.cache>/features/.locks/<store>.lock`
(store_lock), outside the store, so that `cache gc` removing the store never deletes a lock
file another process holds open.

A split is stored in the folder `<split>-<data digest>`, named by what it holds (the digest of
its image and mask files), so several datasets with a split of the same name share a store
without evicting each other, and a moved dataset is found again. A folder named `<split>`
alone was made before the index (adopted as it is when its content matches). The index maps a
dataset (its layout, absolute root and split name) to its folder, so that the later stages
find their split without reading or hashing the dataset; stage 1 writes it.

A shard's name carries the hash of everything that determines its content (the feature key,
the image and mask files' sha256), and it is written under a temporary name and renamed into
place, then its receipt. The manifest lists every shard with its size and sha256 and carries
a digest of its own body, so an edited or damaged manifest, and a shard that is missing,
truncated, unlisted or fails its checksum, are all found: readers refuse them in one line
naming the repair (`extract-features`, which recomputes only what is bad).

A split's content fingerprint is its manifest's digest: a hash of the shards' checksums and
items, i.e. of what stage 1 produced. Stage 2 depends on it, not on stage 1's parameters.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..core.config import Config
from ..core.errors import StoreError
from ..core.fingerprints import fingerprint
from ..core.fsutil import (
    FileHasher,
    atomic_file,
    atomic_write_bytes,
    atomic_write_json,
    canonical_json,
    lock_path,
    read_json,
    sha256_file,
)
from ..core.hints import command
from ..core.owned import is_marked
from ..data.dataset import Box, Item, decode_image, list_items
from ..params import FORMAT_VERSION, feature_params

SHARD_SIZE = 64  # images per shard: the unit of resumption and of distributed work


# ----------------------------------------------------------------------------- identity

def store_dir(cfg: Config, fparams: dict | None = None) -> Path:
    fparams = fparams or feature_params(cfg)
    return Path(cfg.paths.cache) / "features" / f"{cfg.backbone.name}-{fingerprint(fparams)[:12]}"


def store_lock(store: Path) -> Path:
    """The flock file of the store in `store` (held by the one process writing it, and by
    `cache gc` while it removes it): in the stores' folder's `.locks/`, never inside the store,
    which gc deletes."""
    return lock_path(Path(store).parent, Path(store).name)


INDEX_FILE = "index.json"  # in a store: dataset key -> the folder of its split
RUNS_DIR = "runs"  # in a store: one file per run that uses it


def dataset_key(cfg: Config, split: str) -> str:
    """What identifies a dataset's split in the index: layout, absolute root, split name."""
    return f"{cfg.data.layout}:{Path(cfg.data.root).resolve()}:{split}"


def split_folder(split: str, data_digest: str) -> str:
    """The store folder of a split holding the data with `data_digest`."""
    return f"{split}-{data_digest[:16]}"


def read_index(sdir: Path) -> dict[str, str]:
    """The store's index (dataset key -> split folder name); entries that are not a plain
    folder name are ignored, a damaged index is an empty one."""
    obj = read_json(Path(sdir) / INDEX_FILE)
    splits = obj.get("splits") if isinstance(obj, dict) else None
    if not isinstance(splits, dict):
        return {}
    return {k: v for k, v in splits.items() if isinstance(k, str) and isinstance(v, str)
            and v and "/" not in v and "\\" not in v and v not in (".", "..")}


def index_split(sdir: Path, key: str, folder: str) -> None:
    """Point the index entry `key` at `folder` (the caller holds the store's lock). The folder
    it pointed to before (the dataset's earlier content) is removed unless another entry
    still names it: its unchanged shards were linked into the new folder."""
    index = read_index(sdir)
    old = index.get(key)
    if old == folder:
        return
    index[key] = folder
    atomic_write_json(Path(sdir) / INDEX_FILE, {"splits": index})
    if old is not None and old not in index.values() and manifest_path(Path(sdir) / old).exists():
        manifest_path(Path(sdir) / old).unlink()  # first: a half-removed folder is no split
        shutil.rmtree(Path(sdir) / old, ignore_errors=True)


def locate_split(cfg: Config, split: str, mirror: bool = False) -> Path | None:
    """The folder of the stored split of the configured dataset for the current feature
    settings (`mirror`: its mirrored features), from the store's index alone (no data file
    read), or None when stage 1 has not stored it. A store made before the index: the folder
    named like the split."""
    return locate_in(store_dir(cfg, feature_params(cfg, mirror)), cfg, split)


def locate_in(sdir: Path, cfg: Config, split: str) -> Path | None:
    """locate_split in the store `sdir`."""
    name = read_index(sdir).get(dataset_key(cfg, split))
    if name is not None:
        return sdir / name
    if not (sdir / INDEX_FILE).exists() and manifest_path(sdir / split).is_file():
        return sdir / split
    return None


def register_run(split_dir: Path, run_dir: Path) -> None:
    """Note in the store holding `split_dir` that the run in `run_dir` uses it (cache gc keeps
    a store while a registered run's folder exists). Best effort: a read-only cache is used
    all the same."""
    run = str(Path(run_dir).resolve())
    name = hashlib.sha256(run.encode()).hexdigest()[:16]
    entry = Path(split_dir).parent / RUNS_DIR / f"{name}.json"
    if read_json(entry) != {"run": run}:
        with contextlib.suppress(OSError):
            atomic_write_json(entry, {"run": run})


MEMO_FILE = ".file_hashes.json"  # the checksum memo, in the cache folder
CACHE_LEGACY = (MEMO_FILE,)  # in a cache folder made before the marker


def file_hasher(cfg: Config, verify: bool = False) -> FileHasher:
    """The sha256 memo of data files and shards (keyed by path and stat stamp), kept in the
    cache folder; saved only once the tool has claimed that folder. `verify`: rehash all."""
    cache = Path(cfg.paths.cache)
    return FileHasher(cache / MEMO_FILE, verify=verify,
                      writable=is_marked(cache, CACHE_LEGACY))


# ----------------------------------------------------------------------------- manifest

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
        out = {"file": self.file, "hash": self.hash, "bytes": self.bytes, "sha256": self.sha256,
               "items": [list(r) for r in self.rows], "errors": list(self.errors)}
        if self.rejected:  # absent when empty: manifests of earlier versions keep their digest
            out["rejected"] = list(self.rejected)
        return out

    @classmethod
    def from_json(cls, d: dict) -> ShardEntry:
        return cls(str(d["file"]), str(d["hash"]), int(d["bytes"]), str(d["sha256"]),
                   tuple(tuple(r) for r in d["items"]), tuple(map(str, d["errors"])),
                   tuple(int(p) for p in d.get("rejected", ())))

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
        return {"format": FORMAT_VERSION, "split": self.split, "feature_key": self.feature_key,
                "data_digest": self.data_digest, "problems": list(self.problems),
                "shards": [s.to_json() for s in self.shards]}

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
        m = Manifest(str(obj["split"]), str(obj["feature_key"]), str(obj["data_digest"]),
                     tuple(map(str, obj["problems"])),
                     tuple(ShardEntry.from_json(s) for s in obj["shards"]))
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


def check_shard(split_dir: Path, entry: ShardEntry, hasher: FileHasher | None,
                max_pixels: int | None = None) -> str:
    """"" when the shard file is present with the recorded size and sha256 (and, given
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
        return (f"shard {entry.file}: {entry.retry(max_pixels)} image(s) refused by an earlier "
                "data.max_pixels now accepted")
    return ""


# ----------------------------------------------------------------------------- planning

@dataclass
class ShardTask:
    """Everything a worker needs to compute one shard (picklable)."""
    data_root: str
    split_dir: str
    file: str  # relative to split_dir
    hash: str
    items: list[Item]
    attrs: dict = field(default_factory=dict)
    max_pixels: int | None = None  # data.max_pixels (not part of the hash: see ShardEntry.retry)

    @property
    def path(self) -> Path:
        return Path(self.split_dir) / self.file

    @property
    def mirror(self) -> bool:
        """Whether the shard holds mirrored features (canvases flipped left-right)."""
        return bool(self.attrs.get("mirror", False))

    @property
    def receipt(self) -> Path:
        return self.path.with_suffix(".json")


@dataclass
class SplitPlan:
    """What stage 1 must produce for a split, derived from the data files and the key."""
    split: str
    split_dir: Path
    items: list[Item]
    problems: list[str]
    data_digest: str
    feature_key: str
    tasks: list[ShardTask]
    max_pixels: int | None = None


def plan_split(cfg: Config, split: str, fparams: dict, hasher: FileHasher) -> SplitPlan:
    """The split's shards. Reads the data folder (file digests are memoised)."""
    root = Path(cfg.data.root)
    items, problems = list_items(root, cfg.data.layout, split)
    key = fingerprint(fparams)
    ids = [(it.image, hasher.digest(root / it.image), it.mask,
            hasher.digest(root / it.mask) if it.mask else None) for it in items]
    digest = fingerprint([ids, problems])
    sdir = store_dir(cfg, fparams)
    split_dir = sdir / split_folder(split, digest)
    if not split_dir.is_dir():  # a store made before the index holds this very data?
        m, _ = read_manifest(sdir / split)
        if m is not None and m.data_digest == digest and m.feature_key == key:
            split_dir = sdir / split
    by_cat: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_cat.setdefault(it.category, []).append(i)
    tasks = []
    for cat, idx in by_cat.items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cat)
        for k in range(0, len(idx), SHARD_SIZE):
            chunk = idx[k:k + SHARD_SIZE]
            h = fingerprint([key, [ids[i] for i in chunk]])
            tasks.append(ShardTask(str(root), str(split_dir),
                                   f"shards/{safe}-{k // SHARD_SIZE:04d}-{h}.h5", h,
                                   [items[i] for i in chunk],
                                   {"feature_key": key, "split": split, "shard_hash": h,
                                    "format": FORMAT_VERSION,
                                    **({"mirror": 1} if fparams.get("mirror") else {})},
                                   cfg.data.max_pixels))
    return SplitPlan(split, split_dir, items, problems, digest, key, tasks, cfg.data.max_pixels)


def read_receipt(task: ShardTask) -> ShardEntry | None:
    obj = read_json(task.receipt)
    try:
        entry = ShardEntry.from_json(obj) if isinstance(obj, dict) else None
    except (KeyError, TypeError, ValueError):
        return None
    if entry is None or entry.file != task.file or entry.hash != task.hash:
        return None
    return entry


def done_entry(task: ShardTask, hasher: FileHasher | None) -> ShardEntry | None:
    """The shard's receipt when the shard is complete and intact, else None (recompute)."""
    entry = read_receipt(task)
    if entry is None or check_shard(Path(task.split_dir), entry, hasher, task.max_pixels):
        return None
    return entry


def split_problems(plan: SplitPlan, hasher: FileHasher) -> list[str]:
    """Why the stored split is not what the plan asks for ([] = current and intact)."""
    m, why = read_manifest(plan.split_dir)
    if m is None:
        return [why]
    if m.feature_key != plan.feature_key or m.split != plan.split:
        return ["manifest of another split or feature key"]
    if m.data_digest != plan.data_digest:
        return [f"data[{plan.split}] changed"]
    out = []
    listed = {s.file for s in m.shards}
    expected = {t.file for t in plan.tasks}
    out += [f"manifest does not list shard {f}" for f in sorted(expected - listed)]
    out += [f"manifest lists unknown shard {f}" for f in sorted(listed - expected)]
    for s in m.shards:
        if s.file in expected:
            problem = check_shard(plan.split_dir, s, hasher, plan.max_pixels)
            if problem:
                out.append(problem)
    return out


# ----------------------------------------------------------------------------- shards

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


def write_shard(task: ShardTask, records: list[ShardRecord], errors: list[str],
                rejected: tuple[int, ...] = ()) -> ShardEntry:
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
                g.create_dataset("image", data=np.frombuffer(r.encoded, np.uint8),
                                 track_times=False)
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
    rows = tuple((r.category, r.stem, r.source, *r.orig_size, *r.box.as_tuple(),
                  int(r.mask is not None))
                 for r in records)
    entry = ShardEntry(task.file, task.hash, size, digest, rows, tuple(errors), tuple(rejected))
    atomic_write_json(task.receipt, entry.to_json())
    return entry


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """bool (H, W) -> uint8 (H, ceil(W / 8)), bits packed along rows."""
    return np.packbits(mask.astype(bool), axis=1)


def unpack_mask(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of pack_mask."""
    return np.unpackbits(packed, axis=1, count=width).astype(bool)


# ----------------------------------------------------------------------------- reader

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

    def __init__(self, split_dir: str | Path, max_open: int = 8):
        self.split_dir = Path(split_dir)
        manifest, why = read_manifest(self.split_dir)
        if manifest is None:
            split = re.sub(r"-[0-9a-f]{16}$", "", self.split_dir.name)
            raise StoreError(f"{manifest_path(self.split_dir)}: {why}; run "
                             f"`{command('extract-features', '--split', split)}`")
        self.manifest = manifest
        self.split = manifest.split
        self.fingerprint = manifest.fingerprint
        self.items: list[ItemMeta] = []
        for si, shard in enumerate(manifest.shards):
            for slot, (cat, stem, src, h, w, top, left, bh, bw, ann) in enumerate(shard.rows):
                self.items.append(ItemMeta(len(self.items), cat, stem, src, (h, w),
                                           Box(top, left, bh, bw), bool(ann), si, slot))
        for entry in manifest.shards:
            path = self.split_dir / entry.file
            size = path.stat().st_size if path.is_file() else -1
            if size != entry.bytes:
                self._damaged(entry, "missing" if size < 0 else "truncated")
        self._max_open = max_open
        self._open: OrderedDict[int, h5py.File] = OrderedDict()
        self._verified: set[int] = set()

    @classmethod
    def open(cls, cfg: Config, split: str, mirror: bool = False) -> FeatureStore:
        """The stored split of the configured dataset for the current feature settings
        (`mirror`: its mirrored features); StoreError naming the command to run when it is
        missing or damaged, or a UsageError when the split has no manifest and the readable
        dataset has no such split."""
        split_dir = locate_split(cfg, split, mirror)
        if split_dir is None or not manifest_path(split_dir).exists():  # is it a split at all?
            from ..core.errors import DataError, UsageError
            from ..data.dataset import list_splits
            try:
                splits = list_splits(cfg.data.root, cfg.data.layout)
            except (DataError, OSError):  # no readable dataset: extract-features will say so
                splits = [split]
            if split not in splits:
                raise UsageError(f"split '{split}' not found in {cfg.data.root} "
                                 f"(splits: {', '.join(splits)})")
        if split_dir is None:
            sdir = store_dir(cfg, feature_params(cfg, mirror))
            raise StoreError(f"{sdir}: no stored features of split '{split}' of {cfg.data.root}"
                             f" for these settings; run "
                             f"`{command('extract-features', '--split', split)}`")
        store = cls(split_dir)
        if store.split != split:  # an index entry edited to name another split's folder
            raise StoreError(f"{split_dir.parent / INDEX_FILE}: names {split_dir.name} (split "
                             f"'{store.split}') for split '{split}'; run "
                             f"`{command('extract-features', '--split', split)}`")
        return store

    def _damaged(self, entry: ShardEntry, what: str) -> None:
        raise StoreError(f"{self.split_dir / entry.file}: shard {what}; run "
                         f"`{command('extract-features', '--split', self.split)}` to repair it")

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self):
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
                raise StoreError(f"{path}: unreadable shard ({e}); run "
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
        return CachedItem(self.items[index], self.features(index), self.image(index),
                          self.mask(index))

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

    def __exit__(self, *exc) -> None:
        self.close()


def split_fingerprint(cfg: Config, split: str, mirror: bool = False) -> str | None:
    """The content fingerprint of the stored split for the current feature settings (`mirror`:
    of its mirrored features), or None when there is no valid manifest (reads it only)."""
    split_dir = locate_split(cfg, split, mirror)
    m, _ = read_manifest(split_dir) if split_dir is not None else (None, "")
    return m.fingerprint if m is not None and m.split == split else None
