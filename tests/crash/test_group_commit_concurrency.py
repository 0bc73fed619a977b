"""Group commit on several threads: the protocol's order, checked as the calls happen.

The power-loss, kill -9 and fault sweeps run group commits in turn (their
file systems say ``concurrent_syncs = False``: they count calls and record
one order). Here :class:`OrderCheckingFS` lets a group run concurrently and
checks, at each call, what the commit protocol requires of that moment:

* a meta is renamed only after its bucket's data ``fdatasync`` and its own
  ``fsync`` returned;
* the directory ``fsync`` comes after every rename, with no other call of
  the group in flight and no file of it open for writing;
* no file of a bucket is unlinked while a call on that bucket's files is
  in flight or one of them is open for writing (a failed group is removed
  only once every task ended).

The data syncs of a group meet at a barrier, so a group that ran them one
after another fails. Two canaries (a meta published beside its data rather
than after it; a failed group cleaned up without waiting for its tasks) must
be caught.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, as_completed
from functools import partial

import pytest

import kvbucket._core.bucket_files as bucket_files
import kvbucket._core.commit as commit
from crash_fs import FdNames
from kvbucket import BucketStore, StorageIOError
from kvbucket._core.commit import NewBucket
from kvbucket._core.fs import FileSystem

GROUP = 3
WAIT_S = 10  # a safety net only: every wait below ends on an event first


def _bucket(name: str) -> str:
    """The bucket id part of a file name (``7.bucket``, ``7.meta.tmp`` -> ``7``)."""
    return name.split(".", 1)[0]


def _group_file(name: str) -> bool:
    return name.endswith(".bucket") or name.endswith(".meta.tmp")


class OrderCheckingFS(FdNames):
    """Runs group commits concurrently and records each protocol break in ``violations``.

    ``events`` lists ``(call, file name, thread name)`` in the order the
    calls started. ``sync_gate``, when set, is called with the file name at
    the start of each sync of a data file or temporary meta (tests hold or
    fail syncs there).
    """

    concurrent_syncs = True

    def __init__(self, inner: FileSystem | None = None) -> None:
        super().__init__(inner)
        self._state = threading.Lock()
        self.violations: list[str] = []
        self.events: list[tuple[str, str, str]] = []
        self.data_synced: set[str] = set()  # bucket ids whose data fdatasync returned
        self.meta_synced: set[str] = set()  # temporary metas whose fsync returned
        self.unrenamed: set[str] = set()  # temporary metas created, not yet renamed
        self.writing: dict[int, str] = {}  # descriptors of group files open for writing -> bucket id
        self.in_flight = 0
        self.busy: Counter[str] = Counter()  # bucket id -> calls on its files in flight
        self.sync_gate: Callable[[str], None] | None = None
        self.renamed = threading.Event()
        self.unlinked_busy = threading.Event()

    def clear_events(self) -> None:
        with self._state:
            self.events.clear()

    def _enter(self, call: str, name: str) -> None:
        with self._state:
            self.events.append((call, name, threading.current_thread().name))
            self.in_flight += 1
            if _group_file(name):
                self.busy[_bucket(name)] += 1

    def _leave(self, name: str) -> None:
        with self._state:
            self.in_flight -= 1
            if _group_file(name):
                self.busy[_bucket(name)] -= 1

    def _violation(self, what: str) -> None:
        with self._state:
            self.violations.append(what)

    def _run(self, call: str, name: str, operation: Callable[[], object]) -> object:
        self._enter(call, name)
        try:
            return operation()
        finally:
            self._leave(name)

    def open(self, path, flags, mode=0o644):
        name = os.path.basename(path)
        fd = self._run("open", name, lambda: super(OrderCheckingFS, self).open(path, flags, mode))
        if _group_file(name) and flags & os.O_CREAT:
            with self._state:
                self.writing[fd] = _bucket(name)
                if name.endswith(".meta.tmp"):
                    self.unrenamed.add(name)
        return fd

    def close(self, fd):
        name = self.fd_name.get(fd, "")
        self._run("close", name, lambda: super(OrderCheckingFS, self).close(fd))
        with self._state:
            self.writing.pop(fd, None)

    def pwritev(self, fd, buffers, offset):
        return self._run("pwritev", self.fd_name.get(fd, ""), lambda: super(OrderCheckingFS, self).pwritev(fd, buffers, offset))

    def fstat(self, fd):
        return self._run("fstat", self.fd_name.get(fd, ""), lambda: super(OrderCheckingFS, self).fstat(fd))

    def fdatasync(self, fd):
        name = self.fd_name.get(fd, "")

        self._run("fdatasync", name, lambda: self._gate(name) or super(OrderCheckingFS, self).fdatasync(fd))
        if name.endswith(".bucket"):
            with self._state:
                self.data_synced.add(_bucket(name))

    def fsync(self, fd):
        name = self.fd_name.get(fd, "")
        self._run("fsync", name, lambda: self._gate(name) or super(OrderCheckingFS, self).fsync(fd))
        if name.endswith(".meta.tmp"):
            with self._state:
                self.meta_synced.add(name)

    def _gate(self, name: str) -> None:
        if _group_file(name) and self.sync_gate is not None:
            self.sync_gate(name)

    def rename(self, src, dst):
        name = os.path.basename(src)
        if name.endswith(".meta.tmp"):
            with self._state:
                data_synced, meta_synced = _bucket(name) in self.data_synced, name in self.meta_synced
            if not data_synced:
                self._violation(f"{name} renamed before its data's fdatasync returned")
            if not meta_synced:
                self._violation(f"{name} renamed before its fsync returned")
        self._run("rename", name, lambda: super(OrderCheckingFS, self).rename(src, dst))
        with self._state:
            self.unrenamed.discard(name)
        self.renamed.set()

    def fsync_dir(self, path):
        with self._state:
            busy = (sorted(self.unrenamed), self.in_flight, len(self.writing))
        if busy != ([], 0, 0):
            self._violation(f"directory fsync with metas {busy[0]} not renamed, {busy[1]} call(s) in flight, {busy[2]} file(s) open")
        self._run("fsync_dir", "", lambda: super(OrderCheckingFS, self).fsync_dir(path))

    def unlink(self, path):
        name = os.path.basename(path)
        bucket_id = _bucket(name)
        with self._state:
            busy = (self.busy[bucket_id], sum(b == bucket_id for b in self.writing.values()))
        if busy != (0, 0):
            self._violation(f"{name} unlinked with {busy[0]} call(s) on its bucket in flight and {busy[1]} of its files open for writing")
            self.unlinked_busy.set()
        self._run("unlink", name, lambda: super(OrderCheckingFS, self).unlink(path))


def batches(tag: str, n: int = GROUP) -> list[dict[str, bytes]]:
    return [{f"{tag}{i}.{j}": bytes([i * 8 + j]) * (8192 + j) for j in range(2)} for i in range(n)]


@pytest.fixture
def fs_and_store(tmp_path) -> Iterator[tuple[OrderCheckingFS, BucketStore]]:
    fs = OrderCheckingFS()
    with BucketStore.open(tmp_path / "s", filesystem=fs, durability="strict", io_mode="buffered") as store:
        fs.clear_events()
        yield fs, store


def syncs_meet(fs: OrderCheckingFS, suffix: str, *, fail_one: bool = False, others_wait_for: threading.Event | None = None) -> threading.Event:
    """The syncs of files ending in ``suffix`` wait until ``GROUP`` of them
    started (chaining onto the gate already set for other files). With
    ``fail_one``, one of them raises EIO and sets the returned event, and the
    others wait for ``others_wait_for`` (by default that event) before syncing:
    they are mid-sync when the error is raised."""
    barrier = threading.Barrier(GROUP, timeout=WAIT_S)
    failed = threading.Event()
    released = others_wait_for or failed
    earlier = fs.sync_gate

    def gate(name: str) -> None:
        if not name.endswith(suffix):
            if earlier is not None:
                earlier(name)
            return
        first = barrier.wait() == 0
        if fail_one and first:
            failed.set()
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if fail_one:
            released.wait(WAIT_S)

    fs.sync_gate = gate
    return failed


def group_files(directory) -> set[str]:
    return {n for n in os.listdir(directory) if n != "LOCK"}


def test_group_runs_each_phase_concurrently_in_protocol_order(fs_and_store):
    fs, store = fs_and_store
    syncs_meet(fs, ".bucket")
    syncs_meet(fs, ".meta.tmp")
    group = batches("g")
    ids = store.offload_group(group)
    assert not fs.violations, fs.violations
    for suffix in (".bucket", ".meta.tmp"):
        threads = {thread for call, name, thread in fs.events if call in ("fdatasync", "fsync") and name.endswith(suffix)}
        assert len(threads) == GROUP and all(t.startswith("kvbucket-commit") for t in threads), (suffix, threads)
    calls = [call for call, _, _ in fs.events]
    assert calls.count("fdatasync") == calls.count("fsync") == GROUP and calls.count("fsync_dir") == 1
    assert calls[-1] == "fsync_dir", "the group returned before its directory fsync was its last call"
    assert len(set(ids)) == GROUP
    for batch in group:
        assert store.batch_get(list(batch)) == batch


def test_lone_bucket_makes_its_calls_in_turn_on_the_callers_thread(fs_and_store):
    fs, store = fs_and_store
    (bucket_id,) = store.offload_group(batches("one", 1))
    data, tmp = f"{bucket_id}.bucket", f"{bucket_id}.meta.tmp"
    expected = [("open", data), ("pwritev", data), ("fdatasync", data), ("fstat", data), ("close", data)]
    expected += [("open", tmp), ("pwritev", tmp), ("fsync", tmp), ("fstat", tmp), ("close", tmp), ("rename", tmp), ("fsync_dir", "")]
    assert [(call, name) for call, name, _ in fs.events] == expected
    assert {thread for _, _, thread in fs.events} == {threading.current_thread().name}
    assert not fs.violations, fs.violations


@pytest.mark.parametrize("suffix", [".bucket", ".meta.tmp"], ids=["data_fdatasync", "meta_fsync"])
def test_failed_sync_removes_the_group_after_every_task_ended(fs_and_store, suffix):
    fs, store = fs_and_store
    before = group_files(store.path)
    failed = syncs_meet(fs, suffix, fail_one=True)
    group = batches("f")
    with pytest.raises(StorageIOError):
        store.offload_group(group)
    assert failed.is_set()
    assert not fs.violations, fs.violations
    calls = [(call, name) for call, name, _ in fs.events]
    first_cleanup = next(i for i, (call, name) in enumerate(calls) if call == "unlink" and not name.endswith(".meta.tmp"))
    closes = [i for i, (call, name) in enumerate(calls) if call == "close" and name.endswith(suffix)]
    assert len(closes) == GROUP and max(closes) < first_cleanup, "a file of the group was still open when its cleanup began"
    assert "fsync_dir" not in {call for call, _ in calls}
    assert group_files(store.path) == before, "a file of the failed group was left"
    assert not any(store.batch_exists([k for batch in group for k in batch]))
    fs.sync_gate = None
    store.offload_group(group)  # the store goes on
    for batch in group:
        assert store.batch_get(list(batch)) == batch


# -- canaries: broken concurrent group commits the checks must catch ---------


def write_group_meta_beside_data(
    fs: FileSystem, directory: str, buckets: Sequence[NewBucket], *, durable: bool, pool: Executor | None = None
) -> list[int]:
    """Canary: each bucket's meta is published by a task of its own, concurrently with its data."""
    assert pool is not None
    for bucket in buckets:
        if bucket.checksums is not None:
            bucket.meta.crcs = bucket.checksums()
    data = [partial(commit._write_data, fs, directory, b.meta, b.values, durable=durable) for b in buckets]
    metas = [partial(commit._publish, fs, directory, b.meta, durable=durable) for b in buckets]
    physical = commit._concurrently(pool, data + metas)
    fs.fsync_dir(directory)
    return [a + b for a, b in zip(physical[: len(buckets)], physical[len(buckets) :])]


