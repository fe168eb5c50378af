"""Stage 1: images -> frozen-backbone patch features in the HDF5 cache.

The work is cut into shards (SHARD_SIZE images of one category, in file order). A shard is an
independent, idempotent task: its output name is the hash of its inputs, and it is written
atomically, so a run can be killed at any instant and resumed, and shards can be handed to a
Dask cluster unchanged (pipeline/distributed.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import h5py
import numpy as np
import torch

from .backbones import Backbone, create_backbone, get_spec, weights_identity
from .cache import (FORMAT_VERSION, SHARD_SIZE, CacheError, FeatureCache, ShardRecord,
                    atomic_write_json, exclusive_lock, read_json, remove_temporaries, write_shard)
from .config import Config
from .data import (Box, DataError, FileHasher, Item, fit_box, list_items, list_splits, load_pair,
                   same_size_batches, to_canvas)
from .stages import StageStatus, diff_params, fingerprint, load_record, save_record

STAGE = "extract-features"


# ----------------------------------------------------------------------------- planning

def model_params(cfg: Config) -> dict:
    """What determines a feature value, besides the image: the stage-1 model key."""
    return {
        "format": FORMAT_VERSION,
        "backbone.name": cfg.backbone.name,
        "backbone.weights": weights_identity(cfg.backbone.weights),
        "extract.fit": cfg.extract.fit,
        "extract.precision": effective_precision(cfg),
        "extract.feature_dtype": cfg.extract.feature_dtype,
    }


def cache_dir(cfg: Config, mparams: dict | None = None) -> Path:
    mparams = mparams or model_params(cfg)
    return Path(cfg.paths.cache) / "features" / f"{cfg.backbone.name}-{fingerprint(mparams)[:12]}"


@dataclass
class ShardTask:
    """Everything a worker needs to compute one shard (picklable)."""
    data_root: str
    split_dir: str
    file: str  # relative to split_dir
    hash: str
    items: list[Item]
    attrs: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.split_dir) / self.file


@dataclass
class SplitPlan:
    split: str
    split_dir: Path
    items: list[Item]
    problems: list[str]
    digest: str
    fingerprint: str
    tasks: list[ShardTask]

    def pending(self) -> list[ShardTask]:
        return [t for t in self.tasks if not t.path.exists()]


def _hasher(cfg: Config) -> FileHasher:
    return FileHasher(Path(cfg.paths.cache) / ".file_hashes.json")


def plan_split(cfg: Config, split: str, mparams: dict | None = None,
               hasher: FileHasher | None = None) -> SplitPlan:
    mparams = mparams or model_params(cfg)
    hasher = hasher or _hasher(cfg)
    root = Path(cfg.data.root)
    items, problems = list_items(root, cfg.data.layout, split)
    model_key = fingerprint(mparams)
    ids = [(it.image, hasher.digest(root / it.image), it.mask, hasher.digest(root / it.mask))
           for it in items]
    digest = hashlib.sha256(json.dumps([ids, problems]).encode()).hexdigest()[:16]
    split_dir = cache_dir(cfg, mparams) / split
    tasks = []
    by_cat: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_cat.setdefault(it.category, []).append(i)
    for cat, idx in by_cat.items():
        for k in range(0, len(idx), SHARD_SIZE):
            chunk = idx[k:k + SHARD_SIZE]
            h = hashlib.sha256(json.dumps([model_key, [ids[i] for i in chunk]]).encode()).hexdigest()[:16]
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cat)
            tasks.append(ShardTask(str(root), str(split_dir), f"shards/{safe}-{k // SHARD_SIZE:04d}-{h}.h5",
                                   h, [items[i] for i in chunk],
                                   {"model_key": model_key, "split": split, "shard_hash": h,
                                    "format": FORMAT_VERSION}))
    return SplitPlan(split, split_dir, items, problems, digest,
                     fingerprint({"model": model_key, "data": digest}), tasks)


def selected_splits(cfg: Config, splits: Iterable[str] = ()) -> list[str]:
    splits = list(splits)
    return splits or list_splits(cfg.data.root, cfg.data.layout)


def split_params(cfg: Config, split: str, mparams: dict, plan: SplitPlan) -> dict:
    return {**{k: v for k, v in mparams.items() if k != "format"}, f"data[{split}]": plan.digest}


# ----------------------------------------------------------------------------- the engine

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CacheError(f"device {name!r} requested but CUDA is not available; use device = \"auto\" or \"cpu\"")
    return dev


def effective_precision(cfg: Config) -> str:
    """extract.precision with "auto" resolved (bf16 on CUDA, fp32 on CPU): the cache key
    records what was computed, so a CPU cache is not taken for a GPU one."""
    if cfg.extract.precision != "auto":
        return cfg.extract.precision
    dev = cfg.extract.device
    on_cuda = dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())
    return "bf16" if on_cuda else "fp32"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass
class Decoded:
    item: Item
    image: np.ndarray | None = None  # original, uint8 (H, W, 3)
    mask: np.ndarray | None = None
    box: Box | None = None
    error: str | None = None


def decode(data_root: str, item: Item, patch: int, fit: str) -> Decoded:
    try:
        image, mask = load_pair(data_root, item)
    except DataError as e:
        return Decoded(item, error=str(e))
    return Decoded(item, image, mask, fit_box(image.shape[0], image.shape[1], patch, fit))


class Extractor:
    """A loaded backbone plus everything needed to turn decoded images into shard records."""

    def __init__(self, cfg: Config, device: torch.device | None = None):
        self.device = device or resolve_device(cfg.extract.device)
        self.backbone: Backbone = create_backbone(cfg.backbone.name, cfg.backbone.weights).to(self.device)
        self.backbone.optimize_for_inference(self.device)
        self.patch = self.backbone.spec.patch_size
        self.fit = cfg.extract.fit
        self.batch_size = cfg.extract.batch_size
        self.amp = autocast_dtype(effective_precision(cfg), self.device)
        self.out_dtype = np.dtype(cfg.extract.feature_dtype)
        self.model = self.backbone
        self.cpu_threads = max(1, torch.get_num_threads())
        self._pool: ThreadPoolExecutor | None = None
        if cfg.extract.compile and self.device.type == "cuda":
            self.model = torch.compile(self.backbone, dynamic=False)

    def _cpu_pool(self) -> ThreadPoolExecutor:
        """Threads that each run whole forwards with one intra-op thread (OpenMP's count is
        per thread and set here; MKL's is process-wide and set around each batch)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.cpu_threads, thread_name_prefix="forward",
                                            initializer=torch.set_num_threads, initargs=(1,))
        return self._pool

    def _autocast(self):
        """A fresh autocast context for this device and precision (fp32: none)."""
        return (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
                else contextlib.nullcontext())

    @torch.inference_mode()
    def _launch(self, canvases: list[np.ndarray]) -> Callable[[], np.ndarray]:
        """Start the forward pass of one same-size batch; returns a function giving the
        features (B, h, w, C). On CUDA the copy back is asynchronous, so the caller can
        prepare the next batch before waiting."""
        x = torch.from_numpy(np.ascontiguousarray(np.stack(canvases))).permute(0, 3, 1, 2)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            # One image per single-threaded forward, images spread over the cores: on CPU
            # larger batches only spill activations out of the caches, and a feature map
            # then depends neither on which images shared its batch nor on the core count
            # (a local run and 1-thread Dask workers compute identical values).
            def one(i: int) -> torch.Tensor:
                with torch.inference_mode(), self._autocast():
                    return self.model(x[i:i + 1])
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # MKL's count is process-wide: restore it right after
            try:
                feats = torch.cat(list(self._cpu_pool().map(one, range(x.shape[0]))))
            finally:
                torch.set_num_threads(threads)
        else:
            with self._autocast():
                feats = self.model(x)
        feats = feats.to(torch.float16 if self.out_dtype == np.float16 else torch.float32)
        if self.device.type == "cuda":
            host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
            host.copy_(feats, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return lambda: (done.synchronize(), host.numpy())[1]
        out = feats.numpy()
        return lambda: out

    def shard_records(self, decoded: Iterable[Decoded]) -> tuple[list[ShardRecord], list[str]]:
        """Features for one shard's decoded images. Batches are formed per canvas size in
        item order, so the same shard always sees the same batches."""
        good: list[Decoded] = []
        errors: list[str] = []
        for d in decoded:
            (errors.append(d.error) if d.error else good.append(d))
        feats: list[np.ndarray | None] = [None] * len(good)
        pending: deque = deque()
        for chunk in same_size_batches([d.box for d in good], self.batch_size):
            fetch = self._launch([to_canvas(good[i].image, good[i].box) for i in chunk])
            pending.append((chunk, fetch))
            if len(pending) > 1:
                self._collect(pending.popleft(), feats)
        while pending:
            self._collect(pending.popleft(), feats)
        records = [ShardRecord(f, d.image, d.mask, d.item.category, d.item.stem, d.item.image, d.box)
                   for f, d in zip(feats, good)]
        return records, errors

    @staticmethod
    def _collect(entry, feats: list) -> None:
        chunk, fetch = entry
        out = fetch()
        for j, i in enumerate(chunk):
            feats[i] = np.ascontiguousarray(out[j])


def run_task(task: ShardTask, extractor: Extractor, decoded: Iterable[Decoded] | None = None) -> dict:
    """Compute and atomically write one shard (idempotent: a complete shard is kept).
    Returns {"file", "n", "errors", "bytes"}."""
    if task.path.exists():
        return shard_summary(task.path, task.file)
    if decoded is None:
        decoded = [decode(task.data_root, it, extractor.patch, extractor.fit) for it in task.items]
    records, errors = extractor.shard_records(decoded)
    attrs = {**task.attrs, "errors": json.dumps(errors)}
    size = write_shard(task.path, records, attrs)
    return {"file": task.file, "n": len(records), "errors": errors, "bytes": size}


def shard_summary(path: Path, file: str) -> dict:
    with h5py.File(path, "r") as f:
        return {"file": file, "n": int(f.attrs["n"]), "errors": json.loads(f.attrs["errors"]),
                "bytes": path.stat().st_size}


# ----------------------------------------------------------------------------- local streaming

def stream_local(tasks: list[ShardTask], extractor: Extractor, workers: int,
                 on_done: Callable[[dict, int], None], lookahead: int = 2) -> None:
    """Run shard tasks in this process: images are decoded by a thread pool ahead of the
    model (`lookahead` shards in flight), shards are written by a background thread."""
    decode_pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="decode")
    write_pool = ThreadPoolExecutor(1, thread_name_prefix="write")
    window: deque[tuple[ShardTask, list[Future]]] = deque()
    writes: deque[tuple[Future, int]] = deque()
    todo = iter(tasks)

    def submit_next() -> None:
        t = next(todo, None)
        if t is not None:
            window.append((t, [decode_pool.submit(decode, t.data_root, it, extractor.patch, extractor.fit)
                               for it in t.items]))

    def write(task: ShardTask, records: list[ShardRecord], errors: list[str]) -> dict:
        size = write_shard(task.path, records, {**task.attrs, "errors": json.dumps(errors)})
        return {"file": task.file, "n": len(records), "errors": errors, "bytes": size}

    try:
        for _ in range(lookahead):
            submit_next()
        while window:
            task, futs = window.popleft()
            submit_next()
            records, errors = extractor.shard_records(f.result() for f in futs)
            writes.append((write_pool.submit(write, task, records, errors), len(task.items)))
            while len(writes) > 1 or (writes and writes[0][0].done()):
                fut, n = writes.popleft()
                on_done(fut.result(), n)
        while writes:
            fut, n = writes.popleft()
            on_done(fut.result(), n)
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


