"""The write-behind pipeline: OffloadQueue over a real BucketStore.

Synchronisation is by futures, events and flush(); nothing sleeps to wait
for a worker, and no assertion depends on how long something took. Faults and
stalls are injected through the store's I/O seam (``kvbucket._core.fs.FileSystem``).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from kvbucket import BucketStore
from kvbucket._core.format import FileKind, parse_name
from kvbucket._core.fs import FileSystem
from kvbucket.errors import CapacityExceeded, InvalidArgument, KvBucketError, SizeMismatch, StoreClosed
from kvbucket.pipeline import OffloadQueue
from storeutil import ReprCountingKey, value_for

SIZE = 4096


# -- I/O seam helpers ------------------------------------------------------------
class GateFS(FileSystem):
    """Once armed, every write waits for ``release``; ``entered`` tells a write is waiting."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def pwritev(self, fd: int, buffers: Any, offset: int) -> int:
        if self.armed:
            self.entered.set()
            self.release.wait()
        return super().pwritev(fd, buffers, offset)


class FaultFS(FileSystem):
    """Once armed, every ``write_every``-th write raises EIO and every
    ``sync_every``-th data sync raises ENOSPC."""

    def __init__(self, write_every: int = 5, sync_every: int = 3) -> None:
        self.armed = False
        self._lock = threading.Lock()
        self._writes = self._syncs = 0
        self._write_every, self._sync_every = write_every, sync_every
        self.injected = 0

    def _due(self, counter: str, every: int) -> bool:
        with self._lock:
            if not self.armed:
                return False
            count = getattr(self, counter) + 1
            setattr(self, counter, count)
            if count % every == 0:
                self.injected += 1
                return True
            return False

    def pwritev(self, fd: int, buffers: Any, offset: int) -> int:
        if self._due("_writes", self._write_every):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return super().pwritev(fd, buffers, offset)

    def fdatasync(self, fd: int) -> None:
        if self._due("_syncs", self._sync_every):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().fdatasync(fd)


def assert_clean_directory(path: str | os.PathLike[str]) -> None:
    """Only LOCK and complete bucket pairs (no temporary, no orphan)."""
    kinds: dict[int, set[FileKind]] = {}
    for name in os.listdir(path):
        if name == "LOCK":
            continue
        parsed = parse_name(name)
        assert parsed is not None, f"unexpected file {name}"
        bucket_id, kind = parsed
        assert kind in (FileKind.DATA, FileKind.META), f"leftover {name}"
        kinds.setdefault(bucket_id, set()).add(kind)
    orphans = {bucket_id: k for bucket_id, k in kinds.items() if k != {FileKind.DATA, FileKind.META}}
    assert not orphans, f"incomplete bucket pairs: {orphans}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BucketStore]:
    with BucketStore.open(tmp_path / "s", durability="relaxed", bucket_keys_limit=8, group_max_delay_s=0.0) as opened:
        yield opened


def wait_all(futures: dict[str, Future[None]]) -> dict[str, BaseException | None]:
    return {key: future.exception(timeout=60) for key, future in futures.items()}


# -- staging and reading -----------------------------------------------------------
def test_put_returns_before_the_write_and_reads_see_staged_objects(store: BucketStore) -> None:
    # No time flush (group_max_delay_s=0): three put objects of an 8-key bucket stay staged.
    with OffloadQueue(store) as queue:
        futures = {f"k{i}": queue.put(f"k{i}", value_for(f"k{i}", SIZE)) for i in range(3)}
        assert not any(f.done() for f in futures.values())
        assert not store.exists("k0")
        assert queue.is_staged("k0") and queue.exists("k0")
        assert queue.batch_exists(["k0", "nope", "k2"]) == [True, False, True]
        buf = bytearray(SIZE)
        assert queue.get_into("k1", buf) and bytes(buf) == value_for("k1", SIZE)
        assert not queue.get_into("nope", buf)
        with pytest.raises(SizeMismatch, match="k1"):
            queue.get_into("k1", bytearray(SIZE - 1))
        queue.flush()
        assert all(f.result() is None for f in futures.values())
        assert store.batch_get(["k0", "k1", "k2"]) == {f"k{i}": value_for(f"k{i}", SIZE) for i in range(3)}
        got = {f"k{i}": bytearray(SIZE) for i in range(3)}
        assert queue.batch_get_into(got) == dict.fromkeys(got, True)
        assert all(bytes(v) == value_for(k, SIZE) for k, v in got.items())


