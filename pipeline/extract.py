"""Stage 1: images -> frozen-backbone patch features in the feature store (pipeline/store.py).

The work is cut into shards (SHARD_SIZE images of one category, in file order). A shard is an
independent, idempotent task: its output name is the hash of its inputs, and it is written
atomically with a receipt of its checksum, so a run can be killed at any instant and resumed,
a damaged shard is recomputed alone, and shards can be handed to a Dask cluster unchanged
(pipeline/executors.py).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import Config
from .data import (
    Box,
    DataError,
    Item,
    LoadedItem,
    fit_box,
    list_splits,
    load_item,
    same_size_batches,
    to_canvas,
)
from .errors import ImageTooLarge, StoreError
from .executors import portable_config, run_tasks, worker_cached
from .fsutil import atomic_write_json, exclusive_lock, remove_temporaries
from .inference import BackboneRunner
from .owned import claim_folder, claim_run_dir
from .params import FORMAT_VERSION, feature_params, mirrored_splits
from .progress import Progress
from .stages import StageState, StageStatus, judge, load_record, save_record
from .store import (
    CACHE_LEGACY,
    Manifest,
    ShardRecord,
    ShardTask,
    SplitPlan,
    bad_marker,
    done_entry,
    file_hasher,
    manifest_path,
    plan_split,
    read_manifest,
    split_problems,
    store_dir,
    write_shard,
)

STAGE = "extract-features"


def selected_splits(cfg: Config, splits: Iterable[str] = ()) -> list[str]:
    splits = list(splits)
    return splits or list_splits(cfg.data.root, cfg.data.layout)


# ----------------------------------------------------------------------------- the engine

@dataclass
class Decoded:
    """One item read and decoded, with its box on the canvas."""
    item: Item
    loaded: LoadedItem
    box: Box


@dataclass
class Undecodable:
    """One unusable item and its one-line error."""
    item: Item
    error: str
    refused_pixels: int = 0  # > 0: refused by data.max_pixels (retried when it is raised)


def decode(data_root: str, item: Item, patch: int, fit: str,
           max_pixels: int | None) -> Decoded | Undecodable:
    """Read and decode one item; an unusable one carries its one-line error (and, when
    data.max_pixels refused it from its header, its pixel count)."""
    try:
        loaded = load_item(data_root, item, max_pixels)
    except ImageTooLarge as e:
        return Undecodable(item, str(e), e.pixels)
    except DataError as e:
        return Undecodable(item, str(e))
    h, w = loaded.image.shape[:2]
    return Decoded(item, loaded, fit_box(h, w, patch, fit))


class Extractor(BackboneRunner):
    """A loaded backbone (the shared forward, `inference.BackboneRunner`) plus everything
    needed to turn decoded images into shard records."""

    def shard_records(self, decoded: Iterable[Decoded | Undecodable],
                      on_batch: Callable[[int], None] | None = None,
                      mirror: bool = False,
                      ) -> tuple[list[ShardRecord], list[str], tuple[int, ...]]:
        """Features for one shard's decoded images (`on_batch(n)` after each batch of n;
        `mirror`: of the mirrored canvases).
        Batches are formed per canvas size in item order, so the same shard always sees the
        same batches. Returns the records, the unusable files' errors and the pixel counts of
        the images refused by data.max_pixels."""
        good: list[Decoded] = []
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
            fetch = self.launch([to_canvas(good[i].loaded.image, good[i].box) for i in chunk],
                                mirror)
            pending.append((chunk, fetch))
            if len(pending) > 1:
                self._collect(pending.popleft(), feats, on_batch)
        while pending:
            self._collect(pending.popleft(), feats, on_batch)
        records = [ShardRecord(feats[i], d.loaded.encoded, d.loaded.mask,
                               d.loaded.image.shape[:2], d.item.category, d.item.stem,
                               d.item.image, d.box)
                   for i, d in enumerate(good)]
        return records, errors, tuple(rejected)

    @staticmethod
    def _collect(entry, feats: dict[int, np.ndarray],
                 on_batch: Callable[[int], None] | None) -> None:
        chunk, fetch = entry
        out = fetch()
        for j, i in enumerate(chunk):
            feats[i] = np.ascontiguousarray(out[j])
        if on_batch is not None:
            on_batch(len(chunk))


def run_task(task: ShardTask, extractor: Extractor,
             decoded: Iterable[Decoded | Undecodable] | None = None) -> int:
    """Compute and atomically write one shard with its receipt; returns its image count."""
    if decoded is None:
        decoded = [decode(task.data_root, it, extractor.patch, extractor.fit, task.max_pixels)
                   for it in task.items]
    records, errors, rejected = extractor.shard_records(decoded, mirror=task.mirror)
    write_shard(task, records, errors, rejected)
    return len(records)


def extract_task(task: ShardTask, cfg: Config) -> int:
    """One shard on a Dask worker: decode with threads, run the worker's backbone (loaded
    once per worker process), write atomically. Idempotent: an intact shard is kept."""
    entry = done_entry(task, None)
    if entry is not None:
        return len(entry.rows)
    key = ("extract", tuple(sorted(feature_params(cfg).items())), cfg.extract.device,
           cfg.extract.batch_size)
    extractor = worker_cached(key, lambda: Extractor(cfg))
    with ThreadPoolExecutor(max(1, cfg.extract.num_workers)) as pool:
        decoded = list(pool.map(lambda it: decode(task.data_root, it, extractor.patch,
                                                  extractor.fit, task.max_pixels),
                                task.items))
    return run_task(task, extractor, decoded)


# ----------------------------------------------------------------------------- local streaming

def stream_local(tasks: list[ShardTask], extractor: Extractor, workers: int,
                 on_done: Callable[[int], None], on_images: Callable[[int], None] | None = None,
                 lookahead: int = 2) -> None:
    """Run shard tasks in this process: images are decoded by a thread pool ahead of the
    model (`lookahead` shards in flight), shards are written by a background thread.
    `on_images(n)` after each batch of n images (failed ones counted per shard), `on_done(n_cached)`
    per shard written."""
    decode_pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="decode")
    write_pool = ThreadPoolExecutor(1, thread_name_prefix="write")
    window: deque[tuple[ShardTask, list[Future]]] = deque()
    writes: deque[Future] = deque()
    todo = iter(tasks)

    def submit_next() -> None:
        t = next(todo, None)
        if t is not None:
            window.append((t, [decode_pool.submit(decode, t.data_root, it, extractor.patch,
                                                  extractor.fit, t.max_pixels)
                               for it in t.items]))

    def write(task: ShardTask, records: list[ShardRecord], errors: list[str],
              rejected: tuple[int, ...]) -> int:
        write_shard(task, records, errors, rejected)
        return len(records)

    try:
        for _ in range(lookahead):
            submit_next()
        while window:
            task, futs = window.popleft()
            submit_next()
            records, errors, rejected = extractor.shard_records((f.result() for f in futs),
                                                                on_images, task.mirror)
            if on_images is not None and errors:
                on_images(len(errors))
            writes.append(write_pool.submit(write, task, records, errors, rejected))
            while len(writes) > 1 or (writes and writes[0].done()):
                on_done(writes.popleft().result())
        while writes:
            on_done(writes.popleft().result())
    finally:
        for _, futs in window:
            for f in futs:
                f.cancel()
        decode_pool.shutdown(wait=True, cancel_futures=True)
        write_pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- the stage

@dataclass
class ExtractResult:
    n_images: int = 0
    n_errors: int = 0
    seconds: float = 0.0
    cache_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    up_to_date: bool = False


def _assemble_manifest(plan: SplitPlan, hasher) -> Manifest:
    """The split's manifest from its shards' receipts (each checked against its shard), written
    atomically; shards of earlier plans are removed."""
    entries = []
    for t in plan.tasks:
        entry = done_entry(t, hasher)
        if entry is None:
            raise StoreError(f"{t.path}: shard missing or damaged after extraction; "
                             "rerun extract-features")
        entries.append(entry)
    manifest = Manifest(plan.split, plan.feature_key, plan.data_digest, tuple(plan.problems),
                        tuple(entries))
    atomic_write_json(manifest_path(plan.split_dir), manifest.to_json())
    keep = {t.path.name for t in plan.tasks} | {t.receipt.name for t in plan.tasks}
    shard_dir = plan.split_dir / "shards"
    for old in [*shard_dir.glob("*.h5"), *shard_dir.glob("*.json"), *shard_dir.glob("*.bad")]:
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return manifest


def _store_groups(cfg: Config, splits: list[str]) -> list[tuple[dict, list[str], str]]:
    """(feature params, splits, label) of each store stage 1 fills: the features of `splits`
    and, with predict.tta = "flip", the mirrored features of the predicted ones."""
    groups = [(feature_params(cfg), splits, "")]
    mirrored = mirrored_splits(cfg, splits)
    if mirrored:
        groups.append((feature_params(cfg, mirror=True), mirrored, " mirrored"))
    return groups


def run_extract(cfg: Config, splits: Iterable[str] = (), force: bool = False,
                log: Callable[[str], None] = print, progress: bool = True,
                executor: str | None = None) -> ExtractResult:
    """Stage 1 for the given splits (all by default): computes the shards that are missing
    or damaged, and each split's manifest (for the features and, with predict.tta = "flip",
    the mirrored features of the predicted splits). Raises PipelineError subclasses for
    problems that stop the stage."""
    t0 = time.perf_counter()
    claim_folder(cfg.paths.cache, "paths.cache", CACHE_LEGACY)
    claim_run_dir(cfg.run_dir)
    hasher = file_hasher(cfg)
    groups = [(fparams, [plan_split(cfg, s, fparams, hasher) for s in names], label)
              for fparams, names, label in _store_groups(cfg, selected_splits(cfg, splits))]
    result = ExtractResult(up_to_date=True)
    for fparams, plans, label in groups:
        errors = _extract_store(cfg, fparams, plans, label, hasher, result, force, log, progress,
                                executor)
        if not label:  # the mirrored store lists the same unusable files again
            result.errors.extend(errors)
    hasher.save()
    _record(cfg, groups[0][1], groups[0][0])
    result.n_errors = len(result.errors)
    result.seconds = time.perf_counter() - t0
    if not result.up_to_date:  # an up-to-date run reports no size: no walk over the store
        result.cache_bytes = sum(f.stat().st_size for fparams, _, _ in groups
                                 for f in store_dir(cfg, fparams).rglob("*.h5"))
    return result


def _extract_store(cfg: Config, fparams: dict, plans: list[SplitPlan], label: str, hasher,
                   result: ExtractResult, force: bool, log: Callable[[str], None], progress: bool,
                   executor: str | None) -> list[str]:
    """Bring one store's splits up to date; returns the splits' listed problems."""
    problems = {p.split: split_problems(p, hasher) for p in plans}
    hasher.save()
    todo = [p for p in plans if force or problems[p.split]]
    errors: list[str] = []
    if not todo:
        for p in plans:
            errors.extend(_listed_errors(p))
        return errors
    result.up_to_date = False
    sdir = store_dir(cfg, fparams)
    with exclusive_lock(sdir / ".lock", f"feature store {sdir}"):
        atomic_write_json(sdir / "features.json", fparams)
        pending: list[ShardTask] = []
        for p in todo:
            why = problems[p.split]
            more = f"; +{len(why) - 3} more" if len(why) > 3 else ""
            log(f"extract-features [{p.split}{label}]: "
                + ("computing (--force)" if force else f"computing ({'; '.join(why[:3])}{more})"))
            remove_temporaries(p.split_dir / "shards")
            if force:
                manifest_path(p.split_dir).unlink(missing_ok=True)
            for t in p.tasks:
                if force or done_entry(t, hasher) is None:
                    t.path.unlink(missing_ok=True)
                    t.receipt.unlink(missing_ok=True)
                    bad_marker(t.path).unlink(missing_ok=True)
                    pending.append(t)
        n_total = sum(len(t.items) for t in pending)
        n_cached = sum(len(p.items) for p in todo) - n_total
        log(f"extract-features{label}: {len(todo)} split(s), {n_total} images to extract"
            + (f", {n_cached} already cached" if n_cached else "")
            + f" [{cfg.backbone.name}, store {sdir}]")
        if pending:
            _execute(cfg, pending, n_total, result, progress, executor)
            for p in todo:  # temporaries of killed (e.g. distributed) writers
                remove_temporaries(p.split_dir / "shards")
        for p in todo:
            errors.extend(_assemble_manifest(p, hasher).errors)
        for p in plans:
            if p not in todo:
                errors.extend(_listed_errors(p))
        hasher.save()
    return errors


def _listed_errors(plan: SplitPlan) -> list[str]:
    """The unusable files listed in the split's manifest, which split_problems found current."""
    m, why = read_manifest(plan.split_dir)
    if m is None:  # removed or rewritten by another process since it was checked
        raise StoreError(f"{manifest_path(plan.split_dir)}: {why} (changed during this run); "
                         "rerun extract-features")
    return m.errors


