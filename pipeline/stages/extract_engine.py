"""Stage 1's engine: images decoded and run through the backbone into shard records, shards
streamed to disk (here or as Dask tasks, the same code), a stored shard reused from another
folder of the store, and a split's manifest assembled from its shards' receipts."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from ..core.config import Config
from ..core.errors import DataError, ImageTooLarge, StoreError
from ..core.fsutil import FileHasher, atomic_write_json
from ..data import (
    Item,
    LoadedItem,
    fit_box,
    load_item,
    same_size_batches,
    to_canvas,
)
from ..executors import worker_cached
from ..inference import BackboneRunner
from ..models.devices import config_keys, resolve_device
from ..store import (
    Manifest,
    ShardRecord,
    ShardTask,
    SplitPlan,
    done_entry,
    manifest_path,
    write_shard,
)
from ..streaming import Decoded, Undecodable, Writer, stream


def decode(
    data_root: str, item: Item, patch: int, fit: str, max_pixels: int | None
) -> Decoded[Item, LoadedItem] | Undecodable[Item]:
    """Read and decode one item (its file's bytes and mask kept as `meta`); an unusable one
    carries its one-line error (and, when data.max_pixels refused it from its header, its
    pixel count)."""
    try:
        loaded = load_item(data_root, item, max_pixels)
    except ImageTooLarge as e:
        return Undecodable(item, str(e), e.pixels)
    except DataError as e:
        return Undecodable(item, str(e))
    h, w = loaded.image.shape[:2]
    return Decoded(item, loaded.image, fit_box(h, w, patch, fit), loaded)


class Extractor(BackboneRunner):
    """A loaded backbone (the shared forward, `inference.BackboneRunner`) plus everything
    needed to turn decoded images into shard records."""

    def shard_records(
        self,
        decoded: Iterable[Decoded[Item, LoadedItem] | Undecodable[Item]],
        on_batch: Callable[[int], None] | None = None,
        mirror: bool = False,
    ) -> tuple[list[ShardRecord], list[str], tuple[int, ...]]:
        """Features for one shard's decoded images (`on_batch(n)` after each batch of n;
        `mirror`: of the mirrored canvases).
        Batches are formed per canvas size in item order, so the same shard always sees the
        same batches. Returns the records, the unusable files' errors and the pixel counts of
        the images refused by data.max_pixels."""
        good: list[Decoded[Item, LoadedItem]] = []
        errors: list[str] = []
        rejected: list[int] = []
        for d in decoded:
            if isinstance(d, Decoded):
                good.append(d)
                continue
            errors.append(d.error)
            if d.refused_pixels:
                rejected.append(d.refused_pixels)
        feats: dict[int, np.ndarray] = {}  # index in `good` -> features
        pending: deque = deque()
        for chunk in same_size_batches([d.box for d in good], self.batch_size):
            fetch = self.launch([to_canvas(good[i].image, good[i].box) for i in chunk], mirror)
            pending.append((chunk, fetch))
            if len(pending) > 1:
                self._collect(pending.popleft(), feats, on_batch)
        while pending:
            self._collect(pending.popleft(), feats, on_batch)
        records = [
            ShardRecord(
                feats[i],
                d.meta.encoded,
                d.meta.mask,
                d.image.shape[:2],
                d.source.category,
                d.source.stem,
                d.source.image,
                d.box,
            )
            for i, d in enumerate(good)
        ]
        return records, errors, tuple(rejected)

    @staticmethod
    def _collect(
        entry: tuple[list[int], Callable[[], np.ndarray]],
        feats: dict[int, np.ndarray],
        on_batch: Callable[[int], None] | None,
    ) -> None:
        chunk, fetch = entry
        out = fetch()
        for j, i in enumerate(chunk):
            feats[i] = np.ascontiguousarray(out[j])
        if on_batch is not None:
            on_batch(len(chunk))


def extractor_of(cfg: Config) -> Extractor:
    """Stage 1's backbone for `cfg`, on extract.device."""
    return Extractor(
        config_keys(cfg).feature,
        cfg.backbone.weights,
        resolve_device(cfg.extract.device),
        cfg.extract.batch_size,
        cfg.extract.compile,
    )