def test_full_buckets_are_written_without_flush(store: BucketStore) -> None:
    with OffloadQueue(store) as queue:
        futures = queue.put_batch({f"k{i}": value_for(f"k{i}", SIZE) for i in range(16)})  # two full buckets
        assert wait_all(futures) == dict.fromkeys(futures)
        assert store.stats().buckets == 2


def test_partial_bucket_is_written_after_the_delay(tmp_path: Path) -> None:
    with BucketStore.open(tmp_path / "s", durability="relaxed", group_max_delay_s=0.01) as store, OffloadQueue(store) as queue:
        future = queue.put("lonely", value_for("lonely", SIZE))
        assert future.result(timeout=60) is None  # no flush: the deadline wrote it
        assert store.exists("lonely")


def test_many_producers_every_key_stored_once(store: BucketStore) -> None:
    seen: list[str] = []
    seen_lock = threading.Lock()
    futures: dict[str, Future[None]] = {}

    def on_done(key: str, error: BaseException | None) -> None:
        assert error is None
        with seen_lock:
            seen.append(key)

    def produce(thread: int) -> None:
        for batch in range(10):
            keys = [f"t{thread}-{batch}-{i}" for i in range(5)]
            mine = queue.put_batch({k: value_for(k, SIZE) for k in keys}, callback=on_done)
            with seen_lock:
                futures.update(mine)

    with OffloadQueue(store, workers=3, max_staged_bytes=64 * SIZE, max_delay_s=0.005) as queue:
        threads = [threading.Thread(target=produce, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        queue.flush()
        assert queue.stats().staged_bytes == 0
    assert len(futures) == 400 and all(f.result() is None for f in futures.values())
    assert sorted(seen) == sorted(futures)  # each callback exactly once
    assert store.stats().keys == 400
    sample = random.Random(1).sample(sorted(futures), 40)
    assert store.batch_get(sample) == {k: value_for(k, SIZE) for k in sample}


def test_readers_during_flush_always_get_the_right_bytes(store: BucketStore) -> None:
    keys = [f"r{i}" for i in range(120)]
    errors: list[str] = []
    stop = threading.Event()

    def read() -> None:
        rng = random.Random(threading.get_ident())
        buf = bytearray(SIZE)
        while not stop.is_set():
            key = rng.choice(keys)
            if not queue.get_into(key, buf):
                errors.append(f"{key} missing")
            elif bytes(buf) != value_for(key, SIZE):
                errors.append(f"{key} wrong bytes")

    with OffloadQueue(store, workers=2) as queue:
        futures = queue.put_batch({k: value_for(k, SIZE) for k in keys})
        readers = [threading.Thread(target=read) for _ in range(4)]
        for reader in readers:
            reader.start()
        queue.flush()  # objects move from staging to the store under the readers
        stop.set()
        for reader in readers:
            reader.join()
    assert errors == []
    assert all(f.result() is None for f in futures.values())


# -- completion order ------------------------------------------------------------
def test_callbacks_run_after_durability_before_the_future(store: BucketStore) -> None:
    checks: list[tuple[str, bool, bool]] = []
    futures: dict[str, Future[None]] = {}

    def on_done(key: str, error: BaseException | None) -> None:
        assert error is None
        checks.append((key, store.exists(key), futures[key].done()))

    with OffloadQueue(store) as queue:  # nothing is written before flush (no time flush)
        futures.update(queue.put_batch({f"k{i}": value_for(f"k{i}", SIZE) for i in range(20)}, callback=on_done))
        queue.flush()
        assert len(checks) == 20  # flush returned after every callback
    assert all(stored and not future_done for _, stored, future_done in checks)


def bucket_contents(store: BucketStore) -> list[list[str]]:
    """Each bucket's keys, buckets in write order."""
    return [store.bucket_keys(b) for b in store.bucket_ids()]


def test_each_put_batch_gets_buckets_of_its_own(store: BucketStore) -> None:
    # bucket_keys_limit=8 and no time flush: batches are not pooled into full buckets.
    with OffloadQueue(store, workers=1) as queue:
        batches = [[f"a{i}" for i in range(3)], [f"b{i}" for i in range(3)], [f"c{i:02}" for i in range(10)]]
        futures: dict[str, Future[None]] = {}
        for keys in batches:
            futures.update(queue.put_batch({k: value_for(k, SIZE) for k in keys}))
        assert wait_all(futures) == dict.fromkeys(futures)  # written without flush
    assert bucket_contents(store) == [batches[0], batches[1], batches[2][:8], batches[2][8:]]


def test_put_objects_are_pooled_apart_from_batches(store: BucketStore) -> None:
    with OffloadQueue(store, workers=1) as queue:
        singles = stage_each(queue, {f"p{i}": value_for(f"p{i}", SIZE) for i in range(3)})
        batch = queue.put_batch({f"b{i}": value_for(f"b{i}", SIZE) for i in range(2)})
        assert wait_all(batch) == dict.fromkeys(batch)
        assert not any(future.done() for future in singles.values())  # a partial bucket waits for more
        singles.update(stage_each(queue, {f"p{i}": value_for(f"p{i}", SIZE) for i in range(3, 5)}))
        queue.flush()
        assert wait_all(singles) == dict.fromkeys(singles)
    assert bucket_contents(store) == [["b0", "b1"], [f"p{i}" for i in range(5)]]


def test_bucket_per_batch_off_pools_batches(store: BucketStore) -> None:
    with OffloadQueue(store, workers=1, bucket_per_batch=False) as queue:
        for n in range(3):
            queue.put_batch({f"b{n}-{i}": value_for(f"b{n}-{i}", SIZE) for i in range(3)})
        queue.flush()
    assert [len(keys) for keys in bucket_contents(store)] == [8, 1]


def test_callbacks_follow_staging_order(store: BucketStore) -> None:
    order: list[str] = []
    keys = [f"k{i:02d}" for i in range(30)]
    with OffloadQueue(store, workers=1) as queue:
        for key in keys:
            queue.put(key, value_for(key, SIZE), callback=lambda k, e: order.append(k))
        queue.flush()
    assert order == keys


def test_a_failing_callback_does_not_lose_keys(store: BucketStore) -> None:
    def explode(key: str, error: BaseException | None) -> None:
        raise RuntimeError("callback bug")

    with OffloadQueue(store) as queue:
        futures = queue.put_batch({f"k{i}": b"x" for i in range(10)}, callback=explode)
        queue.flush()
    assert wait_all(futures) == dict.fromkeys(futures)


# -- duplicates ------------------------------------------------------------------
def test_duplicates_join_or_skip(store: BucketStore) -> None:
    with OffloadQueue(store) as queue:
        first = queue.put("dup", value_for("dup", SIZE))
        second = queue.put("dup", value_for("dup", SIZE))  # joins the staged write
        assert queue.stats().staged_keys == 1
        queue.flush()
        assert first.result() is None and second.result() is None
        buckets = store.stats().buckets
        again = queue.put("dup", value_for("dup", SIZE))  # already stored: not rewritten
        queue.flush()
        assert again.result() is None
        assert store.stats().buckets == buckets and store.stats().keys == 1


# -- backpressure ----------------------------------------------------------------
def gated_store(tmp_path: Path) -> tuple[BucketStore, GateFS]:
    gate = GateFS()
    store = BucketStore.open(tmp_path / "g", filesystem=gate, durability="relaxed", bucket_keys_limit=2, group_max_delay_s=0.0)
    gate.armed = True
    return store, gate


def test_backpressure_reject(tmp_path: Path) -> None:
    store, gate = gated_store(tmp_path)
    try:
        queue = OffloadQueue(store, max_staged_bytes=4 * SIZE, backpressure="reject")
        futures = queue.put_batch({"a": bytes(SIZE), "b": bytes(SIZE)})  # one full bucket: being written
        gate.entered.wait(timeout=60)
        futures.update(queue.put_batch({"c": bytes(SIZE), "d": bytes(SIZE)}))
        with pytest.raises(CapacityExceeded, match="'e'"):
            queue.put("e", bytes(SIZE))
        with pytest.raises(CapacityExceeded):
            queue.put_batch({"e": bytes(SIZE), "f": bytes(SIZE)})
        assert not queue.exists("e") and not queue.exists("f")  # nothing was staged
        assert queue.put("a", bytes(SIZE)) is not None  # a staged key needs no room
        assert queue.stats().staged_bytes == 4 * SIZE
        gate.release.set()
        queue.close()
        assert wait_all(futures) == dict.fromkeys(futures)
    finally:
        gate.release.set()
        store.close()


def test_backpressure_block_timeout(tmp_path: Path) -> None:
    store, gate = gated_store(tmp_path)
    try:
        queue = OffloadQueue(store, max_staged_bytes=2 * SIZE, backpressure="block", put_timeout=0.01)
        futures = queue.put_batch({"a": bytes(SIZE), "b": bytes(SIZE)})
        gate.entered.wait(timeout=60)
        with pytest.raises(CapacityExceeded, match="put_timeout"):
            queue.put("c", bytes(SIZE))  # the timeout bounds the wait
        assert not queue.exists("c")
        gate.release.set()
        queue.close()
        assert wait_all(futures) == dict.fromkeys(futures)
    finally:
        gate.release.set()
        store.close()


def test_backpressure_block_waits_for_room(tmp_path: Path) -> None:
    store, gate = gated_store(tmp_path)
    try:
        queue = OffloadQueue(store, max_staged_bytes=4 * SIZE, backpressure="block")
        futures = queue.put_batch({"a": bytes(SIZE), "b": bytes(SIZE)})
        gate.entered.wait(timeout=60)
        futures.update(queue.put_batch({"c": bytes(SIZE), "d": bytes(SIZE)}))
        late: dict[str, Future[None]] = {}
        producer = threading.Thread(target=lambda: late.update(queue.put_batch({"e": bytes(SIZE), "f": bytes(SIZE)})))
        producer.start()
        # While the write is held no key can resolve, so the producer cannot have staged.
        assert queue.stats().staged_bytes == 4 * SIZE and not late
        gate.release.set()  # the first bucket completes and makes room
        producer.join(timeout=60)
        assert not producer.is_alive()
        queue.close()
        assert wait_all({**futures, **late}) == dict.fromkeys([*futures, *late])
        assert store.stats().keys == 6
    finally:
        gate.release.set()
        store.close()


def test_an_object_larger_than_the_limit_is_taken_alone(store: BucketStore) -> None:
    with OffloadQueue(store, max_staged_bytes=SIZE, backpressure="reject") as queue:
        future = queue.put("big", bytes(3 * SIZE))
        with pytest.raises(CapacityExceeded):
            queue.put("next", b"x")
        queue.flush()
        assert future.result() is None
        following = queue.put("next", b"x")  # room again
        queue.flush()
        assert following.result() is None


def small_staging_store(tmp_path: Path) -> BucketStore:
    """Buckets far larger than the staging area, and no time flush within any test."""
    return BucketStore.open(tmp_path / "small", durability="relaxed", bucket_size_limit=1 << 20, group_max_delay_s=3600.0)


def test_a_full_staging_area_sends_the_partial_bucket_off(tmp_path: Path) -> None:
    # Only 4 objects fit in the staging area and a bucket takes 256: a put that
    # waits for room must get it from the partial bucket at once, not after
    # group_max_delay_s. put_timeout fires only when that does not happen.
    with small_staging_store(tmp_path) as store:
        queue = OffloadQueue(store, max_staged_bytes=4 * SIZE, backpressure="block", put_timeout=60)
        futures = {f"k{i:02}": queue.put(f"k{i:02}", value_for(f"k{i:02}", SIZE)) for i in range(12)}
        assert store.batch_exists([f"k{i:02}" for i in range(8)]) == [True] * 8  # written to make room
        queue.close()
        assert wait_all(futures) == dict.fromkeys(futures)
        buckets = [sorted(store.bucket_keys(b)) for b in store.bucket_ids()]
        assert buckets == [[f"k{i:02}" for i in range(n, n + 4)] for n in (0, 4, 8)]
        assert store.batch_get(futures) == {key: value_for(key, SIZE) for key in futures}


def test_a_rejected_put_sends_the_partial_bucket_off(tmp_path: Path) -> None:
    with small_staging_store(tmp_path) as store:
        queue = OffloadQueue(store, max_staged_bytes=4 * SIZE, backpressure="reject")
        futures = {f"k{i}": queue.put(f"k{i}", value_for(f"k{i}", SIZE)) for i in range(4)}
        with pytest.raises(CapacityExceeded, match="'k4'"):
            queue.put("k4", value_for("k4", SIZE))
        # No flush: the rejection alone writes the partial bucket (the timeout fires only if not).
        assert {key: future.exception(timeout=60) for key, future in futures.items()} == dict.fromkeys(futures)
        assert [sorted(store.bucket_keys(b)) for b in store.bucket_ids()] == [sorted(futures)]
        following = queue.put("k4", value_for("k4", SIZE))  # room again
        queue.close()
        assert following.result() is None and store.exists("k4")


# -- flush and close -------------------------------------------------------------
def test_close_flushes_and_then_refuses(store: BucketStore) -> None:
    queue = OffloadQueue(store)
    futures = queue.put_batch({f"k{i}": b"v" for i in range(3)})
    queue.close()
    assert all(f.done() and f.result() is None for f in futures.values())
    assert store.batch_exists(list(futures)) == [True] * 3
    with pytest.raises(StoreClosed):
        queue.put("late", b"v")
    queue.close()  # idempotent
    assert not store.closed  # the queue does not own the store
    assert queue.closed


def test_flush_timeout(tmp_path: Path) -> None:
    store, gate = gated_store(tmp_path)
    try:
        queue = OffloadQueue(store)
        future = queue.put("stuck", b"v")
        with pytest.raises(TimeoutError):
            queue.flush(timeout=0.01)
        gate.release.set()
        queue.flush()
        assert future.result() is None
        queue.close()
    finally:
        gate.release.set()
        store.close()


def test_flush_from_a_callback_is_refused(store: BucketStore) -> None:
    seen: list[BaseException] = []

    def reenter(key: str, error: BaseException | None) -> None:
        try:
            queue.flush()
        except KvBucketError as exc:
            seen.append(exc)

    with OffloadQueue(store) as queue:
        future = queue.put("k", b"v", callback=reenter)
        queue.flush()
    assert future.result() is None and len(seen) == 1


def test_flush_of_an_idle_queue_returns(store: BucketStore) -> None:
    with OffloadQueue(store) as queue:
        queue.flush(timeout=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_staged_bytes": 0},
        {"backpressure": "drop"},
        {"put_timeout": -1},
        {"workers": 0},
        {"max_delay_s": -0.5},
        {"max_staged_bytes": True},
        {"workers": True},
        {"put_timeout": True},
        {"put_timeout": float("nan")},
        {"max_delay_s": False},
        {"max_delay_s": float("nan")},
    ],
)
def test_bad_arguments(store: BucketStore, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        OffloadQueue(store, **kwargs)


def test_bad_keys_and_values_stage_nothing(store: BucketStore) -> None:
    with OffloadQueue(store) as queue:
        for key in ("", 7, "x" * 5000):
            with pytest.raises(InvalidArgument):
                queue.put(key, b"v")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="'s'"):
            queue.put("s", "text")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            queue.put_batch({"ok": b"v", "bad": 3})  # type: ignore[dict-item]
        with pytest.raises(InvalidArgument):
            queue.put_batch({})
        assert queue.stats().staged_keys == 0



def test_staging_a_good_value_composes_no_message_naming_its_key(store: BucketStore) -> None:
    ReprCountingKey.reprs = 0
    with OffloadQueue(store) as queue:
        queue.put(ReprCountingKey("one"), b"v" * 8)
        queue.put_batch({ReprCountingKey(f"k{i}"): [b"a", bytearray(b"bc")] for i in range(5)})
        assert ReprCountingKey.reprs == 0
        with pytest.raises(InvalidArgument, match="'bad'"):  # a bad value is still named by its key
            queue.put(ReprCountingKey("bad"), "text")  # type: ignore[arg-type]
        queue.flush()
    assert store.batch_get(["one", "k0"]) == {"one": b"v" * 8, "k0": b"abc"}


@pytest.mark.parametrize(
    "call",
    [
        lambda q: q.put_batch("ab"),
        lambda q: q.put_batch(b"ab"),
        lambda q: q.put_batch(None),
        lambda q: q.put_batch([("k", b"v", 1)]),
        lambda q: q.is_staged(5),
        lambda q: q.exists(5),
        lambda q: q.batch_exists("ab"),
        lambda q: q.batch_exists(None),
        lambda q: q.batch_exists(["a", 5]),
        lambda q: q.get_into(5, bytearray(1)),
        lambda q: q.batch_get_into(["a"]),
        lambda q: q.batch_get_into({b"a": bytearray(1)}),
    ],
    ids=["put str", "put bytes", "put None", "put triple", "is_staged int", "exists int", "batch_exists str",
         "batch_exists None", "batch_exists int key", "get_into int", "get_into list", "get_into bytes key"],
)
def test_bad_key_arguments_are_invalid(store: BucketStore, call: Any) -> None:
    with OffloadQueue(store) as queue:
        queue.put("a", b"v")
        queue.flush()
        with pytest.raises(InvalidArgument):
            call(queue)
        assert queue.stats().staged_keys == 0
        assert queue.batch_exists(["a", "b"]) == [True, False]


# -- nothing is ever dropped -------------------------------------------------------
def test_every_key_accounted_for_under_io_errors(tmp_path: Path) -> None:
    faults = FaultFS(write_every=5, sync_every=3)
    path = tmp_path / "f"
    store = BucketStore.open(path, filesystem=faults, bucket_keys_limit=4, group_max_delay_s=0.0)
    faults.armed = True
    outcomes: dict[str, BaseException | None] = {}
    lock = threading.Lock()

    def on_done(key: str, error: BaseException | None) -> None:
        with lock:
            assert key not in outcomes, f"{key} resolved twice"
            outcomes[key] = error

    with OffloadQueue(store, workers=2) as queue:
        futures: dict[str, Future[None]] = {}
        for batch in range(30):
            futures.update(queue.put_batch({f"b{batch}-{i}": value_for(f"b{batch}-{i}", SIZE) for i in range(3)}, callback=on_done))
        queue.flush()
        stats = queue.stats()
    assert faults.injected > 0
    results = wait_all(futures)
    assert results == outcomes  # callbacks and futures agree, every key resolved once
    failed = sorted(k for k, e in results.items() if e is not None)
    stored = sorted(k for k, e in results.items() if e is None)
    assert failed and stored
    assert all(isinstance(results[k], (KvBucketError, OSError)) for k in failed)
    assert (stats.stored_keys, stats.failed_keys) == (len(stored), len(failed))
    assert store.batch_exists(failed) == [False] * len(failed)
    assert store.batch_get(stored) == {k: value_for(k, SIZE) for k in stored}
    assert_clean_directory(path)

    faults.armed = False  # the store stays usable: the failed keys go through now
    with OffloadQueue(store) as queue:
        retry = queue.put_batch({k: value_for(k, SIZE) for k in failed})
        queue.flush()
    assert wait_all(retry) == dict.fromkeys(failed)
    store.close()
    with BucketStore.open(path) as reopened:
        assert reopened.recovery_report.removed_files == []
        assert reopened.stats().keys == len(results)


class DroppingStore:
    """A store whose grouper forgets keys (Mooncake #3006) or fails outright."""

    def __init__(self, store: BucketStore, mode: str) -> None:
        self._store, self._mode = store, mode
        self.dropped: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def group_for_offload(self, sizes: dict[str, int], flush: bool = False) -> list[list[str]]:
        return self._damage(sizes, lambda: self._store.group_for_offload(sizes, flush=flush))

    def group_batch(self, sizes: dict[str, int]) -> list[list[str]]:
        return self._damage(sizes, lambda: self._store.group_batch(sizes))

    def _damage(self, sizes: dict[str, int], group: Any) -> list[list[str]]:
        if self._mode == "fail" and sizes:
            raise KvBucketError("grouper exploded")
        groups = group()
        if self._mode == "drop" and groups and len(groups[0]) > 1:
            self.dropped.append(groups[0].pop())  # emitted nowhere, pending nowhere
        return groups


def stage_each(queue: OffloadQueue, objects: dict[str, bytes]) -> dict[str, Future[None]]:
    """Stage ``objects`` one ``put`` at a time (pooled by the store's grouper)."""
    return {key: queue.put(key, value) for key, value in objects.items()}


STAGING = {"put_batch": OffloadQueue.put_batch, "put": stage_each}


@pytest.mark.parametrize("stage", STAGING.values(), ids=list(STAGING))
def test_keys_the_grouper_drops_are_still_written(store: BucketStore, stage: Any) -> None:
    dropping = DroppingStore(store, "drop")
    with OffloadQueue(dropping) as queue:
        futures = stage(queue, {f"k{i}": value_for(f"k{i}", SIZE) for i in range(20)})
        queue.flush()
    assert dropping.dropped
    assert wait_all(futures) == dict.fromkeys(futures)
    assert store.batch_exists(list(futures)) == [True] * 20


@pytest.mark.parametrize("stage", STAGING.values(), ids=list(STAGING))
def test_a_failing_grouper_fails_its_keys_loudly(store: BucketStore, stage: Any) -> None:
    with OffloadQueue(DroppingStore(store, "fail")) as queue:
        futures = stage(queue, {f"k{i}": b"v" for i in range(5)})
        queue.flush()
    assert all("grouper exploded" in str(e) for e in wait_all(futures).values())


def test_a_closed_store_fails_keys_instead_of_hanging(tmp_path: Path) -> None:
    store = BucketStore.open(tmp_path / "c", durability="relaxed", group_max_delay_s=0.0)
    queue = OffloadQueue(store)
    futures = queue.put_batch({"a": b"1", "b": b"2"})
    store.close()
    queue.close()
    assert all(isinstance(e, StoreClosed) for e in wait_all(futures).values())


# -- kill -9 ---------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import hashlib, sys, threading
    from kvbucket import BucketStore
    from kvbucket.pipeline import OffloadQueue

    def value_for(key, size):
        seed = hashlib.sha256(key.encode()).digest()
        return (seed * (size // len(seed) + 1))[:size]

    # strict durability, the default eviction policy; argv[3]: max_physical_bytes (0: none)
    store = BucketStore.open(sys.argv[1], bucket_keys_limit=8, max_physical_bytes=int(sys.argv[3]))
    lock = threading.Lock()

    def write(lines):
        with lock:
            sys.stdout.write("".join(line + "\\n" for line in lines))
            sys.stdout.flush()

    def report(key, error):
        if error is None:
            write([key])

    def evicted(keys):  # before the files go: a key reported here may be gone
        write("-" + key for key in keys)

    store.add_eviction_listener(evicted)  # foreground and background evictions
    queue = OffloadQueue(store, max_staged_bytes=1 << 20, workers=2, max_delay_s=0.01)
    buffer = bytearray(16384)
    i = 0
    while True:  # offload until killed: batches (a bucket each), single puts (pooled), reads
        keys = [f"{sys.argv[2]}k{i + j}" for j in range(3)]
        queue.put_batch({k: value_for(k, 16384) for k in keys}, callback=report)
        single = f"{sys.argv[2]}s{i}"
        queue.put(single, value_for(single, 16384), callback=report)
        if i % 9 == 6:  # a read promotes its bucket out of 2Q's probation
            queue.get_into(f"{sys.argv[2]}k{i - 6}", buffer)
        i += 3
    """
)


def run_and_kill(path: Path, prefix: str, after: int, limit: int = 0) -> tuple[list[str], set[str]]:
    """Run the offloading child; SIGKILL it once ``after`` keys were reported
    stored. Returns the keys reported stored and those reported evicted."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), prefix, str(limit)], stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert child.stdout is not None
        while sum(not line.startswith("-") for line in lines) < after:
            line = child.stdout.readline()
            assert line, f"child ended early with {child.wait()}"
            lines.append(line.strip())
    finally:
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate()
    assert child.returncode == -signal.SIGKILL
    lines += rest.split()  # reported before it died: acknowledged too
    return [line for line in lines if not line.startswith("-")], {line[1:] for line in lines if line.startswith("-")}


def test_kill_9_during_offload_loses_no_reported_key(tmp_path: Path) -> None:
    path = tmp_path / "killed"
    acknowledged: list[str] = []
    for round_, after in enumerate((7, 60, 150)):  # kill at different points of the stream
        stored, evicted = run_and_kill(path, f"r{round_}-", after)
        assert not evicted
        acknowledged += stored
        with BucketStore.open(path) as store:
            assert_clean_directory(path)
            assert store.batch_get(acknowledged) == {k: value_for(k, 16384) for k in acknowledged}
            assert store.stats().keys >= len(acknowledged)


def test_kill_9_during_offload_with_eviction_loses_only_evicted_keys(tmp_path: Path) -> None:
    path, limit = tmp_path / "evicting", 48 * 16384
    acknowledged: set[str] = set()
    evicted: set[str] = set()
    for round_, after in enumerate((40, 150)):
        stored, gone = run_and_kill(path, f"r{round_}-", after, limit)
        acknowledged.update(stored)
        evicted |= gone
        # No background eviction while checking: it would evict what is checked.
        with BucketStore.open(path, max_physical_bytes=limit, background_eviction=False) as store:
            assert store.config.eviction_policy == "2q"
            assert_clean_directory(path)
            kept = sorted(acknowledged - evicted)
            assert store.batch_get(kept) == {k: value_for(k, 16384) for k in kept}
            for key in (k for k in sorted(evicted) if store.exists(k)):  # killed between on_evict and the deletion
                assert store.batch_get([key]) == {key: value_for(key, 16384)}
            assert store.stats().physical_bytes <= limit
    assert len(evicted) > 100  # the limit holds about 40 objects: eviction ran all along
