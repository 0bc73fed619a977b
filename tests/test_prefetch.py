"""The prefetch hint: BucketStore.prefetch.

Every ``posix_fadvise(WILLNEED)`` goes through the FileSystem seam
(:class:`AdviceLog`), which records it and can hold it mid-flight, so every
interleaving here is forced, never timed. ``close()`` waits for the hints
in flight (they pin their buckets), so after it the log is complete.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from kvbucket import BucketStore
from kvbucket._core.format import data_name
from kvbucket._core.fs import FileSystem
from kvbucket.errors import InvalidArgument, StoreClosed
from storeutil import value_for

WAIT_S = 30  # a bound on event waits, so that a broken store fails the test instead of hanging it


class AdviceLog(FileSystem):
    """Records every WILLNEED hint as ``(data file, offset, length, error)``.

    With :attr:`hold` set, a hint first sets :attr:`entered` and waits for
    :attr:`release`; with :attr:`failing`, every hint raises EIO.
    """

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.advice: list[tuple[str, int, int, str | None]] = []
        self.hold = False
        self.failing = False
        self.entered, self.release = threading.Event(), threading.Event()
        self._lock = threading.Lock()

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        with self._lock:
            self.names[fd] = os.path.basename(path)
        return fd

    def advise_willneed(self, fd: int, offset: int, length: int) -> None:
        if self.hold:
            self.entered.set()
            assert self.release.wait(WAIT_S)
        with self._lock:
            name = self.names[fd]
        error: str | None = None
        try:
            if self.failing:
                raise OSError(errno.EIO, "injected")
            super().advise_willneed(fd, offset, length)
        except OSError as exc:
            error = exc.strerror
            raise
        finally:
            with self._lock:
                self.advice.append((name, offset, length, error))


def _offload(store: BucketStore, prefix: str, sizes: list[int]) -> tuple[int, list[str]]:
    """One bucket of objects of ``sizes``; its id and keys."""
    keys = [f"{prefix}{i}" for i in range(len(sizes))]
    bucket_id = store.batch_offload({key: value_for(key, size) for key, size in zip(keys, sizes)})
    assert bucket_id is not None
    return bucket_id, keys


def test_prefetch_counts_the_stored_keys_once_and_ignores_unknown_ones(tmp_path: Path) -> None:
    with BucketStore.open(tmp_path / "s") as store:
        _, a = _offload(store, "a", [100, 200, 300])
        _, b = _offload(store, "b", [400])
        assert store.prefetch([a[0], a[2], b[0], "never-stored", a[0]]) == 3
        assert store.prefetch(["never-stored"]) == 0
        assert store.prefetch([]) == 0


def test_hints_cover_exactly_the_stored_ranges_adjacent_objects_merged(tmp_path: Path) -> None:
    fs = AdviceLog()
    store = BucketStore.open(tmp_path / "s", filesystem=fs)
    bucket_a, a = _offload(store, "a", [1000, 2000, 3000, 4000, 0])
    bucket_b, b = _offload(store, "b", [500, 600, 700])
    metas = store.batch_query(a + b)
    assert store.prefetch([a[3], a[0], a[1], b[2], a[4], "x"]) == 5
    store.close()
    expected = [
        (data_name(bucket_a), metas[a[0]].offset, 3000, None),  # a0 and a1 touch: one range
        (data_name(bucket_a), metas[a[3]].offset, 4000, None),
        (data_name(bucket_b), metas[b[2]].offset, 700, None),
    ]  # the empty a4 has no range (a length of 0 would mean the whole file)
    assert sorted(fs.advice) == sorted(expected)


@pytest.mark.parametrize("change", ["delete", "compact"])
def test_a_bucket_deleted_while_its_hint_is_given_is_still_hinted_safely(tmp_path: Path, change: str) -> None:
    fs = AdviceLog()
    store = BucketStore.open(tmp_path / "s", filesystem=fs)
    bucket_id, keys = _offload(store, "k", [4096, 4096, 4096])
    store.remove(keys.pop())  # dead bytes for compact() to reclaim
    offset = store.batch_query(keys)[keys[0]].offset
    fs.hold = True
    assert store.prefetch(keys) == 2  # returns while the hint waits
    assert fs.entered.wait(WAIT_S)
    if change == "delete":
        store.delete_bucket(bucket_id)  # unlinks the files while the hint is held
    else:
        assert store.compact(min_dead_ratio=0.1) > 0  # rewrites the live objects elsewhere, then deletes the bucket
        assert store.batch_get(keys) == {key: value_for(key, 4096) for key in keys}
    assert not (tmp_path / "s" / data_name(bucket_id)).exists()
    fs.release.set()
    store.close()
    # the pinned descriptor stayed open: the hint went to the deleted file, not to a closed or reused fd
    assert fs.advice == [(data_name(bucket_id), offset, 8192, None)]


def test_a_bucket_gone_before_the_hint_is_skipped(tmp_path: Path) -> None:
    with BucketStore.open(tmp_path / "s") as writer:
        gone, first = _offload(writer, "a", [100, 200])
        _, second = _offload(writer, "b", [300])
        fs = AdviceLog()
        with BucketStore.open(tmp_path / "s", readonly=True, filesystem=fs) as reader:
            writer.delete_bucket(gone)  # the reader's index still lists it
            assert reader.prefetch(first + second) == 1
        assert [name for name, *_ in fs.advice] == [data_name(writer.batch_query(second)[second[0]].bucket_id)]


def test_a_failing_hint_is_dropped_and_loads_still_work(tmp_path: Path) -> None:
    fs = AdviceLog()
    fs.failing = True
    with BucketStore.open(tmp_path / "s", filesystem=fs) as store:
        _, keys = _offload(store, "k", [100, 200])
        assert store.prefetch(keys) == 2
        assert store.batch_get(keys) == {key: value_for(key, size) for key, size in zip(keys, [100, 200])}
    assert fs.advice and all(error is not None for *_, error in fs.advice)  # close() returned: every pin was released


def test_direct_io_gives_no_hint(tmp_path: Path) -> None:
    fs = AdviceLog()
    with BucketStore.open(tmp_path / "s", io_mode="direct", filesystem=fs) as store:
        _, keys = _offload(store, "k", [4096, 8192])
        assert store.prefetch(keys) == 0
    assert fs.advice == []


def test_prefetch_on_a_closed_store_raises(tmp_path: Path) -> None:
    store = BucketStore.open(tmp_path / "s")
    _, keys = _offload(store, "k", [10])
    store.close()
    with pytest.raises(StoreClosed):
        store.prefetch(keys)
    direct = BucketStore.open(tmp_path / "d", io_mode="direct")
    direct.close()
    with pytest.raises(StoreClosed):
        direct.prefetch(keys)


@pytest.mark.parametrize("keys", ["k0", b"k0", 5, [1], ["k0", None]])
def test_prefetch_refuses_bad_arguments(tmp_path: Path, keys: object) -> None:
    fs = AdviceLog()
    with BucketStore.open(tmp_path / "s", filesystem=fs) as store:
        _offload(store, "k", [10])
        with pytest.raises(InvalidArgument, match=r"prefetch|keys must be str"):
            store.prefetch(keys)  # type: ignore[arg-type]
    assert fs.advice == []
