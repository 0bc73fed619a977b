"""Readers verifying bytes while a writer offloads and a deleter deletes."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from kvbucket import BucketStore
from kvbucket._core.fs import FileSystem
from kvbucket.errors import KeyNotFound, StoreClosed
from storeutil import SetOnRecord, value_for

SIZE = 64 << 10


class PausingReads(FileSystem):
    """The first ``preadv`` after :meth:`arm` sets ``entered`` and waits for ``release``."""

    def __init__(self) -> None:
        self.armed, self.entered, self.release = threading.Event(), threading.Event(), threading.Event()

    def arm(self) -> None:
        self.armed.set()

    def preadv(self, fd, buffers, offset):  # type: ignore[no-untyped-def]
        if self.armed.is_set() and not self.entered.is_set():
            self.entered.set()
            self.release.wait()
        return super().preadv(fd, buffers, offset)


def test_reads_stay_correct_under_writes_and_deletes(store_dir: Path) -> None:
    store = BucketStore.open(store_dir, io_threads=4)
    written: list[list[str]] = []
    written_lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = {"loaded": 0, "vanished": 0, "deleted": 0}

    def writer() -> None:
        for b in range(60):
            keys = [f"b{b}-{i}" for i in range(8)]
            store.batch_offload({k: value_for(k, SIZE) for k in keys})
            with written_lock:
                written.append(keys)
        stop.set()

    def deleter() -> None:
        while not stop.is_set():
            ids = store.bucket_ids()
            if len(ids) > 6:
                store.delete_bucket(ids[len(ids) // 2])
                counts["deleted"] += 1

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set() or counts["loaded"] < 50:
            with written_lock:
                if not written:
                    continue
                keys = written[int(rng.integers(len(written)))]
            buffers = {k: np.empty(SIZE, dtype=np.uint8) for k in keys}
            try:
                store.batch_load(buffers)
            except KeyNotFound:
                counts["vanished"] += 1
                continue
            for key, buf in buffers.items():
                assert buf.tobytes() == value_for(key, SIZE), key
            counts["loaded"] += 1

    def guarded(target, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
            stop.set()

    jobs = [(writer, ()), (deleter, ()), (reader, (1,)), (reader, (2,)), (reader, (3,))]
    threads = [threading.Thread(target=guarded, args=(f, *a)) for f, a in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert counts["loaded"] >= 50 and counts["deleted"] > 0
    for bucket_id in store.bucket_ids():
        keys = store.bucket_keys(bucket_id)
        assert store.batch_get(keys) == {k: value_for(k, SIZE) for k in keys}
    store.close()


def test_a_read_in_flight_completes_when_its_bucket_is_deleted(store_dir: Path) -> None:
    """The pinned descriptor keeps the unlinked data file readable."""
    fs = PausingReads()
    store = BucketStore.open(store_dir, filesystem=fs)
    bucket_id = store.batch_offload({"a": value_for("a", SIZE)})
    result: dict[str, bytes] = {}
    fs.arm()
    reader = threading.Thread(target=lambda: result.update(store.batch_get(["a"])))
    reader.start()
    fs.entered.wait()
    store.delete_bucket(bucket_id)
    assert not (store_dir / f"{bucket_id}.bucket").exists()
    fs.release.set()
    reader.join()
    assert result == {"a": value_for("a", SIZE)}
    assert not store.exists("a")
    store.close()


def test_refresh_during_a_read_keeps_the_descriptor_cache_whole(store_dir: Path) -> None:
    """The retired bucket of a refresh and its replacement share an id: the
    old one's last unpin closes only its own descriptor."""
    with BucketStore.open(store_dir) as writer:
        writer.batch_offload({"a": value_for("a", SIZE), "b": value_for("b", SIZE)})
    fs = PausingReads()
    reader_store = BucketStore.open(store_dir, readonly=True, filesystem=fs)
    result: dict[str, bytes] = {}
    fs.arm()
    reader = threading.Thread(target=lambda: result.update(reader_store.batch_get(["a"])))
    reader.start()
    fs.entered.wait()
    reader_store.refresh()  # retires the pinned bucket; the new one gets the same id
    assert reader_store.batch_get(["b"]) == {"b": value_for("b", SIZE)}  # opens the new bucket's descriptor
    fs.release.set()
    reader.join()
    assert result == {"a": value_for("a", SIZE)}
    for _ in range(3):
        assert reader_store.batch_get(["a", "b"]) == {"a": value_for("a", SIZE), "b": value_for("b", SIZE)}
    reader_store.close()


