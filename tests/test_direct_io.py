"""O_DIRECT fast paths of datafile: aligned caller memory goes straight to and
from the file, everything else through staging; the bytes are the same."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from kvbucket import BucketStore
from kvbucket._core import datafile
from kvbucket._core.format import ALIGNMENT, aligned_layout
from kvbucket._core.fs import O_DIRECT, WRITE_CHUNK, FileSystem
from storeutil import value_for

pytestmark = pytest.mark.skipif(not O_DIRECT, reason="no O_DIRECT on this platform")


def round_up(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def aligned_array(n: int, fill: bytes = b"") -> np.ndarray:
    """A writable uint8 array at a page-aligned address (mmap-backed)."""
    area = mmap.mmap(-1, max(round_up(n), ALIGNMENT))
    array = np.frombuffer(area, dtype=np.uint8, count=n)
    if fill:
        array[:] = np.frombuffer(fill, dtype=np.uint8)
    assert array.ctypes.data % ALIGNMENT == 0
    return array


def unaligned_bytearray(data: bytes) -> memoryview:
    """A view of ``data`` at an address that is not page-aligned."""
    buf = bytearray(len(data) + ALIGNMENT)
    view = memoryview(buf)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    skip = 1 if base % ALIGNMENT == 0 else 0
    out = view[skip : skip + len(data)]
    out[:] = data
    return out


def address(view) -> int:  # type: ignore[no-untyped-def]
    """Where ``view``'s bytes start (read-only views too)."""
    view = memoryview(view).cast("B")
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


class Recording(FileSystem):
    """Records each pwritev/preadv: (offset, [(address, length), ...], thread)."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, list[tuple[int, int]], str]] = []
        self.reads: list[tuple[int, list[tuple[int, int]], str]] = []
        self.buffers: list[memoryview] = []

    @staticmethod
    def _iov(buffers):  # type: ignore[no-untyped-def]
        return [(address(b), len(b)) for b in buffers]

    def pwritev(self, fd, buffers, offset):  # type: ignore[no-untyped-def]
        self.writes.append((offset, self._iov(buffers), threading.current_thread().name))
        return super().pwritev(fd, buffers, offset)

    def preadv(self, fd, buffers, offset):  # type: ignore[no-untyped-def]
        self.reads.append((offset, self._iov(buffers), threading.current_thread().name))
        self.buffers.extend(buffers)
        return super().preadv(fd, buffers, offset)


def inside(iov: tuple[int, int], array) -> bool:
    """Whether the iovec lies in ``array``'s memory."""
    start = address(array)
    return start <= iov[0] and iov[0] + iov[1] <= start + memoryview(array).nbytes


def bytes_from(calls, arrays) -> int:
    """Bytes of ``calls`` whose iovecs point into one of ``arrays``."""
    return sum(n for _, iov, _ in calls for a, n in iov if any(inside((a, n), arr) for arr in arrays))


def write_file(path: Path, values: list[list], fs: FileSystem) -> tuple[list[int], int]:
    """Write ``values`` (lists of pieces) as an aligned data file with O_DIRECT."""
    sizes = [sum(memoryview(p).nbytes for p in pieces) for pieces in values]
    offsets, length = aligned_layout(sizes)
    fd = fs.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_DIRECT)
    try:
        datafile.write_values(fs, fd, [[memoryview(p).cast("B") for p in pieces] for pieces in values], offsets, length, True)
    finally:
        fs.close(fd)
    return offsets, length


def expected_file(values: list[bytes]) -> bytes:
    return b"".join(v + bytes(round_up(len(v)) - len(v)) for v in values)


def read(path: Path, offset: int, dests: list, fs: FileSystem, direct: bool = True) -> int:
    fd = datafile.open_for_read(fs, str(path), direct)
    try:
        return datafile.read_value(fs, fd, offset, [memoryview(d).cast("B") for d in dests], direct)
    finally:
        fs.close(fd)


# ---------------------------------------------------------------------------
# writes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64 << 10, 1 << 20])
def test_aligned_values_are_written_from_the_callers_memory(tmp_path: Path, size: int) -> None:
    datas = [value_for(f"v{i}", size) for i in range(80)]  # 5 MiB / 80 MiB: several write calls
    arrays = [aligned_array(size, d) for d in datas]
    fs = Recording()
    _, length = write_file(tmp_path / "d", [[a] for a in arrays], fs)
    assert (tmp_path / "d").read_bytes() == expected_file(datas)
    assert bytes_from(fs.writes, arrays) == length  # no byte was staged
    assert max(sum(n for _, n in iov) for _, iov, _ in fs.writes) <= WRITE_CHUNK
    assert [off for off, _, _ in fs.writes] == sorted(off for off, _, _ in fs.writes)


