"""io_mode: "auto" (the default) reads buffered and writes each bucket
aligned with O_DIRECT or packed and buffered by its object sizes; "direct"
needs a file system that accepts O_DIRECT and says so at open."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kvbucket import BucketConfig, BucketStore, InvalidArgument, StorageIOError
from kvbucket._core import write_mode
from kvbucket._core.format import ALIGNMENT, LOCK_NAME, decode_meta, meta_name
from kvbucket._core.fs import O_DIRECT, FileSystem
from kvbucket._core.write_mode import AUTO_DIRECT_MIN_OBJECT, WriteMode
from storeutil import snapshot, value_for

pytestmark = pytest.mark.skipif(not O_DIRECT, reason="no O_DIRECT on this platform")

KiB, MiB = 1 << 10, 1 << 20


class OpenFlags(FileSystem):
    """Records the flags of every open, by file name; ``refuse_direct``
    makes every O_DIRECT open fail with EINVAL, as tmpfs on older kernels
    and some FUSE file systems do."""

    def __init__(self, refuse_direct: bool = False) -> None:
        self.opens: list[tuple[str, int]] = []
        self.refuse_direct = refuse_direct

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        self.opens.append((os.path.basename(path), flags))
        if self.refuse_direct and flags & O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return super().open(path, flags, mode)

    def data_opens(self, writing: bool) -> list[tuple[str, int]]:
        """(name, flags) of each open of a data file, for writing or for reading."""
        return [(n, f) for n, f in self.opens if n.endswith(".bucket") and _writes(f) == writing]

    def direct_data_reads(self) -> list[str]:
        """Data files opened with O_DIRECT for reading."""
        return [n for n, f in self.data_opens(writing=False) if f & O_DIRECT]

    def direct_probes(self) -> list[tuple[str, int]]:
        """(name, flags) of each O_DIRECT open of a file that is not a data file."""
        return [(n, f) for n, f in self.opens if f & O_DIRECT and not n.endswith(".bucket")]


def _writes(flags: int) -> bool:
    return bool(flags & (os.O_WRONLY | os.O_RDWR))


def aligned_flag(store_dir: Path, bucket_id: int) -> bool:
    """The aligned flag the bucket's meta file records."""
    return decode_meta((store_dir / meta_name(bucket_id)).read_bytes(), bucket_id).aligned


def values(tag: str, sizes: list[int]) -> dict[str, bytes]:
    return {f"{tag}{i}": value_for(f"{tag}{i}", size) for i, size in enumerate(sizes)}


def test_the_default_is_auto() -> None:
    assert BucketConfig().io_mode == "auto"
    assert BucketConfig.from_env({"KVBUCKET_IO_MODE": "AUTO"}, path="x").validated().io_mode == "auto"
    with pytest.raises(InvalidArgument, match="io_mode must be one of auto, buffered, direct"):
        BucketConfig(path="x", io_mode="o_direct").validated()  # type: ignore[arg-type]


def test_auto_writes_large_aligned_objects_with_o_direct(store_dir: Path) -> None:
    fs = OpenFlags()
    with BucketStore.open(store_dir, filesystem=fs) as store:
        bucket_id = store.batch_offload(values("big", [1 * MiB] * 3))
    assert aligned_flag(store_dir, bucket_id)
    [(name, flags)] = fs.data_opens(writing=True)
    assert flags & O_DIRECT, f"{name} was written without O_DIRECT"
    assert os.path.getsize(store_dir / name) == 3 * MiB  # no padding


@pytest.mark.parametrize(
    "sizes",
    [
        [64 * KiB] * 4,  # aligned sizes, mean below the threshold
        [1 * MiB, 1 * MiB + 1],  # large, but one size is not a multiple of 4 KiB
        [1 * MiB, 5000, 1 * MiB],  # large mean, an odd size
    ],
    ids=["small", "large-odd", "mixed-odd"],
)
def test_auto_writes_small_or_odd_objects_packed_and_buffered(store_dir: Path, sizes: list[int]) -> None:
    fs = OpenFlags()
    with BucketStore.open(store_dir, filesystem=fs) as store:
        bucket_id = store.batch_offload(values("v", sizes))
    assert not aligned_flag(store_dir, bucket_id)
    [(name, flags)] = fs.data_opens(writing=True)
    assert not flags & O_DIRECT
    assert os.path.getsize(store_dir / name) == sum(sizes)  # packed


def test_auto_threshold_is_on_the_mean_object_size() -> None:
    mode = WriteMode("auto", direct_ok=True)
    at, below = AUTO_DIRECT_MIN_OBJECT, AUTO_DIRECT_MIN_OBJECT - ALIGNMENT
    assert mode.aligned([at, at])
    assert mode.aligned([at + ALIGNMENT, below])  # mean exactly the threshold
    assert not mode.aligned([at, below])
    assert not mode.aligned([])
    assert not WriteMode("auto", direct_ok=False).aligned([4 * at])
    assert WriteMode("direct", direct_ok=True).aligned([1])
    assert not WriteMode("buffered", direct_ok=True).aligned([4 * at])


