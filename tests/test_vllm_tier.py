"""The vLLM secondary tier, driven through stand-ins of vLLM's tiering API.

The call pattern follows vLLM's own fs-tier tests: submit jobs against a
memoryview of page-aligned host memory, ``drain_jobs()``, then
``get_finished_jobs()``. No sleeps: ``drain_jobs`` is the synchronisation.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from adapter_suite import AdapterSuite, page_bytes
from kvbucket import BucketStore
from kvbucket.errors import InvalidArgument
from standins import vllm_standin as vs
from standins.modules import imported_without
from storeutil import fail_next_writes, hold_reads, record_submits

CHUNK_BYTES = 64 << 10
NUM_CHUNKS = 16

with vs.installed() as tier_module:  # the tier module built on the stand-ins of vLLM
    TierClass = tier_module.KvBucketTierManager


def make_tier(
    root: Path, memory: np.ndarray, *, rank: int = 0, cls: type = TierClass, kv_cache_events: bool = False, **options: Any
) -> Any:
    options.setdefault("durability", "relaxed")
    return cls(
        offloading_spec=vs.make_spec(rank=rank, kv_cache_events=kv_cache_events),
        primary_kv_view=memoryview(memory),
        tier_type="kvbucket",
        root_dir=str(root),
        **options,
    )


@pytest.fixture
def memory() -> np.ndarray:
    return vs.primary_memory(NUM_CHUNKS, CHUNK_BYTES)


@pytest.fixture
def tier(tmp_path: Path, memory: np.ndarray) -> Iterator[Any]:
    opened = make_tier(tmp_path, memory)
    yield opened
    opened.shutdown()


def fill_random(memory: np.ndarray, rows: range, seed: int) -> np.ndarray:
    memory[rows.start : rows.stop] = np.random.default_rng(seed).random((len(rows), memory.shape[1]), dtype=np.float32)
    return memory[rows.start : rows.stop].copy()


def store_keys(tier: Any, job_id: int, keys: list[bytes], chunk_ids: list[int]) -> list[Any]:
    tier.submit_store(vs.make_job(job_id, keys, chunk_ids))
    return vs.drain(tier)


def load_keys(tier: Any, job_id: int, keys: list[bytes], chunk_ids: list[int]) -> list[Any]:
    tier.submit_load(vs.make_job(job_id, keys, chunk_ids, is_promotion=True))
    return vs.drain(tier)


def test_class_is_built_on_the_vllm_base(tier: Any) -> None:
    assert isinstance(tier, vs.SecondaryTierManager)
    assert TierClass.medium is vs.Medium.STORAGE
    assert tier.on_new_request(vs.CTX) == vs.RequestOffloadingContext()
    assert tier_module.kvbucket is tier_module.KvBucketTierManager  # "type": "kvbucket" resolves


def test_pages_round_trip_byte_exact(tier: Any, memory: np.ndarray) -> None:
    keys = [vs.key(i) for i in range(4)]
    expected = fill_random(memory, range(0, 4), seed=1)
    results = store_keys(tier, 1, keys, [0, 1, 2, 3])
    assert [(r.job_id, r.success) for r in results] == [(1, True)]
    assert results[0].transfer_bytes == 4 * CHUNK_BYTES

    memory[:] = 0
    results = load_keys(tier, 2, keys, [8, 9, 10, 11])
    assert [(r.job_id, r.success) for r in results] == [(2, True)]
    assert np.array_equal(memory[8:12], expected)
    assert not memory[:8].any()  # nothing else was touched


def test_lookup_miss_retry_hit(tmp_path: Path, memory: np.ndarray) -> None:
    # No time flush: a partial bucket waits for drain_jobs, so RETRY is observable.
    tier = make_tier(tmp_path, memory, group_max_delay_s=0.0)
    try:
        keys = [vs.key(1), vs.key(2)]
        assert [tier.lookup(k, vs.CTX) for k in keys] == [vs.LookupResult.MISS] * 2
        tier.submit_store(vs.make_job(1, keys, [0, 1]))
        assert [tier.lookup(k, vs.CTX) for k in keys] == [vs.LookupResult.RETRY] * 2
        assert tier.has_pending_work()
        assert [r.success for r in vs.drain(tier)] == [True]
        assert not tier.has_pending_work()
        assert [tier.lookup(k, vs.CTX) for k in keys] == [vs.LookupResult.HIT] * 2
        assert tier.lookup(vs.key(3), vs.CTX) is vs.LookupResult.MISS
    finally:
        tier.shutdown()


def test_jobs_complete_without_drain(tier: Any, memory: np.ndarray) -> None:
    """With the default small group delay, results arrive by polling alone."""
    fill_random(memory, range(0, 2), seed=2)
    tier.submit_store(vs.make_job(7, [vs.key(1), vs.key(2)], [0, 1]))
    finished: list[Any] = []
    while tier.has_pending_work() or not finished:  # the engine keeps stepping while True
        finished += tier.get_finished_jobs()
        if not finished:
            tier._jobs.wait_idle()  # stands in for the next scheduler step
    assert [(r.job_id, r.success) for r in finished] == [(7, True)]


def test_restart_keeps_objects(tmp_path: Path, memory: np.ndarray) -> None:
    keys = [vs.key(i) for i in range(3)]
    expected = fill_random(memory, range(0, 3), seed=3)
    first = make_tier(tmp_path, memory, durability="strict")
    assert [r.success for r in store_keys(first, 1, keys, [0, 1, 2])] == [True]
    first.shutdown()

    memory[:] = 0
    second = make_tier(tmp_path, memory)
    try:
        assert [second.lookup(k, vs.CTX) for k in keys] == [vs.LookupResult.HIT] * 3
        assert [r.success for r in load_keys(second, 2, keys, [5, 6, 7])] == [True]
        assert np.array_equal(memory[5:8], expected)
        assert second.store_path == first.store_path
    finally:
        second.shutdown()


def test_two_ranks_side_by_side(tmp_path: Path) -> None:
    memories = [vs.primary_memory(NUM_CHUNKS, CHUNK_BYTES) for _ in range(2)]
    tiers = [make_tier(tmp_path, memories[rank], rank=rank) for rank in range(2)]
    try:
        keys = [vs.key(i) for i in range(4)]  # the same block hashes on both ranks
        expected = [fill_random(memories[rank], range(0, 4), seed=10 + rank) for rank in range(2)]
        for tier in tiers:
            tier.submit_store(vs.make_job(1, keys, [0, 1, 2, 3]))
        assert [[r.success for r in vs.drain(tier)] for tier in tiers] == [[True], [True]]
        for rank, tier in enumerate(tiers):
            memories[rank][:] = 0
            assert [r.success for r in load_keys(tier, 2, keys, [4, 5, 6, 7])] == [True]
            assert np.array_equal(memories[rank][4:8], expected[rank])
        assert tiers[0].store_path != tiers[1].store_path
        assert tiers[0].store_path.endswith("_r0") and tiers[1].store_path.endswith("_r1")
        assert Path(tiers[0].store_path).parent == Path(tiers[1].store_path).parent == tmp_path
    finally:
        for tier in tiers:
            tier.shutdown()


def test_load_of_missing_chunks_reports_the_loaded_subset(tier: Any, memory: np.ndarray) -> None:
    expected = fill_random(memory, range(0, 2), seed=4)
    assert [r.success for r in store_keys(tier, 1, [vs.key(1), vs.key(2)], [0, 1])] == [True]
    memory[:] = 0
    results = load_keys(tier, 2, [vs.key(1), vs.key(99), vs.key(2)], [4, 5, 6])
    assert len(results) == 1 and not results[0].success
    assert list(results[0].successful_keys) == [vs.key(1), vs.key(2)]
    assert np.array_equal(memory[[4, 6]], expected)

    results = load_keys(tier, 3, [vs.key(98)], [7])
    assert [(r.success, r.successful_keys) for r in results] == [(False, None)]


def test_storing_present_chunks_writes_nothing_new(tier: Any, memory: np.ndarray) -> None:
    fill_random(memory, range(0, 3), seed=5)
    keys = [vs.key(i) for i in range(3)]
    assert [r.success for r in store_keys(tier, 1, keys, [0, 1, 2])] == [True]
    buckets = tier.store.stats().buckets
    assert [r.success for r in store_keys(tier, 2, keys, [0, 1, 2])] == [True]
    assert tier.store.stats().buckets == buckets


def test_empty_and_malformed_jobs_still_finish(tier: Any) -> None:
    tier.submit_store(vs.make_job(1, [], []))
    tier.submit_load(vs.make_job(2, [], [], is_promotion=True))
    tier.submit_store(vs.make_job(3, [vs.key(1)], [NUM_CHUNKS]))  # chunk id out of range
    results = {r.job_id: r.success for r in vs.drain(tier)}
    assert results == {1: True, 2: True, 3: False}


def test_many_jobs_in_flight_each_reported_once(tier: Any, memory: np.ndarray) -> None:
    expected = fill_random(memory, range(0, NUM_CHUNKS), seed=6)
    for job in range(NUM_CHUNKS // 2):  # each job pins its own two primary slots
        tier.submit_store(vs.make_job(job, [vs.key(2 * job), vs.key(2 * job + 1)], [2 * job, 2 * job + 1]))
    results = vs.drain(tier)
    assert sorted((r.job_id, r.success) for r in results) == [(j, True) for j in range(NUM_CHUNKS // 2)]
    memory[:] = 0
    for job in range(NUM_CHUNKS):
        tier.submit_load(vs.make_job(100 + job, [vs.key(job)], [NUM_CHUNKS - 1 - job], is_promotion=True))
    assert sorted((r.job_id, r.success) for r in vs.drain(tier)) == [(100 + j, True) for j in range(NUM_CHUNKS)]
    assert np.array_equal(memory[::-1], expected)


def test_store_job_that_does_not_fit_fails_without_blocking(tmp_path: Path, memory: np.ndarray) -> None:
    tier = make_tier(tmp_path, memory, max_staged_bytes=2 * CHUNK_BYTES, group_max_delay_s=0.0)
    try:
        tier.submit_store(vs.make_job(1, [vs.key(1), vs.key(2)], [0, 1]))  # fills the staging limit
        tier.submit_store(vs.make_job(2, [vs.key(3)], [2]))  # returns at once, failed
        assert sorted((r.job_id, r.success) for r in vs.drain(tier)) == [(1, True), (2, False)]
        assert tier.lookup(vs.key(3), vs.CTX) is vs.LookupResult.MISS
    finally:
        tier.shutdown()


def test_capacity_settings_map_onto_the_store(tmp_path: Path, memory: np.ndarray) -> None:
    tier = make_tier(
        tmp_path, memory, max_size="8MiB", total_keys_limit=1000, eviction_policy="FIFO", bucket_keys_limit=4, n_write_threads=1
    )
    try:
        config = tier.store.config
        assert (config.max_physical_bytes, config.total_keys_limit, config.eviction_policy) == (8 << 20, 1000, "fifo")
        assert config.bucket_keys_limit == 4
    finally:
        tier.shutdown()


def test_eviction_keeps_the_disk_bounded(tmp_path: Path, memory: np.ndarray) -> None:
    """vLLM's fs tier never evicts; this one keeps its directory under the limit."""
    tier = make_tier(tmp_path, memory, max_total_size=6 * CHUNK_BYTES, bucket_keys_limit=2, eviction_policy="fifo")
    try:
        fill_random(memory, range(0, NUM_CHUNKS), seed=7)
        for job in range(6):
            keys = [vs.key(job * 2), vs.key(job * 2 + 1)]
            assert [r.success for r in store_keys(tier, job, keys, [job * 2, job * 2 + 1])] == [True]
        stats = tier.store.stats()
        assert stats.logical_bytes <= 6 * CHUNK_BYTES and stats.evicted_keys >= 6
        assert tier.lookup(vs.key(0), vs.CTX) is vs.LookupResult.MISS  # oldest evicted first
        assert tier.lookup(vs.key(11), vs.CTX) is vs.LookupResult.HIT
    finally:
        tier.shutdown()