def test_readers_and_a_refresher_on_a_readonly_store(store_dir: Path) -> None:
    """The readonly+refresh pattern under threads: no error, every byte right."""
    keys = [f"k{i}" for i in range(16)]
    with BucketStore.open(store_dir) as writer:
        for start in range(0, len(keys), 4):
            writer.batch_offload({k: value_for(k, SIZE) for k in keys[start : start + 4]})
    store = BucketStore.open(store_dir, readonly=True, io_threads=4)
    done = threading.Event()
    errors: list[BaseException] = []
    reads = [0]

    def reader(offset: int) -> None:
        i = offset
        while not done.is_set():
            batch = [keys[(i + j) % len(keys)] for j in range(1 + i % 5)]
            assert store.batch_get(batch) == {k: value_for(k, SIZE) for k in batch}
            reads[0] += 1
            i += 3

    def refresher() -> None:
        for _ in range(100):
            store.refresh()

    def guarded(target, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
        finally:
            if target is refresher or errors:
                done.set()

    threads = [threading.Thread(target=guarded, args=(reader, n)) for n in range(3)]
    threads.append(threading.Thread(target=guarded, args=(refresher,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert reads[0] > 0
    assert store.batch_get(keys) == {k: value_for(k, SIZE) for k in keys}
    store.close()




def test_close_lets_a_load_past_its_lookup_finish(store_dir: Path) -> None:
    """A load that has pinned its buckets but not yet started its I/O lanes
    when close() begins completes with the right bytes; close() returns after
    it; a load that starts after close() raises StoreClosed."""
    store = BucketStore.open(store_dir, io_threads=2)
    store.batch_offload({"a": value_for("a", SIZE), "b": value_for("b", SIZE)})
    assert store.batch_get(["a", "b"]) == {"a": value_for("a", SIZE), "b": value_for("b", SIZE)}  # starts the I/O pool
    looked_up, proceed = threading.Event(), threading.Event()
    pin = store._catalog.pin

    def pausing_pin(*args):  # type: ignore[no-untyped-def]
        pinned = pin(*args)
        looked_up.set()  # the lookup pinned the buckets; no read has started
        proceed.wait()
        return pinned

    store._catalog.pin = pausing_pin  # type: ignore[method-assign]
    buffers = {"a": bytearray(SIZE), "b": bytearray(SIZE)}
    errors: list[BaseException] = []

    def load() -> None:
        try:
            store.batch_load(buffers)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    def close() -> None:
        store.close()
        proceed.set()  # close() returned without waiting for the load

    waiting = SetOnRecord("batch(es) in flight", proceed)  # or close() waits for it
    store_log = logging.getLogger("kvbucket._core.loads")
    level = store_log.level
    store_log.setLevel(logging.DEBUG)
    store_log.addHandler(waiting)
    try:
        loader = threading.Thread(target=load)
        loader.start()
        looked_up.wait()
        closer = threading.Thread(target=close)
        closer.start()
        proceed.wait()
        with pytest.raises(StoreClosed):
            store.batch_get(["a"])
        loader.join()
        closer.join()
    finally:
        store_log.removeHandler(waiting)
        store_log.setLevel(level)
    assert errors == []
    assert buffers == {"a": bytearray(value_for("a", SIZE)), "b": bytearray(value_for("b", SIZE))}
    assert store.closed

