"""Stage 1: images -> frozen-backbone patch features in the feature store (pipeline/store/).

The work is cut into shards (SHARD_SIZE images of one category, in file order). A shard is an
independent, idempotent task: its output name is the hash of its inputs, and it is written
atomically with a receipt of its checksum, so a run can be killed at any instant and resumed,
a damaged shard is recomputed alone, and shards can be handed to a Dask cluster unchanged
(pipeline/executors.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.config import Config
from ..core.errors import ImageTooLarge, StoreError, thread_limits
from ..core.fingerprints import first_problems
from ..core.fsutil import (
    FileHasher,
    atomic_write_json,
    exclusive_lock,
    human_bytes,
    read_json,
    remove_temporaries,
)
from ..core.owned import claim_folder
from ..core.progress import Progress, plural
from ..data.dataset import (
    DataError,
    Item,
    LoadedItem,
    fit_box,
    list_splits,
    load_item,
    same_size_batches,
    to_canvas,
)
from ..executors import execute, portable_config, scheduler_of, worker_cached
from ..inference import BackboneRunner
from ..params import feature_params, mirrored_splits
from ..store.feature_store import (
    CACHE_LEGACY,
    Manifest,
    ShardRecord,
    ShardTask,
    SplitPlan,
    bad_marker,
    dataset_key,
    done_entry,
    file_hasher,
    index_split,
    locate_in,
    manifest_path,
    plan_split,
    read_index,
    read_manifest,
    split_problems,
    store_dir,
    store_lock,
    write_shard,
)
from ..streaming import Decoded, Undecodable, Writer, stream
from .base import Context, StageState, StageStatus, as_record, judge_record

STAGE = "extract-features"


def selected_splits(cfg: Config, splits: Iterable[str] = ()) -> list[str]:
    splits = list(splits)
    return splits or list_splits(cfg.data.root, cfg.data.layout)


# ----------------------------------------------------------------------------- the engine

def decode(data_root: str, item: Item, patch: int, fit: str,
           max_pixels: int | None) -> Decoded[Item, LoadedItem] | Undecodable[Item]:
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

    def shard_records(self, decoded: Iterable[Decoded[Item, LoadedItem] | Undecodable[Item]],
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
        records = [ShardRecord(feats[i], d.meta.encoded, d.meta.mask, d.image.shape[:2],
                               d.source.category, d.source.stem, d.source.image, d.box)
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


def stream_shards(tasks: Iterable[ShardTask], extractor: Extractor, decode_threads: int,
                  on_done: Callable[[int], None] = lambda n: None,
                  on_images: Callable[[int], None] | None = None, lookahead: int = 2,
                  forward_lock: AbstractContextManager | None = None) -> None:
    """Compute and atomically write shards with their receipts through the streaming engine
    (pipeline/streaming.py): the items of the next `lookahead` shards are decoded by
    `decode_threads` threads while the backbone runs, and a shard is written in the
    background while the next one is computed. The same in this process and in a Dask task.
    `on_images(n)` after each batch of n images (unusable ones counted per shard),
    `on_done(n_cached)` per shard written, in order. `forward_lock`: held around each shard's
    forward (a Dask worker's tasks share its one backbone, one forward at a time)."""
    def items(task: ShardTask) -> list[tuple[ShardTask, Item]]:
        return [(task, it) for it in task.items]

    def decode_one(entry: tuple[ShardTask, Item]):
        task, it = entry
        return decode(task.data_root, it, extractor.patch, extractor.fit, task.max_pixels)

    def write(task: ShardTask, records: list[ShardRecord], errors: list[str],
              rejected: tuple[int, ...]) -> int:
        write_shard(task, records, errors, rejected)
        return len(records)

    def process(task: ShardTask, decoded, writer: Writer[int]) -> None:
        decoded = list(decoded)  # decoded before the lock: another task's forward runs
        with forward_lock or contextlib.nullcontext():
            records, errors, rejected = extractor.shard_records(decoded, on_images, task.mirror)
        if on_images is not None and errors:
            on_images(len(errors))
        writer.submit(write, task, records, errors, rejected)

    stream(tasks, items, decode_one, process, on_done, decode_threads=decode_threads,
           lookahead=lookahead, max_writes=1)


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
    key = ("extract", tuple(sorted(feature_params(cfg).items())), cfg.extract.device,
           cfg.extract.batch_size)
    extractor, lock = worker_cached(key, lambda: (Extractor(cfg), threading.Lock()))
    done: list[int] = []
    stream_shards([task], extractor, max(1, cfg.extract.num_workers // _worker_threads()),
                  done.append, forward_lock=lock)
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


# ----------------------------------------------------------------------------- the stage

@dataclass
class ExtractResult:
    n_images: int = 0
    n_errors: int = 0
    seconds: float = 0.0
    cache_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    up_to_date: bool = False

    @property
    def ok(self) -> bool:
        """False when this run could not use some files (known ones are a note, exit 0)."""
        return self.up_to_date or not self.errors

    def lines(self) -> list[tuple[str, bool]]:
        """What the command reports (text, to stderr)."""
        if self.up_to_date:
            out = [(f"{STAGE}: up-to-date", False)]
            if self.n_errors:
                were = "was" if self.n_errors == 1 else "were"
                out.append((f"note: {plural(self.n_errors, 'file')} {were} skipped when the "
                            "cache was built (rerun with --force to list them)", True))
            return out
        rate = self.n_images / self.seconds if self.seconds > 0 else 0.0
        out = [(f"{STAGE}: {plural(self.n_images, 'image')} in {self.seconds:.1f} s "
                f"({rate:.1f} images/s),"
                f" cache {human_bytes(self.cache_bytes)}"
                + (f", {self.n_errors} skipped" if self.n_errors else ""), False)]
        if self.errors:
            out += [(f"  skipped: {e}", True) for e in self.errors]
            out.append((f"error: {plural(self.n_errors, 'file')} could not be used (listed "
                        "above); the other images are cached", True))
        return out


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
    hasher = file_hasher(cfg)
    groups = _plans(cfg, selected_splits(cfg, splits), hasher)
    result = ExtractResult(up_to_date=True)
    for fparams, plans, label in groups:
        errors = _extract_store(cfg, fparams, plans, label, hasher, result, force, log, progress,
                                executor)
        if not label:  # the mirrored store lists the same unusable files again
            result.errors.extend(errors)
    hasher.save()
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
    sdir = store_dir(cfg, fparams)
    unindexed = [p for p in plans if read_index(sdir).get(dataset_key(cfg, p.split))
                 != p.split_dir.name]
    if not todo:
        if unindexed:  # stored already (e.g. the dataset moved, or a store made before the
            with exclusive_lock(store_lock(sdir), f"feature store {sdir}"):  # index): index it
                for p in unindexed:
                    index_split(sdir, dataset_key(cfg, p.split), p.split_dir.name)
        for p in plans:
            errors.extend(_listed_errors(p))
        return errors
    result.up_to_date = False
    with exclusive_lock(store_lock(sdir), f"feature store {sdir}"):
        atomic_write_json(sdir / "features.json", fparams)
        pending: list[ShardTask] = []
        for p in todo:
            why = "--force" if force else first_problems(problems[p.split])
            log(f"extract-features [{p.split}{label}]: computing ({why})")
            remove_temporaries(p.split_dir / "shards")
            if force:
                manifest_path(p.split_dir).unlink(missing_ok=True)
            for t in p.tasks:
                if force or done_entry(t, hasher) is None:
                    t.path.unlink(missing_ok=True)
                    t.receipt.unlink(missing_ok=True)
                    bad_marker(t.path).unlink(missing_ok=True)
                    if force or not _reuse(t, sdir, hasher):
                        pending.append(t)
        n_total = sum(len(t.items) for t in pending)
        n_cached = sum(len(p.items) for p in todo) - n_total
        log(f"extract-features{label}: {plural(len(todo), 'split')}, "
            f"{plural(n_total, 'image')} to extract"
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
            index_split(sdir, dataset_key(cfg, p.split), p.split_dir.name)
        hasher.save()
    return errors


def _reuse(task: ShardTask, sdir: Path, hasher: FileHasher) -> bool:
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

    sizes = {t.hash: len(t.items) for t in tasks}

    def remote() -> Iterator[tuple[str, tuple]]:
        wcfg = portable_config(cfg)
        portable = [dataclasses.replace(t, data_root=str(Path(t.data_root).resolve()),
                                        split_dir=str(Path(t.split_dir).resolve()))
                    for t in tasks]
        return ((f"extract-{t.hash}", (t, wcfg)) for t in largest_first(portable))

    def local() -> list[tuple[str, int]]:  # progress through the stream's own callbacks
        extractor = Extractor(cfg)
        with thread_limits("stage 1's decoding and writing"):
            stream_shards(tasks, extractor, cfg.extract.num_workers, on_done, bar.update)
        return []

    try:
        for h, n in execute(scheduler_of(cfg, executor), _dask_extract, remote, local,
                            DASK_WORKER_THREADS):
            on_done(n)
            bar.update(sizes[h])
    finally:
        bar.close()


def _dask_extract(task: ShardTask, cfg: Config) -> tuple[str, int]:
    return task.hash, extract_task(task, cfg)


# ----------------------------------------------------------------------------- the stage

def _plans(cfg: Config, splits: list[str], hasher: FileHasher
           ) -> list[tuple[dict, list[SplitPlan], str]]:
    return [(fparams, [plan_split(cfg, s, fparams, hasher) for s in names], label)
            for fparams, names, label in _store_groups(cfg, splits)]


def _manifest_damage(plan: SplitPlan) -> str:
    """Why the manifest in the plan's folder cannot be read ("" when it can or is absent)."""
    m, why = read_manifest(plan.split_dir)
    return "" if m is not None or why == "no manifest" else why


def store_record(cfg: Config, fparams: dict, plans: list[SplitPlan]
                 ) -> tuple[dict, dict[str, str | None]] | None:
    """Stage 1's record for these splits, (params, deps), read from the store it describes
    (its features.json and the splits' manifests; shared by every run using the cache).
    Without a store for `fparams`, the record of the store with the same splits made last
    (so that `status` names the settings that changed), or None."""
    def record(sdir: Path) -> tuple[dict, dict[str, str | None]] | None:
        params = read_json(sdir / "features.json")
        if not isinstance(params, dict):
            return None
        deps: dict[str, str | None] = {}
        for p in plans:  # the folder the index names for this dataset's split (or holds it)
            split_dir = locate_in(sdir, cfg, p.split)
            if split_dir is None and p.split_dir.parent == sdir:
                split_dir = p.split_dir
            m, _ = read_manifest(split_dir) if split_dir is not None else (None, "")
            if m is not None:
                deps[f"data[{p.split}]"] = m.data_digest
        return (params, deps) if deps else None

    sdir = store_dir(cfg, fparams)
    own = record(sdir) if sdir.is_dir() else None
    if own is not None:
        return own
    features = Path(cfg.paths.cache) / "features"
    others = [d for d in features.glob("*/features.json") if d.parent != sdir] \
        if features.is_dir() else []
    for f in sorted(others, key=lambda f: f.stat().st_mtime, reverse=True):
        other = record(f.parent)
        if other is not None and bool(other[0].get("mirror")) == bool(fparams.get("mirror")):
            return other
    return None


def _state(plans: list[SplitPlan], fparams: dict, problems: list[str]) -> StageState:
    return StageState(STAGE, {f"data[{p.split}]": p.data_digest for p in plans}, dict(fparams),
                      first_problems(problems))


class ExtractStage:
    """Stage 1 as data: deps the splits' data digests, params the feature key, outs the
    stored splits (shards with checksums and the manifests); its record is the store."""
    in_run = False

    def name(self, split: str) -> str:
        return STAGE

    def splits(self, ctx: Context, all_splits: bool) -> list[str]:
        """Every split of the dataset (`status`), or those the run needs (`run`)."""
        cfg = ctx.cfg
        if all_splits:
            return selected_splits(cfg)
        needed = [cfg.data.train_split, ctx.split, cfg.data.val_split]
        return list(dict.fromkeys(s for s in needed if s))

    def state(self, ctx: Context) -> StageState:
        return self._judged(ctx)[0]

    def _judged(self, ctx: Context, splits: list[str] | None = None
                ) -> tuple[StageState, StageStatus]:
        cfg = ctx.cfg
        hasher = file_hasher(cfg, ctx.verify)
        groups = _plans(cfg, self.splits(ctx, True) if splits is None else splits, hasher)
        fparams, plans, _ = groups[0]
        problems = []  # of the outputs; a missing or outdated manifest is judged from the record
        damaged = set()  # splits whose manifest cannot be read: an outs problem, not a new dep
        for _, ps, label in groups:
            for p in ps:
                whys = split_problems(p, hasher)
                problems += [f"{p.split}{label}: {why}" for why in whys
                             if label or why not in ("no manifest", f"data[{p.split}] changed")]
                if whys and not label and _manifest_damage(p):
                    damaged.add(p.split)
                if not whys and locate_in(p.split_dir.parent, cfg, p.split) != p.split_dir:
                    problems.append(f"{p.split}{label}: stored, not indexed for "
                                    f"{cfg.data.root} (e.g. a moved dataset)")
        hasher.save()
        state = _state(plans, fparams, problems)
        found = store_record(cfg, fparams, plans)
        rec = None
        if found is not None:
            params, deps = found
            if params == fparams:
                deps.update({f"data[{p.split}]": p.data_digest for p in plans
                             if p.split in damaged})
            rec = as_record(StageState(STAGE, deps, params))
        return state, judge_record(rec, state)

    def status(self, ctx: Context, splits: list[str] | None = None) -> StageStatus:
        """up to date when every split's store (and mirrored store, with predict.tta =
        "flip") is current and intact, whichever run wrote it. `ctx.verify`: rehash every
        data file and shard (a shard found bad is marked, so that extract-features repairs
        it)."""
        try:
            return self._judged(ctx, splits)[1]
        except DataError as e:
            return StageStatus(STAGE, "stale", f"dataset problem: {e}")

    def run(self, ctx: Context, force: bool) -> ExtractResult:
        return run_extract(ctx.cfg, self.splits(ctx, False), force=force, progress=True)


def status(cfg: Config, splits: Iterable[str] = (), verify: bool = False) -> StageStatus:
    """Stage 1's status for the given splits (all by default)."""
    return ExtractStage().status(Context.of(cfg, verify=verify), list(splits) or None)
