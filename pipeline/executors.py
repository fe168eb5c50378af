"""Running task functions on a Dask cluster. The executor knows no stage: a stage hands it a
picklable task function and its inputs, and gets the results back as they complete. Each
worker process keeps what a task function loads (a backbone, trained models, an open store)
in `worker_cached`, keyed by what defines it, for all its tasks.

`dask.scheduler` (or the `--scheduler` option of extract-features, predict and run):
"local:N" starts N local worker processes on loopback; "tcp://host:8786" connects to a
running scheduler (`dask scheduler` + `dask worker ...`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, TypeVar

from .core.errors import ExecutorError, UsageError, thread_limits

CONNECT_TIMEOUT_S = 10
# The nanny's environment for the local:N workers: Dask's default minus MALLOC_TRIM_THRESHOLD_.
# Setting that variable (Dask sets 65536) freezes glibc's mmap threshold at 128 KiB, so every
# tensor above it is a fresh mmap whose pages fault in again on each forward: measured 2x the
# per-image time of a CPU forward in a worker (benchmarks/RESULTS.md, dask_overhead.py).
NANNY_ENVIRON = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}

_WORKER_STATE: dict = {}  # per worker process: what task functions loaded
_WORKER_LOCK = threading.Lock()


def worker_cached(key: Hashable, factory: Callable[[], Any]) -> Any:
    """The object stored under `key` in this process, made by `factory` the first time."""
    with _WORKER_LOCK:
        if key not in _WORKER_STATE:
            _WORKER_STATE[key] = factory()
        return _WORKER_STATE[key]


@contextlib.contextmanager
def glibc_malloc_defaults() -> Iterator[None]:
    """Workers started meanwhile get no MALLOC_TRIM_THRESHOLD_ (NANNY_ENVIRON), also when this
    process's environment holds it (a LocalCluster started earlier leaves Dask's value in the
    environment of the process that started it, and the nanny takes that first). Use inside
    preserved_environment()."""
    import dask

    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set(NANNY_ENVIRON):
        yield


@contextlib.contextmanager
def preserved_environment() -> Iterator[None]:
    """Undo changes to os.environ on exit: starting a LocalCluster sets OMP_NUM_THREADS=1
    (and MKL's, OpenBLAS's) in the calling process for good, which would make every
    process started afterwards single-threaded, and compute differently."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


DASK_EXTRA = "pip install 'vit-objseg[dask]'"  # Dask is optional: only the scale-out needs it


def require_distributed() -> None:
    """UsageError in one line, naming the extra to install, when dask.distributed is absent
    (the local path never needs it)."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise UsageError(
            "dask.scheduler / --scheduler needs Dask, which is not installed: "
            f"`{DASK_EXTRA}`, or leave dask.scheduler empty to run locally"
        ) from None


@contextlib.contextmanager
def local_cluster(n_workers: int, worker_threads: int = 1) -> Iterator:
    """A dask.distributed LocalCluster of `n_workers` worker processes on this machine (no
    dashboard, quiet logs), started with this process's environment kept as it is."""
    from distributed import LocalCluster

    with (
        preserved_environment(),
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=worker_threads,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
    ):
        yield cluster


@contextlib.contextmanager
def connect(scheduler: str, worker_threads: int = 1) -> Iterator:
    """A dask.distributed Client for `scheduler` ("local:N": N worker processes of
    `worker_threads` task threads each, or an address); ExecutorError naming the address when
    it cannot be reached within CONNECT_TIMEOUT_S."""
    require_distributed()
    from distributed import Client

    if scheduler.startswith("local:"):
        n = int(scheduler.split(":", 1)[1])
        with (
            preserved_environment(),
            glibc_malloc_defaults(),
            thread_limits(f"the local Dask cluster ({scheduler})"),
            local_cluster(n, worker_threads) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as e:
        raise ExecutorError(
            f"cannot reach the Dask scheduler at {scheduler} within "
            f"{CONNECT_TIMEOUT_S} s ({type(e).__name__}); start it with "
            "`dask scheduler`, or leave dask.scheduler empty to run "
            "locally"
        ) from None
    with client:
        yield client


def run_tasks(
    scheduler: str, fn: Callable, inputs: Iterable[tuple[str, tuple]], worker_threads: int = 1
) -> Iterator[Any]:
    """Run fn(*args) on the cluster for each (key, args) of `inputs`, handed to workers in
    that order (earlier first: a caller that lists its largest tasks first balances the
    workers' loads); yield the results as they complete. A task whose worker dies is retried
    elsewhere (tasks are idempotent). `worker_threads`: task threads per worker of a
    "local:N" cluster (tasks that overlap their I/O with another task's compute ask for 2)."""
    from distributed import as_completed

    with connect(scheduler, worker_threads) as client:
        calls = list(inputs)
        futures = [
            client.submit(fn, *args, key=key, pure=False, retries=2, priority=len(calls) - k)
            for k, (key, args) in enumerate(calls)
        ]
        for fut in as_completed(futures):
            yield fut.result()


T = TypeVar("T")


def scheduler_of(configured: str, executor: str | None = None) -> str:
    """Where a stage's tasks run: `executor` when given, else `configured` (dask.scheduler;
    "": here)."""
    return executor if executor is not None else configured


def execute(
    scheduler: str,
    fn: Callable[..., T],
    remote: Callable[[], Iterable[tuple[str, tuple]]],
    local: Callable[[], Iterable[T]],
    worker_threads: int = 1,
) -> Iterator[T]:
    """The one choice between here and Dask for a stage's tasks: with a `scheduler`, fn(*args)
    for each (key, args) of remote() on the cluster (run_tasks: results as they complete);
    without, local()'s results (the same tasks in this process, in order)."""
    if scheduler:
        yield from run_tasks(scheduler, fn, remote(), worker_threads)
    else:
        yield from local()
