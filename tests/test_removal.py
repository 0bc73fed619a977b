"""Removal (issue 3): remove/batch_remove, durability across reopen, dead-byte
accounting, compaction, and eviction's preference for dead space."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest

from kvbucket import BucketStore
from kvbucket.errors import InvalidArgument, KeyNotFound, ReadOnlyStore
from storeutil import du, value_for

# Foreground eviction, step by step; the background evictor is tested on its own.
pytestmark = pytest.mark.usefixtures("foreground_eviction")

KiB = 1024


def bucket_files_bytes(directory: Path, bucket_id: int) -> int:
    """Allocated bytes of one bucket's two files (0 for a missing file)."""
    total = 0
    for name in (f"{bucket_id}.bucket", f"{bucket_id}.meta"):
        with contextlib.suppress(FileNotFoundError):
            total += os.lstat(directory / name).st_blocks * 512
    return total


def put(store: BucketStore, name: str, sizes: list[int], **kwargs: Any) -> tuple[int, dict[str, bytes]]:
    """One bucket with one object per size; returns (bucket id, {key: value})."""
    values = {f"{name}/{i}": value_for(f"{name}/{i}", size) for i, size in enumerate(sizes)}
    bucket_id = store.batch_offload(values, **kwargs)
    assert bucket_id is not None
    return bucket_id, values


def live(store: BucketStore) -> dict[str, Any]:
    return {key: meta for page in store.scan_meta() for key, meta in page}


def assert_exact(store: BucketStore, values: dict[str, bytes]) -> None:
    """Exactly ``values`` are stored, byte for byte."""
    assert sorted(live(store)) == sorted(values)
    if values:
        assert store.batch_get(list(values)) == values


