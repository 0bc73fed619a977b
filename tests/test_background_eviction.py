"""The background evictor: it keeps usage between the watermarks, stops with
the store, reports its failures, and honours ``background_eviction``."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kvbucket import BucketConfig, BucketStore
from kvbucket._core.fs import FileSystem
from kvbucket.errors import StorageIOError
from storeutil import value_for


def evictor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kvbucket-evict")]


def put(store: BucketStore, name: str, size: int = 1000) -> str:
    store.batch_offload({name: value_for(name, size)})
    return name


def test_usage_above_high_comes_down_to_low_without_a_write_paying_for_it(store_dir: Path) -> None:
    with BucketStore.open(store_dir, eviction_policy="fifo", max_total_size=10_000, eviction_high_watermark=0.9, eviction_low_watermark=0.5) as store:
        names = [put(store, f"k{i}") for i in range(10)]  # 10,000 bytes: every write fits without evicting
        assert store.wait_for_eviction(timeout=30)
        stats = store.stats()
        assert stats.logical_bytes <= 5_000 and stats.evicted_buckets == 5
        assert [n for n in names if store.exists(n)] == names[5:]  # oldest first (fifo)
        assert stats.background_eviction_errors == 0 and stats.background_eviction_error is None


def test_a_store_opened_above_high_comes_down_at_open(store_dir: Path) -> None:
    with BucketStore.open(store_dir, background_eviction=False, max_total_size=10_000) as store:
        for i in range(10):
            put(store, f"k{i}")
    with BucketStore.open(store_dir, max_total_size=10_000, eviction_low_watermark=0.6) as store:
        assert store.wait_for_eviction(timeout=30)
        assert store.stats().logical_bytes <= 6_000


def test_write_storm_stays_within_the_limit_and_ends_at_or_below_high(store_dir: Path) -> None:
    limit, size, writers, per_writer = 100_000, 1000, 4, 24  # 96 buckets: 0.96 of the limit without eviction
    limits = {"max_total_size": limit, "total_keys_limit": 100, "eviction_high_watermark": 0.9, "eviction_low_watermark": 0.7}
    with BucketStore.open(store_dir, eviction_policy="lru", **limits) as store:
        start = threading.Barrier(writers)
        over: list[int] = []
        errors: list[BaseException] = []

        def writer(w: int) -> None:
            try:
                start.wait()
                for i in range(per_writer):
                    put(store, f"w{w}/{i}", size)
                    used = store.stats().logical_bytes
                    if used > limit:
                        over.append(used)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and not over
        assert store.wait_for_eviction(timeout=30)
        stats = store.stats()
        assert stats.usage_ratio <= 0.9 and stats.keys <= 90
        assert stats.evicted_buckets > 0 and stats.background_eviction_errors == 0
        assert all(store.batch_get([k])[k] == value_for(k, size) for page in store.scan_meta() for k, _ in page)


def test_every_limit_is_brought_down(store_dir: Path) -> None:
    # The keys limit is the one above high; the logical one is far below.
    limits = {"max_total_size": 10**9, "total_keys_limit": 20, "eviction_high_watermark": 0.9, "eviction_low_watermark": 0.5}
    with BucketStore.open(store_dir, eviction_policy="fifo", **limits) as store:
        for i in range(19):
            put(store, f"k{i}", 10)
        assert store.wait_for_eviction(timeout=30)
        assert len(store) <= 10


def test_physical_limit_is_brought_down(store_dir: Path) -> None:
    limits = {"max_physical_bytes": 400 * 1024, "eviction_high_watermark": 0.9, "eviction_low_watermark": 0.5}
    with BucketStore.open(store_dir, eviction_policy="fifo", **limits) as store:
        for i in range(60):
            put(store, f"k{i}", 4096)
        assert store.wait_for_eviction(timeout=30)
        stats = store.stats()
        assert stats.physical_bytes <= 0.9 * 400 * 1024 and stats.evicted_buckets > 0


def test_close_stops_and_joins_the_evictor(store_dir: Path) -> None:
    before = set(evictor_threads())
    store = BucketStore.open(store_dir, max_total_size=10_000)
    mine = [t for t in evictor_threads() if t not in before]
    assert len(mine) == 1 and mine[0].daemon
    put(store, "k")
    store.close()
    assert not mine[0].is_alive()
    assert store.wait_for_eviction(timeout=0)


@pytest.mark.parametrize(
    "fields",
    [
        {"background_eviction": False, "max_total_size": 10_000},
        {"eviction_policy": "none", "max_total_size": 10_000},
        {},  # no limit: nothing to evict for
    ],
    ids=["switched-off", "policy-none", "unlimited"],
)
def test_no_evictor_without_a_policy_a_limit_and_the_switch(store_dir: Path, fields: dict) -> None:
    before = set(evictor_threads())
    with BucketStore.open(store_dir, **fields) as store:
        assert set(evictor_threads()) == before
        for i in range(10):
            put(store, f"k{i}")
        assert store.wait_for_eviction(timeout=0)
        assert len(store) == 10  # above the high watermark, and it stays there


def test_readonly_store_has_no_evictor(store_dir: Path) -> None:
    with BucketStore.open(store_dir, background_eviction=False, max_total_size=10_000) as writer:
        for i in range(10):
            put(writer, f"k{i}")
        before = set(evictor_threads())
        with BucketStore.open(store_dir, readonly=True, max_total_size=10_000) as reader:
            assert set(evictor_threads()) == before and len(reader) == 10


def test_the_switch_is_parsed_like_every_setting() -> None:
    assert BucketConfig.from_env({"KVBUCKET_BACKGROUND_EVICTION": "off"}, path="x").validated().background_eviction is False
    assert BucketConfig.from_env({"KVBUCKET_BACKGROUND_EVICTION": "1"}, path="x").validated().background_eviction is True
    assert BucketConfig(path="x").validated().background_eviction is True


class FailingDeletes(FileSystem):
    """Unlinking a bucket's files fails with EIO while ``failing`` is set."""

    def __init__(self) -> None:
        self.failing = threading.Event()

    def unlink(self, path: str) -> None:
        if self.failing.is_set() and path.endswith((".meta", ".bucket")):
            raise OSError(5, "Input/output error", path)
        super().unlink(path)


