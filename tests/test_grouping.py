"""Grouping for an offload pipeline (issue 3): ``group_for_offload`` and
``pending_group``, Mooncake's AllocateOffloadingBuckets fixed.

Time is driven by a fake clock, never by sleeping. ``OffloadGrouper`` takes
its clock as a documented constructor argument; the store builds its grouper
itself and has no clock seam, so the store-level tests substitute the
``OffloadGrouper`` name the store module uses with a factory that passes the
fake clock (see :func:`clocked_store`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kvbucket.store as store_module
from kvbucket import BucketStore
from kvbucket.errors import InvalidArgument
from kvbucket.policy.grouping import OffloadGrouper, cut_batches, split_batches
from storeutil import value_for


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked_store(store_dir: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A store factory whose grouper reads ``clock``."""
    real = OffloadGrouper

    def with_fake_clock(size_limit: int, keys_limit: int, max_delay_s: float) -> OffloadGrouper:
        return real(size_limit, keys_limit, max_delay_s, clock=clock)

    monkeypatch.setattr(store_module, "OffloadGrouper", with_fake_clock)
    opened: list[BucketStore] = []

    def open_store(**fields: Any) -> BucketStore:
        store = BucketStore.open(store_dir, **fields)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def write_groups(store: BucketStore, groups: list[list[str]], sizes: dict[str, int]) -> None:
    """Offload each group as one bucket (they must be valid buckets)."""
    for group in groups:
        store.batch_offload({key: value_for(key, sizes[key]) for key in group})


# -- full buckets and the carried remainder -----------------------------------------------
def test_full_buckets_are_emitted_and_the_rest_is_carried(store: BucketStore) -> None:
    limit = store.config.bucket_size_limit
    third = limit // 3
    sizes = {f"k{i}": third for i in range(7)}
    groups = store.group_for_offload(sizes)
    assert groups == [["k0", "k1", "k2"], ["k3", "k4", "k5"]]
    assert store.pending_group() == ["k6"]
    # the next call completes the carried bucket before starting a new one
    groups = store.group_for_offload({"k7": third, "k8": third, "k9": third})
    assert groups == [["k6", "k7", "k8"]]
    assert store.pending_group() == ["k9"]


def test_keys_limit_makes_a_bucket_full(store_dir: Path) -> None:
    with BucketStore.open(store_dir, bucket_keys_limit=3, bucket_size_limit=1000) as store:
        groups = store.group_for_offload({f"k{i}": 10 for i in range(8)})
        assert groups == [["k0", "k1", "k2"], ["k3", "k4", "k5"]]
        assert store.pending_group() == ["k6", "k7"]


def test_a_bucket_is_cut_before_an_object_that_would_overflow_it(store_dir: Path) -> None:
    with BucketStore.open(store_dir, bucket_keys_limit=10, bucket_size_limit=100) as store:
        sizes = {"a": 60, "b": 30, "c": 50, "d": 50, "e": 1}
        groups = store.group_for_offload(sizes)
        for group in groups:
            assert sum(sizes[k] for k in group) <= 100
        assert groups == [["a", "b"], ["c", "d"]]  # a+b+c = 140; c+d = 100 is exactly full
        assert store.pending_group() == ["e"]
        write_groups(store, groups, sizes)


def test_remainder_is_deduplicated_and_arrival_order_kept(store_dir: Path) -> None:
    with BucketStore.open(store_dir, bucket_keys_limit=4, bucket_size_limit=1000) as store:
        assert store.group_for_offload({"a": 10, "b": 10}) == []
        assert store.group_for_offload({"b": 10, "a": 10, "c": 10}) == []
        assert store.pending_group() == ["a", "b", "c"]
        assert store.group_for_offload({"c": 10, "d": 10, "e": 10}) == [["a", "b", "c", "d"]]
        assert store.pending_group() == ["e"]


def test_stored_keys_are_dropped_from_input_and_from_the_remainder(store_dir: Path) -> None:
    with BucketStore.open(store_dir, bucket_keys_limit=3, bucket_size_limit=1000) as store:
        store.batch_offload({"stored": b"x"})
        assert store.group_for_offload({"stored": 1, "a": 10, "b": 10}) == []
        assert store.pending_group() == ["a", "b"]
        store.batch_offload({"a": value_for("a", 10)})  # written by another path meanwhile
        assert store.group_for_offload({"c": 10}) == []
        assert store.pending_group() == ["b", "c"]
        assert store.group_for_offload({"d": 10, "stored": 1}) == [["b", "c", "d"]]
        assert store.pending_group() == []
        store.batch_offload({"e": b"e"})
        assert store.group_for_offload({"e": 1}, flush=True) == []