def stream_shards(
    tasks: Iterable[ShardTask],
    extractor: Extractor,
    decode_threads: int,
    on_done: Callable[[int], None] = lambda n: None,
    on_images: Callable[[int], None] | None = None,
    lookahead: int = 2,
    forward_lock: AbstractContextManager | None = None,
) -> None:
    """Compute and atomically write shards with their receipts through the streaming engine
    (pipeline/streaming.py): the items of the next `lookahead` shards are decoded by
    `decode_threads` threads while the backbone runs, and a shard is written in the
    background while the next one is computed. The same in this process and in a Dask task.
    `on_images(n)` after each batch of n images (unusable ones counted per shard),
    `on_done(n_cached)` per shard written, in order. `forward_lock`: held around each shard's
    forward (a Dask worker's tasks share its one backbone, one forward at a time)."""

    def items(task: ShardTask) -> list[tuple[ShardTask, Item]]:
        return [(task, it) for it in task.items]

    def decode_one(entry: tuple[ShardTask, Item]) -> Decoded[Item, LoadedItem] | Undecodable[Item]:
        task, it = entry
        return decode(task.data_root, it, extractor.patch, extractor.fit, task.max_pixels)

    def write(
        task: ShardTask, records: list[ShardRecord], errors: list[str], rejected: tuple[int, ...]
    ) -> int:
        write_shard(task, records, errors, rejected)
        return len(records)

    def process(
        task: ShardTask,
        decoded: Iterable[Decoded[Item, LoadedItem] | Undecodable[Item]],
        writer: Writer[int],
    ) -> None:
        decoded = list(decoded)  # decoded before the lock: another task's forward runs
        with forward_lock or contextlib.nullcontext():
            records, errors, rejected = extractor.shard_records(decoded, on_images, task.mirror)
        if on_images is not None and errors:
            on_images(len(errors))
        writer.submit(write, task, records, errors, rejected)

    stream(
        tasks,
        items,
        decode_one,
        process,
        on_done,
        decode_threads=decode_threads,
        lookahead=lookahead,
        max_writes=1,
    )


DASK_WORKER_THREADS = 2  # task threads of a "local:N" worker: one shard's decoding and
# writing overlap another's forward (`extract_task`)


def extract_task(task: ShardTask, cfg: Config) -> int:
    """One shard on a Dask worker, through the same streaming engine as a local run. The
    worker loads the backbone once and keeps it, with a lock, for all its tasks; a worker
    with T task threads has up to T shards in flight, one in the forward at a time while the
    others decode (extract.num_workers threads shared among the T) or write: the stream of a
    local run, sized by the worker's threads. Idempotent: an intact shard is kept."""
    entry = done_entry(task, None)
    if entry is not None:
        return len(entry.rows)
    key = ("extract", config_keys(cfg).feature, cfg.extract.device, cfg.extract.batch_size)
    extractor, lock = worker_cached(key, lambda: (extractor_of(cfg), threading.Lock()))
    done: list[int] = []
    stream_shards(
        [task],
        extractor,
        max(1, cfg.extract.num_workers // _worker_threads()),
        done.append,
        forward_lock=lock,
    )
    return done[0]


def _worker_threads() -> int:
    """The task threads of the Dask worker this runs on (1 outside a worker)."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):  # not on a worker (a direct call)
        return 1


def largest_first(tasks: list[ShardTask]) -> list[ShardTask]:
    """The order shards are handed to Dask workers: the largest first, in plan order among
    equals (greedy longest-processing-time: a worker that finishes early takes the smaller
    shards left, so the last shard to finish is a small one, and no worker idles longer than
    one shard's time at the end). The cut itself stays store.plan_split's (at most
    SHARD_SIZE images of one category): a shard's name is the hash of its inputs, so another
    cut would make every existing store recompute, for a balance the order already gives."""
    return sorted(tasks, key=lambda t: -len(t.items))


def dask_extract(task: ShardTask, cfg: Config) -> tuple[str, int]:
    return task.hash, extract_task(task, cfg)


def reuse_shard(task: ShardTask, sdir: Path, hasher: FileHasher) -> bool:
    """Link the shard of `task` from another folder of the store that holds it intact (an
    earlier version of the split, another dataset with the same images): a shard's name is
    the hash of its inputs, and shards are never modified in place."""
    name = Path(task.file).name
    for other in sorted(sdir.glob(f"*/shards/{name}")):
        if other == task.path:
            continue
        src = dataclasses.replace(task, split_dir=str(other.parent.parent))
        if done_entry(src, hasher) is None:
            continue
        try:
            for a, b in ((src.path, task.path), (src.receipt, task.receipt)):
                b.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(a, b)
                except OSError:  # a file system without hard links: a copy
                    shutil.copyfile(a, b)
        except OSError:
            task.path.unlink(missing_ok=True)
            task.receipt.unlink(missing_ok=True)
            continue
        return True
    return False


def assemble_manifest(plan: SplitPlan, hasher: FileHasher) -> Manifest:
    """The split's manifest from its shards' receipts (each checked against its shard), written
    atomically; shards of earlier plans are removed."""
    entries = []
    for t in plan.tasks:
        entry = done_entry(t, hasher)
        if entry is None:
            raise StoreError(
                f"{t.path}: shard missing or damaged after extraction; rerun extract-features"
            )
        entries.append(entry)
    manifest = Manifest(
        plan.split, plan.feature_key, plan.data_digest, tuple(plan.problems), tuple(entries)
    )
    atomic_write_json(manifest_path(plan.split_dir), manifest.to_json())
    keep = {t.path.name for t in plan.tasks} | {t.receipt.name for t in plan.tasks}
    shard_dir = plan.split_dir / "shards"
    for old in [*shard_dir.glob("*.h5"), *shard_dir.glob("*.json"), *shard_dir.glob("*.bad")]:
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return manifest
