"""open() recovery: every leftover is removed and reported, nothing foreign is touched."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from kvbucket import BucketStore
from kvbucket.checksum import crc32c
from kvbucket.format import BucketMeta, MetaRecord, encode_meta
from kvbucket.lockfile import StoreLock
from kvbucket.fs import FileSystem
from kvbucket.recovery import scan_directory
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
        (lambda d: open(d / "2.bucket", "ab").write(b"tail"), "meta records"),
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
        assert sorted(store.recovery_report.foreign_files) == sorted(foreign + ["7.bucket", "8.meta"])
        assert store.recovery_report.removed_files == []
    after = snapshot(store_dir)
    assert all(after.get(name) == digest for name, digest in before.items())
    assert os.path.islink(store_dir / "8.meta")


def test_quarantine_moves_instead_of_deleting(store_dir: Path) -> None:
    make_store(store_dir)
    (store_dir / "9.bucket").write_bytes(b"orphan")
    os.truncate(store_dir / "2.meta", 10)
    with reopen(store_dir, quarantine=True) as store:
        assert sorted(store.recovery_report.removed_files) == ["2.bucket", "2.meta", "9.bucket"]
        assert store.recovery_report.quarantined
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