def test_readonly_aligned_views_are_written_directly(tmp_path: Path) -> None:
    data = value_for("ro", 5 * ALIGNMENT)
    array = aligned_array(len(data), data)
    fs = Recording()
    write_file(tmp_path / "d", [[memoryview(array).toreadonly()]], fs)
    assert (tmp_path / "d").read_bytes() == data
    assert bytes_from(fs.writes, [array]) == len(data)


def test_unaligned_tail_is_staged_and_padded_with_zeros(tmp_path: Path) -> None:
    sizes = [3 * ALIGNMENT + 100, 1, ALIGNMENT - 1, (1 << 20) + 5, ALIGNMENT]
    datas = [value_for(f"t{i}", n) for i, n in enumerate(sizes)]
    arrays = [aligned_array(len(d), d) for d in datas]
    fs = Recording()
    write_file(tmp_path / "d", [[a] for a in arrays], fs)
    assert (tmp_path / "d").read_bytes() == expected_file(datas)
    # the whole pages of each value went out from its own memory
    assert bytes_from(fs.writes, arrays) == sum(n - n % ALIGNMENT for n in sizes)


def test_unaligned_buffers_are_staged(tmp_path: Path) -> None:
    sizes = [0, 1, ALIGNMENT - 1, ALIGNMENT, ALIGNMENT + 1, 3 * ALIGNMENT + 17, 1 << 20]
    datas = [value_for(f"u{i}", n) for i, n in enumerate(sizes)]
    views = [unaligned_bytearray(d) for d in datas]
    fs = Recording()
    write_file(tmp_path / "d", [[v] for v in views], fs)
    assert (tmp_path / "d").read_bytes() == expected_file(datas)
    assert bytes_from(fs.writes, [v for v in views if len(v)]) == 0
    assert all(a % ALIGNMENT == 0 and n % ALIGNMENT == 0 for _, iov, _ in fs.writes for a, n in iov)


def test_bytes_values_are_staged_or_direct_and_exact(tmp_path: Path) -> None:
    datas = [value_for(f"b{i}", n) for i, n in enumerate([ALIGNMENT, 2 * ALIGNMENT + 3, 17])]
    write_file(tmp_path / "d", [[d] for d in datas], Recording())
    assert (tmp_path / "d").read_bytes() == expected_file(datas)


def test_split_pieces_of_aligned_memory_keep_their_aligned_middle(tmp_path: Path) -> None:
    """A value given as [first 7 bytes, rest] of one aligned buffer: the rest
    is congruent to its file position, so its whole pages go out directly."""
    data = value_for("split", 8 * ALIGNMENT + 5)
    array = aligned_array(len(data), data)
    mixed = unaligned_bytearray(value_for("mixed", 2 * ALIGNMENT + 9))
    other = aligned_array(4 * ALIGNMENT, value_for("other", 4 * ALIGNMENT))
    fs = Recording()
    write_file(tmp_path / "d", [[array[:7], array[7:]], [mixed, other]], fs)
    assert (tmp_path / "d").read_bytes() == expected_file([data, bytes(mixed) + bytes(other)])
    assert bytes_from(fs.writes, [array]) == 7 * ALIGNMENT  # pages 1..7; page 0 and the tail staged
    assert bytes_from(fs.writes, [other]) == 0  # lands at file offset ≡ 9 (mod 4096): staged


