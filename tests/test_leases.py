"""Lookup leases: a key a lookup found survives eviction until it is loaded,
released or its lease expires; leases never hold space for ever."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kvbucket import BucketConfig, BucketStore
from kvbucket._core.lease import LeaseTable
from kvbucket.errors import CapacityExceeded, InvalidArgument
from storeutil import du, value_for


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def put(store: BucketStore, name: str, size: int = 1000) -> str:
    store.batch_offload({name: value_for(name, size)})
    return name


def open_fifo(store_dir: Path, clock: FakeClock, **fields: object) -> BucketStore:
    """Room for exactly 4 buckets of 1,000 bytes; foreground eviction only unless asked."""
    options: dict = {"eviction_policy": "fifo", "max_total_size": 4000, "background_eviction": False, "lookup_lease_s": 5.0, **fields}
    return BucketStore.open(store_dir, clock=clock, **options)


def test_a_looked_up_key_survives_foreground_eviction(store_dir: Path) -> None:
    clock = FakeClock()
    with open_fifo(store_dir, clock) as store:
        names = [put(store, f"k{i}") for i in range(4)]
        assert store.lookup(["k0", "nope"]) == [True, False]
        put(store, "k4")  # needs one bucket: fifo would take k0's, which is leased
        assert store.exists("k0") and not store.exists("k1")
        assert store.batch_get(["k0"])["k0"] == value_for("k0", 1000)
        assert store.stats().leased_keys == 0  # the load ended the lease
        put(store, "k5")  # now k0 is the oldest and no longer leased
        assert not store.exists("k0") and [store.exists(n) for n in names[2:]] == [True, True]


def test_batch_load_ends_the_lease_too(store_dir: Path) -> None:
    clock = FakeClock()
    with open_fifo(store_dir, clock) as store:
        for i in range(4):
            put(store, f"k{i}")
        store.lookup(["k0"])
        store.batch_load({"k0": bytearray(1000)})
        put(store, "k4")
        assert not store.exists("k0")


def test_a_lease_expires_on_the_clock(store_dir: Path) -> None:
    clock = FakeClock()
    with open_fifo(store_dir, clock) as store:
        for i in range(4):
            put(store, f"k{i}")
        store.lookup(["k0"])
        clock.now += 4.9
        put(store, "k4")
        assert store.exists("k0")
        clock.now += 0.2  # past the 5 s lease
        put(store, "k5")
        assert not store.exists("k0")
        assert store.stats().leased_keys == 0  # the expired lease was dropped, not kept


def test_release_ends_a_lease_and_lease_s_zero_grants_none(store_dir: Path) -> None:
    clock = FakeClock()
    with open_fifo(store_dir, clock) as store:
        for i in range(4):
            put(store, f"k{i}")
        store.lookup(["k0", "k1"])
        store.release(["k0"])
        store.lookup(["k2"], lease_s=0)
        assert store.stats().leased_keys == 1
        put(store, "k4")
        put(store, "k5")
        assert not store.exists("k0") and store.exists("k1") and not store.exists("k2")


def test_lookup_lease_s_zero_in_the_config_disables_leases(store_dir: Path) -> None:
    clock = FakeClock()
    with open_fifo(store_dir, clock, lookup_lease_s=0) as store:
        for i in range(4):
            put(store, f"k{i}")
        store.lookup(["k0"])
        put(store, "k4")
        assert not store.exists("k0")


def test_prefix_lookup_stops_at_the_first_missing_key(store_dir: Path) -> None:
    clock = FakeClock()
    with open_fifo(store_dir, clock) as store:
        for i in range(3):
            put(store, f"k{i}")
        assert store.lookup(["k0", "gap", "k1"], prefix=True) == [True, False, False]
        assert store.stats().leased_keys == 1
        assert store.lookup(["k0", "gap", "k1"]) == [True, False, True]


def test_a_store_full_of_leased_buckets_refuses_cleanly(store_dir: Path) -> None:
    clock = FakeClock()
    limit = 64 * 1024
    with open_fifo(store_dir, clock, max_total_size=0, max_physical_bytes=limit) as store:
        for i in range(20):  # more than fits: the store is full, having evicted
            put(store, f"k{i}", 4096)
        assert store.stats().evicted_buckets > 0
        names = [n for page in store.scan_meta() for n, _ in page]
        assert store.lookup(names) == [True] * len(names)
        before = sorted(names)
        with pytest.raises(CapacityExceeded, match="leased by lookups"):
            put(store, "new", 4096)
        with pytest.raises(CapacityExceeded, match="leased by lookups"):
            store.evict_to_watermark(high=0.1, low=0.1)
        assert sorted(n for page in store.scan_meta() for n, _ in page) == before
        assert du(store_dir) <= limit
        clock.now += 10  # every lease expires: the write now evicts and fits
        put(store, "new", 4096)
        assert store.exists("new") and du(store_dir) <= limit and store.stats().leased_keys == 0


def test_a_leased_bucket_survives_background_eviction(store_dir: Path) -> None:
    clock = FakeClock()
    with open_fifo(store_dir, clock, max_total_size=10_000, background_eviction=True, eviction_low_watermark=0.5) as store:
        for i in range(8):
            put(store, f"k{i}")
        assert store.wait_for_eviction(timeout=30)
        store.lookup(["k0"])
        put(store, "k8")
        put(store, "k9")  # 10,000 bytes: above high, the evictor takes the oldest unleased buckets
        assert store.wait_for_eviction(timeout=30)
        held = sorted(n for page in store.scan_meta() for n, _ in page)
        assert "k0" in held and len(held) <= 5
        assert store.batch_get(["k0"])["k0"] == value_for("k0", 1000)


def test_leases_made_before_a_commit_protect_the_committed_key(store_dir: Path) -> None:
    clock = FakeClock()
    with open_fifo(store_dir, clock) as store:
        store.lease(["k0"])  # staged in a write-behind queue, not stored yet
        for i in range(5):
            put(store, f"k{i}")
        assert store.exists("k0") and not store.exists("k1")


def test_lease_arguments_are_checked(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        for bad in (-1, float("inf"), True, "5"):
            with pytest.raises(InvalidArgument, match="lease_s"):
                store.lookup(["k"], lease_s=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            store.lookup("k")  # a str is not a list of keys


def test_a_readonly_store_grants_no_leases(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as writer:
        put(writer, "k0")
        with BucketStore.open(store_dir, readonly=True) as reader:
            assert reader.lookup(["k0"]) == [True]
            assert reader.stats().leased_keys == 0


def test_the_lease_time_is_a_setting() -> None:
    assert BucketConfig.from_env({"KVBUCKET_LOOKUP_LEASE_S": "2.5"}, path="x").validated().lookup_lease_s == 2.5
    with pytest.raises(InvalidArgument, match="lookup_lease_s"):
        BucketConfig(path="x", lookup_lease_s=-1).validated()


def test_the_lease_table_stays_bounded_without_evictions() -> None:
    clock = FakeClock()
    table = LeaseTable(clock)
    for i in range(100_000):
        table.grant([f"k{i}"], 1.0)
        clock.now += 0.01  # about 100 leases live at any time
    assert len(table) < 3000
    clock.now += 1.0
    assert table.live() == [] and len(table) == 0


def test_a_later_grant_never_shortens_a_lease() -> None:
    clock = FakeClock()
    table = LeaseTable(clock)
    table.grant(["k"], 10.0)
    table.grant(["k"], 1.0)
    clock.now += 5
    assert table.live() == ["k"]


def test_concurrent_lookups_loads_and_evictions_never_lose_a_leased_key(store_dir: Path) -> None:
    # A reader looks a key up and then loads it while a writer keeps
    # evicting: every lookup that found its key loads it.
    clock = FakeClock()
    with open_fifo(store_dir, clock, max_total_size=8000, background_eviction=True) as store:
        for i in range(8):
            put(store, f"k{i}")
        stop = threading.Event()
        gone: list[str] = []

        def reader() -> None:
            i = 0
            while not stop.is_set():
                key = f"k{i % 40}"
                if store.lookup([key]) == [True]:
                    try:
                        store.batch_load({key: bytearray(1000)})
                    except KeyError:
                        gone.append(key)
                i += 1

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for i in range(8, 40):
                put(store, f"k{i}")
        finally:
            stop.set()
            thread.join()
        assert gone == []
