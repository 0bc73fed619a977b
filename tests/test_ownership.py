"""A writer acts only on files it can tell are its own, and never through links.

Mooncake directories, directories of other programs, a ``LOCK`` or a
``quarantine/`` that is a link, and names with ids too large to hand out: the
store refuses (a typed error, nothing changed) or leaves them alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvbucket import BucketStore
from kvbucket._core.format import MAX_BUCKET_ID
from kvbucket._core.fs import FileSystem
from kvbucket._core.lockfile import StoreLock
from kvbucket.errors import CapacityExceeded, ForeignDirectory, ForeignEntry, MooncakeDirectory
from mooncake_writer import MooncakeDir, tree_digest
from storeutil import snapshot


def mooncake_directory(root: Path, buckets: int = 4) -> MooncakeDir:
    d = MooncakeDir(root)
    for b in range(1, buckets + 1):
        d.write_bucket(b, {f"m{b}-{i}": os.urandom(100 + i) for i in range(3)})
    return d


# -- item: a writer open of a Mooncake directory -------------------------------------------


def test_writer_open_of_a_mooncake_directory_refuses_and_deletes_nothing(tmp_path: Path) -> None:
    d = mooncake_directory(tmp_path / "mc")
    d.orphan_data(4)  # Mooncake's own crash leftover: still not ours to delete
    before = tree_digest(d.root)
    with pytest.raises(MooncakeDirectory) as caught:
        BucketStore.open(d.root)
    message = str(caught.value)
    assert str(d.root) in message and "kvbucket import --from-mooncake" in message
    assert isinstance(caught.value, ForeignDirectory)
    assert tree_digest(d.root) == before
    assert sorted(os.listdir(d.root)) == sorted(before)  # no LOCK either


def test_writer_open_of_a_damaged_mooncake_directory_refuses(tmp_path: Path) -> None:
    """Even when no meta is readable, files named like ours without a store
    identity are not deleted."""
    d = mooncake_directory(tmp_path / "mc", buckets=2)
    d.garbage_meta(1)
    d.garbage_meta(2)
    before = tree_digest(d.root)
    with pytest.raises(ForeignDirectory) as caught:
        BucketStore.open(d.root)
    assert "1.bucket" in str(caught.value)
    assert tree_digest(d.root) == before


def test_readonly_open_of_a_mooncake_directory_changes_nothing(tmp_path: Path) -> None:
    d = mooncake_directory(tmp_path / "mc")
    before = tree_digest(d.root)
    with BucketStore.open(d.root, readonly=True) as store:
        assert store.stats().keys == 0
        assert sorted(store.recovery_report.foreign_files) == sorted(before)
    assert tree_digest(d.root) == before


def test_metas_of_another_format_in_a_store_are_foreign(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        store.batch_offload({"a": b"1"})
    d = MooncakeDir(store_dir)
    d.write_bucket(7, {"m": b"mooncake value"})
    (store_dir / "8.meta").write_bytes(b"another program's meta")
    (store_dir / "8.bucket").write_bytes(b"and its data")
    before = snapshot(store_dir)
    with BucketStore.open(store_dir) as store:
        assert store.recovery_report.removed_files == []
        assert sorted(store.recovery_report.foreign_files) == ["7.bucket", "7.meta", "8.bucket", "8.meta"]
        assert store.batch_get(["a"]) == {"a": b"1"}
        assert store.batch_offload({"b": b"2"}) == 9  # ids stay clear of the foreign names
    after = snapshot(store_dir)
    assert all(after[name] == before[name] for name in ("7.bucket", "7.meta", "8.bucket", "8.meta"))


def test_a_huge_meta_of_another_program_is_foreign_and_read_no_further(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        store.batch_offload({"a": b"1"})
    with open(store_dir / "8.meta", "wb") as f:
        f.write(b"another program's meta")
        f.truncate(8 << 30)  # sparse: reading it whole would need 8 GiB of memory
    with BucketStore.open(store_dir) as store:
        assert store.recovery_report.removed_files == []
        assert store.recovery_report.foreign_files == ["8.meta"]
        assert store.batch_get(["a"]) == {"a": b"1"}
    assert os.path.getsize(store_dir / "8.meta") == 8 << 30


def test_a_store_whose_lock_was_deleted_is_still_recognised(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        store.batch_offload({"a": b"1"})
    os.unlink(store_dir / "LOCK")
    (store_dir / "5.bucket").write_bytes(b"orphan")
    with BucketStore.open(store_dir) as store:  # proved by the meta's magic
        assert store.recovery_report.removed_files == ["5.bucket"]
        assert store.batch_get(["a"]) == {"a": b"1"}


def test_foreign_files_without_our_names_do_not_stop_a_new_store(store_dir: Path) -> None:
    store_dir.mkdir()
    (store_dir / "notes.txt").write_bytes(b"x")
    with BucketStore.open(store_dir) as store:
        store.batch_offload({"a": b"1"})
    assert (store_dir / "notes.txt").read_bytes() == b"x"


def test_lock_of_another_program_is_refused(store_dir: Path) -> None:
    store_dir.mkdir()
    (store_dir / "LOCK").write_bytes(b"pid 1234\n")
    with pytest.raises(ForeignEntry, match="not a kvbucket lock file"):
        BucketStore.open(store_dir)
    assert (store_dir / "LOCK").read_bytes() == b"pid 1234\n"


# -- item: LOCK that is a link ------------------------------------------------------------


@pytest.mark.parametrize("dangling", [False, True])
def test_lock_that_is_a_symlink_is_refused(tmp_path: Path, dangling: bool) -> None:
    store_dir = tmp_path / "store"
    with BucketStore.open(store_dir) as store:
        store.batch_offload({"a": b"1"})
    target = tmp_path / "outside"
    if not dangling:
        target.write_bytes(b"a file outside the store" * 4)
    os.replace(store_dir / "LOCK", tmp_path / "old-lock")
    os.symlink(target, store_dir / "LOCK")
    with pytest.raises(ForeignEntry) as caught:
        BucketStore.open(store_dir)
    assert str(store_dir / "LOCK") in str(caught.value)
    if dangling:
        assert not os.path.lexists(target)
    else:
        assert target.read_bytes() == b"a file outside the store" * 4
    assert os.path.islink(store_dir / "LOCK")


def test_lock_that_is_a_directory_is_refused(store_dir: Path) -> None:
    (store_dir / "LOCK").mkdir(parents=True)
    with pytest.raises(ForeignEntry, match="LOCK"):
        BucketStore.open(store_dir)


# -- item: quarantine/ that is a link -----------------------------------------------------


def test_quarantine_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    with BucketStore.open(store_dir) as store:
        store.batch_offload({"a": b"1"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "9.bucket").write_bytes(b"precious, not the store's")
    os.symlink(elsewhere, store_dir / "quarantine")
    (store_dir / "9.bucket").write_bytes(b"orphan")
    with pytest.raises(ForeignEntry) as caught:
        BucketStore.open(store_dir, quarantine=True)
    assert str(store_dir / "quarantine") in str(caught.value)
    assert (elsewhere / "9.bucket").read_bytes() == b"precious, not the store's"
    assert (store_dir / "9.bucket").read_bytes() == b"orphan"


def test_quarantine_never_replaces_a_file(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        store.batch_offload({"a": b"1"})
    (store_dir / "quarantine").mkdir()
    (store_dir / "quarantine" / "9.bucket").write_bytes(b"quarantined earlier")
    (store_dir / "9.bucket").write_bytes(b"orphan")
    with BucketStore.open(store_dir, quarantine=True) as store:
        assert store.recovery_report.removed_files == ["9.bucket"]
    assert (store_dir / "quarantine" / "9.bucket").read_bytes() == b"quarantined earlier"
    assert (store_dir / "quarantine" / "9.bucket.1").read_bytes() == b"orphan"
    assert not (store_dir / "9.bucket").exists()


# -- item: ids near the limit --------------------------------------------------------------


@pytest.mark.parametrize("name", ["9223372036854775807.bucket", "9223372036854775807.meta", str(MAX_BUCKET_ID + 1) + ".bucket"])
@pytest.mark.parametrize("as_directory", [False, True])
def test_a_huge_id_does_not_brick_the_store(store_dir: Path, name: str, as_directory: bool) -> None:
    store_dir.mkdir()
    if as_directory:
        (store_dir / name).mkdir()
    else:
        (store_dir / name).write_bytes(b"x")
    with BucketStore.open(store_dir) as store:  # a fresh store
        assert store.batch_offload({"a": b"1"}) == 1
        assert name in store.recovery_report.foreign_files
    with BucketStore.open(store_dir) as store:  # and after a reopen
        assert store.batch_offload({"b": b"2"}) == 2
        assert store.batch_get(["a", "b"]) == {"a": b"1", "b": b"2"}
    assert os.path.lexists(store_dir / name)


def test_a_huge_high_water_mark_in_lock_does_not_brick_the_store(store_dir: Path) -> None:
    fs = FileSystem()
    store_dir.mkdir()
    lock = StoreLock.acquire(fs, str(store_dir), durable=True)
    lock.claim()
    lock.raise_high_water_mark(2**63 - 1)  # as a crafted LOCK would hold
    lock.release()
    with BucketStore.open(store_dir) as store:
        assert store.batch_offload({"a": b"1"}) == 1


def test_ids_used_up_raise_a_typed_error(store_dir: Path) -> None:
    store_dir.mkdir()
    (store_dir / f"{MAX_BUCKET_ID}.bucket").mkdir()  # the largest id that is ours
    with BucketStore.open(store_dir) as store, pytest.raises(CapacityExceeded, match="highest ids"):
        store.batch_offload({"a": b"1"})


# -- the identity survives a power cut in relaxed durability ------------------------------


class SyncLog(FileSystem):
    """Records, in order, the files opened for writing and the syncs."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.names: dict[int, str] = {}

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        self.names[fd] = os.path.basename(path)
        if flags & (os.O_WRONLY | os.O_RDWR):
            self.events.append(f"open {self.names[fd]}")
        return fd

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        self.events.append(f"fsync {self.names.get(fd)}")

    def fsync_dir(self, path: str) -> None:
        super().fsync_dir(path)
        self.events.append("fsync_dir")


def test_relaxed_store_makes_its_lock_durable_before_any_bucket(store_dir: Path) -> None:
    fs = SyncLog()
    with BucketStore.open(store_dir, durability="relaxed", filesystem=fs) as store:
        store.batch_offload({"a": b"1"})
    first_bucket = fs.events.index("open 1.bucket")
    before = fs.events[:first_bucket]
    assert "fsync LOCK" in before and before.index("fsync LOCK") < len(before) - before[::-1].index("fsync_dir")