def concurrently_without_waiting(pool: Executor, tasks: Sequence[Callable[[], int]]) -> list[int]:
    """Canary: raises the first error as soon as it comes, tasks still running."""
    futures = [pool.submit(task) for task in tasks]
    for future in as_completed(futures):
        future.result()
    return [future.result() for future in futures]


def test_canary_meta_renamed_before_its_data_sync_is_caught(fs_and_store, monkeypatch):
    fs, store = fs_and_store
    monkeypatch.setattr(bucket_files, "write_group", write_group_meta_beside_data)

    def data_syncs_wait_for_a_rename(name: str) -> None:
        if name.endswith(".bucket"):
            fs.renamed.wait(WAIT_S)

    fs.sync_gate = data_syncs_wait_for_a_rename
    store.offload_group(batches("c"))
    assert any("before its data's fdatasync returned" in v for v in fs.violations), fs.violations


def test_canary_cleanup_before_every_task_ended_is_caught(fs_and_store, monkeypatch):
    fs, store = fs_and_store
    monkeypatch.setattr(commit, "_concurrently", concurrently_without_waiting)
    syncs_meet(fs, ".bucket", fail_one=True, others_wait_for=fs.unlinked_busy)
    with pytest.raises(StorageIOError):
        store.offload_group(batches("u"))
    assert any("unlinked with" in v for v in fs.violations), fs.violations
