"""The I/O engine: parallel loads, write chunking, direct and buffered buckets."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from kvbucket import BucketStore
from kvbucket._core.format import ALIGNMENT
from kvbucket._core.fs import WRITE_CHUNK, FileSystem
from kvbucket.errors import CorruptionError, SizeMismatch, StorageIOError
from storeutil import our_files, value_for


def sizes_with_edges() -> list[int]:
    return [0, 1, ALIGNMENT - 1, ALIGNMENT, ALIGNMENT + 1, 3 * ALIGNMENT + 17, 1 << 20, WRITE_CHUNK + 5]


@pytest.mark.parametrize("writer_mode, reader_mode", [("buffered", "direct"), ("direct", "buffered"), ("direct", "direct"), ("buffered", "buffered")])
def test_each_mode_reads_the_other(store_dir: Path, writer_mode: str, reader_mode: str) -> None:
    values = {f"k{i}": value_for(f"k{i}", size) for i, size in enumerate(sizes_with_edges())}
    with BucketStore.open(store_dir, io_mode=writer_mode) as store:
        bucket_id = store.batch_offload({k: [v[:7], v[7:]] for k, v in values.items()})
    data_size = os.path.getsize(store_dir / f"{bucket_id}.bucket")
    assert (data_size % ALIGNMENT == 0) if writer_mode == "direct" else data_size == sum(map(len, values.values()))
    with BucketStore.open(store_dir, io_mode=reader_mode, io_threads=4) as store:
        assert store.batch_get(list(values)) == values
        buffers = {k: np.empty(len(v), dtype=np.uint8) for k, v in values.items()}
        store.batch_load(buffers)
        assert all(buffers[k].tobytes() == v for k, v in values.items())


def test_parallel_load_into_numpy_and_bytearray(store_dir: Path) -> None:
    with BucketStore.open(store_dir, io_threads=8, bucket_keys_limit=16) as store:
        keys = [f"p{i}" for i in range(64)]
        for start in range(0, 64, 16):
            store.batch_offload({k: value_for(k, 100_000) for k in keys[start : start + 16]})
        buffers = {k: (np.empty(100_000, dtype=np.uint8) if i % 2 else bytearray(100_000)) for i, k in enumerate(keys)}
        store.batch_load(buffers)
        assert all(bytes(buffers[k]) == value_for(k, 100_000) for k in keys)


class CountingWrites(FileSystem):
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def pwritev(self, fd, buffers, offset):  # type: ignore[no-untyped-def]
        self.calls.append((len(buffers), sum(len(b) for b in buffers)))
        return super().pwritev(fd, buffers, offset)


def test_writes_are_chunked(store_dir: Path) -> None:
    fs = CountingWrites()
    with BucketStore.open(store_dir, filesystem=fs) as store:
        store.batch_offload({"big": b"x" * (3 * WRITE_CHUNK + 1), "many": [b"y"] * 5000})
        assert store.batch_get(["many"])["many"] == b"y" * 5000
    data_calls = fs.calls[:-1]  # the last call writes the meta
    assert max(n for n, _ in data_calls) <= os.sysconf("SC_IOV_MAX")
    assert max(size for _, size in data_calls) <= WRITE_CHUNK


class ShortWrites(FileSystem):
    """Every pwritev writes at most 1000 bytes, as a kernel may."""

    def pwritev(self, fd, buffers, offset):  # type: ignore[no-untyped-def]
        budget, clipped = 1000, []
        for buf in buffers:
            if budget == 0:
                break
            clipped.append(buf[:budget])
            budget -= len(clipped[-1])
        return super().pwritev(fd, clipped, offset)


def test_short_writes_are_looped(store_dir: Path) -> None:
    values = {f"k{i}": value_for(f"k{i}", 10_000 + i) for i in range(5)}
    with BucketStore.open(store_dir, filesystem=ShortWrites()) as store:
        store.batch_offload({k: [v[:3333], v[3333:]] for k, v in values.items()})
    with BucketStore.open(store_dir) as store:
        assert store.batch_get(list(values)) == values


class FailingReads(FileSystem):
    armed = False

    def preadv(self, fd, buffers, offset):  # type: ignore[no-untyped-def]
        if self.armed:
            raise OSError(errno.EIO, "Input/output error")
        return super().preadv(fd, buffers, offset)


def test_read_error_is_typed_and_names_the_key(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        store.batch_offload({"a": b"1", "b": b"2"})
    fs = FailingReads()
    with BucketStore.open(store_dir, filesystem=fs) as store:
        fs.armed = True
        with pytest.raises(StorageIOError, match="'a'") as caught:
            store.batch_get(["a"])
        assert caught.value.errno == errno.EIO
        with pytest.raises(StorageIOError):
            store.batch_load({"a": bytearray(1), "b": bytearray(1)})


def test_flipped_byte_raises_corruption_naming_key_and_bucket(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        bucket_id = store.batch_offload({"a": b"hello", "b": b"world"})
    with open(store_dir / f"{bucket_id}.bucket", "r+b") as f:
        f.seek(7)
        f.write(b"X")
    with BucketStore.open(store_dir, io_threads=2) as store:
        assert store.batch_get(["a"]) == {"a": b"hello"}
        with pytest.raises(CorruptionError, match=rf"'b' in bucket {bucket_id}"):
            store.batch_get(["b"])
        with pytest.raises(CorruptionError):
            store.batch_load({"a": bytearray(5), "b": bytearray(5)})
    assert our_files(store_dir) == [f"{bucket_id}.bucket", f"{bucket_id}.meta"]


def test_many_buckets_bounded_descriptors(store_dir: Path) -> None:
    from kvbucket._core.read_path import MAX_OPEN_DESCRIPTORS

    with BucketStore.open(store_dir) as store:
        for b in range(MAX_OPEN_DESCRIPTORS + 20):
            store.batch_offload({f"k{b}": b"v%d" % b})
        for b in range(MAX_OPEN_DESCRIPTORS + 20):
            assert store.batch_get([f"k{b}"]) == {f"k{b}": b"v%d" % b}
        open_fds = len(os.listdir("/proc/self/fd"))
        assert open_fds < MAX_OPEN_DESCRIPTORS + 50


def test_open_wraps_io_errors(store_dir: Path) -> None:
    fs = FailingReads()
    fs.armed = True
    with pytest.raises(StorageIOError):
        BucketStore.open(store_dir, filesystem=fs)
    BucketStore.open(store_dir).close()  # the failed open left the lock free


@pytest.mark.parametrize("mode", ["buffered", "direct"])
def test_load_scatters_into_a_list_of_buffers(store_dir: Path, mode: str) -> None:
    """A page's K and V halves can live in separate buffers (no bounce copy)."""
    value = value_for("page", 3 * ALIGNMENT + 100)
    with BucketStore.open(store_dir, io_mode=mode) as store:
        store.batch_offload({"page": value, "other": b"x"})
        k, v = bytearray(ALIGNMENT + 7), np.empty(2 * ALIGNMENT + 93, dtype=np.uint8)
        store.batch_load({"page": [k, v], "other": [bytearray(1)]})
        assert bytes(k) + v.tobytes() == value
        with pytest.raises(SizeMismatch):
            store.batch_load({"page": [bytearray(10), bytearray(10)]})
