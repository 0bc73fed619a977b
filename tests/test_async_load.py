"""Asynchronous loads: BucketStore.submit_load and LoadHandle.

Reads are held mid-flight through the FileSystem seam (:class:`ReadGate`),
so every interleaving here is forced, never timed.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

from kvbucket import BucketStore, LoadHandle
from kvbucket._core.format import data_name
from kvbucket._core.fs import FileSystem
from kvbucket.errors import CapacityExceeded, CorruptionError, InvalidArgument, KeyNotFound, SizeMismatch, StorageIOError, StoreClosed
from storeutil import ReprCountingKey, SetOnRecord, value_for

SIZE = 64 << 10


class ReadGate(FileSystem):
    """Knows which file each descriptor reads. The first ``preadv`` of a
    ``(data file, offset)`` in :attr:`held` sets :attr:`entered` and waits
    for :attr:`release`; one in :attr:`failing` raises EIO. Every read and
    every closed data file is recorded."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.held: set[tuple[str, int]] = set()
        self.failing: set[tuple[str, int]] = set()
        self.entered, self.release = threading.Event(), threading.Event()
        self.reads: list[str] = []
        self.closed: list[str] = []
        self._lock = threading.Lock()

    def open(self, path, flags, mode=0o644):  # type: ignore[no-untyped-def]
        fd = super().open(path, flags, mode)
        self.names[fd] = os.path.basename(path)
        return fd

    def close(self, fd):  # type: ignore[no-untyped-def]
        with self._lock:
            self.closed.append(self.names.get(fd, "?"))
        super().close(fd)

    def preadv(self, fd, buffers, offset):  # type: ignore[no-untyped-def]
        where = (self.names.get(fd, "?"), offset)
        with self._lock:
            self.reads.append(where[0])
            hold = where in self.held
            self.held.discard(where)
        if where in self.failing:
            raise OSError(errno.EIO, "Input/output error")
        if hold:
            self.entered.set()
            self.release.wait()
        return super().preadv(fd, buffers, offset)

    def hold(self, store: BucketStore, key: str) -> None:
        """Hold the read of ``key``'s object."""
        self.held.add(_location(store, key))


def _location(store: BucketStore, key: str) -> tuple[str, int]:
    meta = store.batch_query([key])[key]
    return data_name(meta.bucket_id), meta.offset


def _buffers(*keys: str) -> dict[str, bytearray]:
    return {key: bytearray(SIZE) for key in keys}


def _values(*keys: str) -> dict[str, bytearray]:
    return {key: bytearray(value_for(key, SIZE)) for key in keys}


def _offload(store: BucketStore, *keys: str) -> int:
    bucket_id = store.batch_offload({key: value_for(key, SIZE) for key in keys})
    assert bucket_id is not None
    return bucket_id


@pytest.fixture
def gate() -> ReadGate:
    return ReadGate()


def test_submit_returns_at_once_and_the_handle_resolves_with_the_bytes(store_dir: Path, gate: ReadGate) -> None:
    with BucketStore.open(store_dir, filesystem=gate, io_threads=2) as store:
        _offload(store, "a", "b", "c")
        gate.hold(store, "b")
        buffers = _buffers("a", "b", "c")
        done: list[LoadHandle] = []
        handle = store.submit_load(buffers)
        handle.add_done_callback(done.append)
        gate.entered.wait()
        assert not handle.done() and done == []
        assert handle.key_future("a").result() is None  # a key resolves on its own
        assert not handle.key_future("b").done()
        gate.release.set()
        assert handle.result() is None and handle.wait()
        assert done == [handle]
        assert buffers == _values("a", "b", "c")
        assert handle.loaded() == ["a", "b", "c"] and handle.errors() == {}
        assert handle.keys == ["a", "b", "c"]
        counters = store.counters()
        assert (counters.hits["load"], counters.read_objects, counters.read_latency.count) == (3, 3, 1)


def test_a_slow_read_does_not_hold_back_the_next_batch(store_dir: Path, gate: ReadGate) -> None:
    """No barrier between batches: a later batch completes while an earlier one's read is held."""
    with BucketStore.open(store_dir, filesystem=gate, io_threads=2) as store:
        _offload(store, "slow", "other")
        _offload(store, "next")
        gate.hold(store, "slow")
        first = store.submit_load(_buffers("slow", "other"))
        gate.entered.wait()
        second_buffers = _buffers("next")
        second = store.submit_load(second_buffers)
        assert second.result(timeout=60) is None  # while the first batch's read is still held
        assert second_buffers == _values("next")
        assert first.key_future("other").result(timeout=60) is None
        assert not first.done()
        gate.release.set()
        first.result()