def test_a_failing_background_run_is_logged_counted_and_surfaced(store_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    fs = FailingDeletes()
    with BucketStore.open(store_dir, filesystem=fs, eviction_policy="fifo", max_total_size=10_000, eviction_low_watermark=0.5) as store:
        for i in range(9):
            put(store, f"k{i}")
        fs.failing.set()
        put(store, "k9")  # above high: the evictor runs and its deletions fail
        assert store.wait_for_eviction(timeout=30)
        stats = store.stats()
        assert stats.background_eviction_errors >= 1
        assert "Input/output error" in (stats.background_eviction_error or "")
        assert stats.pending_deletions > 0  # out of the index, still counted as usage
        assert any("background eviction" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        with pytest.raises(StorageIOError):  # the next write retries the deletions first
            put(store, "k10")
        fs.failing.clear()
        put(store, "k10")
        assert store.wait_for_eviction(timeout=30)
        stats = store.stats()
        assert stats.pending_deletions == 0 and stats.background_eviction_error is None
        assert stats.logical_bytes <= 9_000


def test_eviction_listeners_see_background_and_foreground_evictions(store_dir: Path) -> None:
    seen: list[str] = []
    with BucketStore.open(store_dir, eviction_policy="fifo", max_total_size=10_000, eviction_low_watermark=0.5) as store:
        store.add_eviction_listener(seen.extend)
        for i in range(10):
            put(store, f"k{i}")
        assert store.wait_for_eviction(timeout=30)
        assert sorted(seen) == sorted(f"k{i}" for i in range(5))