def test_flush_emits_the_remainder(store_dir: Path) -> None:
    with BucketStore.open(store_dir, bucket_keys_limit=3, bucket_size_limit=1000) as store:
        assert store.group_for_offload({f"k{i}": 10 for i in range(5)}) == [["k0", "k1", "k2"]]
        assert store.group_for_offload({"k5": 10}, flush=True) == [["k3", "k4", "k5"]]
        assert store.pending_group() == []
        store.group_for_offload({"x": 5})
        assert store.group_for_offload({}, flush=True) == [["x"]]
        assert store.pending_group() == []
        assert store.group_for_offload({}, flush=True) == []


def test_flush_emits_full_buckets_and_a_partial_one(store_dir: Path) -> None:
    with BucketStore.open(store_dir, bucket_keys_limit=2, bucket_size_limit=1000) as store:
        sizes = {f"k{i}": 10 for i in range(5)}
        groups = store.group_for_offload(sizes, flush=True)
        assert groups == [["k0", "k1"], ["k2", "k3"], ["k4"]]
        assert store.pending_group() == []
        write_groups(store, groups, sizes)
        assert len(store.bucket_ids()) == 3


# -- oversized objects ----------------------------------------------------------------------
def test_object_larger_than_a_bucket_gets_its_own(store_dir: Path) -> None:
    with BucketStore.open(store_dir, bucket_keys_limit=10, bucket_size_limit=4096) as store:
        sizes = {"a": 1000, "big": 10_000, "b": 1000, "huge": 50_000}
        groups = store.group_for_offload(sizes)
        assert ["big"] in groups and ["huge"] in groups, "an oversized object must never be dropped"
        emitted = [k for g in groups for k in g]
        assert sorted(emitted + store.pending_group()) == sorted(sizes)
        for group in groups:
            assert len(group) == 1 or sum(sizes[k] for k in group) <= 4096
        groups += store.group_for_offload({}, flush=True)
        write_groups(store, groups, sizes)  # every group is a valid bucket
        assert sorted(k for page in store.scan_meta() for k, _ in page) == sorted(sizes)


# -- the time flush ---------------------------------------------------------------------------
def test_remainder_older_than_group_max_delay_is_emitted(clocked_store: Any, clock: FakeClock) -> None:
    store = clocked_store(bucket_keys_limit=3, bucket_size_limit=1000, group_max_delay_s=5.0)
    assert store.group_for_offload({"a": 10}) == []
    clock.advance(4.9)
    assert store.group_for_offload({"b": 10}) == []  # younger than 5 s: still carried
    assert store.group_for_offload({}) == []
    clock.advance(0.1)
    assert store.group_for_offload({}) == [["a", "b"]], "an empty call must emit an expired remainder"
    assert store.pending_group() == []


def test_time_flush_counts_from_the_oldest_carried_key(clocked_store: Any, clock: FakeClock) -> None:
    store = clocked_store(bucket_keys_limit=3, bucket_size_limit=1000, group_max_delay_s=5.0)
    store.group_for_offload({"a": 10})
    for key in ("b",):  # adding keys does not restart the clock of those carried
        clock.advance(3)
        assert store.group_for_offload({key: 10}) == []
    clock.advance(2)
    assert store.group_for_offload({"c": 10}) == [["a", "b", "c"]]
    # a full bucket emitted restarts the clock for what is then carried (all new keys)
    assert store.group_for_offload({"d": 10, "e": 10, "f": 10, "g": 10}) == [["d", "e", "f"]]
    clock.advance(4.99)
    assert store.group_for_offload({}) == []
    clock.advance(0.01)
    assert store.group_for_offload({}) == [["g"]]


