"""The feature store: stage 1's output, and all that the later stages know about stage 1.
It takes a cache folder and a feature key (core.keys.FeatureKey), never the config.

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

Modules: index (stores, the index, runs using a store), manifest (a split's manifest and the
shard checks), plan (stage 1's shards of a split), shards (writing a shard), reader
(FeatureStore: reading a split).
"""

from __future__ import annotations

from .index import (
    CACHE_LEGACY,
    FEATURES,
    INDEX_FILE,
    MEMO_FILE,
    RUNS_DIR,
    dataset_key,
    file_hasher,
    index_split,
    locate_in,
    locate_split,
    read_index,
    register_run,
    split_folder,
    store_dir,
    store_lock,
)
from .manifest import (
    ItemMeta,
    Manifest,
    ShardEntry,
    bad_marker,
    check_shard,
    manifest_path,
    mark_bad,
    read_manifest,
)
from .plan import (
    SHARD_SIZE,
    ShardTask,
    SplitPlan,
    done_entry,
    plan_split,
    read_receipt,
    split_problems,
)
from .reader import CachedItem, FeatureStore, split_fingerprint
from .selection import open_split, selected_fingerprint, stored_split
from .shards import ShardRecord, pack_mask, unpack_mask, write_shard

__all__ = [
    "open_split",
    "selected_fingerprint",
    "stored_split",
    "CACHE_LEGACY",
    "FEATURES",
    "INDEX_FILE",
    "MEMO_FILE",
    "RUNS_DIR",
    "SHARD_SIZE",
    "CachedItem",
    "FeatureStore",
    "ItemMeta",
    "Manifest",
    "ShardEntry",
    "ShardRecord",
    "ShardTask",
    "SplitPlan",
    "bad_marker",
    "check_shard",
    "dataset_key",
    "done_entry",
    "file_hasher",
    "index_split",
    "locate_in",
    "locate_split",
    "manifest_path",
    "mark_bad",
    "pack_mask",
    "plan_split",
    "read_index",
    "read_manifest",
    "read_receipt",
    "register_run",
    "split_fingerprint",
    "split_folder",
    "split_problems",
    "store_dir",
    "store_lock",
    "unpack_mask",
    "write_shard",
]
