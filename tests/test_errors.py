"""Bad input gets a typed error that names the culprit, and changes nothing on disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from kvbucket import BucketStore
from kvbucket.errors import (
    CapacityExceeded,
    CorruptionError,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    KvBucketError,
    ReadOnlyStore,
    SizeMismatch,
    StorageIOError,
    StoreClosed,
    StoreLocked,
)
from storeutil import snapshot


@pytest.fixture
def filled(store_dir: Path) -> BucketStore:
    store = BucketStore.open(store_dir, bucket_keys_limit=4, bucket_size_limit=100)
    store.batch_offload({"a": b"12345", "b": b"678"})
    yield store
    store.close()


BAD_CALLS: dict[str, tuple[Callable[[BucketStore], object], type[Exception], str]] = {
    "empty batch": (lambda s: s.batch_offload({}), InvalidArgument, "at least one"),
    "empty list of pairs": (lambda s: s.batch_offload([]), InvalidArgument, "at least one"),
    "empty key": (lambda s: s.batch_offload({"": b"x"}), InvalidArgument, "non-empty"),
    "bytes key": (lambda s: s.batch_offload({b"k": b"x"}), InvalidArgument, "b'k'"),
    "int key": (lambda s: s.batch_offload({5: b"x"}), InvalidArgument, "5"),
    "key too long": (lambda s: s.batch_offload({"é" * 2049: b"x"}), InvalidArgument, "4096"),
    "lone surrogate key": (lambda s: s.batch_offload({"\udc80": b"x"}), InvalidArgument, "UTF-8"),
    "str value": (lambda s: s.batch_offload({"c": "text"}), InvalidArgument, "'c'"),
    "int value": (lambda s: s.batch_offload({"c": 42}), InvalidArgument, "'c'"),
    "non-contiguous value": (lambda s: s.batch_offload({"c": np.zeros((4, 4))[:, 1]}), InvalidArgument, "'c'"),
    "not a pair": (lambda s: s.batch_offload([("c", b"x", 1)]), InvalidArgument, "pair"),
    "not a batch": (lambda s: s.batch_offload(b"abc"), InvalidArgument, "mapping"),
    "stored key": (lambda s: s.batch_offload({"c": b"x", "a": b"y"}), KeyExists, "'a'"),
    "key twice in batch": (lambda s: s.batch_offload([("c", b"x"), ("c", b"y")]), KeyExists, "'c'"),
    "bad on_duplicate": (lambda s: s.batch_offload({"c": b"x"}, on_duplicate="maybe"), InvalidArgument, "on_duplicate"),
    "too many keys": (lambda s: s.batch_offload({f"k{i}": b"x" for i in range(5)}), InvalidArgument, "bucket_keys_limit"),
    "too many bytes": (lambda s: s.batch_offload({"c": b"x" * 60, "d": b"y" * 60}), InvalidArgument, "bucket_size_limit"),
    "load empty": (lambda s: s.batch_load({}), InvalidArgument, "at least one"),
    "load unknown": (lambda s: s.batch_load({"zz": bytearray(1)}), KeyNotFound, "'zz'"),
    "load small buffer": (lambda s: s.batch_load({"a": bytearray(4)}), SizeMismatch, "'a'"),
    "load large buffer": (lambda s: s.batch_load({"a": bytearray(6)}), SizeMismatch, "'a'"),
    "load readonly buffer": (lambda s: s.batch_load({"a": b"12345"}), InvalidArgument, "'a'"),
    "load non-buffer": (lambda s: s.batch_load({"a": [1, 2]}), InvalidArgument, "'a'"),
    "get empty": (lambda s: s.batch_get([]), InvalidArgument, "at least one"),
    "get unknown": (lambda s: s.batch_get(["a", "zz"]), KeyNotFound, "'zz'"),
    "get bad key": (lambda s: s.batch_get([""]), InvalidArgument, "non-empty"),
    "remove unknown": (lambda s: s.remove("zz"), KeyNotFound, "'zz'"),
    "remove bad key": (lambda s: s.remove(7), InvalidArgument, "7"),
    "delete unknown bucket": (lambda s: s.delete_bucket(999), KeyNotFound, "999"),
    "keys of unknown bucket": (lambda s: s.bucket_keys(999), KeyNotFound, "999"),
    "scan batch size": (lambda s: list(s.scan_meta(0)), InvalidArgument, "batch_size"),
    "compact ratio": (lambda s: s.compact(2), InvalidArgument, "min_dead_ratio"),
    "watermarks": (lambda s: s.evict_to_watermark(high=0.5, low=0.9), InvalidArgument, "watermarks"),
    "group size": (lambda s: s.group_for_offload({"c": -1}), InvalidArgument, "'c'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_typed_error_and_changes_nothing(filled: BucketStore, case: str) -> None:
    call, error, fragment = BAD_CALLS[case]
    before = snapshot(filled.path)
    keys_before = filled.batch_exists(["a", "b", "c", "d"])
    with pytest.raises(error) as caught:
        call(filled)
    assert isinstance(caught.value, KvBucketError)
    assert fragment in str(caught.value)
    assert snapshot(filled.path) == before
    assert filled.batch_exists(["a", "b", "c", "d"]) == keys_before
    assert filled.batch_get(["a", "b"]) == {"a": b"12345", "b": b"678"}


def test_error_hierarchy() -> None:
    for error in (KeyNotFound, KeyExists, SizeMismatch, CapacityExceeded, CorruptionError, StoreLocked, StoreClosed, InvalidArgument, ReadOnlyStore, StorageIOError):
        assert issubclass(error, KvBucketError)
    assert issubclass(KeyNotFound, KeyError)
    assert issubclass(InvalidArgument, ValueError)
    assert issubclass(StorageIOError, OSError)
    assert str(KeyNotFound("key 'a' is not stored")) == "key 'a' is not stored"


def test_open_on_a_file_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="not a directory"):
        BucketStore.open(path)
    assert path.read_bytes() == b"x"


def test_readonly_on_a_missing_directory_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        BucketStore.open(tmp_path / "missing", readonly=True)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    "fields",
    [
        {"durability": "sometimes"},
        {"eviction_policy": "random"},
        {"io_mode": "mmap"},
        {"bucket_keys_limit": 0},
        {"bucket_size_limit": -1},
        {"max_total_size": -5},
        {"io_threads": 0},
        {"verify_checksums": "ture"},  # text is parsed, and this is no boolean
        {"eviction_high_watermark": 1.5},
        {"eviction_low_watermark": 0.95},
        {"group_max_delay_s": -1},
        {"no_such_field": 1},
    ],
)
def test_invalid_config_changes_nothing(tmp_path: Path, fields: dict[str, object]) -> None:
    path = tmp_path / "store"
    with pytest.raises(InvalidArgument):
        BucketStore.open(path, **fields)
    assert not path.exists()


def test_bad_value_inside_a_batch_writes_nothing(filled: BucketStore) -> None:
    before = snapshot(filled.path)
    with pytest.raises(InvalidArgument, match="'bad'"):
        filled.batch_offload({"c": b"fine", "bad": object()})
    assert snapshot(filled.path) == before
    assert not filled.exists("c")