def test_remainder_after_a_full_bucket_is_timed_from_its_own_arrival(clocked_store: Any, clock: FakeClock) -> None:
    store = clocked_store(bucket_keys_limit=2, bucket_size_limit=1000, group_max_delay_s=5.0)
    assert store.group_for_offload({"a": 10}) == []
    clock.advance(3)
    assert store.group_for_offload({"b": 10, "c": 10}) == [["a", "b"]]  # "c" is carried, new
    clock.advance(2)  # "a" would be 5 s old, but "c" is only 2 s old
    assert store.group_for_offload({}) == []
    assert store.pending_group() == ["c"]
    clock.advance(3)
    assert store.group_for_offload({}) == [["c"]]


def test_time_flush_disabled_by_zero_delay(clocked_store: Any, clock: FakeClock) -> None:
    store = clocked_store(bucket_keys_limit=3, bucket_size_limit=1000, group_max_delay_s=0)
    store.group_for_offload({"a": 10})
    clock.advance(1e9)
    assert store.group_for_offload({}) == []
    assert store.pending_group() == ["a"]
    assert store.group_for_offload({}, flush=True) == [["a"]]


def test_default_group_max_delay_is_five_seconds(clocked_store: Any, clock: FakeClock) -> None:
    store = clocked_store()
    assert store.config.group_max_delay_s == 5.0
    store.group_for_offload({"a": 1})
    clock.advance(4.999)
    assert store.group_for_offload({}) == []
    clock.advance(0.001)
    assert store.group_for_offload({}) == [["a"]]


def test_empty_calls_without_a_remainder_never_emit(clocked_store: Any, clock: FakeClock) -> None:
    store = clocked_store(group_max_delay_s=1.0)
    assert store.group_for_offload({}) == []
    clock.advance(100)
    assert store.group_for_offload({"a": 1}) == [], "a key that just arrived is not expired"
    clock.advance(1)
    assert store.group_for_offload({}) == [["a"]]


# -- argument checks --------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [{"a": -1}, {"a": 1.5}, {"a": True}, {"a": "10"}, {"": 1}, {7: 1}])
def test_bad_arguments_raise_invalid_argument_and_change_nothing(store: BucketStore, sizes: dict[Any, Any]) -> None:
    store.group_for_offload({"kept": 1})
    with pytest.raises(InvalidArgument):
        store.group_for_offload({"other": 1, **sizes})
    assert store.pending_group() == ["kept"]


def test_pending_group_is_a_copy(store: BucketStore) -> None:
    store.group_for_offload({"a": 1, "b": 2})
    pending = store.pending_group()
    pending.append("c")
    assert store.pending_group() == ["a", "b"]