def test_unknown_config_key_is_refused(tmp_path: Path, memory: np.ndarray) -> None:
    with pytest.raises(InvalidArgument, match="max_sise"):
        make_tier(tmp_path, memory, max_sise="10G")
    assert not any(tmp_path.iterdir())  # refused before anything was created


@pytest.mark.parametrize(
    "bad",
    [
        {"n_write_threads": 0},
        {"n_read_threads": "four"},
        {"max_staged_bytes": "lots"},
        {"bucket_keys_limit": 0},
        {"rank": -1},
        {"locality": "nearby"},
        {"max_kv_event_keys": 0},
    ],
)
def test_bad_tier_options_leave_no_locked_store(tmp_path: Path, memory: np.ndarray, bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        TierClass(vs.make_spec(), memoryview(memory), "kvbucket", root_dir=str(tmp_path), **bad)
    make_tier(tmp_path, memory).shutdown()  # the rank's directory is free


def test_text_values_are_parsed_and_bad_ones_refused(tmp_path: Path, memory: np.ndarray) -> None:
    with pytest.raises(InvalidArgument, match="vLLM tier config: verify_checksums must be True or False"):
        make_tier(tmp_path, memory, verify_checksums="ture")
    with pytest.raises(InvalidArgument, match="'n_read_thread' \\(did you mean 'n_read_threads'\\?\\)"):
        make_tier(tmp_path, memory, n_read_thread=2)
    assert not any(tmp_path.iterdir())
    tier = make_tier(tmp_path, memory, verify_checksums="false", n_write_threads="1", max_staged_bytes="1MiB")
    try:
        assert tier.store.config.verify_checksums is False
        assert tier._queue.stats().max_staged_bytes == 1 << 20
    finally:
        tier.shutdown()


def test_a_full_staging_area_does_not_wait_for_the_group_delay(tmp_path: Path, memory: np.ndarray) -> None:
    # The staging area holds 2 chunks, a bucket 256 MiB, the delay is an hour:
    # the rejected job must make the partial bucket go to disk at once.
    tier = make_tier(tmp_path, memory, max_staged_bytes=2 * CHUNK_BYTES, group_max_delay_s=3600.0)
    try:
        fill_random(memory, range(0, 3), seed=11)
        tier.submit_store(vs.make_job(1, [vs.key(1), vs.key(2)], [0, 1]))
        tier.submit_store(vs.make_job(2, [vs.key(3)], [2]))  # no room: rejected
        waiter = threading.Thread(target=tier._jobs.wait_idle, daemon=True)  # no drain_jobs (it flushes)
        waiter.start()
        waiter.join(timeout=60)
        assert not waiter.is_alive(), "job 1 waited for group_max_delay_s"
        assert sorted((r.job_id, r.success) for r in tier.get_finished_jobs()) == [(1, True), (2, False)]
        assert [tier.lookup(vs.key(i), vs.CTX) for i in (1, 2, 3)] == [vs.LookupResult.HIT] * 2 + [vs.LookupResult.MISS]
    finally:
        tier.shutdown()


def test_root_dir_is_required(tmp_path: Path, memory: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVBUCKET_PATH", raising=False)
    with pytest.raises(InvalidArgument, match="root_dir"):
        TierClass(vs.make_spec(), memoryview(memory), "kvbucket")


def test_backpressure_detector_reaches_the_base(tmp_path: Path, memory: np.ndarray) -> None:
    detector = object()
    tier = make_tier(tmp_path, memory, backpressure_detector=detector)
    try:
        assert tier.backpressure_detector is detector
    finally:
        tier.shutdown()


def test_shutdown_finishes_jobs_and_is_idempotent(tmp_path: Path, memory: np.ndarray) -> None:
    tier = make_tier(tmp_path, memory, group_max_delay_s=0.0)
    fill_random(memory, range(0, 2), seed=8)
    tier.submit_store(vs.make_job(1, [vs.key(1), vs.key(2)], [0, 1]))
    tier.shutdown()
    tier.shutdown()
    assert [(r.job_id, r.success) for r in tier.get_finished_jobs()] == [(1, True)]
    with BucketStore.open(tier.store_path, readonly=True) as store:
        assert store.batch_exists([vs.key(1).hex(), vs.key(2).hex()]) == [True, True]


def test_module_imports_and_works_without_vllm(tmp_path: Path, memory: np.ndarray) -> None:
    """The default class (vLLM's base when importable, else kvbucket's stand-in) works as a tier."""
    module = importlib.import_module("kvbucket.integrations.vllm")
    tier = make_tier(tmp_path, memory, cls=module.kvbucket)
    try:
        fill_random(memory, range(0, 1), seed=9)
        tier.submit_store(vs.make_job(1, [vs.key(1)], [0]))
        tier.drain_jobs()
        assert [r.success for r in tier.get_finished_jobs()] == [True]
        assert tier.lookup(vs.key(1), vs.CTX).name == "HIT"
    finally:
        tier.shutdown()


def test_directory_namespace_separates_models(tmp_path: Path, memory: np.ndarray) -> None:
    a = TierClass(vs.make_spec(model="org/model-a"), memoryview(memory), "kvbucket", root_dir=str(tmp_path))
    b = TierClass(vs.make_spec(model="org/model-b"), memoryview(memory), "kvbucket", root_dir=str(tmp_path))
    try:
        assert a.store_path != b.store_path
        assert os.path.basename(a.store_path).startswith("org-model-a_")
    finally:
        a.shutdown()
        b.shutdown()


def test_get_stats_reports_counter_increments_and_usage(tier: Any, memory: np.ndarray) -> None:
    definitions = TierClass.build_metric_definitions({})
    assert isinstance(definitions["vllm:kvbucket_written_bytes"], vs.OffloadingCounterMetadata)
    assert isinstance(definitions["vllm:kvbucket_physical_bytes"], vs.OffloadingGaugeMetadata)
    keys = [vs.key(i) for i in range(3)]
    fill_random(memory, range(0, 3), seed=7)
    assert [r.success for r in store_keys(tier, 1, keys, [0, 1, 2])] == [True]
    assert [r.success for r in load_keys(tier, 2, keys[:2], [8, 9])] == [True]

    stats = tier.get_stats()
    counters = stats.data["data"]
    assert counters["vllm:kvbucket_written_bytes"][()] == 3 * CHUNK_BYTES
    assert counters["vllm:kvbucket_read_chunks"][()] == 2
    assert set(stats.data["data"]) <= set(definitions)
    tier._usage.result()  # the usage refresh get_stats started on a loader thread
    again = tier.get_stats().data["data"]
    assert "vllm:kvbucket_written_bytes" not in again  # increments, not totals
    assert again["vllm:kvbucket_chunks"][()] == 3
    assert again["vllm:kvbucket_logical_bytes"][()] == 3 * CHUNK_BYTES


def test_get_stats_without_vllm_metrics_is_none(tmp_path: Path, memory: np.ndarray) -> None:
    with imported_without("vllm", vs.MODULE) as bare_module:  # on kvbucket's own stand-ins
        bare = bare_module.KvBucketTierManager
    assert bare.build_metric_definitions({}) == {}
    opened = make_tier(tmp_path, memory, cls=bare)
    try:
        assert opened.get_stats() is None
    finally:
        opened.shutdown()


def test_a_hit_is_leased_until_its_chunk_is_loaded(tmp_path: Path, memory: np.ndarray) -> None:
    tier = make_tier(tmp_path, memory, max_total_size=4 * CHUNK_BYTES, bucket_keys_limit=2, eviction_policy="fifo", background_eviction=False)
    try:
        fill_random(memory, range(0, NUM_CHUNKS), seed=3)
        for job in range(2):
            assert all(r.success for r in store_keys(tier, job, [vs.key(job * 2), vs.key(job * 2 + 1)], [job * 2, job * 2 + 1]))
        assert tier.lookup(vs.key(0), vs.CTX) is vs.LookupResult.HIT
        # A new bucket needs one bucket's room: fifo would take chunks 0 and 1,
        # but chunk 0 is leased, so chunks 2 and 3 go instead.
        assert all(r.success for r in store_keys(tier, 2, [vs.key(4), vs.key(5)], [4, 5]))
        assert tier.lookup(vs.key(2), vs.CTX) is vs.LookupResult.MISS
        assert all(r.success for r in load_keys(tier, 3, [vs.key(0)], [6]))  # the load ends the lease
        assert tier.store.stats().leased_keys == 0
    finally:
        tier.shutdown()


def test_watermark_settings_map_onto_the_store(tmp_path: Path, memory: np.ndarray) -> None:
    tier = make_tier(tmp_path, memory, max_size="8MiB", eviction_high_watermark=0.75, eviction_low_watermark="0.5", lookup_lease_s="1.5")
    try:
        config = tier.store.config
        assert (config.eviction_high_watermark, config.eviction_low_watermark, config.lookup_lease_s) == (0.75, 0.5, 1.5)
        assert config.background_eviction is True
    finally:
        tier.shutdown()


# -- KV events -------------------------------------------------------------------------
def events_tier(root: Path, memory: np.ndarray, **options: Any) -> Any:
    """A tier publishing KV events (tier setting and vLLM's global switch on), evicting
    whole 2-chunk buckets oldest first, only in the foreground unless asked."""
    options = {"bucket_keys_limit": 2, "eviction_policy": "fifo", "background_eviction": False, "n_write_threads": 1, **options}
    return make_tier(root, memory, kv_cache_events=True, enable_kv_events=True, **options)


def summary(events: Any) -> list[tuple[str, list[bytes]]]:
    """``("stored" | "removed", block hashes)`` per event, as vLLM's connector publishes them."""
    return [("removed" if e.removed else "stored", [vs.get_offload_block_hash(k) for k in e.keys]) for e in events]


def hashes(*blocks: int) -> list[bytes]:
    """The block hashes of ``vs.key(n)`` (the OffloadKey without its group index)."""
    return [n.to_bytes(8, "big") for n in blocks]


def test_a_stored_then_evicted_block_produces_both_events_in_order(tmp_path: Path, memory: np.ndarray) -> None:
    tier = events_tier(tmp_path, memory, max_total_size=4 * CHUNK_BYTES)
    try:
        fill_random(memory, range(0, 6), seed=12)
        assert all(r.success for r in store_keys(tier, 1, [vs.key(0), vs.key(1)], [0, 1]))
        events = list(tier.take_events())
        assert summary(events) == [("stored", hashes(0, 1))]
        assert all(isinstance(e, vs.OffloadingEvent) for e in events)
        assert [(e.keys, e.medium, e.locality) for e in events] == [([vs.key(0), vs.key(1)], vs.Medium.STORAGE, vs.Locality.LOCAL)]
        assert list(tier.take_events()) == []  # taken once

        # The tier holds 4 chunks: the third job's bucket evicts the first one's.
        assert all(r.success for r in store_keys(tier, 2, [vs.key(2), vs.key(3)], [2, 3]))
        assert all(r.success for r in store_keys(tier, 3, [vs.key(4), vs.key(5)], [4, 5]))
        assert summary(tier.take_events()) == [("stored", hashes(2, 3)), ("removed", hashes(0, 1)), ("stored", hashes(4, 5))]
        assert tier.lookup(vs.key(0), vs.CTX) is vs.LookupResult.MISS

        # Storing chunks the tier holds writes nothing and announces nothing.
        assert all(r.success for r in store_keys(tier, 4, [vs.key(4), vs.key(5)], [4, 5]))
        assert list(tier.take_events()) == []
    finally:
        tier.shutdown()


def test_a_stored_event_comes_when_the_chunks_are_durable_not_when_staged(tmp_path: Path, memory: np.ndarray) -> None:
    tier = events_tier(tmp_path, memory, group_max_delay_s=0.0)  # a partial bucket waits for drain_jobs
    try:
        tier.submit_store(vs.make_job(1, [vs.key(1)], [0]))
        assert tier.lookup(vs.key(1), vs.CTX) is vs.LookupResult.RETRY  # staged, not yet written
        assert list(tier.take_events()) == []
        assert [r.success for r in vs.drain(tier)] == [True]
        assert summary(tier.take_events()) == [("stored", hashes(1))]
    finally:
        tier.shutdown()


def test_chunks_that_fail_to_store_produce_no_event(tmp_path: Path, memory: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = events_tier(tmp_path, memory, max_staged_bytes=2 * CHUNK_BYTES, group_max_delay_s=0.0)
    try:
        fail_next_writes(monkeypatch, 1)
        assert [r.success for r in store_keys(tier, 1, [vs.key(1), vs.key(2)], [0, 1])] == [False]
        tier.submit_store(vs.make_job(2, [vs.key(3), vs.key(4)], [2, 3]))  # fills the staging limit
        tier.submit_store(vs.make_job(3, [vs.key(5)], [4]))  # rejected: no room
        assert sorted((r.job_id, r.success) for r in vs.drain(tier)) == [(2, True), (3, False)]
        assert summary(tier.take_events()) == [("stored", hashes(3, 4))]
    finally:
        tier.shutdown()


def test_background_eviction_produces_removed_events(tmp_path: Path, memory: np.ndarray) -> None:
    tier = events_tier(
        tmp_path, memory, max_total_size=4 * CHUNK_BYTES, background_eviction=True, eviction_high_watermark=0.9, eviction_low_watermark=0.5
    )
    try:
        fill_random(memory, range(0, 4), seed=13)
        for job in range(2):  # 4 chunks: at the limit, above the high watermark, nothing evicted in the foreground
            assert all(r.success for r in store_keys(tier, job, [vs.key(2 * job), vs.key(2 * job + 1)], [2 * job, 2 * job + 1]))
        assert tier.store.wait_for_eviction(timeout=60)
        assert summary(tier.take_events()) == [("stored", hashes(0, 1)), ("stored", hashes(2, 3)), ("removed", hashes(0, 1))]
        assert [tier.lookup(vs.key(n), vs.CTX) for n in (0, 2)] == [vs.LookupResult.MISS, vs.LookupResult.HIT]
    finally:
        tier.shutdown()


def test_replaying_the_events_gives_exactly_the_chunks_the_store_holds(tmp_path: Path, memory: np.ndarray) -> None:
    """Two writer threads and the background evictor at once: per chunk, stored
    and removed alternate, starting with stored, and end where the store is."""
    tier = events_tier(
        tmp_path, memory, max_total_size=6 * CHUNK_BYTES, n_write_threads=2, background_eviction=True,
        eviction_high_watermark=0.8, eviction_low_watermark=0.5,
    )  # fmt: skip
    try:
        fill_random(memory, range(0, NUM_CHUNKS), seed=15)
        for job in range(NUM_CHUNKS // 2):
            tier.submit_store(vs.make_job(job, [vs.key(2 * job), vs.key(2 * job + 1)], [2 * job, 2 * job + 1]))
        assert all(r.success for r in vs.drain(tier))
        assert tier.store.wait_for_eviction(timeout=60)
        history: dict[bytes, list[str]] = {}
        for kind, blocks in summary(tier.take_events()):
            for block in blocks:
                history.setdefault(block, []).append(kind)
        assert set(history) == set(hashes(*range(NUM_CHUNKS)))
        for kinds in history.values():
            assert kinds == ["stored", "removed"] * (len(kinds) // 2) + ["stored"] * (len(kinds) % 2)
        held = {block for block, kinds in history.items() if kinds[-1] == "stored"}
        assert held == {block for block in history if tier.store.exists((block + bytes(4)).hex())}
        assert tier.store.stats().evicted_keys > 0
    finally:
        tier.shutdown()


def test_the_locality_setting_tags_the_events(tmp_path: Path, memory: np.ndarray) -> None:
    tier = events_tier(tmp_path, memory, locality="REMOTE")
    try:
        assert tier.locality is vs.Locality.REMOTE
        assert all(r.success for r in store_keys(tier, 1, [vs.key(1)], [0]))
        assert [(e.medium, e.locality) for e in tier.take_events()] == [(vs.Medium.STORAGE, vs.Locality.REMOTE)]
    finally:
        tier.shutdown()


@pytest.mark.parametrize(
    "tier_setting, vllm_switch, warning",
    [(False, True, None), (True, False, "KV cache events are off"), (False, False, None)],
)
def test_without_both_switches_no_event_is_buffered(
    tmp_path: Path, memory: np.ndarray, caplog: pytest.LogCaptureFixture, tier_setting: bool, vllm_switch: bool, warning: str | None
) -> None:
    tier = make_tier(
        tmp_path, memory, kv_cache_events=vllm_switch, enable_kv_events=tier_setting,
        max_total_size=2 * CHUNK_BYTES, bucket_keys_limit=2, eviction_policy="fifo", background_eviction=False,
    )  # fmt: skip
    try:
        for job in range(2):  # the second job evicts the first
            assert all(r.success for r in store_keys(tier, job, [vs.key(2 * job), vs.key(2 * job + 1)], [2 * job, 2 * job + 1]))
        assert tier.store.stats().evicted_keys == 2
        assert tier._events is None  # no buffer, no commit reporter, no eviction listener
        assert list(tier.take_events()) == []
        warned = [r.message for r in caplog.records if "enable_kv_events is set" in r.message]
        assert len(warned) == (warning is not None) and all(warning in message for message in warned)
    finally:
        tier.shutdown()


def test_the_event_buffer_is_bounded_and_counts_what_it_drops(tmp_path: Path, memory: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    tier = events_tier(tmp_path, memory, max_kv_event_keys=3)
    try:
        fill_random(memory, range(0, 6), seed=14)
        for job in range(3):  # 6 keys in 3 events, nobody takes them: the oldest two events go
            assert all(r.success for r in store_keys(tier, job, [vs.key(2 * job), vs.key(2 * job + 1)], [2 * job, 2 * job + 1]))
        assert tier.kv_event_keys_dropped == 4
        assert len([r for r in caplog.records if "not taking KV events" in r.message]) == 1  # warned once per run of drops
        assert summary(tier.take_events()) == [("stored", hashes(4, 5))]
        assert tier.get_stats().data["data"]["vllm:kvbucket_kv_event_keys_dropped"][()] == 4
        assert "vllm:kvbucket_kv_event_keys_dropped" in TierClass.build_metric_definitions({})
    finally:
        tier.shutdown()


def test_the_newest_event_is_kept_even_when_larger_than_the_bound(tmp_path: Path, memory: np.ndarray) -> None:
    tier = events_tier(tmp_path, memory, max_kv_event_keys=1)
    try:
        assert all(r.success for r in store_keys(tier, 1, [vs.key(1), vs.key(2)], [0, 1]))
        assert summary(tier.take_events()) == [("stored", hashes(1, 2))]
        assert tier.kv_event_keys_dropped == 0
    finally:
        tier.shutdown()


def test_without_vllm_there_are_no_events(tmp_path: Path, memory: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    with imported_without("vllm", vs.MODULE) as bare_module:  # on kvbucket's own stand-ins
        bare = bare_module.KvBucketTierManager
    tier = make_tier(tmp_path, memory, cls=bare, kv_cache_events=True, enable_kv_events=True)
    try:
        assert tier.locality == "LOCAL"
        assert all(r.success for r in store_keys(tier, 1, [vs.key(1)], [0]))
        assert list(tier.take_events()) == []
        assert any("no OffloadingEvent" in r.message for r in caplog.records)
    finally:
        tier.shutdown()


class TestSuite(AdapterSuite):
    """The shared adapter tests, through store and load jobs on the primary tier's memory."""

    module_name, adapter_class, engine_name = vs.MODULE, "KvBucketTierManager", "vllm"
    page_size = CHUNK_BYTES
    load_slot = NUM_CHUNKS // 2
    """Loads go to chunks from here on (stores come from chunks 0, 1, ...)."""
    job_ids = itertools.count(1)

    def engine(self) -> contextlib.AbstractContextManager[ModuleType]:
        return vs.installed()

    def open(self, module: ModuleType, root: Path, **settings: Any) -> Any:
        memory = vs.primary_memory(NUM_CHUNKS, CHUNK_BYTES)
        tier = module.KvBucketTierManager(vs.make_spec(), memoryview(memory), "kvbucket", root_dir=str(root), **settings)
        tier.test_rows = memory.view(np.uint8)  # the primary memory, one chunk a row
        return tier

    def store(self, adapter: Any, pages: list[int]) -> list[bool]:
        for slot, page in enumerate(pages):
            adapter.test_rows[slot] = np.frombuffer(page_bytes(page, CHUNK_BYTES), np.uint8)
        (result,) = store_keys(adapter, next(self.job_ids), [vs.key(p) for p in pages], list(range(len(pages))))
        return [result.success] * len(pages)

    def load(self, adapter: Any, pages: list[int]) -> list[bytes | None]:
        adapter.test_rows[...] = 0
        keys = [vs.key(p) for p in pages]
        slots = list(range(self.load_slot, self.load_slot + len(pages)))
        (result,) = load_keys(adapter, next(self.job_ids), keys, slots)
        loaded = set(keys) if result.success else set(result.successful_keys or ())
        return [adapter.test_rows[slot].tobytes() if key in loaded else None for key, slot in zip(keys, slots)]

    def lookup(self, adapter: Any, pages: list[int]) -> list[bool]:
        return [adapter.lookup(vs.key(p), vs.CTX).name == "HIT" for p in pages]

    def bucket_store(self, adapter: Any) -> BucketStore:
        return adapter.store

    def close(self, adapter: Any) -> None:
        adapter.shutdown()


def test_a_load_job_is_read_by_the_store_load_queue(tmp_path: Path, memory: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    """submit_load hands the job to BucketStore.submit_load and returns while
    its read is held; the job ends from the load's completion."""
    tier = make_tier(tmp_path, memory)
    release = threading.Event()
    try:
        expected = fill_random(memory, range(0, 2), seed=11)
        assert [r.success for r in store_keys(tier, 1, [vs.key(1), vs.key(2)], [0, 1])] == [True]
        memory[:] = 0
        entered, release = hold_reads(monkeypatch)
        submitted = record_submits(monkeypatch, tier.store)
        tier.submit_load(vs.make_job(2, [vs.key(1), vs.key(2)], [4, 5], is_promotion=True))
        entered.wait()
        assert submitted == [2]
        assert tier.has_pending_work() and list(tier.get_finished_jobs()) == []
        release.set()
        assert [(r.job_id, r.success) for r in vs.drain(tier)] == [(2, True)]
        assert np.array_equal(memory[4:6], expected)
    finally:
        release.set()
        tier.shutdown()
