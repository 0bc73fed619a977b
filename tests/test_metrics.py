"""Operation counters and the Prometheus metrics built from them."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvbucket import BucketStore, OffloadQueue
from kvbucket._core.format import data_name, meta_name
from kvbucket.errors import CapacityExceeded, CorruptionError, InvalidArgument, KeyNotFound, StorageIOError
from kvbucket.integrations import vllm as tier_module
from kvbucket.integrations._common import metrics_endpoint
from kvbucket.metrics import exposition, serve_metrics
from standins import lmcache_standin as lm
from standins import sglang_standin as sg
from standins import vllm_standin as vs
from test_cli import kvbucket

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """``{(sample name, labels without "store"): value}`` of an exposition (it must parse)."""
    parsed: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if k != "store")
            parsed[(sample.name, labels)] = sample.value
    return parsed


def value(parsed: Samples, name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=60) as response:
        return samples(response.read().decode())


def test_counters_after_known_operations(tmp_path: Path) -> None:
    store = BucketStore.open(tmp_path, max_total_size="1M", durability="relaxed")
    store.batch_offload({"a": b"a" * 100, "b": b"b" * 50})
    assert store.batch_exists(["a", "b", "c"]) == [True, True, False]
    assert not store.exists("c")
    store.batch_load({"a": bytearray(100)})
    with pytest.raises(KeyNotFound):
        store.batch_load({"a": bytearray(100), "zz": bytearray(7)})
    assert store.batch_get(["b"]) == {"b": b"b" * 50}
    with pytest.raises(KeyNotFound):
        store.batch_get(["nope"])

    counters = store.counters()
    assert (counters.hits, counters.misses) == ({"exists": 2, "load": 2, "get": 1}, {"exists": 2, "load": 1, "get": 1})
    assert (counters.hit_bytes["load"], counters.miss_bytes["load"], counters.hit_bytes["get"]) == (200, 7, 50)
    assert (counters.read_objects, counters.read_bytes, counters.written_objects, counters.written_bytes) == (2, 150, 2, 150)
    assert (counters.read_latency.count, counters.write_latency.count) == (2, 1)

    parsed = samples(exposition(store))
    assert value(parsed, "kvbucket_lookups_total", op="exists", result="hit") == 2
    assert value(parsed, "kvbucket_lookups_total", op="exists", result="miss") == 2
    assert value(parsed, "kvbucket_lookups_total", op="load", result="miss") == 1
    assert value(parsed, "kvbucket_lookup_bytes_total", op="load", result="hit") == 200
    assert value(parsed, "kvbucket_lookup_bytes_total", op="load", result="miss") == 7
    assert value(parsed, "kvbucket_lookups_total", op="get", result="miss") == 1
    assert value(parsed, "kvbucket_read_bytes_total") == 150
    assert value(parsed, "kvbucket_written_objects_total") == 2
    assert value(parsed, "kvbucket_written_bytes_total") == 150
    assert value(parsed, "kvbucket_read_latency_seconds_count") == 2
    assert value(parsed, "kvbucket_read_latency_seconds_bucket", le="+Inf") == 2
    assert value(parsed, "kvbucket_write_latency_seconds_count") == 1
    assert value(parsed, "kvbucket_usage", resource="logical_bytes") == 150
    assert value(parsed, "kvbucket_usage", resource="keys") == 2
    assert value(parsed, "kvbucket_limit", resource="logical_bytes") == 1 << 20
    assert value(parsed, "kvbucket_limit", resource="keys") == 0
    assert value(parsed, "kvbucket_usage_ratio") == 150 / (1 << 20)
    assert value(parsed, "kvbucket_checksum_failures_total") == 0
    assert value(parsed, "kvbucket_store_open") == 1
    store.close()
    assert samples(exposition(store)) == {("kvbucket_store_open", frozenset()): 0}


def test_the_shared_budget_is_exposed(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with BucketStore.open(tmp_path / "a", budget_path=tmp_path / "BUDGET", budget_bytes="10M", durability="relaxed") as store:
        parsed = samples(exposition(store))
        assert value(parsed, "kvbucket_budget_bytes") == 10 << 20
        before = value(parsed, "kvbucket_budget_used_bytes")
        store.batch_offload({"a": b"a" * 100_000})
        after = value(samples(exposition(store)), "kvbucket_budget_used_bytes")
        assert after == store.stats().budget_used_bytes >= before + 100_000
    with BucketStore.open(tmp_path / "b") as alone:
        assert value(samples(exposition(alone)), "kvbucket_budget_bytes") == 0


def test_evictions_and_checksum_failures_are_counted(tmp_path: Path) -> None:
    store = BucketStore.open(tmp_path, total_keys_limit=2, eviction_policy="fifo", durability="relaxed")
    store.batch_offload({"a": b"a" * 64, "b": b"b" * 64})
    store.batch_offload({"c": b"c" * 64})
    with open(tmp_path / data_name(2), "r+b") as f:  # flip a byte of c
        f.write(b"X")
    with pytest.raises(CorruptionError):
        store.batch_load({"c": bytearray(64)})
    parsed = samples(exposition(store))
    assert value(parsed, "kvbucket_evicted_buckets_total") == 1
    assert value(parsed, "kvbucket_evicted_keys_total") == 2
    assert value(parsed, "kvbucket_checksum_failures_total") == 1
    assert value(parsed, "kvbucket_read_objects_total") == 0  # the failed read returned nothing
    store.close()


def test_recovery_actions_of_the_last_open(tmp_path: Path) -> None:
    with BucketStore.open(tmp_path, durability="relaxed") as store:
        store.batch_offload({"a": b"a" * 64})
        store.batch_offload({"b": b"b" * 64})
    os.unlink(tmp_path / meta_name(2))  # bucket 2: a data file without its meta
    with BucketStore.open(tmp_path) as store:
        parsed = samples(exposition(store))
    assert value(parsed, "kvbucket_recovery_actions", action="dropped_buckets") == 1
    assert value(parsed, "kvbucket_recovery_actions", action="removed_files") == 1
    assert value(parsed, "kvbucket_recovery_freed_bytes") > 0


def test_queue_depth_staged_hits_and_rejections(tmp_path: Path) -> None:
    store = BucketStore.open(tmp_path, durability="relaxed")
    queue = OffloadQueue(store, max_staged_bytes=100, backpressure="reject", max_delay_s=0)
    try:
        queue.put("k1", b"1" * 80)
        assert queue.exists("k1")
        target = bytearray(80)
        assert queue.get_into("k1", target) and target == b"1" * 80
        parsed = samples(exposition(store, queue))  # k1 waits for a full bucket: nothing writes it yet
        assert value(parsed, "kvbucket_queue_staged_keys") == 1
        assert value(parsed, "kvbucket_queue_staged_bytes") == 80
        assert value(parsed, "kvbucket_queue_max_staged_bytes") == 100
        assert value(parsed, "kvbucket_queue_staged_hits_total") == 2
        assert value(parsed, "kvbucket_queue_staged_hit_bytes_total") == 80
        with pytest.raises(CapacityExceeded):
            queue.put("k2", b"2" * 80)  # (and has k1 written at once to make room)
        parsed = samples(exposition(store, queue))
        assert (value(parsed, "kvbucket_queue_rejected_keys_total"), value(parsed, "kvbucket_queue_rejected_bytes_total")) == (1, 80)
        queue.flush()
        parsed = samples(exposition(store, queue))
        assert (value(parsed, "kvbucket_queue_staged_keys"), value(parsed, "kvbucket_queue_stored_keys_total")) == (0, 1)
        assert value(parsed, "kvbucket_written_objects_total") == 1
    finally:
        queue.close()
        store.close()


def test_http_endpoint_serves_one_scrape_then_closes(tmp_path: Path) -> None:
    with BucketStore.open(tmp_path, durability="relaxed") as store:
        store.batch_offload({"a": b"a" * 10})
        server = serve_metrics(store, 0)
        try:
            assert server.port > 0 and server.url.startswith("http://127.0.0.1:")
            assert value(scrape(server.url), "kvbucket_usage", resource="keys") == 1
        finally:
            server.close()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(server.url, timeout=60)


@pytest.mark.parametrize("port, addr", [(-1, "127.0.0.1"), (70000, "127.0.0.1"), (True, "127.0.0.1"), (0, "localhost:9")])
def test_bad_endpoints_are_refused(tmp_path: Path, port: Any, addr: str) -> None:
    with BucketStore.open(tmp_path) as store, pytest.raises(InvalidArgument, match="metrics"):
        serve_metrics(store, port, addr)


def test_stats_prometheus_prints_a_parsable_exposition(tmp_path: Path) -> None:
    with BucketStore.open(tmp_path, max_physical_bytes="1G", durability="relaxed") as store:
        store.batch_offload({f"k{i}": b"v" * 100 for i in range(5)})
    proc = kvbucket("stats", tmp_path, "--prometheus")
    assert proc.returncode == 0, proc.stderr
    parsed = samples(proc.stdout.decode())
    assert value(parsed, "kvbucket_usage", resource="keys") == 5
    assert value(parsed, "kvbucket_usage", resource="logical_bytes") == 500
    assert value(parsed, "kvbucket_limit", resource="physical_bytes") == 1 << 30
    assert kvbucket("stats", tmp_path, "--prometheus", "--json").returncode == 2


def test_metrics_port_setting_is_parsed_per_rank() -> None:
    assert metrics_endpoint({}, "cfg") is None
    assert metrics_endpoint({"metrics_port": "9400"}, "cfg", offset=3) == (9403, "127.0.0.1")
    assert metrics_endpoint({"metrics_port": 0, "metrics_addr": "0.0.0.0"}, "cfg", offset=3) == (0, "0.0.0.0")
    for bad in ({"metrics_port": "http"}, {"metrics_port": 65535 + 1}, {"metrics_port": 1, "metrics_addr": "host"}):
        with pytest.raises(InvalidArgument, match="cfg"):
            metrics_endpoint(bad, "cfg")


def test_sglang_setting_serves_the_rank_store(tmp_path: Path) -> None:
    with sg.installed():
        pool = sg.FakeHostPool()
        backend = sg.attach(sg.make_config(tmp_path, metrics_port=0), pool)
        try:
            assert all(backend.batch_set_v1(["h1", "h2", "h3"], pool.page_indices([0, 1, 2])))
            parsed = scrape(backend.metrics_server.url)
            assert value(parsed, "kvbucket_written_objects_total") == 3
            assert value(parsed, "kvbucket_usage", resource="keys") == 3
        finally:
            backend.close()
        assert backend.metrics_server is None


def test_vllm_setting_serves_store_and_queue(tmp_path: Path) -> None:
    tier = tier_module.KvBucketTierManager(
        offloading_spec=vs.make_spec(rank=0),
        primary_kv_view=memoryview(vs.primary_memory(4, 64 << 10)),
        tier_type="kvbucket",
        root_dir=str(tmp_path),
        metrics_port=0,
        max_staged_bytes="1M",
    )
    try:
        parsed = scrape(tier.metrics_server.url)
        assert value(parsed, "kvbucket_queue_max_staged_bytes") == 1 << 20
        assert value(parsed, "kvbucket_store_open") == 1
    finally:
        tier.shutdown()


def test_lmcache_setting_serves_the_store(tmp_path: Path) -> None:
    with lm.installed():
        spec = {"module_path": lm.MODULE, "class_name": "KvBucketL2Adapter", "adapter_params": {"storage_path": str(tmp_path), "metrics_port": 0}}
        adapter = lm.create_plugin_adapter(lm.PluginL2AdapterConfig.from_dict(spec))
        try:
            assert lm.store(adapter, [lm.key(1)], [lm.FakeMemoryObj(4096, seed=1)]).is_successful()
            assert value(scrape(adapter.metrics_server.url), "kvbucket_written_bytes_total") == 4096
        finally:
            adapter.close()


def test_a_metrics_port_in_use_leaves_no_locked_store(tmp_path: Path) -> None:
    with BucketStore.open(tmp_path / "other", durability="relaxed") as other, serve_metrics(other, 0) as taken, sg.installed():
        with pytest.raises(StorageIOError, match="metrics"):
            sg.attach(sg.make_config(tmp_path, metrics_port=taken.port), sg.FakeHostPool())
        sg.attach(sg.make_config(tmp_path), sg.FakeHostPool()).close()  # the failed attach released the rank's directory
