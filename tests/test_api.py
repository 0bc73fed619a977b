"""Every public call of BucketStore, on the happy path."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from kvbucket import BucketConfig, BucketStore, ObjectMeta, RecoveryReport, StoreStats
from kvbucket._core.checksum import crc32c
from kvbucket._core.fs import FileSystem
from kvbucket.errors import KeyNotFound, ReadOnlyStore, StoreClosed, StoreLocked
from storeutil import our_files, value_for


def test_open_creates_directory_with_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "store"
    with BucketStore.open(path) as store:
        assert path.is_dir()
        assert store.path == str(path)
        assert isinstance(store.recovery_report, RecoveryReport)
        assert store.recovery_report.buckets == 0


def test_open_accepts_a_config_and_overrides(tmp_path: Path) -> None:
    config = BucketConfig(path=tmp_path / "s", bucket_keys_limit=3)
    with BucketStore.open(config, durability="relaxed") as store:
        assert store.config.bucket_keys_limit == 3
        assert store.config.durability == "relaxed"


def test_offload_then_get_and_load(store: BucketStore) -> None:
    values = {f"page-{i}": value_for(f"page-{i}", 1000 + i) for i in range(10)}
    bucket_id = store.batch_offload(values)
    assert isinstance(bucket_id, int) and bucket_id >= 1
    assert store.batch_get(list(values)) == values
    buffers = {key: bytearray(len(value)) for key, value in values.items()}
    store.batch_load(buffers)
    assert {k: bytes(v) for k, v in buffers.items()} == values


def test_values_of_every_buffer_kind(store: BucketStore) -> None:
    array = np.arange(1024, dtype=np.float32).reshape(32, 32)
    objects = {
        "bytes": b"abc",
        "bytearray": bytearray(b"defg"),
        "memoryview": memoryview(b"0123456789")[2:6],
        "numpy": array,
        "list": [b"ab", bytearray(b"cd"), memoryview(b"ef"), np.frombuffer(b"gh", dtype=np.uint8)],
        "empty": b"",
        "empty-list-pieces": [b"", b"x", b""],
    }
    store.batch_offload(objects)
    got = store.batch_get(list(objects))
    assert got["bytes"] == b"abc"
    assert got["bytearray"] == b"defg"
    assert got["memoryview"] == b"2345"
    assert got["numpy"] == array.tobytes()
    assert got["list"] == b"abcdefgh"
    assert got["empty"] == b""
    assert got["empty-list-pieces"] == b"x"
    out = np.empty((32, 32), dtype=np.float32)
    store.batch_load({"numpy": out})
    assert np.array_equal(out, array)


def test_pairs_and_more_buffers_than_iov_max(store: BucketStore) -> None:
    pieces = [bytes([i % 251]) * 3 for i in range(3000)]
    store.batch_offload([("many", pieces), ("other", b"z")])
    assert store.batch_get(["many"])["many"] == b"".join(pieces)


def test_keys_with_any_character(store: BucketStore) -> None:
    keys = ["default\x00user-key", "ключ", "🔑" * 1024, "a" * 4096]
    store.batch_offload({key: key.encode() for key in keys})
    assert store.batch_get(keys) == {key: key.encode() for key in keys}


def test_query_exists_and_metadata(store: BucketStore) -> None:
    bucket_id = store.batch_offload({"a": b"hello", "b": b"world!"})
    assert store.exists("a") and not store.exists("zzz")
    assert store.batch_exists(["a", "zzz", "b"]) == [True, False, True]
    assert store.batch_exists([]) == []
    metas = store.batch_query(["a", "b", "missing"])
    assert set(metas) == {"a", "b"}
    assert metas["a"] == ObjectMeta(bucket_id, 0, 5, crc32c(b"hello"))
    assert metas["b"] == ObjectMeta(bucket_id, 5, 6, crc32c(b"world!"))
    assert store.bucket_ids() == [bucket_id]
    assert store.bucket_keys(bucket_id) == ["a", "b"]


def test_bucket_ids_ascend_and_scan_meta_pages_whole_buckets(store: BucketStore) -> None:
    ids = [store.batch_offload({f"{b}-{i}": b"x" for i in range(n)}) for b, n in enumerate([3, 4, 2, 7])]
    assert store.bucket_ids() == sorted(ids) == ids
    pages = list(store.scan_meta(batch_size=6))
    assert [len(page) for page in pages] == [3, 4 + 2, 6, 1]
    assert [key for page in pages for key, _ in page] == [k for b in ids for k in store.bucket_keys(b)]
    assert all(meta.bucket_id in ids for page in pages for _, meta in page)


def test_delete_bucket_and_remove_all(store: BucketStore) -> None:
    first = store.batch_offload({"a": b"1", "b": b"2"})
    second = store.batch_offload({"c": b"3"})
    store.delete_bucket(first)
    assert store.batch_exists(["a", "b", "c"]) == [False, False, True]
    assert our_files(store.path) == [f"{second}.bucket", f"{second}.meta"]
    with pytest.raises(KeyNotFound):
        store.delete_bucket(first)
    store.remove_all()
    assert store.bucket_ids() == [] and our_files(store.path) == []


def test_stats(store: BucketStore) -> None:
    store.batch_offload({"a": b"x" * 5000, "b": b"y" * 3000})
    stats = store.stats()
    assert isinstance(stats, StoreStats)
    assert (stats.keys, stats.buckets, stats.logical_bytes) == (2, 1, 8000)
    du = sum(os.lstat(os.path.join(root, n)).st_blocks * 512 for root, dirs, files in os.walk(store.path) for n in dirs + files)
    du += os.lstat(store.path).st_blocks * 512
    assert stats.physical_bytes == du


def test_reopen_sees_everything(store_dir: Path) -> None:
    values = {f"k{i}": value_for(f"k{i}", 777 * i) for i in range(20)}
    with BucketStore.open(store_dir) as store:
        store.batch_offload(dict(list(values.items())[:10]))
        store.batch_offload(dict(list(values.items())[10:]))
    with BucketStore.open(store_dir) as store:
        assert store.recovery_report.buckets == 2
        assert store.recovery_report.keys == 20
        assert store.recovery_report.removed_files == []
        assert store.batch_get(list(values)) == values


def test_context_manager_closes(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        store.batch_offload({"a": b"1"})
    assert store.closed
    for call in (lambda: store.exists("a"), lambda: store.batch_get(["a"]), lambda: store.batch_offload({"b": b"2"}), store.stats):
        with pytest.raises(StoreClosed):
            call()
    store.close()  # closing twice is fine


def test_second_writer_in_the_same_process_is_told_so(store: BucketStore) -> None:
    with pytest.raises(StoreLocked, match=r"this process already has a writer open on .*share that BucketStore") as caught:
        BucketStore.open(store.path)
    assert "another" not in str(caught.value)
    store.close()
    BucketStore.open(store.path).close()  # the registry forgets a closed writer


def test_second_writer_in_another_process_is_refused_with_advice(store: BucketStore) -> None:
    code = (
        "import sys\n"
        "from kvbucket import BucketStore\n"
        "from kvbucket.errors import StoreLocked\n"
        "try:\n"
        "    BucketStore.open(sys.argv[1])\n"
        "except StoreLocked as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, os.fspath(store.path)], capture_output=True, text=True, timeout=60, check=True)
    assert "another writer process" in out.stdout and "sub-directory" in out.stdout


def test_writer_lock_released_on_close(store_dir: Path) -> None:
    BucketStore.open(store_dir).close()
    BucketStore.open(store_dir).close()


def test_readonly_reads_beside_a_writer_and_refreshes(store: BucketStore) -> None:
    store.batch_offload({"a": b"1"})
    reader = BucketStore.open(store.path, readonly=True)
    try:
        assert reader.batch_get(["a"]) == {"a": b"1"}
        store.batch_offload({"b": b"2"})
        assert not reader.exists("b")
        reader.refresh()
        assert reader.batch_get(["b"]) == {"b": b"2"}
        with pytest.raises(ReadOnlyStore):
            reader.batch_offload({"c": b"3"})
        for call in (lambda: reader.remove("a"), lambda: reader.delete_bucket(1), reader.remove_all, reader.compact):
            with pytest.raises(ReadOnlyStore):
                call()
    finally:
        reader.close()


def test_readonly_never_creates_or_deletes(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        store.batch_offload({"a": b"1"})
    os.unlink(store_dir / "LOCK")
    (store_dir / "77.bucket").write_bytes(b"orphan")
    (store_dir / "78.meta.tmp").write_bytes(b"tmp")
    before = sorted(os.listdir(store_dir))
    with BucketStore.open(store_dir, readonly=True) as reader:
        assert reader.batch_get(["a"]) == {"a": b"1"}
        assert reader.recovery_report.removed_files == []
    assert sorted(os.listdir(store_dir)) == before


def test_on_complete_sees_committed_objects(store: BucketStore) -> None:
    seen = []

    def on_complete(keys: list[str], metas: list[ObjectMeta]) -> None:
        seen.append((keys, metas))
        assert store.batch_get(keys) == {"a": b"12", "b": b"345"}

    bucket_id = store.batch_offload({"a": b"12", "b": b"345"}, on_complete=on_complete)
    assert seen == [(["a", "b"], [ObjectMeta(bucket_id, 0, 2, crc32c(b"12")), ObjectMeta(bucket_id, 2, 3, crc32c(b"345"))])]


def test_failing_on_complete_rolls_back_completely(store: BucketStore) -> None:
    store.batch_offload({"keep": b"1"})
    before = our_files(store.path)

    def on_complete(keys: list[str], metas: list[ObjectMeta]) -> None:
        raise RuntimeError("master unreachable")

    with pytest.raises(RuntimeError, match="master unreachable"):
        store.batch_offload({"a": b"1", "b": b"2"}, on_complete=on_complete)
    assert store.batch_exists(["a", "b", "keep"]) == [False, False, True]
    assert our_files(store.path) == before
    assert store.batch_offload({"a": b"1"}) is not None


def test_on_duplicate_skip(store: BucketStore) -> None:
    store.batch_offload({"a": b"1"})
    bucket_id = store.batch_offload({"a": b"other", "b": b"2"}, on_duplicate="skip")
    assert store.bucket_keys(bucket_id) == ["b"]
    assert store.batch_get(["a"]) == {"a": b"1"}
    assert store.batch_offload({"a": b"x", "b": b"y"}, on_duplicate="skip") is None


def test_single_object_may_exceed_bucket_size_limit(store_dir: Path) -> None:
    with BucketStore.open(store_dir, bucket_size_limit=1024) as store:
        store.batch_offload({"big": b"x" * 5000})
        assert store.batch_get(["big"]) == {"big": b"x" * 5000}


def test_verify_checksums_off_returns_stored_bytes(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        bucket_id = store.batch_offload({"a": b"hello"})
    with open(store_dir / f"{bucket_id}.bucket", "r+b") as f:
        f.write(b"J")
    with BucketStore.open(store_dir, verify_checksums=False) as store:
        assert store.batch_get(["a"]) == {"a": b"Jello"}


class NoIOWhenArmed(FileSystem):
    """Fails any directory or file access once ``armed``."""

    armed = False

    def _check(self) -> None:
        assert not self.armed, "I/O while armed"

    def open(self, path, flags, mode=0o644):  # type: ignore[no-untyped-def]
        self._check()
        return super().open(path, flags, mode)

    def stat(self, path):  # type: ignore[no-untyped-def]
        self._check()
        return super().stat(path)

    def listdir(self, path):  # type: ignore[no-untyped-def]
        self._check()
        return super().listdir(path)


def test_len_in_and_repr(store_dir: Path) -> None:
    fs = NoIOWhenArmed()
    store = BucketStore.open(store_dir, filesystem=fs)
    assert len(store) == 0 and bool(store)
    assert repr(store) == f"<BucketStore {str(store_dir)!r} writer, 0 keys in 0 buckets>"
    store.batch_offload({"a": b"1", "b": b"2"})
    seen: list[str] = []

    def describe_from_another_thread(keys: list[str], metas: object) -> None:
        # This thread holds the writer lock: repr() must not need it, nor do I/O.
        fs.armed = True
        reader = threading.Thread(target=lambda: seen.append(repr(store)))
        reader.start()
        reader.join(timeout=60)
        fs.armed = False
        assert not reader.is_alive()

    store.batch_offload({"c": b"3"}, on_complete=describe_from_another_thread)
    assert seen == [f"<BucketStore {str(store_dir)!r} writer, 3 keys in 2 buckets>"]
    assert len(store) == 3
    assert "a" in store and "c" in store and "zz" not in store
    store.close()
    assert repr(store) == f"<BucketStore {str(store_dir)!r} writer, closed>"
    with pytest.raises(StoreClosed):
        len(store)
    with BucketStore.open(store_dir, readonly=True) as reader:
        assert len(reader) == 3
        assert repr(reader) == f"<BucketStore {str(store_dir)!r} readonly, 3 keys in 2 buckets>"
