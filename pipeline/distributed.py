"""Stages 1 and 3 on a Dask cluster: the same shard tasks as a local run, sent to
`dask.distributed` workers. Each worker process loads the backbone (or the trained models)
once and keeps it for all its tasks; shards are written by the workers into the shared cache
folder with the same atomic rename, so a worker killed mid-task leaves only a temporary file,
and Dask reruns the task elsewhere.

`dask.scheduler` (or the `--scheduler` option of extract-features, predict and run):
"local:N" starts N local worker processes on loopback; "tcp://host:8786" connects to a running scheduler (`dask scheduler` + `dask worker ...`).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

from .config import Config

_WORKER_STATE: dict = {}  # per worker process: loaded models, keyed by what defines them
_WORKER_LOCK = threading.Lock()


@contextlib.contextmanager
def preserved_environment() -> Iterator[None]:
    """Undo changes to os.environ on exit: starting a LocalCluster sets OMP_NUM_THREADS=1
    (and MKL's, OpenBLAS's) in the calling process for good, which would make every
    process started afterwards single-threaded, and compute differently."""
    import os
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


@contextlib.contextmanager
def connect(scheduler: str) -> Iterator:
    """A dask.distributed Client for `scheduler` ("local:N" or an address)."""
    from distributed import Client, LocalCluster
    if scheduler.startswith("local:"):
        n = int(scheduler.split(":", 1)[1])
        with preserved_environment(), \
                LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                             dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
                Client(cluster) as client:
            yield client
    else:
        with Client(scheduler) as client:
            yield client


def portable_config(cfg: Config) -> Config:
    """The config as workers must see it: paths absolute (a worker's working directory is
    not the driver's) and extract.precision resolved on the driver, so every worker
    computes what the cache key says."""
    from .config import copy_config
    from .extract import effective_precision
    changes = {"data.root": str(Path(cfg.data.root).resolve()),
               "paths.cache": str(Path(cfg.paths.cache).resolve()),
               "paths.outputs": str(Path(cfg.paths.outputs).resolve()),
               "extract.precision": effective_precision(cfg)}
    if cfg.backbone.weights not in ("pretrained", "random"):
        changes["backbone.weights"] = str(Path(cfg.backbone.weights).expanduser().resolve())
    return copy_config(cfg, **{k.replace(".", "__"): v for k, v in changes.items()})


# ----------------------------------------------------------------------------- stage 1

def _worker_extractor(cfg: Config):
    from .extract import Extractor, model_params
    from .stages import fingerprint
    key = ("extract", fingerprint(model_params(cfg)), cfg.extract.device, cfg.extract.batch_size)
    with _WORKER_LOCK:
        if key not in _WORKER_STATE:
            _WORKER_STATE[key] = Extractor(cfg)
        return _WORKER_STATE[key]


def extract_task(task, cfg: Config) -> dict:
    """One shard on a worker: decode with threads, run the worker's backbone, write atomically."""
    from .extract import decode, run_task
    extractor = _worker_extractor(cfg)
    if task.path.exists():
        return run_task(task, extractor)
    with ThreadPoolExecutor(max(1, cfg.extract.num_workers)) as pool:
        decoded = list(pool.map(lambda it: decode(task.data_root, it, extractor.patch, extractor.fit),
                                task.items))
    return run_task(task, extractor, decoded)


def run_extract_tasks(cfg: Config, tasks: list, scheduler: str,
                      on_done: Callable[[dict, int], None]) -> None:
    import dataclasses

    from distributed import as_completed
    wcfg = portable_config(cfg)
    tasks = [dataclasses.replace(t, data_root=str(Path(t.data_root).resolve()),
                                 split_dir=str(Path(t.split_dir).resolve())) for t in tasks]
    with connect(scheduler) as client:
        futures = {client.submit(extract_task, t, wcfg, key=f"extract-{t.hash}", pure=False, retries=2): t
                   for t in tasks}
        for fut in as_completed(futures):
            on_done(fut.result(), len(futures[fut].items))


# ----------------------------------------------------------------------------- stage 3

def _worker_predictor(cfg: Config):
    from .extract import resolve_device
    from .predict import Predictor
    from .train import load_models
    models_file = cfg.run_dir / "models" / "pac_upsampler.pt"
    key = ("predict", str(models_file.resolve()), models_file.stat().st_mtime_ns, cfg.predict.threshold)
    with _WORKER_LOCK:
        if key not in _WORKER_STATE:
            device = resolve_device(cfg.predict.device)
            _WORKER_STATE[key] = Predictor(load_models(cfg, device), device, cfg.predict.threshold)
        return _WORKER_STATE[key]


def predict_task(cfg: Config, split_dir: str, shard: int, pred_dir: str) -> tuple[int, dict]:
    from .cache import FeatureCache
    from .predict import predict_shard
    key = ("cache", split_dir)
    with _WORKER_LOCK:
        cache = _WORKER_STATE.setdefault(key, FeatureCache(split_dir))
    return shard, predict_shard(cache, shard, _worker_predictor(cfg), Path(pred_dir),
                                cfg.predict.batch_size)


def run_predict_shards(cfg: Config, cache, shards: list[int], pred_dir: Path,
                       scheduler: str) -> Iterator[tuple[int, dict]]:
    from distributed import as_completed
    wcfg = portable_config(cfg)
    with connect(scheduler) as client:
        futures = [client.submit(predict_task, wcfg, str(cache.split_dir.resolve()), si,
                                 str(Path(pred_dir).resolve()),
                                 key=f"predict-{cache.fingerprint}-{si}", pure=False, retries=2)
                   for si in shards]
        for fut in as_completed(futures):
            yield fut.result()
