"""open() recovery: every leftover is removed and reported, nothing foreign is touched."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from kvbucket import BucketStore
from kvbucket._core.checksum import crc32c
from kvbucket._core.format import HEADER_SIZE, MAX_BUCKET_KEYS, MAX_META_BYTES, BucketMeta, MetaRecord, encode_meta
from kvbucket._core.fs import FileSystem
from kvbucket._core.lockfile import StoreLock
from kvbucket._core.recovery import scan_directory
from kvbucket.errors import InvalidArgument
from storeutil import our_files, snapshot, value_for


def make_store(path: Path, buckets: int = 3, per_bucket: int = 4) -> dict[str, bytes]:
    values = {}
    with BucketStore.open(path) as store:
        for b in range(buckets):
            batch = {f"b{b}-k{i}": value_for(f"b{b}-k{i}", 1000 + 100 * i) for i in range(per_bucket)}
            store.batch_offload(batch)
            values.update(batch)
    return values


def reopen(path: Path, **fields: object) -> BucketStore:
    return BucketStore.open(path, **fields)


def test_orphan_data_file_is_removed_and_reported(store_dir: Path) -> None:
    values = make_store(store_dir)
    (store_dir / "9.bucket").write_bytes(b"x" * 12345)
    with reopen(store_dir) as store:
        report = store.recovery_report
        assert report.removed_files == ["9.bucket"]
        assert report.freed_bytes == 12345
        assert report.dropped_buckets == [(9, "data file without a committed meta")]
        assert store.batch_get(list(values)) == values
    assert "9.bucket" not in os.listdir(store_dir)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: os.unlink(d / "2.bucket"), "meta without its data file"),
        (lambda d: os.truncate(d / "2.bucket", 100), "data file is 100 bytes"),
        (lambda d: os.truncate(d / "2.meta", 30), "truncated"),
        (lambda d: (d / "2.meta").write_bytes(b""), "truncated"),
        (lambda d: (d / "2.meta").write_bytes(b"\0" * 200), "checksum"),
    ],
)
def test_broken_bucket_is_dropped_with_reason(store_dir: Path, damage, reason: str) -> None:
    values = make_store(store_dir)
    damage(store_dir)
    with reopen(store_dir) as store:
        report = store.recovery_report
        assert [b for b, _ in report.dropped_buckets] == [2]
        assert reason in report.dropped_buckets[0][1]
        assert set(report.removed_files) <= {"2.bucket", "2.meta"}
        assert report.buckets == 2 and report.keys == 8
        survivors = {k: v for k, v in values.items() if not k.startswith("b1-")}
        assert store.batch_get(list(survivors)) == survivors
        assert not any(store.batch_exists([k for k in values if k.startswith("b1-")]))
    assert our_files(store_dir) == ["1.bucket", "1.meta", "3.bucket", "3.meta"]


def test_temporary_meta_is_removed(store_dir: Path) -> None:
    make_store(store_dir)
    (store_dir / "4.meta.tmp").write_bytes(b"partial")
    (store_dir / "4.bucket").write_bytes(b"data")
    with reopen(store_dir) as store:
        assert sorted(store.recovery_report.removed_files) == ["4.bucket", "4.meta.tmp"]
        assert store.recovery_report.freed_bytes == len(b"partial") + len(b"data")
    assert our_files(store_dir) == ["1.bucket", "1.meta", "2.bucket", "2.meta", "3.bucket", "3.meta"]


def test_foreign_files_are_never_touched(store_dir: Path) -> None:
    make_store(store_dir)
    foreign = ["05.meta", "x.bucket", "12.meta.tmp.bak", "-1.bucket", "1.BUCKET", "notes.txt", "99999999999999999999.bucket"]
    for name in foreign:
        (store_dir / name).write_bytes(b"not ours")
    (store_dir / "7.bucket").mkdir()  # a directory with our name is foreign too
    (store_dir / "8.meta").symlink_to(store_dir / "notes.txt")
    before = {k: v for k, v in snapshot(store_dir).items() if not k[0].isdigit() or k.startswith(("05", "99", "7.", "8."))}
    with reopen(store_dir) as store:
        assert sorted(store.recovery_report.foreign_files) == sorted([*foreign, "7.bucket", "8.meta"])
        assert store.recovery_report.removed_files == []
    after = snapshot(store_dir)
    assert all(after.get(name) == digest for name, digest in before.items())
    assert os.path.islink(store_dir / "8.meta")


def test_quarantine_moves_instead_of_deleting(store_dir: Path) -> None:
    make_store(store_dir)
    (store_dir / "9.bucket").write_bytes(b"orphan")
    os.truncate(store_dir / "2.meta", 10)
    with reopen(store_dir, quarantine=True) as store:
        report = store.recovery_report
        assert sorted(report.removed_files) == ["2.bucket", "2.meta", "9.bucket"]
        assert report.quarantined
        moved = sum(os.path.getsize(store_dir / "quarantine" / name) for name in report.removed_files)
        assert report.quarantined_bytes == moved and report.freed_bytes == 0  # nothing was freed
    assert sorted(os.listdir(store_dir / "quarantine")) == ["2.bucket", "2.meta", "9.bucket"]
    assert (store_dir / "quarantine" / "9.bucket").read_bytes() == b"orphan"
    with reopen(store_dir) as store:  # the quarantine folder itself is left alone
        assert store.recovery_report.removed_files == []
        assert store.recovery_report.foreign_files == []


def test_recovery_is_idempotent(store_dir: Path) -> None:
    make_store(store_dir)
    (store_dir / "9.bucket").write_bytes(b"orphan")
    (store_dir / "10.meta").write_bytes(b"garbage")
    reopen(store_dir).close()
    state = snapshot(store_dir)
    with reopen(store_dir) as store:
        assert store.recovery_report.removed_files == []
    assert snapshot(store_dir) == state


def test_interrupted_compaction_keeps_the_newer_copy(store_dir: Path) -> None:
    """Bucket 2 re-lists keys of bucket 1 (crash before bucket 1 was deleted)."""
    values = {"a": b"aaaa", "b": b"bb", "c": b"c"}
    with BucketStore.open(store_dir) as store:
        store.batch_offload(values)
        store.batch_offload({"d": b"dd"})
    # forge what a compaction interrupted after its commit leaves: a newer bucket with "a"
    data = values["a"] + b"dd"
    (store_dir / "3.bucket").write_bytes(data)
    meta = BucketMeta(3, len(data), False, [MetaRecord("a", 0, 4, crc32c(values["a"]))])
    (store_dir / "3.meta").write_bytes(encode_meta(meta))
    with reopen(store_dir) as store:
        assert store.recovery_report.rewritten_buckets == [1]
        assert store.batch_query(["a"])["a"].bucket_id == 3
        assert store.bucket_keys(1) == ["b", "c"]
        assert store.batch_get(list(values)) == values
        store.remove("a")
    with reopen(store_dir) as store:  # removing the winner must not resurrect the loser's copy
        assert not store.exists("a")
        assert store.batch_get(["b", "c", "d"]) == {"b": b"bb", "c": b"c", "d": b"dd"}


def test_ids_keep_increasing_after_deletions_and_restarts(store_dir: Path) -> None:
    seen = []
    with BucketStore.open(store_dir) as store:
        seen += [store.batch_offload({"a": b"1"}), store.batch_offload({"b": b"2"})]
        store.delete_bucket(seen[-1])
    with BucketStore.open(store_dir) as store:
        seen.append(store.batch_offload({"c": b"3"}))
        store.remove_all()
    with BucketStore.open(store_dir) as store:
        seen.append(store.batch_offload({"d": b"4"}))
        store.remove("d")
    with BucketStore.open(store_dir) as store:
        seen.append(store.batch_offload({"e": b"5"}))
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_ids_stay_above_an_orphan_removed_by_recovery(store_dir: Path) -> None:
    make_store(store_dir)
    (store_dir / "40.bucket").write_bytes(b"orphan")
    reopen(store_dir).close()
    with reopen(store_dir) as store:
        assert store.batch_offload({"new": b"x"}) == 41


def test_high_water_mark_survives_a_torn_slot(store_dir: Path) -> None:
    fs = FileSystem()
    store_dir.mkdir()
    lock = StoreLock.acquire(fs, str(store_dir), durable=True)
    lock.raise_high_water_mark(10)
    lock.raise_high_water_mark(20)
    lock.release()
    with open(store_dir / "LOCK", "r+b") as f:  # tear the slot holding 20
        raw = f.read()
        slot = 0 if struct.unpack_from("<Q", raw, 8)[0] == 20 else 512
        f.seek(slot + 9)
        f.write(b"\xff")
    lock = StoreLock.acquire(fs, str(store_dir), durable=True)
    assert lock.high_water_mark == 10
    lock.raise_high_water_mark(30)
    assert lock.high_water_mark == 30
    lock.release()


def test_scan_directory_changes_nothing(store_dir: Path) -> None:
    make_store(store_dir)
    (store_dir / "9.bucket").write_bytes(b"orphan")
    (store_dir / "2.meta").write_bytes(b"KVBMETA\0bad")
    (store_dir / "3.meta").write_bytes(b"bad")  # no kvbucket magic: another program's meta
    (store_dir / "foreign").write_bytes(b"x")
    before = snapshot(store_dir)
    scan = scan_directory(store_dir)
    assert sorted(scan.buckets) == [1]
    assert sorted((f.kind, f.bucket_id) for f in scan.findings) == [("invalid_meta", 2), ("orphan_data", 9)]
    assert scan.foreign == ["3.bucket", "3.meta", "foreign"]
    assert snapshot(store_dir) == before


class ReadCountingFileSystem(FileSystem):
    """Counts the bytes read from each path (by descriptor)."""

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self.read: dict[str, int] = {}

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        self.paths[fd] = os.path.basename(path)
        return fd

    def preadv(self, fd: int, buffers, offset: int) -> int:  # type: ignore[no-untyped-def]
        got = super().preadv(fd, buffers, offset)
        name = self.paths.get(fd, "?")
        self.read[name] = self.read.get(name, 0) + got
        return got


@pytest.mark.parametrize("readonly", [False, True])
def test_huge_sparse_meta_is_invalid_without_being_read(store_dir: Path, readonly: bool) -> None:
    values = make_store(store_dir)
    os.truncate(store_dir / "2.meta", 8 << 30)  # sparse: costs no disk space
    fs = ReadCountingFileSystem()
    with reopen(store_dir, filesystem=fs, readonly=readonly) as store:
        assert fs.read["2.meta"] <= HEADER_SIZE
        assert not any(store.batch_exists([k for k in values if k.startswith("b1-")]))
        survivors = {k: v for k, v in values.items() if not k.startswith("b1-")}
        assert store.batch_get(list(survivors)) == survivors
        if not readonly:
            (bucket, reason), = store.recovery_report.dropped_buckets
            assert bucket == 2 and f"is {8 << 30} bytes; no valid meta exceeds {MAX_META_BYTES}" in reason
    assert ("2.meta" in os.listdir(store_dir)) == readonly


def test_large_meta_whose_header_disagrees_is_read_no_further(store_dir: Path) -> None:
    make_store(store_dir)
    raw = (store_dir / "2.meta").read_bytes()
    (store_dir / "2.meta").write_bytes(raw[:HEADER_SIZE] + b"\0" * (3 << 20))  # header records a short meta
    fs = ReadCountingFileSystem()
    scan = scan_directory(store_dir, fs)
    (finding,) = scan.findings
    assert (finding.kind, finding.bucket_id) == ("invalid_meta", 2)
    assert "not the length its header records" in finding.reason
    assert fs.read["2.meta"] == HEADER_SIZE


def test_bucket_keys_limit_is_bounded_by_the_format(store_dir: Path) -> None:
    with pytest.raises(InvalidArgument, match=f"bucket_keys_limit must be at most {MAX_BUCKET_KEYS}"):
        BucketStore.open(store_dir, bucket_keys_limit=MAX_BUCKET_KEYS + 1)
    assert MAX_META_BYTES == HEADER_SIZE + MAX_BUCKET_KEYS * (24 + 4096) + 4


def bucket_two(values: dict[str, bytes]) -> dict[str, bytes]:
    """The objects of bucket 2 of :func:`make_store` (sizes 1000, 1100, 1200, 1300)."""
    return {k: v for k, v in values.items() if k.startswith("b1-")}


def test_long_data_file_keeps_every_object(store_dir: Path) -> None:
    values = make_store(store_dir)
    with open(store_dir / "2.bucket", "ab") as f:
        f.write(b"\xee" * 4096)  # a block too long
    size = os.path.getsize(store_dir / "2.bucket")
    with reopen(store_dir) as store:
        report = store.recovery_report
        assert report.salvaged_buckets == [2] and report.dropped_keys == []
        assert report.removed_files == [] and report.dropped_buckets == []
        assert store.batch_get(list(values)) == values
        assert store.stats().dead_bytes == 4096  # the tail is dead bytes until compaction
    assert os.path.getsize(store_dir / "2.bucket") == size  # the data file is not touched
    with reopen(store_dir) as store:  # the rewritten meta records the file's length
        assert store.recovery_report.salvaged_buckets == [] and not scan_directory(store_dir).findings
        assert store.compact(min_dead_ratio=0.4) > 0  # reclaims the tail
        assert store.batch_get(list(values)) == values


@pytest.mark.parametrize("readonly", [False, True])
def test_short_data_file_keeps_the_objects_that_verify(store_dir: Path, readonly: bool) -> None:
    values = make_store(store_dir)
    os.truncate(store_dir / "2.bucket", 1000 + 1100 + 50)  # cut inside the third object
    before = snapshot(store_dir)
    with reopen(store_dir, readonly=readonly) as store:
        kept = {k: values[k] for k in ("b1-k0", "b1-k1")}
        assert store.batch_get(list(kept)) == kept
        assert store.batch_exists(["b1-k2", "b1-k3"]) == [False, False]
        others = {k: v for k, v in values.items() if k not in bucket_two(values)}
        assert store.batch_get(list(others)) == others
        if not readonly:
            report = store.recovery_report
            assert report.salvaged_buckets == [2] and report.dropped_keys == ["b1-k2", "b1-k3"]
            assert report.removed_files == [] and report.freed_bytes == 0
    if readonly:
        assert snapshot(store_dir) == before
    else:
        with reopen(store_dir) as store:
            assert store.recovery_report.salvaged_buckets == [] and store.bucket_keys(2) == ["b1-k0", "b1-k1"]


def test_salvage_drops_objects_that_fail_their_checksum(store_dir: Path) -> None:
    values = make_store(store_dir)
    with open(store_dir / "2.bucket", "r+b") as f:
        f.seek(1000 + 10)  # inside b1-k1
        f.write(b"\x00\xff")
        f.seek(0, os.SEEK_END)
        f.write(b"tail")
    with reopen(store_dir) as store:
        assert store.recovery_report.dropped_keys == ["b1-k1"]
        survivors = {k: v for k, v in values.items() if k != "b1-k1"}
        assert store.batch_get(list(survivors)) == survivors and not store.exists("b1-k1")


def test_short_data_file_with_nothing_intact_is_removed(store_dir: Path) -> None:
    make_store(store_dir)
    os.truncate(store_dir / "2.bucket", 999)
    with reopen(store_dir) as store:
        report = store.recovery_report
        assert sorted(report.removed_files) == ["2.bucket", "2.meta"]
        assert report.dropped_keys == ["b1-k0", "b1-k1", "b1-k2", "b1-k3"] and report.salvaged_buckets == []