def _execute(cfg: Config, tasks: list[ShardTask], n_total: int, result: ExtractResult,
             progress: bool, executor: str | None) -> None:
    bar = Progress(n_total, "extract", enabled=progress)
    lock = threading.Lock()

    def on_done(n_cached: int) -> None:
        with lock:
            result.n_images += n_cached

    try:
        scheduler = executor if executor is not None else cfg.dask.scheduler
        if scheduler:
            wcfg = portable_config(cfg)
            tasks = [dataclasses.replace(t, data_root=str(Path(t.data_root).resolve()),
                                         split_dir=str(Path(t.split_dir).resolve())) for t in tasks]
            sizes = {t.hash: len(t.items) for t in tasks}
            calls = ((f"extract-{t.hash}", (t, wcfg)) for t in tasks)
            for h, n in run_tasks(scheduler, _dask_extract, calls):
                on_done(n)
                bar.update(sizes[h])
        else:
            stream_local(tasks, Extractor(cfg), cfg.extract.num_workers, on_done, bar.update)
    finally:
        bar.close()


def _dask_extract(task: ShardTask, cfg: Config) -> tuple[str, int]:
    return task.hash, extract_task(task, cfg)


def _state(rec: dict | None, plans: list[SplitPlan], fparams: dict,
           outs_problem: str = "") -> StageState:
    """Stage 1's state for these splits; the record's other splits are carried along."""
    deps = dict((rec or {}).get("deps", {}))
    deps.update({f"data[{p.split}]": p.data_digest for p in plans})
    return StageState(STAGE, deps, dict(fparams), outs_problem)


