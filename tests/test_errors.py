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
from storeutil import ReprCountingKey, snapshot


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
    "group not a mapping": (lambda s: s.group_for_offload(["c"]), InvalidArgument, "group_for_offload takes a mapping"),
    "offload a str": (lambda s: s.batch_offload("ab"), InvalidArgument, "mapping"),
    "load a list": (lambda s: s.batch_load(["a"]), InvalidArgument, "batch_load takes a mapping"),
    "load None": (lambda s: s.batch_load(None), InvalidArgument, "batch_load takes a mapping"),
    "load int key": (lambda s: s.batch_load({5: bytearray(5)}), InvalidArgument, "5"),
    "get a str": (lambda s: s.batch_get("ab"), InvalidArgument, "batch_get takes a collection of keys, not one str"),
    "get None": (lambda s: s.batch_get(None), InvalidArgument, "batch_get takes a collection"),
    "remove a str": (lambda s: s.batch_remove("ab"), InvalidArgument, "pass [key]"),
    "remove bytes": (lambda s: s.batch_remove(b"ab"), InvalidArgument, "batch_remove"),
    "remove None": (lambda s: s.batch_remove(None), InvalidArgument, "batch_remove"),
    "exists int": (lambda s: s.exists(5), InvalidArgument, "5"),
    "exists bytes": (lambda s: s.exists(b"a"), InvalidArgument, "b'a'"),
    "in int": (lambda s: 5 in s, InvalidArgument, "5"),
    "exists batch a str": (lambda s: s.batch_exists("ab"), InvalidArgument, "batch_exists"),
    "exists batch None": (lambda s: s.batch_exists(None), InvalidArgument, "batch_exists"),
    "exists batch an int": (lambda s: s.batch_exists(5), InvalidArgument, "batch_exists"),
    "exists batch int key": (lambda s: s.batch_exists(["a", 5]), InvalidArgument, "5"),
    "query a str": (lambda s: s.batch_query("ab"), InvalidArgument, "batch_query"),
    "query None key": (lambda s: s.batch_query(iter(["a", None])), InvalidArgument, "None"),
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
    for error in (
        KeyNotFound, KeyExists, SizeMismatch, CapacityExceeded, CorruptionError,
        StoreLocked, StoreClosed, InvalidArgument, ReadOnlyStore, StorageIOError,
    ):
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
        {"eviction_low_watermark": 0.999},  # above the default high watermark
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


def test_lookups_take_any_str_key(filled: BucketStore) -> None:
    """A str that could never be stored is not found; a str subclass is a key."""

    class Name(str):
        pass

    assert filled.batch_exists(("a", Name("b"), "", "x" * 5000)) == [True, True, False, False]
    assert filled.batch_exists(key for key in ["b", "c"]) == [True, False]
    assert set(filled.batch_query([Name("a"), "zz"])) == {"a"}
    assert Name("a") in filled and "zz" not in filled


def test_every_error_class_is_exported_from_kvbucket() -> None:
    import inspect

    import kvbucket
    from kvbucket import errors

    classes = {
        name for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == errors.__name__
    }
    assert classes == set(errors.__all__)
    for name in classes:
        assert getattr(kvbucket, name) is getattr(errors, name)
        assert name in kvbucket.__all__



def test_a_valid_batch_composes_no_error_message(store_dir: Path) -> None:
    """Naming a key in an error costs a repr; a batch with nothing wrong pays
    none (per-object cost), while a bad value still names its key."""
    ReprCountingKey.reprs = 0
    keys = [ReprCountingKey(f"k{i}") for i in range(8)]
    with BucketStore.open(store_dir) as store:
        store.batch_offload({k: np.full(16, i, dtype=np.uint8) for i, k in enumerate(keys)})
        assert ReprCountingKey.reprs == 0
        assert store.batch_get(["k3"])["k3"] == bytes([3] * 16)
        with pytest.raises(InvalidArgument, match="'bad'"):
            store.batch_offload({ReprCountingKey("bad"): np.zeros((4, 4))[:, 1]})