@pytest.mark.parametrize("change", ["eviction", "deletion", "compaction"])
def test_a_read_in_flight_keeps_its_bytes_while_its_bucket_goes(store_dir: Path, gate: ReadGate, change: str) -> None:
    with BucketStore.open(store_dir, filesystem=gate, total_keys_limit=4, eviction_policy="fifo", background_eviction=False) as store:
        first = _offload(store, "a", "b", "dead")
        gate.hold(store, "a")
        buffers = _buffers("a", "b")
        handle = store.submit_load(buffers)
        gate.entered.wait()
        if change == "eviction":
            _offload(store, "x", "y")  # 5 keys > 4: the oldest bucket is evicted
        elif change == "deletion":
            store.delete_bucket(first)
        else:
            store.remove("dead")
            assert store.compact(min_dead_ratio=0.1) > 0  # its own read of "a" is not held
        assert first not in store.bucket_ids()
        assert not (store_dir / data_name(first)).exists()
        gate.release.set()
        handle.result()
        assert buffers == _values("a", "b")


def test_a_read_in_flight_keeps_its_bytes_across_a_refresh(store_dir: Path, gate: ReadGate) -> None:
    with BucketStore.open(store_dir) as writer:
        first = _offload(writer, "a", "b")
        with BucketStore.open(store_dir, readonly=True, filesystem=gate) as reader:
            gate.hold(reader, "a")
            buffers = _buffers("a", "b")
            handle = reader.submit_load(buffers)
            gate.entered.wait()
            writer.delete_bucket(first)
            _offload(writer, "c")
            reader.refresh()  # the pinned bucket retires; its file is gone
            assert not reader.exists("a") and reader.exists("c")
            gate.release.set()
            handle.result()
            assert buffers == _values("a", "b")
            assert reader.batch_get(["c"]) == {"c": value_for("c", SIZE)}


def test_cancel_before_start_reads_nothing_and_unpins_at_once(store_dir: Path, gate: ReadGate) -> None:
    with BucketStore.open(store_dir, filesystem=gate, io_threads=1) as store:
        _offload(store, "busy")
        queued = _offload(store, "q1", "q2")
        gate.hold(store, "busy")
        busy = store.submit_load(_buffers("busy"))
        gate.entered.wait()  # the one load thread is held
        handle = store.submit_load(_buffers("q1", "q2"))
        assert handle.cancel() == 2
        assert handle.done() and handle.cancel() == 0
        with pytest.raises(CancelledError):
            handle.result()
        assert set(handle.errors()) == {"q1", "q2"} and handle.loaded() == []
        with pytest.raises(CancelledError):
            handle.key_future("q2").result()
        gate.closed.clear()
        store.delete_bucket(queued)  # unpinned: its descriptor closes at once
        assert data_name(queued) in gate.closed
        assert data_name(queued) not in gate.reads
        gate.release.set()
        busy.result()
        assert store.counters().read_objects == 1


def test_an_ended_read_keeps_its_bucket_pinned_until_its_batch_completes(store_dir: Path, gate: ReadGate) -> None:
    with BucketStore.open(store_dir, filesystem=gate, io_threads=2) as store:
        done_first = _offload(store, "a")
        _offload(store, "b")
        gate.hold(store, "b")
        buffers = _buffers("a", "b")
        handle = store.submit_load(buffers)
        gate.entered.wait()
        try:
            assert handle.key_future("a").result(timeout=60) is None
            gate.closed.clear()
            store.delete_bucket(done_first)  # still pinned by the batch: the descriptor stays open
            assert data_name(done_first) not in gate.closed
        finally:
            gate.release.set()  # a failed assertion must not leave the store's close waiting for the held read
        handle.result()
        assert data_name(done_first) in gate.closed  # the batch completed: unpinned, closed
        assert buffers == _values("a", "b")