def test_auto_reads_everything_buffered_and_round_trips_both_layouts(store_dir: Path) -> None:
    big, small = values("big", [1 * MiB, 2 * MiB]), values("small", [64 * KiB, 4097, 0])
    fs = OpenFlags()
    with BucketStore.open(store_dir, filesystem=fs) as store:
        big_id = store.batch_offload(big)
        [small_id, big_again_id] = store.offload_group([small, values("group", [512 * KiB] * 2)])
        assert store.batch_get(list(big) + list(small)) == {**big, **small}
    assert (aligned_flag(store_dir, big_id), aligned_flag(store_dir, small_id), aligned_flag(store_dir, big_again_id)) == (True, False, True)
    everything = {**big, **small, **values("group", [512 * KiB] * 2)}
    for reopen in (FileSystem(), OpenFlags()):
        with BucketStore.open(store_dir, filesystem=reopen) as store:
            got = store.batch_get(list(everything))
            dests = {k: bytearray(len(v)) for k, v in everything.items()}
            store.batch_load(dests)
        assert got == everything
        assert {k: bytes(d) for k, d in dests.items()} == everything
    assert fs.data_opens(writing=False), "the store read its data files"
    assert not fs.direct_data_reads()
    assert isinstance(reopen, OpenFlags) and reopen.data_opens(writing=False) and not reopen.direct_data_reads()
    with BucketStore.open(store_dir, readonly=True) as reader:
        assert reader.batch_get(list(everything)) == everything


def test_compaction_under_auto_chooses_the_layout_of_what_is_left(store_dir: Path) -> None:
    fs = OpenFlags()
    with BucketStore.open(store_dir, filesystem=fs) as store:
        first = store.batch_offload(values("a", [1 * MiB, 1 * MiB, 4097]))
        assert not aligned_flag(store_dir, first)
        store.batch_remove(["a2"])
        store.compact(min_dead_ratio=0.0)
        [kept] = store.bucket_ids()
        assert kept != first
        assert store.batch_get(["a0", "a1"]) == values("a", [1 * MiB, 1 * MiB])
    assert aligned_flag(store_dir, kept)
    assert fs.data_opens(writing=True)[-1][1] & O_DIRECT


def test_auto_writes_buffered_where_o_direct_is_refused(store_dir: Path) -> None:
    fs = OpenFlags(refuse_direct=True)
    big = values("big", [1 * MiB] * 2)
    with BucketStore.open(store_dir, filesystem=fs) as store:
        bucket_id = store.batch_offload(big)
        assert store.batch_get(list(big)) == big
    assert not aligned_flag(store_dir, bucket_id)
    assert [f for _, f in fs.data_opens(writing=True)] and not any(f & O_DIRECT for _, f in fs.data_opens(writing=True))
    assert [n for n, _ in fs.direct_probes()] == [LOCK_NAME], "one probe, of the store's own LOCK"


def test_auto_probes_once_per_open_through_lock_only(store_dir: Path) -> None:
    fs = OpenFlags()
    with BucketStore.open(store_dir, filesystem=fs) as store:
        for i in range(3):
            store.batch_offload(values(f"b{i}.", [1 * MiB]))
    [(name, flags)] = fs.direct_probes()
    assert name == LOCK_NAME
    assert not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)


def test_buffered_never_probes_nor_opens_o_direct(store_dir: Path) -> None:
    fs = OpenFlags(refuse_direct=True)
    with BucketStore.open(store_dir, filesystem=fs, io_mode="buffered") as store:
        bucket_id = store.batch_offload(values("big", [1 * MiB] * 2))
        store.batch_get(["big0"])
    assert not aligned_flag(store_dir, bucket_id)
    assert not [n for n, f in fs.opens if f & O_DIRECT]


def test_direct_writes_and_reads_everything_with_o_direct(store_dir: Path) -> None:
    fs = OpenFlags()
    small = values("s", [64 * KiB, 4097])
    with BucketStore.open(store_dir, filesystem=fs, io_mode="direct") as store:
        bucket_id = store.batch_offload(small)
        assert store.batch_get(list(small)) == small
    assert aligned_flag(store_dir, bucket_id)
    assert all(f & O_DIRECT for _, f in fs.data_opens(writing=True))
    assert fs.data_opens(writing=False) and fs.direct_data_reads() == [n for n, _ in fs.data_opens(writing=False)]


def test_direct_on_a_file_system_refusing_o_direct_fails_at_open(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        store.batch_offload(values("x", [8 * KiB]))
    before = snapshot(store_dir)
    with pytest.raises(InvalidArgument, match=r"does not accept O_DIRECT.*io_mode='auto'.*'buffered'"):
        BucketStore.open(store_dir, filesystem=OpenFlags(refuse_direct=True), io_mode="direct")
    assert snapshot(store_dir) == before
    with BucketStore.open(store_dir, filesystem=OpenFlags(refuse_direct=True), io_mode="auto") as store:
        assert store.batch_get(["x0"]) == values("x", [8 * KiB])  # the lock was released


def test_a_failing_probe_is_a_storage_error(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class ProbeFails(FileSystem):
        def open(self, path: str, flags: int, mode: int = 0o644) -> int:
            if flags & O_DIRECT:
                raise OSError(errno.EIO, os.strerror(errno.EIO), path)
            return super().open(path, flags, mode)

    with pytest.raises(StorageIOError, match="checking O_DIRECT support"):
        BucketStore.open(store_dir, filesystem=ProbeFails())
    with BucketStore.open(store_dir, io_mode="buffered", filesystem=ProbeFails()) as store:
        assert len(store) == 0


def test_the_threshold_constant_is_what_auto_uses(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(write_mode, "AUTO_DIRECT_MIN_OBJECT", 16 * KiB)
    with BucketStore.open(store_dir) as store:
        low = store.batch_offload(values("low", [16 * KiB] * 2))
        lower = store.batch_offload(values("lower", [12 * KiB] * 2))
    assert (aligned_flag(store_dir, low), aligned_flag(store_dir, lower)) == (True, False)