def write_manifest(plan: SplitPlan, params: dict) -> dict:
    shards = []
    errors = list(plan.problems)
    for t in plan.tasks:
        with h5py.File(t.path, "r") as f:
            errs = json.loads(f.attrs["errors"])
            items = []
            for i in range(int(f.attrs["n"])):
                g = f[f"{i:05d}"]
                items.append([str(g.attrs["category"]), str(g.attrs["stem"]), str(g.attrs["source"]),
                              *map(int, g.attrs["orig_size"]), *map(int, g.attrs["box"])])
        errors.extend(errs)
        shards.append({"file": t.file, "hash": t.hash, "items": items})
    manifest = {"format": FORMAT_VERSION, "split": plan.split, "fingerprint": plan.fingerprint,
                "params": params, "n_images": sum(len(s["items"]) for s in shards),
                "errors": errors, "shards": shards}
    atomic_write_json(plan.split_dir / "manifest.json", manifest)
    keep = {t.file for t in plan.tasks}
    for old in (plan.split_dir / "shards").glob("*.h5"):
        if f"shards/{old.name}" not in keep:
            old.unlink()
    return manifest


def manifest_current(plan: SplitPlan) -> dict | None:
    m = read_json(plan.split_dir / "manifest.json")
    if m and m.get("fingerprint") == plan.fingerprint and all(t.path.exists() for t in plan.tasks):
        return m
    return None