# -- properties, on the grouper itself (its clock is a documented argument) -------------------------
keys_st = st.sampled_from([f"k{i}" for i in range(40)])
calls_st = st.lists(
    st.tuples(
        st.dictionaries(keys_st, st.integers(0, 300), max_size=12),  # the mapping
        st.booleans(),  # flush
        st.sampled_from([0.0, 0.0, 1.0, 2.5, 6.0]),  # clock advance before the call
        st.lists(keys_st, max_size=3),  # keys that get stored before the call
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(  # a remainder left after a full bucket is young, even if the old one was not
    calls=[({"k0": 10}, False, 0.0, []), ({"k1": 10, "k2": 10}, False, 2.5, []), ({}, False, 2.5, [])],
    size_limit=100,
    keys_limit=2,
    delay=5.0,
)
@given(calls=calls_st, size_limit=st.integers(50, 400), keys_limit=st.integers(1, 6), delay=st.sampled_from([0.0, 5.0]))
def test_grouper_properties(calls: list[Any], size_limit: int, keys_limit: int, delay: float) -> None:
    clock = FakeClock()
    grouper = OffloadGrouper(size_limit, keys_limit, delay, clock=clock)
    stored: set[str] = set()
    emitted: list[str] = []  # keys given out so far (each is then written)
    offered: dict[str, int] = {}  # size first offered while not stored or pending
    oldest: float | None = None  # model: when the current remainder started
    for sizes, flush, advance, newly_stored in calls:
        clock.advance(advance)
        stored.update(newly_stored)
        before = set(grouper.pending())
        offered.update({key: size for key, size in sizes.items() if key not in before and key not in stored})
        groups = grouper.add(sizes, stored.__contains__, flush)
        after = grouper.pending()
        flat = [k for g in groups for k in g]
        # nothing stored is emitted or carried; nothing is emitted twice
        assert not (set(flat) | set(after)) & stored
        assert len(flat) == len(set(flat)) and not set(flat) & set(emitted) and not set(flat) & set(after)
        emitted += flat
        # conservation: every key offered and not stored meanwhile is emitted or carried
        assert (set(before) | {k for k in sizes if k not in stored}) - stored == set(flat) | set(after)
        for group in groups:
            assert group, "no empty buckets"
            assert len(group) <= keys_limit
            assert len(group) == 1 or sum(offered[k] for k in group) <= size_limit
        # the carried remainder is a partial bucket
        assert len(after) < keys_limit and sum(offered[k] for k in after) < size_limit
        if flush:
            assert after == []
        # time flush model: a remainder is emitted once it is delay seconds old
        expired = delay > 0 and oldest is not None and before and clock.now - oldest >= delay
        if expired:
            assert after == [], "an expired remainder must be emitted"
        if not after:
            oldest = None
        elif not before or groups:
            # a new remainder (all its keys arrived in this call) starts now
            oldest = clock.now
        if delay > 0 and oldest is not None:
            assert clock.now - oldest < delay or after == []
        # full buckets: every group but a flushed remainder could take no more
        full_groups = groups if not (flush or expired) else groups[:-1]
        for group in full_groups:
            size = sum(offered[k] for k in group)
            nxt = flat[flat.index(group[-1]) + 1] if group[-1] != flat[-1] else (after[0] if after else None)
            assert len(group) == keys_limit or size >= size_limit or (nxt is not None and size + offered[nxt] > size_limit), (group, nxt)
        stored.update(flat)  # the pipeline writes what it was given before its next call


# -- cut_batches: the one cutter of the grouper, compaction, the importer and the adapters

Item = tuple[int, int, int]  # (position, bytes, keys)


@settings(max_examples=300, deadline=None)
@given(
    weights=st.lists(st.tuples(st.integers(0, 300), st.integers(1, 3)), max_size=30),
    max_bytes=st.integers(1, 500),
    max_keys=st.integers(1, 6),
)
def test_cut_batches_properties(weights: list[tuple[int, int]], max_bytes: int, max_keys: int) -> None:
    items: list[Item] = [(i, b, k) for i, (b, k) in enumerate(weights)]
    full, rest = cut_batches(items, max_bytes=max_bytes, max_keys=max_keys, size=lambda item: item[1], keys=lambda item: item[2])
    batches = [*full, rest] if rest else full
    assert split_batches(items, max_bytes=max_bytes, max_keys=max_keys, size=lambda item: item[1], keys=lambda item: item[2]) == batches
    # in order, nothing lost, nothing twice, no empty batch
    assert [item for batch in batches for item in batch] == items
    assert all(batch for batch in batches)
    for position, batch in enumerate(batches):
        batch_bytes, batch_keys = sum(item[1] for item in batch), sum(item[2] for item in batch)
        # only a batch of one item is ever over a limit
        assert len(batch) == 1 or (batch_bytes <= max_bytes and batch_keys <= max_keys)
        if batch is rest:
            assert batch_bytes < max_bytes and batch_keys < max_keys, "the rest is a partial batch"
            continue
        # a full batch reached a limit, or the next item would have pushed it past one
        nxt = batches[position + 1][0] if position + 1 < len(batches) else None
        reached = batch_bytes >= max_bytes or batch_keys >= max_keys
        assert reached or (nxt is not None and (batch_bytes + nxt[1] > max_bytes or batch_keys + nxt[2] > max_keys)), (batch, nxt)


def test_cut_batches_counts_one_key_per_item_by_default() -> None:
    full, rest = cut_batches(["a", "b", "c", "d", "e"], max_bytes=1 << 20, max_keys=2, size=lambda key: 10)
    assert (full, rest) == ([["a", "b"], ["c", "d"]], ["e"])


def test_an_item_over_the_byte_limit_is_a_batch_of_its_own() -> None:
    sizes = {"a": 10, "big": 500, "b": 10}
    assert split_batches(sizes, max_bytes=100, max_keys=10, size=sizes.__getitem__) == [["a"], ["big"], ["b"]]


def test_the_limits_are_keyword_only() -> None:
    """Two of the cutters this one replaced took the limits in opposite orders."""
    with pytest.raises(TypeError):
        cut_batches(["a"], 100, 10, size=len)  # type: ignore[misc]
