"""Readers verifying bytes while a writer offloads and a deleter deletes."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from kvbucket import BucketStore
from kvbucket.errors import KeyNotFound
from storeutil import value_for

SIZE = 64 << 10


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
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=guarded, args=(f, *a)) for f, a in [(writer, ()), (deleter, ()), (reader, (1,)), (reader, (2,)), (reader, (3,))]]
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
    from kvbucket.fs import FileSystem

    armed, entered, release = threading.Event(), threading.Event(), threading.Event()

    class PausingReads(FileSystem):
        def preadv(self, fd, buffers, offset):  # type: ignore[no-untyped-def]
            if armed.is_set() and not entered.is_set():
                entered.set()
                release.wait()
            return super().preadv(fd, buffers, offset)

    store = BucketStore.open(store_dir, filesystem=PausingReads())
    bucket_id = store.batch_offload({"a": value_for("a", SIZE)})
    result: dict[str, bytes] = {}
    armed.set()
    reader = threading.Thread(target=lambda: result.update(store.batch_get(["a"])))
    reader.start()
    entered.wait()
    store.delete_bucket(bucket_id)
    assert not (store_dir / f"{bucket_id}.bucket").exists()
    release.set()
    reader.join()
    assert result == {"a": value_for("a", SIZE)}
    assert not store.exists("a")
    store.close()
