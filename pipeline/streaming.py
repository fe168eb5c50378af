"""Decode -> process -> write, overlapped: the one streaming engine of stage 1 (in process and
in a Dask worker's task) and of `segment`.

The input comes in chunks (stage 1: a shard's items; `segment`: a run of images). The items of
the next `lookahead` chunks are decoded by a thread pool while the calling thread processes
the current chunk (the model's forward), and what a chunk produces is written by background
threads (write-behind) while the next chunk is processed. Memory is bounded both ways: at most
`lookahead` chunks decoded ahead, at most `max_writes` writes waiting (back-pressure: the
processing waits for the oldest write). Writes finish, and `on_written` is called, in the
order they were submitted.

An item that cannot be decoded is the decoder's to describe (`Undecodable`, one error); an
exception raised by a decoder, the processing or a write stops the stream and propagates,
after the writes already submitted have completed (their work is kept) and the decoding
ahead has been cancelled.

Layering: below the stages; imports no stage module.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from .data import Box

S = TypeVar("S")  # what an item is (stage 1: a dataset Item; segment: a Source)
M = TypeVar("M")  # what decoding it yields besides the pixels
C = TypeVar("C")  # a chunk
T = TypeVar("T")  # an item
D = TypeVar("D")  # a decoded item
R = TypeVar("R")  # a write's result


@dataclass
class Decoded(Generic[S, M]):
    """One item read and decoded: its pixels, its box on the canvas and what else its reader
    keeps (stage 1: the file's bytes and the mask; segment: the source file's identity)."""

    source: S
    image: np.ndarray  # uint8 (H, W, 3), viewer orientation
    box: Box
    meta: M


@dataclass
class Undecodable(Generic[S]):
    """One unusable item and its one-line error."""

    source: S
    error: str
    refused_pixels: int = 0  # > 0: refused by data.max_pixels from its header


class Writer(Generic[R]):
    """The write-behind side of a stream: `submit` queues a write on the write threads and
    waits while more than `max_writes` are unfinished; finished writes are handed to
    `on_written` in submission order, in the calling thread."""

    def __init__(self, pool: ThreadPoolExecutor, max_writes: int, on_written: Callable[[R], None]):
        self._pool = pool
        self._max = max(1, max_writes)
        self._on_written = on_written
        self._pending: deque[Future] = deque()

    def submit(self, fn: Callable[..., R], *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        self.drain(self._max)

    def map(self, fn: Callable[[T], Any], items: Iterable[T]) -> list:
        """fn over items on the write threads (e.g. encoding files before they are recorded),
        results in order; waits for all."""
        return list(self._pool.map(fn, items))

    def drain(self, keep: int = 0) -> None:
        """Hand on the finished writes at the head of the queue, waiting for the oldest while
        more than `keep` are unfinished."""
        while len(self._pending) > keep or (self._pending and self._pending[0].done()):
            self._on_written(self._pending.popleft().result())

    def finish_submitted(self) -> None:
        """Let the writes already submitted finish (their work is done; their results are not
        handed on): used when the stream stops on an error."""
        wait(self._pending)  # their own errors are not raised: the stream's error is


def stream(
    chunks: Iterable[C],
    items: Callable[[C], Sequence[T]],
    decode: Callable[[T], D],
    process: Callable[[C, Iterator[D], Writer[R]], None],
    on_written: Callable[[R], None] = lambda r: None,
    *,
    decode_threads: int,
    write_threads: int = 1,
    lookahead: int = 2,
    max_writes: int = 1,
) -> None:
    """For each chunk in order: `process(chunk, decoded items in order, writer)`, while the
    items of the next `lookahead` chunks (`items(chunk)`) are decoded by `decode_threads`
    threads and the writes the processing submits (`writer.submit(fn, *args)`) run on
    `write_threads` threads, at most `max_writes` of them unfinished. `on_written(result)`
    per finished write, in submission order. An exception from `decode`, `process` or a
    write propagates once the writes already submitted have finished."""
    decode_pool = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="decode")
    write_pool = ThreadPoolExecutor(max(1, write_threads), thread_name_prefix="write")
    writer: Writer[R] = Writer(write_pool, max_writes, on_written)
    window: deque[tuple[C, list[Future]]] = deque()
    todo = iter(chunks)
    ok = False

    def submit_next() -> None:
        chunk = next(todo, None)
        if chunk is not None:
            window.append((chunk, [decode_pool.submit(decode, it) for it in items(chunk)]))

    try:
        for _ in range(max(1, lookahead)):
            submit_next()
        while window:
            chunk, futs = window.popleft()
            submit_next()
            process(chunk, (f.result() for f in futs), writer)
        writer.drain()
        ok = True
    finally:
        for _, futs in window:
            for f in futs:
                f.cancel()
        if not ok:
            writer.finish_submitted()
        decode_pool.shutdown(wait=True, cancel_futures=True)
        write_pool.shutdown(wait=True)
