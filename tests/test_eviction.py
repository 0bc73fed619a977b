"""Eviction policies: each policy's victim order, as a unit (buckets built in
memory, driven through the calls the store makes) and through a store."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbucket import BucketConfig, BucketStore
from kvbucket._core.index import Bucket
from kvbucket._core.space import Limits, Usage
from kvbucket.policy.eviction import MAIN, POLICIES, PROBATION, EvictionPolicy, TwoQueue, make_policy
from storeutil import value_for

SIZE = 100


def bucket(bucket_id: int, nkeys: int = 2, access: int | None = None, dead: int = 0) -> Bucket:
    """A bucket of ``nkeys`` live objects of SIZE bytes, ``dead`` dead bytes after them."""
    keys = [f"b{bucket_id}/{i}" for i in range(nkeys)]
    length = nkeys * SIZE + dead
    made = Bucket(bucket_id, length, False, length, keys=keys, logical=nkeys * SIZE, used=nkeys * SIZE)
    made.access = bucket_id if access is None else access
    return made


def total(buckets: list[Bucket]) -> Usage:
    return sum((Usage.of(b) for b in buckets), Usage())


def committed(policy: EvictionPolicy, buckets: list[Bucket]) -> list[Bucket]:
    for b in buckets:
        policy.committed(b)
    return buckets


def ids(buckets: list[Bucket] | None) -> list[int] | None:
    return None if buckets is None else [b.bucket_id for b in buckets]


def test_the_registry_names_every_configurable_policy() -> None:
    from kvbucket.config import _CHOICES

    assert set(POLICIES) == set(_CHOICES["eviction_policy"]) == {"none", "fifo", "lru", "2q"}
    assert BucketConfig().eviction_policy == "2q"


# -- none, fifo, lru ---------------------------------------------------------------
def test_none_never_picks_a_victim() -> None:
    policy = make_policy("none", Limits(keys=4))
    buckets = [bucket(1), bucket(2)]
    assert not policy.evicts
    assert policy.victims(buckets, Usage(keys=6), Limits(keys=4)) is None
    assert policy.victims(buckets, Usage(keys=4), Limits(keys=4)) == []


def test_fifo_takes_lowest_ids_whatever_the_reads() -> None:
    policy = make_policy("fifo", Limits(keys=8))
    buckets = committed(policy, [bucket(3, access=1), bucket(1, access=9), bucket(2, access=5)])
    policy.read(buckets[1])
    assert ids(policy.victims(buckets, Usage(keys=10), Limits(keys=6))) == [1, 2]


def test_lru_takes_lowest_access_stamps() -> None:
    policy = make_policy("lru", Limits(keys=8))
    buckets = committed(policy, [bucket(3, access=1), bucket(1, access=9), bucket(2, access=5)])
    assert ids(policy.victims(buckets, Usage(keys=10), Limits(keys=6))) == [3, 2]


@pytest.mark.parametrize("name", ["fifo", "lru", "2q"])
def test_empty_then_half_dead_buckets_go_first(name: str) -> None:
    policy = make_policy(name, Limits(keys=8))
    empty = bucket(9, nkeys=0, dead=SIZE)
    mostly_dead = bucket(8, nkeys=1, dead=3 * SIZE)
    half_dead = bucket(7, nkeys=2, dead=2 * SIZE)
    buckets = committed(policy, [bucket(1), half_dead, empty, mostly_dead, bucket(2)])
    usage = total(buckets)
    assert ids(policy.victims(buckets, usage, Limits(keys=usage.keys - 3))) == [9, 8, 7]


@pytest.mark.parametrize("name", ["fifo", "lru", "2q"])
def test_not_enough_even_with_every_bucket_is_none(name: str) -> None:
    policy = make_policy(name, Limits(keys=4))
    buckets = committed(policy, [bucket(1), bucket(2)])
    assert policy.victims(buckets, Usage(keys=9), Limits(keys=4)) is None


# -- 2q ----------------------------------------------------------------------------
def test_2q_new_buckets_enter_probation_and_leave_oldest_first() -> None:
    policy = make_policy("2q", Limits(keys=8))
    buckets = committed(policy, [bucket(i, access=10 - i) for i in range(1, 5)])
    assert [b.segment for b in buckets] == [PROBATION] * 4
    assert ids(policy.victims(buckets, Usage(keys=10), Limits(keys=8))) == [1]
    assert ids(policy.victims(buckets, Usage(keys=12), Limits(keys=8))) == [1, 2]


def test_2q_a_read_promotes_a_probation_bucket_to_main() -> None:
    policy = make_policy("2q", Limits(keys=8))
    buckets = committed(policy, [bucket(i) for i in range(1, 5)])
    policy.read(buckets[0])
    assert buckets[0].segment == MAIN
    assert ids(policy.victims(buckets, Usage(keys=10), Limits(keys=8))) == [2]


def test_2q_takes_main_by_lru_once_probation_is_within_its_share() -> None:
    # 8 keys of capacity: probation may keep 2 keys (25%) before main is touched.
    policy = make_policy("2q", Limits(keys=8))
    main = committed(policy, [bucket(1, access=20), bucket(2, access=10)])
    for b in main:
        policy.read(b)
    probation = committed(policy, [bucket(3, access=30), bucket(4, access=40)])
    buckets = main + probation
    # probation holds 4 keys (> 2): b3 goes; then it holds 2 (not > 2): main by LRU, b2 then b1.
    assert ids(policy.victims(buckets, Usage(keys=14), Limits(keys=8))) == [3, 2, 1]


def test_2q_takes_probation_when_main_is_empty() -> None:
    policy = make_policy("2q", Limits(keys=16))
    buckets = committed(policy, [bucket(1), bucket(2)])  # 4 keys: within probation's share of 16
    assert ids(policy.victims(buckets, Usage(keys=18), Limits(keys=16))) == [1]


def test_2q_a_key_recently_evicted_from_probation_admits_its_bucket_to_main() -> None:
    policy = make_policy("2q", Limits(keys=8))
    [old] = committed(policy, [bucket(1)])
    policy.evicted(old)
    again = Bucket(5, 2 * SIZE, False, 2 * SIZE, keys=["b1/1", "new"], logical=2 * SIZE, used=2 * SIZE)
    fresh = Bucket(6, 2 * SIZE, False, 2 * SIZE, keys=["other", "new2"], logical=2 * SIZE, used=2 * SIZE)
    committed(policy, [again, fresh])
    assert (again.segment, fresh.segment) == (MAIN, PROBATION)


def test_2q_evicting_a_main_bucket_remembers_nothing() -> None:
    policy = make_policy("2q", Limits(keys=8))
    assert isinstance(policy, TwoQueue)
    [read] = committed(policy, [bucket(1)])
    policy.read(read)
    policy.evicted(read)
    assert not policy.is_ghost("b1/0")


def test_2q_ghost_list_holds_as_many_keys_as_the_store() -> None:
    policy = make_policy("2q", Limits(logical=4 * SIZE))  # 4 objects of the mean size
    assert isinstance(policy, TwoQueue)
    buckets = committed(policy, [bucket(i, nkeys=3) for i in range(1, 4)])
    for b in buckets:
        policy.evicted(b)
    assert policy.ghost_capacity() == 4
    remembered = [key for b in buckets for key in b.keys if policy.is_ghost(key)]
    assert remembered == ["b2/2", "b3/0", "b3/1", "b3/2"]  # the most recently evicted


# -- through a store ---------------------------------------------------------------
# Foreground eviction only: these follow which bucket each write evicts.
def put(store: BucketStore, name: str, nkeys: int = 2) -> list[str]:
    keys = [f"{name}/{i}" for i in range(nkeys)]
    store.batch_offload({key: value_for(key, SIZE) for key in keys})
    return keys


def evicted_by_next_write(store: BucketStore, name: str) -> list[str]:
    seen: list[str] = []
    store.batch_offload({f"{name}/{i}": value_for(f"{name}/{i}", SIZE) for i in range(2)}, on_evict=seen.extend)
    return seen


def test_default_store_keeps_a_read_bucket_over_newer_unread_ones(tmp_path: Path) -> None:
    with BucketStore.open(tmp_path / "s", total_keys_limit=8, background_eviction=False) as store:
        assert store.config.eviction_policy == "2q"
        read = put(store, "read")
        store.batch_get(read)
        unread = [put(store, f"u{i}") for i in range(3)]
        # bucket LRU would evict "read" (least recently used); 2Q evicts the oldest unread bucket
        assert evicted_by_next_write(store, "n0") == unread[0]
        assert evicted_by_next_write(store, "n1") == unread[1]


def test_default_store_rewrites_a_recently_evicted_block_into_main(tmp_path: Path) -> None:
    with BucketStore.open(tmp_path / "s", total_keys_limit=8, background_eviction=False) as store:
        first = [put(store, f"b{i}") for i in range(4)]
        assert evicted_by_next_write(store, "n0") == first[0]
        store.batch_offload({first[0][0]: value_for(first[0][0], SIZE), "x/0": value_for("x/0", SIZE)})
        # The re-written bucket is in main: unread probation buckets go before
        # it, even those written after it (bucket LRU would evict it at n4).
        for name, victim in (("n1", first[2]), ("n2", first[3]), ("n3", ["n0/0", "n0/1"]), ("n4", ["n1/0", "n1/1"])):
            assert evicted_by_next_write(store, name) == victim
        assert store.exists(first[0][0]) and store.exists("x/0")


def test_reopened_store_starts_every_bucket_in_main_in_write_order(tmp_path: Path) -> None:
    with BucketStore.open(tmp_path / "s", total_keys_limit=8, background_eviction=False) as store:
        buckets = [put(store, f"b{i}") for i in range(4)]
        store.batch_get(buckets[0])
    with BucketStore.open(tmp_path / "s", total_keys_limit=8, background_eviction=False) as store:
        assert evicted_by_next_write(store, "n0") == buckets[0]  # recency before the restart is gone
        assert evicted_by_next_write(store, "n1") == buckets[1]
