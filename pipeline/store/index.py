"""The stores of a cache folder and their index: which folder holds a dataset's split.

A store is `<cache>/features/<backbone>-<feature key>/` (store_dir: a FeatureKey names it).
Its index.json maps a dataset (its layout, absolute root and split name: dataset_key) to the
folder `<split>-<data digest>` holding the split, so that the later stages find their split
without reading or hashing the dataset; stage 1 writes it. `runs/<hash>.json` names the runs
that use the store (cache gc). The one process writing a store holds its lock (store_lock).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from pathlib import Path

from ..core.fsutil import FileHasher, atomic_write_json, lock_path, read_json
from ..core.keys import DatasetRef, FeatureKey
from ..core.owned import is_marked
from .manifest import manifest_path

FEATURES = "features"  # in the cache folder: the stores


def store_dir(cache: str | Path, key: FeatureKey) -> Path:
    """The folder of the store of the features `key` under the cache folder `cache`."""
    return Path(cache) / FEATURES / key.folder


def store_lock(store: Path) -> Path:
    """The flock file of the store in `store` (held by the one process writing it, and by
    `cache gc` while it removes it): in the stores' folder's `.locks/`, never inside the store,
    which gc deletes."""
    return lock_path(Path(store).parent, Path(store).name)


INDEX_FILE = "index.json"  # in a store: dataset key -> the folder of its split
RUNS_DIR = "runs"  # in a store: one file per run that uses it


def dataset_key(data: DatasetRef, split: str) -> str:
    """What identifies a dataset's split in the index: layout, absolute root, split name."""
    return f"{data.layout}:{Path(data.root).resolve()}:{split}"


def split_folder(split: str, data_digest: str) -> str:
    """The store folder of a split holding the data with `data_digest`."""
    return f"{split}-{data_digest[:16]}"


def pre_index_folder(sdir: Path, split: str) -> Path:
    """Where a store made before the index (format 3 without index.json) kept `split`: the
    folder named like the split. The one place that knows it: `locate_in` finds such a
    split while the store has no index, stage 1's plan adopts it as it is when its content
    matches (plan.plan_split)."""
    return Path(sdir) / split


def read_index(sdir: Path) -> dict[str, str]:
    """The store's index (dataset key -> split folder name); entries that are not a plain
    folder name are ignored, a damaged index is an empty one."""
    obj = read_json(Path(sdir) / INDEX_FILE)
    splits = obj.get("splits") if isinstance(obj, dict) else None
    if not isinstance(splits, dict):
        return {}
    return {
        k: v
        for k, v in splits.items()
        if isinstance(k, str)
        and isinstance(v, str)
        and v
        and "/" not in v
        and "\\" not in v
        and v not in (".", "..")
    }


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


def locate_split(cache: str | Path, key: FeatureKey, data: DatasetRef, split: str) -> Path | None:
    """The folder of the stored `split` of the dataset `data` in the store of `key` under
    `cache`, from the store's index alone (no data file read), or None when stage 1 has not
    stored it. A store made before the index: the folder named like the split."""
    return locate_in(store_dir(cache, key), data, split)


def locate_in(sdir: Path, data: DatasetRef, split: str) -> Path | None:
    """locate_split in the store `sdir`."""
    name = read_index(sdir).get(dataset_key(data, split))
    if name is not None:
        return sdir / name
    old = pre_index_folder(sdir, split)
    if not (sdir / INDEX_FILE).exists() and manifest_path(old).is_file():
        return old
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


def file_hasher(cache: str | Path, verify: bool = False) -> FileHasher:
    """The sha256 memo of data files and shards (keyed by path and stat stamp), kept in the
    cache folder `cache`; saved only once the tool has claimed that folder. `verify`: rehash
    all."""
    cache = Path(cache)
    return FileHasher(cache / MEMO_FILE, verify=verify, writable=is_marked(cache, CACHE_LEGACY))
