"""The streaming engine (pipeline/streaming.py) that stage 1 (in process and in a Dask task)
and `segment` share: order, bounded look-ahead and write-behind, errors; and stage 1's shards
(bounded, handed to Dask workers largest first)."""

from __future__ import annotations

import threading

import pytest

from pipeline.store import SHARD_SIZE
from pipeline.streaming import Undecodable, stream
from tests.conftest import stored


def test_writes_are_handed_on_in_order_when_they_finish_out_of_order():
    """Two write threads; the first write waits until the second has finished: `on_written`
    still sees them in submission order, and every chunk's items arrive in order."""
    second_done = threading.Event()
    seen, written = [], []

    def write(k):
        if k == 0:
            assert second_done.wait(60)
        else:
            second_done.set()
        return k

    def process(chunk, decoded, writer):
        seen.append(list(decoded))
        writer.submit(write, chunk)

    stream(
        [0, 1, 2],
        lambda c: [(c, i) for i in range(5)],
        lambda it: it,
        process,
        written.append,
        decode_threads=3,
        write_threads=2,
        max_writes=2,
    )
    assert written == [0, 1, 2]
    assert seen == [[(c, i) for i in range(5)] for c in range(3)]


def test_back_pressure_bounds_decoding_ahead_and_writes_waiting():
    """At most `lookahead` chunks are decoded ahead of the one processed, and `submit` returns
    only when at most `max_writes` writes are unfinished."""
    lock = threading.Lock()
    decoded_chunks: set[int] = set()
    unfinished = [0]
    worst = {"ahead": 0, "writes": 0}
    release = threading.Semaphore(0)

    def decode(it):
        with lock:
            decoded_chunks.add(it[0])
        return it

    def write(k):
        release.acquire()  # a slow disk: each write waits for the next chunk's processing
        with lock:
            unfinished[0] -= 1
        return k

    def process(chunk, decoded, writer):
        list(decoded)
        with lock:
            worst["ahead"] = max(worst["ahead"], max(decoded_chunks) - chunk)
            unfinished[0] += 1
        release.release()
        writer.submit(write, chunk)
        with lock:
            worst["writes"] = max(worst["writes"], unfinished[0])

    written = []
    stream(
        range(12),
        lambda c: [(c, i) for i in range(3)],
        decode,
        process,
        written.append,
        decode_threads=4,
        lookahead=2,
        max_writes=3,
    )
    assert written == list(range(12))
    assert worst["ahead"] <= 2
    assert worst["writes"] <= 3


def test_an_undecodable_item_is_one_error_and_the_rest_is_written():
    """A decoder describes a bad item (Undecodable); the processing sees it as one error and
    every other item is processed and written."""

    def decode(it):
        return Undecodable(it, f"{it}: corrupt") if it == "b3" else it

    errors, written = [], []

    def process(chunk, decoded, writer):
        good = []
        for d in decoded:
            if isinstance(d, Undecodable):
                errors.append(d.error)
            else:
                good.append(d)
        writer.submit(lambda g: g, good)

    chunks = {"a": ["a1", "a2"], "b": ["b1", "b2", "b3", "b4"], "c": ["c1"]}
    stream(chunks, chunks.__getitem__, decode, process, written.append, decode_threads=2)
    assert errors == ["b3: corrupt"]
    assert written == [["a1", "a2"], ["b1", "b2", "b4"], ["c1"]]


def test_a_failing_decoder_or_write_stops_the_stream_and_earlier_writes_complete():
    """An exception (not an Undecodable) from a decoder propagates from `stream`; the writes
    submitted before it have completed when it returns. Likewise an exception in a write."""
    done = []

    def decode(it):
        if it == (2, 1):
            raise OSError("disk gone")
        return it

    def process(chunk, decoded, writer):
        items = list(decoded)
        writer.submit(done.append, items)

    with pytest.raises(OSError, match="disk gone"):
        stream(
            range(5), lambda c: [(c, 0), (c, 1)], decode, process, decode_threads=2, max_writes=4
        )
    assert done == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]

    def bad_write(k):
        if k == 1:
            raise ValueError("no space")
        return k

    written = []
    with pytest.raises(ValueError, match="no space"):
        stream(
            range(4),
            lambda c: [c],
            lambda it: it,
            lambda c, d, w: (list(d), w.submit(bad_write, c)),
            written.append,
            decode_threads=1,
        )
    assert written == [0]


# ----------------------------------------------------------------------------- stage 1's shards


def test_shards_are_bounded_and_handed_to_workers_largest_first(tmp_path):
    """Shards hold at most SHARD_SIZE images of one category (file order); Dask receives them
    largest first, plan order among equals (greedy balance: the last ones are the small)."""
    from pipeline.data.synth import make_dataset
    from pipeline.stages.extract import largest_first
    from pipeline.store import file_hasher, plan_split
    from tests.conftest import make_cfg

    root = make_dataset(tmp_path / "d", "obj_seg", {"train": 200}, size=(24, 32), seed=3)
    cfg = make_cfg(tmp_path, root)
    plan = plan_split(*stored(cfg), "train", file_hasher(cfg.paths.cache))
    sizes = [len(t.items) for t in plan.tasks]
    assert sum(sizes) == len(plan.items) and max(sizes) == SHARD_SIZE < 200  # categories cut
    for t in plan.tasks:
        assert len({it.category for it in t.items}) == 1
    assert [it for t in plan.tasks for it in t.items] == sorted(
        plan.items,
        key=lambda it: [c for c in dict.fromkeys(i.category for i in plan.items)].index(
            it.category
        ),
    )
    order = largest_first(plan.tasks)
    assert [len(t.items) for t in order] == sorted(sizes, reverse=True)
    big = [t for t in plan.tasks if len(t.items) == max(sizes)]
    assert [t for t in order if len(t.items) == max(sizes)] == big