def footprint(size: int, io_mode: str) -> int:
    return -(-size // 4096) * 4096 if io_mode == "direct" else size


# -- remove / batch_remove ------------------------------------------------------------
def test_remove_unknown_key_raises_key_not_found(store: BucketStore) -> None:
    put(store, "a", [10, 20])
    with pytest.raises(KeyNotFound):
        store.remove("nope")
    store.remove("a/0")
    with pytest.raises(KeyNotFound):
        store.remove("a/0")  # twice
    assert store.batch_get(["a/1"]) == {"a/1": value_for("a/1", 20)}


def test_batch_remove_reports_false_for_unknown_keys(store: BucketStore) -> None:
    _, a = put(store, "a", [10, 20, 30])
    put(store, "b", [40])
    assert store.batch_remove(["a/1", "ghost", "b/0", "a/1-not", "zzz"]) == [True, False, True, False, False]
    assert store.batch_exists(["a/0", "a/1", "a/2", "b/0"]) == [True, False, True, False]
    assert store.batch_remove([]) == []
    assert store.batch_remove(["a/1"]) == [False]
    assert_exact(store, {"a/0": a["a/0"], "a/2": a["a/2"]})


def test_remove_rejects_bad_keys_and_readonly(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        put(store, "a", [10])
        with pytest.raises(InvalidArgument):
            store.remove("")
        with pytest.raises(InvalidArgument):
            store.batch_remove(["a/0", 7])  # type: ignore[list-item]
        assert store.exists("a/0"), "a rejected batch removes nothing"
    with BucketStore.open(store_dir, readonly=True) as reader:
        with pytest.raises(ReadOnlyStore):
            reader.remove("a/0")
        with pytest.raises(ReadOnlyStore):
            reader.batch_remove(["a/0"])
    with BucketStore.open(store_dir) as store:
        assert store.exists("a/0")


@pytest.mark.parametrize("durability", ["strict", "relaxed"])
def test_removed_keys_stay_removed_after_reopen(store_dir: Path, durability: str) -> None:
    with BucketStore.open(store_dir, durability=durability) as store:
        _, a = put(store, "a", [100, 200, 300, 400])
        _, b = put(store, "b", [500, 600])
        put(store, "c", [700])
        store.remove("a/1")
        assert store.batch_remove(["a/3", "b/0", "c/0"]) == [True, True, True]
        expected = {"a/0": a["a/0"], "a/2": a["a/2"], "b/1": b["b/1"]}
        assert_exact(store, expected)
    for _ in range(2):  # and again: a reopen does not resurrect them either
        with BucketStore.open(store_dir, durability=durability) as store:
            assert_exact(store, expected)
            report = store.recovery_report
            assert (report.dropped_buckets, report.removed_files, report.rewritten_buckets) == ([], [], [])
    with BucketStore.open(store_dir, readonly=True) as reader:
        assert_exact(reader, expected)


def test_removed_key_written_again_reads_the_new_value_after_reopen(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        put(store, "a", [100, 100])
        store.remove("a/0")
        store.batch_offload({"a/0": b"new value"})
        assert store.batch_get(["a/0"]) == {"a/0": b"new value"}
    with BucketStore.open(store_dir) as store:
        assert store.batch_get(["a/0", "a/1"]) == {"a/0": b"new value", "a/1": value_for("a/1", 100)}


@pytest.mark.parametrize("how", ["one call", "one by one"])
def test_a_bucket_whose_objects_are_all_removed_is_deleted(store_dir: Path, how: str) -> None:
    with BucketStore.open(store_dir) as store:
        gone, values = put(store, "gone", [5000, 6000, 7000])
        kept, kept_values = put(store, "kept", [100])
        physical_before = du(store_dir)
        if how == "one call":
            assert store.batch_remove(list(values)) == [True, True, True]
        else:
            for key in values:
                store.remove(key)
        assert gone not in store.bucket_ids()
        names = os.listdir(store_dir)
        assert not any(name.startswith(f"{gone}.") for name in names), names
        assert du(store_dir) < physical_before
        stats = store.stats()
        assert (stats.keys, stats.buckets, stats.dead_bytes) == (1, 1, 0)
        assert stats.physical_bytes == du(store_dir)
        assert_exact(store, kept_values)
    with BucketStore.open(store_dir) as store:
        assert store.bucket_ids() == [kept]
        assert_exact(store, kept_values)
        assert store.stats().dead_bytes == 0


@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
def test_dead_bytes_are_reported_and_counted_as_physical(store_dir: Path, io_mode: str) -> None:
    sizes = [1000, 5000, 9000, 4096]
    with BucketStore.open(store_dir, io_mode=io_mode) as store:
        bucket_id, values = put(store, "a", sizes)
        data_file = store_dir / f"{bucket_id}.bucket"
        data_alloc = os.lstat(data_file).st_blocks * 512
        assert store.stats().dead_bytes == 0
        store.batch_remove(["a/1", "a/2"])
        dead = footprint(5000, io_mode) + footprint(9000, io_mode)
        stats = store.stats()
        assert stats.dead_bytes == dead
        assert stats.logical_bytes == 1000 + 4096
        # the data file is untouched: its dead bytes are still allocated, and counted
        assert os.lstat(data_file).st_blocks * 512 == data_alloc
        assert stats.physical_bytes == du(store_dir) >= data_alloc
        assert_exact(store, {"a/0": values["a/0"], "a/3": values["a/3"]})
    with BucketStore.open(store_dir, io_mode=io_mode) as store:
        stats = store.stats()
        assert stats.dead_bytes == dead, "dead bytes are known again after reopen"
        assert stats.physical_bytes == du(store_dir)


# -- compaction ---------------------------------------------------------------------------
@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
@pytest.mark.parametrize("durability", ["strict", "relaxed"])
def test_compaction_keeps_every_live_object_byte_exact(store_dir: Path, io_mode: str, durability: str) -> None:
    with BucketStore.open(store_dir, io_mode=io_mode, durability=durability) as store:
        mostly_dead, a = put(store, "a", [8 * KiB, 8 * KiB, 8 * KiB, 7 * KiB + 3])  # 3 of 4 removed
        half_dead, b = put(store, "b", [6 * KiB + 1, 6 * KiB + 1])  # 1 of 2 removed: exactly half
        little_dead, c = put(store, "c", [4 * KiB, 4 * KiB, 4 * KiB, 12 * KiB])  # 1 small one removed
        untouched, d = put(store, "d", [3 * KiB, 33])
        store.batch_remove(["a/0", "a/1", "a/2", "b/0", "c/0"])
        expected = {k: v for k, v in {**a, **b, **c, **d}.items() if k not in ("a/0", "a/1", "a/2", "b/0", "c/0")}
        kept_files = {
            name: (store_dir / name).read_bytes() for name in os.listdir(store_dir) if name.split(".")[0] in (str(little_dead), str(untouched))
        }
        old_bytes = bucket_files_bytes(store_dir, mostly_dead) + bucket_files_bytes(store_dir, half_dead)
        dead_c = store.stats().dead_bytes - footprint(8 * KiB, io_mode) * 3 - footprint(6 * KiB + 1, io_mode)
        ids_before = set(store.bucket_ids())

        freed = store.compact(min_dead_ratio=0.5)

        new_ids = set(store.bucket_ids()) - ids_before
        assert mostly_dead not in store.bucket_ids() and half_dead not in store.bucket_ids()
        assert not (store_dir / f"{mostly_dead}.bucket").exists() and not (store_dir / f"{half_dead}.bucket").exists()
        assert {little_dead, untouched} <= set(store.bucket_ids())
        for name, content in kept_files.items():
            assert (store_dir / name).read_bytes() == content, f"{name} was below min_dead_ratio and must be untouched"
        new_bytes = sum(bucket_files_bytes(store_dir, i) for i in new_ids)
        assert freed == old_bytes - new_bytes > 0
        stats = store.stats()
        assert stats.dead_bytes == dead_c
        assert stats.physical_bytes == du(store_dir)
        assert_exact(store, expected)
        assert store.compact(min_dead_ratio=0.5) == 0, "nothing left that is at least half dead"
    with BucketStore.open(store_dir, io_mode=io_mode, durability=durability) as store:
        assert_exact(store, expected)
        assert store.stats().dead_bytes == dead_c
        assert store.recovery_report.removed_files == []


def test_compaction_ratio_bounds(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        _, a = put(store, "a", [1000, 9000])
        store.remove("a/0")  # 10 % dead
        before = {name: (store_dir / name).read_bytes() for name in os.listdir(store_dir)}
        assert store.compact(min_dead_ratio=1.0) == 0
        assert store.compact(min_dead_ratio=0.11) == 0
        assert {name: (store_dir / name).read_bytes() for name in os.listdir(store_dir)} == before
        assert store.compact(min_dead_ratio=0.1) >= 0
        assert store.stats().dead_bytes == 0
        assert_exact(store, {"a/1": a["a/1"]})
        for bad in (-0.1, 1.5, True, "0.5"):
            with pytest.raises(InvalidArgument):
                store.compact(min_dead_ratio=bad)  # type: ignore[arg-type]


def test_compaction_respects_bucket_limits(store_dir: Path) -> None:
    with BucketStore.open(store_dir, bucket_keys_limit=4, bucket_size_limit=16 * KiB) as store:
        expected: dict[str, bytes] = {}
        for i in range(6):
            _, values = put(store, f"b{i}", [3 * KiB] * 4)
            store.batch_remove([f"b{i}/0", f"b{i}/1", f"b{i}/2"])
            expected[f"b{i}/3"] = values[f"b{i}/3"]
        assert store.compact(min_dead_ratio=0.5) > 0
        for bucket_id in store.bucket_ids():
            keys = store.bucket_keys(bucket_id)
            sizes = [store.batch_query([k])[k].size for k in keys]
            assert len(keys) <= 4 and sum(sizes) <= 16 * KiB
        assert len(store.bucket_ids()) < 6, "compaction should merge the survivors"
        assert store.stats().dead_bytes == 0
        assert_exact(store, expected)
    with BucketStore.open(store_dir) as store:
        assert_exact(store, expected)


def test_removal_and_compaction_free_space_honestly(store_dir: Path) -> None:
    """stats().physical_bytes tracks du through writes, removals and compaction."""
    with BucketStore.open(store_dir) as store:
        for i in range(5):
            put(store, f"b{i}", [10 * KiB] * 5)
        assert store.stats().physical_bytes == du(store_dir)
        store.batch_remove([f"b{i}/{j}" for i in range(5) for j in range(4)])
        assert store.stats().physical_bytes == du(store_dir)
        before = du(store_dir)
        freed = store.compact()
        assert freed > 0 and store.stats().physical_bytes == du(store_dir) <= before - freed + 4096
        store.batch_remove([f"b{i}/4" for i in range(5)])
        assert store.stats().physical_bytes == du(store_dir)
        assert store.bucket_ids() == []


# -- eviction prefers dead space -------------------------------------------------------------
@pytest.mark.parametrize("policy", ["fifo", "lru", "2q"])
def test_eviction_reclaims_mostly_dead_buckets_before_live_ones(store_dir: Path, policy: str) -> None:
    probe_dir = store_dir.parent / "probe"
    with BucketStore.open(probe_dir, durability="relaxed") as probe:
        put(probe, "p", [16 * KiB] * 4)
        bucket = du(probe_dir)  # a directory with one such bucket
    limit = bucket * 4  # room for a little over four buckets
    with BucketStore.open(store_dir, eviction_policy=policy, max_physical_bytes=limit) as store:
        ids, values = [], {}
        for i in range(4):
            bucket_id, v = put(store, f"b{i}", [16 * KiB] * 4)
            ids.append(bucket_id)
            values.update(v)
        store.batch_remove(["b3/0", "b3/1", "b3/2"])  # the newest bucket is 3/4 dead
        store.batch_get(["b0/0"] if policy == "fifo" else ["b3/3"])  # b3 is also the most recently used
        evicted: list[list[str]] = []
        put(store, "new", [16 * KiB] * 4, on_evict=evicted.append)
        assert evicted == [["b3/3"]], "the mostly dead bucket must go before any mostly live one"
        assert du(store_dir) <= limit
        survivors = {k: v for k, v in values.items() if k.split("/")[0] in ("b0", "b1", "b2")}
        assert store.batch_get(list(survivors)) == survivors


def test_watermark_eviction_prefers_dead_space(store_dir: Path) -> None:
    with BucketStore.open(store_dir, eviction_policy="fifo", total_keys_limit=40) as store:
        for i in range(9):
            put(store, f"b{i}", [100] * 4)
        store.batch_remove(["b8/0", "b8/1", "b8/2", "b5/0", "b5/1"])  # b8 3/4 dead, b5 half dead
        # 31 keys of 40: above 0.7; down to 0.6 (24 keys) needs 7 keys out
        returned = store.evict_to_watermark(high=0.7, low=0.6)
        assert returned[:3] == ["b8/3", "b5/2", "b5/3"], "most-dead buckets first"
        assert returned[3:] == ["b0/0", "b0/1", "b0/2", "b0/3"]
        assert store.stats().keys == 24