def test_long_staged_write_overlaps_in_a_background_thread(tmp_path: Path) -> None:
    datas = [value_for(f"o{i}", 3 * WRITE_CHUNK // 2 + i) for i in range(4)]
    views = [unaligned_bytearray(d) for d in datas]
    fs = Recording()
    write_file(tmp_path / "d", [[v] for v in views], fs)
    assert (tmp_path / "d").read_bytes() == expected_file(datas)
    offsets = [off for off, _, _ in fs.writes]
    assert offsets == sorted(offsets) and len(offsets) >= 6
    assert {thread for _, _, thread in fs.writes} == {"kvbucket-write_0"}
    assert threading.main_thread().name not in {thread for _, _, thread in fs.writes}


def test_long_direct_write_overlaps_planning_with_the_background_writer(tmp_path: Path) -> None:
    """Whole pages from the caller's memory, more than one batch: the batches
    go out from the writer thread while the caller plans the next one."""
    datas = [value_for(f"p{i}", 64 << 10) for i in range(3 * WRITE_CHUNK // (64 << 10))]
    arrays = [aligned_array(len(d), d) for d in datas]
    fs = Recording()
    _, length = write_file(tmp_path / "d", [[a] for a in arrays], fs)
    assert (tmp_path / "d").read_bytes() == expected_file(datas)
    assert bytes_from(fs.writes, arrays) == length  # still no byte staged
    assert len(fs.writes) >= 3
    assert {thread for _, _, thread in fs.writes} == {"kvbucket-write_0"}


class HalfWrites(FileSystem):
    """Each pwritev writes about half of what it was given (4 KiB-aligned)."""

    def pwritev(self, fd, buffers, offset):  # type: ignore[no-untyped-def]
        total = sum(len(b) for b in buffers)
        part = max(ALIGNMENT, (total // 2) - (total // 2) % ALIGNMENT)
        out, left = [], part
        for b in buffers:
            if left <= 0:
                break
            out.append(b[:left])
            left -= len(out[-1])
        return super().pwritev(fd, out, offset)


@pytest.mark.parametrize("make", [aligned_array, lambda n, d: unaligned_bytearray(d)])
def test_short_direct_writes_are_looped(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    datas = [value_for(f"s{i}", n) for i, n in enumerate([WRITE_CHUNK + 5, 64 << 10, 3 * ALIGNMENT + 1, 2 * WRITE_CHUNK])]
    write_file(tmp_path / "d", [[make(len(d), d)] for d in datas], HalfWrites())
    assert (tmp_path / "d").read_bytes() == expected_file(datas)


class FailingWrite(FileSystem):
    """EIO at the ``fail_at``-th pwritev; remembers every call."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.calls = 0

    def pwritev(self, fd, buffers, offset):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(errno.EIO, "injected")
        return super().pwritev(fd, buffers, offset)


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_background_write_error_propagates_and_nothing_stays_in_flight(tmp_path: Path, fail_at: int) -> None:
    datas = [value_for(f"e{i}", 3 * WRITE_CHUNK // 2 + 1) for i in range(4)]
    fs = FailingWrite(fail_at)
    with pytest.raises(OSError) as caught:
        write_file(tmp_path / "d", [[unaligned_bytearray(d)] for d in datas], fs)
    assert caught.value.errno == errno.EIO
    calls = fs.calls
    assert calls == fail_at  # no write was issued after the failing one
    assert not [t for t in threading.enumerate() if t.name.startswith("kvbucket-write")]


# ---------------------------------------------------------------------------
# reads
# ---------------------------------------------------------------------------


@pytest.fixture
def aligned_file(tmp_path: Path) -> tuple[Path, list[bytes], list[int]]:
    sizes = [64 << 10, 3 * ALIGNMENT + 100, 1, (1 << 20) + 5, WRITE_CHUNK + 5, ALIGNMENT]
    datas = [value_for(f"r{i}", n) for i, n in enumerate(sizes)]
    offsets, _ = write_file(tmp_path / "d", [[d] for d in datas], FileSystem())
    return tmp_path / "d", datas, offsets


def test_aligned_destination_is_read_into_directly(aligned_file) -> None:  # type: ignore[no-untyped-def]
    path, datas, offsets = aligned_file
    for data, offset in zip(datas, offsets):
        dest = aligned_array(len(data))
        fs = Recording()
        assert read(path, offset, [dest], fs) == len(data)
        assert dest.tobytes() == data
        whole = len(data) - len(data) % ALIGNMENT
        assert bytes_from(fs.reads, [dest]) == whole
        # only the unaligned tail is staged, in a buffer sized to it
        staged = sum(n for _, iov, _ in fs.reads for a, n in iov if not inside((a, n), dest))
        assert staged == (ALIGNMENT if len(data) % ALIGNMENT else 0)
        assert len(fs.reads) == 1


def test_unaligned_destination_is_staged_in_a_buffer_sized_to_it(aligned_file) -> None:  # type: ignore[no-untyped-def]
    path, datas, offsets = aligned_file
    dest = unaligned_bytearray(bytes(len(datas[0])))
    fs = Recording()
    assert read(path, offsets[0], [dest], fs) == len(datas[0])
    assert bytes(dest) == datas[0]
    assert bytes_from(fs.reads, [dest]) == 0
    assert [len(b.obj) for b in fs.buffers] == [64 << 10]  # not a 4 MiB staging buffer


def test_large_unaligned_destination_is_read_in_staged_chunks(aligned_file) -> None:  # type: ignore[no-untyped-def]
    path, datas, offsets = aligned_file
    dest = unaligned_bytearray(bytes(len(datas[4])))
    fs = Recording()
    assert read(path, offsets[4], [dest], fs) == len(datas[4])
    assert bytes(dest) == datas[4]
    assert all(sum(n for _, n in iov) <= datafile.STAGING_BYTES for _, iov, _ in fs.reads)


def test_scatter_into_mixed_pieces(aligned_file) -> None:  # type: ignore[no-untyped-def]
    path, datas, offsets = aligned_file
    data, offset = datas[3], offsets[3]  # 1 MiB + 5
    k = unaligned_bytearray(bytes(ALIGNMENT + 7))
    v = aligned_array(len(data) - len(k) - 100)
    w = bytearray(100)
    fs = Recording()
    assert read(path, offset, [k, v, w], fs) == len(data)
    assert bytes(k) + v.tobytes() + bytes(w) == data
    assert bytes_from(fs.reads, [v]) == 0  # v starts at file offset ≡ 4103: not congruent
    # the same split of one aligned buffer: its middle is congruent again
    whole = aligned_array(len(data))
    fs = Recording()
    assert read(path, offset, [whole[:7], whole[7 : 3 * ALIGNMENT], whole[3 * ALIGNMENT :]], fs) == len(data)
    assert whole.tobytes() == data
    assert bytes_from(fs.reads, [whole]) == (len(data) // ALIGNMENT - 1) * ALIGNMENT


@pytest.mark.parametrize("size", [1, ALIGNMENT - 1, ALIGNMENT, ALIGNMENT + 1, 3 * ALIGNMENT + 17, 1 << 20, WRITE_CHUNK + 5])
def test_direct_reads_of_a_packed_file(tmp_path: Path, size: int) -> None:
    """A buffered writer's packed file: values at unaligned offsets."""
    data = value_for("p", size)
    path = tmp_path / "packed"
    path.write_bytes(b"x" * 13 + data + b"y" * 9)
    for dest in (aligned_array(size), unaligned_bytearray(bytes(size))):
        assert read(path, 13, [dest], FileSystem()) == size
        assert bytes(dest) == data


def test_short_file_reads_short(aligned_file) -> None:  # type: ignore[no-untyped-def]
    path, datas, offsets = aligned_file
    offset = offsets[4]  # a value of WRITE_CHUNK + 5 bytes
    with open(path, "r+b") as f:
        f.truncate(offset + 2 * ALIGNMENT)  # a power cut dropped the rest
    for dest in (aligned_array(4 * ALIGNMENT), unaligned_bytearray(bytes(4 * ALIGNMENT))):
        assert read(path, offset, [dest], FileSystem()) == 2 * ALIGNMENT
        assert bytes(dest[: 2 * ALIGNMENT]) == datas[4][: 2 * ALIGNMENT]
    assert read(path, offset, [aligned_array(len(datas[4]))], FileSystem()) == 2 * ALIGNMENT
    assert read(path, offset + 2 * ALIGNMENT, [aligned_array(ALIGNMENT)], FileSystem()) == 0


class HalfReads(FileSystem):
    """Each preadv reads about half of what it was asked (4 KiB-aligned)."""

    def preadv(self, fd, buffers, offset):  # type: ignore[no-untyped-def]
        total = sum(len(b) for b in buffers)
        part = max(ALIGNMENT, (total // 2) - (total // 2) % ALIGNMENT)
        out, left = [], part
        for b in buffers:
            if left <= 0:
                break
            out.append(b[:left])
            left -= len(out[-1])
        return super().preadv(fd, out, offset)


def test_short_direct_reads_are_looped(aligned_file) -> None:  # type: ignore[no-untyped-def]
    path, datas, offsets = aligned_file
    for data, offset in zip(datas, offsets):
        for dest in (aligned_array(len(data)), unaligned_bytearray(bytes(len(data)))):
            assert read(path, offset, [dest], HalfReads()) == len(data)
            assert bytes(dest) == data


# ---------------------------------------------------------------------------
# through the store
# ---------------------------------------------------------------------------


def test_store_round_trip_uses_the_fast_paths(store_dir: Path) -> None:
    keys = [f"page{i}" for i in range(40)]
    datas = {k: value_for(k, 64 << 10) for k in keys}
    sources = {k: aligned_array(64 << 10, d) for k, d in datas.items()}
    fs = Recording()
    with BucketStore.open(store_dir, io_mode="direct", io_threads=4, filesystem=fs) as store:
        store.batch_offload(sources)
        assert bytes_from(fs.writes, list(sources.values())) == 40 * (64 << 10)
        dests = {k: aligned_array(64 << 10) for k in keys}
        store.batch_load(dests)
        assert all(dests[k].tobytes() == datas[k] for k in keys)
        assert bytes_from(fs.reads, list(dests.values())) == 40 * (64 << 10)
        # K/V halves in separate aligned buffers, and an unaligned bytearray
        halves = {k: [aligned_array(32 << 10), aligned_array(32 << 10)] for k in keys[:8]}
        halves[keys[8]] = [bytearray(100), bytearray((64 << 10) - 100)]
        store.batch_load(halves)
        assert all(b"".join(bytes(p) for p in halves[k]) == datas[k] for k in halves)
        assert store.batch_get(keys[:3]) == {k: datas[k] for k in keys[:3]}