def run_extract(cfg: Config, splits: Iterable[str] = (), force: bool = False,
                log: Callable[[str], None] = print, progress: bool = True,
                executor: str | None = None) -> ExtractResult:
    """Stage 1 for the given splits (all by default). Returns a summary; raises DataError,
    CacheError or BackboneError for problems that stop the stage."""
    t0 = time.perf_counter()
    mparams = model_params(cfg)
    hasher = _hasher(cfg)
    splits = selected_splits(cfg, splits)
    plans = [plan_split(cfg, s, mparams, hasher) for s in splits]
    hasher.save()
    result = ExtractResult()
    todo = [p for p in plans if force or manifest_current(p) is None]
    if not todo:
        for p in plans:
            _record_split(cfg, p, mparams)
            result.errors.extend(manifest_current(p)["errors"])
        result.n_errors = len(result.errors)
        result.up_to_date = True
        return result
    cdir = cache_dir(cfg, mparams)
    with exclusive_lock(cdir / ".lock", f"feature cache {cdir}"):
        atomic_write_json(cdir / "model.json", mparams)
        for p in todo:
            remove_temporaries(p.split_dir / "shards")
            if force:
                for t in p.tasks:
                    t.path.unlink(missing_ok=True)
                (p.split_dir / "manifest.json").unlink(missing_ok=True)
        tasks = [t for p in todo for t in p.pending()]
        n_total = sum(len(t.items) for t in tasks)
        n_cached = sum(len(p.items) for p in todo) - n_total
        log(f"extract-features: {len(todo)} split(s), {n_total} images to extract"
            + (f", {n_cached} already cached" if n_cached else "")
            + f" [{cfg.backbone.name}, cache {cdir}]")
        if tasks:
            _execute(cfg, tasks, n_total, result, progress, executor)
            for p in todo:  # temporaries of killed (e.g. distributed) writers
                remove_temporaries(p.split_dir / "shards")
        for p in todo:
            params = split_params(cfg, p.split, mparams, p)
            manifest = write_manifest(p, params)
            result.errors.extend(manifest["errors"])
            _record_split(cfg, p, mparams)
    result.n_errors = len(result.errors)
    result.seconds = time.perf_counter() - t0
    result.cache_bytes = sum(f.stat().st_size for f in cdir.rglob("*.h5"))
    return result