def _record(cfg: Config, plans: list[SplitPlan], fparams: dict) -> None:
    rec = load_record(cfg.run_dir, STAGE)
    state = _state(rec, plans, fparams)
    if rec is None or rec["fingerprint"] != state.fingerprint:
        save_record(cfg.run_dir, state)


def status(cfg: Config, splits: Iterable[str] = (), verify: bool = False) -> StageStatus:
    """Stage 1's status for the given splits (all by default): up to date when every split's
    store (and mirrored store, with predict.tta = "flip") is current and intact, whichever
    run wrote it. `verify`: rehash every data file and shard, ignoring the checksum memo (a
    shard found bad is marked, so that plain extract-features repairs it)."""
    hasher = file_hasher(cfg, verify)
    try:
        groups = [(fparams, [plan_split(cfg, s, fparams, hasher) for s in names], label)
                  for fparams, names, label in _store_groups(cfg, selected_splits(cfg, splits))]
    except DataError as e:
        return StageStatus(STAGE, "stale", f"dataset problem: {e}")
    fparams, plans, _ = groups[0]
    problems = [f"{p.split}: {why}" for p in plans for why in split_problems(p, hasher)]
    mirror_problems = [f"{p.split} mirrored (predict.tta = flip): {why}" for _, ps, _ in groups[1:]
                       for p in ps for why in split_problems(p, hasher)]
    hasher.save()
    if not problems:
        return (StageStatus(STAGE, "stale", "; ".join(mirror_problems[:3])) if mirror_problems
                else StageStatus(STAGE, "up-to-date"))
    rec = load_record(cfg.run_dir, STAGE)
    if rec is not None and rec["params"].get("format") != FORMAT_VERSION:
        return StageStatus(STAGE, "stale", f"cache format {rec['params'].get('format', 2)} -> "
                                           f"{FORMAT_VERSION} (stored images are now compact)")
    st = judge(cfg.run_dir, _state(rec, plans, fparams, "; ".join(problems[:3])))
    if st.up_to_date:  # the record matches, yet the store is not intact
        return StageStatus(STAGE, "stale", "; ".join(problems[:3]))
    return st