def test_a_batch_unpins_its_buckets_in_one_call(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One lock round trip of the read path per batch, not one per object."""
    with BucketStore.open(store_dir) as store:
        keys = [f"k{i}" for i in range(32)]
        _offload(store, *keys[:16])
        _offload(store, *keys[16:])
        reads = store._reads
        calls: list[int] = []
        unpin = reads.unpin

        def counted(buckets):  # type: ignore[no-untyped-def]
            buckets = list(buckets)
            calls.append(len(buckets))
            unpin(buckets)

        monkeypatch.setattr(reads, "unpin", counted)
        buffers = _buffers(*keys)
        store.batch_load(buffers)
        assert calls == [32]
        assert buffers == _values(*keys)



def test_a_load_composes_no_message_naming_a_key_that_loads(store_dir: Path) -> None:
    with BucketStore.open(store_dir, io_threads=2) as store:
        _offload(store, "a", "b", "c")
        ReprCountingKey.reprs = 0
        buffers = {ReprCountingKey("a"): bytearray(SIZE), ReprCountingKey("b"): [bytearray(SIZE // 2), bytearray(SIZE // 2)]}
        store.batch_load(buffers)
        store.submit_load({ReprCountingKey("c"): memoryview(bytearray(SIZE))}).result()
        assert ReprCountingKey.reprs == 0
        assert bytes(buffers["a"]) == value_for("a", SIZE)
        with pytest.raises(InvalidArgument, match="'c'"):  # a bad destination is still named by its key
            store.batch_load({ReprCountingKey("c"): bytes(SIZE)})


def test_the_queue_depth_bounds_the_batches_in_flight(store_dir: Path, gate: ReadGate) -> None:
    with BucketStore.open(store_dir, filesystem=gate, io_threads=1, load_queue_depth=1) as store:
        _offload(store, "a", "b")
        gate.hold(store, "a")
        first = store.submit_load(_buffers("a"))
        gate.entered.wait()
        with pytest.raises(CapacityExceeded, match="load_queue_depth=1"):
            store.submit_load(_buffers("b"), timeout=0)
        with pytest.raises(CapacityExceeded):
            store.submit_load(_buffers("b"), timeout=0.01)
        gate.release.set()
        first.result()
        buffers = _buffers("b")
        store.submit_load(buffers, timeout=0).result()  # the slot is free again
        assert buffers == _values("b")
        with pytest.raises(InvalidArgument):
            store.submit_load(_buffers("b"), timeout=-1)


def test_errors_are_per_key_and_the_good_keys_load(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        _offload(store, "good1", "bad")
        _offload(store, "good2")
        meta = store.batch_query(["bad"])["bad"]
        with open(store_dir / data_name(meta.bucket_id), "r+b") as f:  # flip a byte of "bad"
            f.seek(meta.offset)
            f.write(bytes([f.read(1)[0] ^ 0xFF]))
        buffers = {**_buffers("good1", "missing", "bad", "good2"), "short": bytearray(1)}
        _offload(store, "short")
        handle = store.submit_load(buffers)
        assert handle.wait(timeout=60)
        errors = handle.errors()
        assert {key: type(error) for key, error in errors.items()} == {"missing": KeyNotFound, "bad": CorruptionError, "short": SizeMismatch}
        assert handle.future.exception() is errors["missing"]  # the first failed key, in the order given
        assert handle.loaded() == ["good1", "good2"]
        assert {k: buffers[k] for k in ("good1", "good2")} == _values("good1", "good2")
        assert isinstance(handle.key_future("bad").exception(), CorruptionError)
        assert handle.key_future("good2").result() is None
        with pytest.raises(KeyError):
            handle.key_future("never-asked")
        counters = store.counters()
        assert (counters.misses["load"], counters.read_objects, counters.read_latency.count, counters.checksum_failures) == (1, 2, 0, 1)


def test_an_eio_on_one_read_fails_only_that_key(store_dir: Path, gate: ReadGate) -> None:
    with BucketStore.open(store_dir, filesystem=gate, io_threads=2) as store:
        _offload(store, "a", "b", "c")
        gate.failing.add(_location(store, "b"))
        buffers = _buffers("a", "b", "c")
        handle = store.submit_load(buffers)
        with pytest.raises(StorageIOError) as raised:
            handle.result()
        assert raised.value.errno == errno.EIO and "'b'" in str(raised.value)
        assert list(handle.errors()) == ["b"] and handle.loaded() == ["a", "c"]
        assert {k: buffers[k] for k in ("a", "c")} == _values("a", "c")
        with pytest.raises(StorageIOError):
            store.batch_load(_buffers("b"))  # the synchronous path: the same error
        gate.failing.clear()
        assert store.batch_get(["b"]) == {"b": value_for("b", SIZE)}


def test_close_waits_for_the_loads_in_flight_and_later_submits_raise(store_dir: Path, gate: ReadGate) -> None:
    store = BucketStore.open(store_dir, filesystem=gate, io_threads=1)
    _offload(store, "a")
    _offload(store, "b")
    gate.hold(store, "a")
    held_buffers, queued_buffers = _buffers("a"), _buffers("b")
    held = store.submit_load(held_buffers)
    gate.entered.wait()
    queued = store.submit_load(queued_buffers)  # behind the held read: not started
    waiting = threading.Event()
    handler = SetOnRecord("batch(es) in flight", waiting)
    log = logging.getLogger("kvbucket._core.loads")
    level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    closer = threading.Thread(target=store.close)
    try:
        closer.start()
        waiting.wait()  # close() waits for the two batches
        with pytest.raises(StoreClosed):
            store.submit_load(_buffers("b"))
        assert not held.done() and not queued.done()
        gate.release.set()
        closer.join()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert held.done() and queued.done()  # every load submitted before close() is done when it returns
    assert (held_buffers, queued_buffers) == (_values("a"), _values("b"))
    with pytest.raises(StoreClosed):
        store.submit_load(_buffers("a"))
    with pytest.raises(StoreClosed):
        store.batch_load(_buffers("a"))


def test_batch_load_is_all_or_nothing_at_lookup(store_dir: Path, gate: ReadGate) -> None:
    """batch_load keeps its contract: a missing key raises before anything is read."""
    with BucketStore.open(store_dir, filesystem=gate) as store:
        _offload(store, "a")
        gate.reads.clear()
        with pytest.raises(KeyNotFound):
            store.batch_load(_buffers("a", "missing"))
        with pytest.raises(SizeMismatch):
            store.batch_load({"a": bytearray(1)})
        assert gate.reads == []
        with pytest.raises(InvalidArgument):
            store.submit_load({})