def _execute(cfg: Config, tasks: list[ShardTask], n_total: int, result: ExtractResult,
             progress: bool, executor: str | None) -> None:
    from tqdm import tqdm
    bar = tqdm(total=n_total, unit="img", desc="extract", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    lock = threading.Lock()

    def on_done(summary: dict, n_items: int) -> None:
        with lock:
            result.n_images += summary["n"]
            bar.update(n_items)

    try:
        scheduler = executor if executor is not None else cfg.dask.scheduler
        if scheduler:
            from .distributed import run_extract_tasks
            run_extract_tasks(cfg, tasks, scheduler, on_done)
        else:
            extractor = Extractor(cfg)
            stream_local(tasks, extractor, cfg.extract.num_workers, on_done)
    finally:
        bar.close()


def _record_split(cfg: Config, plan: SplitPlan, mparams: dict) -> None:
    """Merge this split's parameters into the stage record (one record covers all splits)."""
    rec = load_record(cfg, STAGE) or {"params": {}}
    params = {**rec["params"], **split_params(cfg, plan.split, mparams, plan)}
    if rec.get("params") != params or rec.get("fingerprint") is None:
        save_record(cfg, STAGE, params)


def status(cfg: Config, splits: Iterable[str] = ()) -> StageStatus:
    mparams = model_params(cfg)
    hasher = _hasher(cfg)
    try:
        plans = [plan_split(cfg, s, mparams, hasher) for s in selected_splits(cfg, splits)]
    except DataError as e:
        return StageStatus(STAGE, "stale", f"dataset problem: {e}")
    hasher.save()
    if all(manifest_current(p) is not None for p in plans):
        return StageStatus(STAGE, "up-to-date")
    rec = load_record(cfg, STAGE)
    if rec is None:
        return StageStatus(STAGE, "missing")
    params: dict = {}
    for p in plans:
        params.update(split_params(cfg, p.split, mparams, p))
    # compare the model keys and only the splits asked for
    old = {k: v for k, v in rec["params"].items() if not k.startswith("data[") or k in params}
    changes = diff_params(old, params)
    return StageStatus(STAGE, "stale", "; ".join(changes) or "cache files missing or incomplete")


def open_split(cfg: Config, split: str) -> FeatureCache:
    """The complete, current cache of a split for the later stages; CacheError (naming the
    command to run) if it is missing or out of date."""
    plan = plan_split(cfg, split)
    if manifest_current(plan) is None:
        raise CacheError(f"no up-to-date feature cache for split '{split}': run "
                         f"`python cli.py extract-features --split {split}` first")
    return FeatureCache(plan.split_dir)
