"""Trace replay: the trace reader, the engine model, the reference caches,
the simulated file system, and the ``kvbucket replay`` command."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from kvbucket import BucketStore
from kvbucket._core.format import data_name
from kvbucket.errors import InvalidArgument, InvalidTrace
from kvbucket.replay import (
    BeladyTier,
    KvBucketTier,
    LruTier,
    ReplayOptions,
    Trace,
    default_trace_path,
    parse_capacity,
    read_trace,
    replay,
    replay_tier,
    tier_requests,
)
from kvbucket.replay.iocount import CountingFileSystem
from kvbucket.replay.run import open_store
from kvbucket.replay.simfs import SimulatedFileSystem
from kvbucket.replay.trace import Request

SRC = Path(__file__).resolve().parents[1] / "src"

LINES = [
    '{"timestamp": 0, "input_length": 1024, "output_length": 10, "hash_ids": [1, 2]}',
    "",
    '{"timestamp": 1500, "input_length": 1024, "output_length": 3, "hash_ids": [1, 3]}',
    '{"timestamp": 3000, "input_length": 1500, "output_length": 7, "hash_ids": [1, 2]}',
]


def trace_of(*chains: Sequence[int]) -> Trace:
    """A trace whose requests have these chains, one second apart."""
    return Trace("test", tuple(Request(1000 * i, 512 * len(c), 1, tuple(c)) for i, c in enumerate(chains)))


def short_trace() -> Trace:
    """The first 1,000 requests of the shipped trace: reuse and eviction at small capacities."""
    return read_trace(default_trace_path()).head(1000)


# -- the trace reader -----------------------------------------------------------------------


@pytest.mark.parametrize("opener", [open, gzip.open, lzma.open], ids=["plain", "gzip", "xz"])
def test_reads_plain_and_compressed_traces_alike(tmp_path: Path, opener) -> None:
    path = tmp_path / "trace.data"  # the name says nothing: compression is recognised by content
    with opener(path, "wt") as f:
        f.write("\n".join(LINES) + "\n")
    trace = read_trace(path)
    assert [r.hash_ids for r in trace.requests] == [(1, 2), (1, 3), (1, 2)]
    assert trace.requests[1] == Request(1500, 1024, 3, (1, 3))
    assert (trace.block_references, trace.distinct_blocks, trace.duration_s) == (6, 3, 3.0)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not a JSON object"),
        ("[1, 2]", "expected a JSON object"),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1}', "'hash_ids' must be a list of integers"),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1, "2"]}', "'hash_ids' must be a list of integers"),
        ('{"timestamp": -5, "input_length": 1, "output_length": 1, "hash_ids": [1]}', "'timestamp' must be an integer >= 0"),
        ('{"timestamp": 0, "input_length": true, "output_length": 1, "hash_ids": [1]}', "'input_length' must be an integer"),
    ],
)
def test_a_bad_line_raises_a_typed_error_naming_it(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(LINES[0] + "\n" + line + "\n")
    with pytest.raises(InvalidTrace, match=message) as caught:
        read_trace(path)
    assert f"{path}:2:" in str(caught.value)
    assert isinstance(caught.value, InvalidArgument)


def test_an_empty_or_damaged_trace_raises_a_typed_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InvalidTrace, match="no requests"):
        read_trace(empty)
    damaged = tmp_path / "damaged.xz"
    damaged.write_bytes(lzma.compress("\n".join(LINES).encode())[:40])
    with pytest.raises(InvalidTrace, match="cannot decompress"):
        read_trace(damaged)


def test_the_shipped_trace_is_the_mooncake_synthetic_trace() -> None:
    trace = read_trace(default_trace_path())
    assert (len(trace.requests), trace.block_references, trace.distinct_blocks) == (3993, 121877, 43924)


# -- the engine model and the references -------------------------------------------------------


def test_lru_on_a_hand_checked_trace() -> None:
    # capacity 2. R1 writes 1, 2. R2 finds 1 (then 2 is least recent), writes 3
    # evicting 2. R3 finds 1 but not 2: one hit, writes 2 evicting 3.
    counts = replay_tier(LruTier(2), tier_requests(trace_of([1, 2], [1, 3], [1, 2]), 0))
    assert (counts.hits, counts.references, counts.admitted, counts.handed) == (2, 6, 4, 4)


def test_belady_on_a_hand_checked_trace() -> None:
    # capacity 2. R1 writes 1 (next used by R2) and 2 (next used by R3). R2
    # hits 1; block 3 is never used again, so it is not admitted. R3 hits 1, 2.
    requests = tier_requests(trace_of([1, 2], [1, 3], [1, 2]), 0)
    counts = replay_tier(BeladyTier(2, requests), requests)
    assert (counts.hits, counts.references) == (3, 6)


def test_belady_evicts_the_block_needed_last() -> None:
    # capacity 2 after R1 = {1, 2}; R2 brings 3, needed by R3 before 2 (R4): 2 goes.
    requests = tier_requests(trace_of([1, 2], [3], [1, 3], [2]), 0)
    counts = replay_tier(BeladyTier(2, requests), requests)
    assert counts.hits == 2  # R3 hits 1 and 3; R4 misses 2
    # LRU drops 1 for 3 instead: R3's prefix is empty, and R4 comes after 2 went for 1.
    assert replay_tier(LruTier(2), requests).hits == 0


def test_l2_serves_prefixes_and_the_tier_sees_the_rest() -> None:
    trace = trace_of([1, 2], [1, 3], [1, 2], [4, 2])
    requests = tier_requests(trace, 2)
    assert [r.l2_hits for r in requests] == [0, 1, 1, 0]
    assert [r.keys for r in requests] == [("1", "2"), ("3",), ("2",), ("4", "2")]
    # L2 holds {1, 2} before R4: block 2 is not new to it, so only 4 is written.
    assert requests[3].write_back_keys(0) == ["4"]
    counts = replay_tier(LruTier(10), requests)
    assert (counts.chain_blocks, counts.l2_hits, counts.references) == (8, 2, 6)
    assert counts.prefix_hit_rate == (2 + counts.hits) / 8


class _ForgetfulTier:
    """Reports every block present, but loads only the first."""

    def __init__(self) -> None:
        self.written: list[list[str]] = []

    def lookup(self, keys: Sequence[str]) -> int:
        return len(keys)

    def load(self, keys: Sequence[str]) -> int:
        return min(1, len(keys))

    def stage(self, keys: Sequence[str]) -> int:
        self.written.append(list(keys))
        return 0

    def land(self) -> None:
        pass


def test_found_then_gone_blocks_count_as_misses_and_are_written_back() -> None:
    tier = _ForgetfulTier()
    counts = replay_tier(tier, tier_requests(trace_of([1, 2, 3]), 0))
    assert (counts.found, counts.hits, counts.found_then_gone) == (3, 1, 2)
    assert tier.written == [["2", "3"]]


def test_with_overlap_a_write_back_lands_between_the_next_lookup_and_load() -> None:
    # capacity 2. R3's lookup finds 1 and 2; R2's write-back of 3 and 4 lands
    # before R3's load and evicts them from LRU: found, then gone. Belady
    # does not admit 3 and 4 (never used again) and keeps its hits.
    requests = tier_requests(trace_of([1, 2], [3, 4], [1, 2]), 0)
    overlapped = replay_tier(LruTier(2), requests, overlap=True)
    assert (overlapped.found, overlapped.hits, overlapped.found_then_gone) == (2, 0, 2)
    belady = replay_tier(BeladyTier(2, requests), requests, overlap=True)
    assert (belady.found, belady.hits, belady.found_then_gone) == (2, 2, 0)
    sequential = replay_tier(LruTier(2), requests)
    assert (sequential.found, sequential.found_then_gone) == (0, 0)


def test_kvbucket_lookups_lease_what_they_find_so_nothing_found_is_gone() -> None:
    # As for LRU above, R2's write-back lands between R3's lookup and load;
    # R3's lookup leased 1 and 2, so the write-back is declined (the store
    # holds one bucket) instead of evicting them.
    trace = trace_of([1, 2], [3, 4], [1, 2])
    options = ReplayOptions(simulate=True, overlap=True, store_fields={"bucket_keys_limit": 2, "background_eviction": False})
    result = replay(trace, [2], options).results[0]
    assert (result.kvbucket.found, result.kvbucket.hits, result.kvbucket.found_then_gone) == (2, 2, 0)
    assert result.lru.found_then_gone == 2


def test_a_write_back_evicts_around_the_found_prefix() -> None:
    # The store holds {1, 2} and {3, 4}; R4's lookup finds 1 and 2, then R3's
    # write-back of 5 and 6 lands and needs a bucket's room: it evicts {3, 4},
    # the only bucket no lookup leased, and R4 loads what it found.
    trace = trace_of([1, 2], [3, 4], [5, 6], [1, 2])
    options = ReplayOptions(simulate=True, overlap=True, store_fields={"bucket_keys_limit": 2, "background_eviction": False})
    result = replay(trace, [4], options).results[0]
    assert (result.kvbucket.found, result.kvbucket.hits, result.kvbucket.found_then_gone) == (2, 2, 0)
    assert result.evicted_buckets == 1
    assert result.lru.found_then_gone == 2


@pytest.mark.parametrize("background", [False, True])
def test_background_eviction_is_replayed_in_step(background: bool) -> None:
    # Two buckets fill the 4-block store: the evictor (replayed after each
    # write-back) takes usage from above the high watermark to the low one,
    # evicting the older bucket, so the third request misses what it would
    # hit; its write-back fills the store again and the evictor takes {3, 4}.
    trace = trace_of([1, 2], [3, 4], [1, 2])
    options = ReplayOptions(simulate=True, store_fields={"bucket_keys_limit": 2, "eviction_policy": "fifo", "background_eviction": background})
    result = replay(trace, [4], options).results[0]
    assert result.kvbucket.hits == (0 if background else 2)
    assert result.evicted_buckets == (2 if background else 0)


def test_no_found_then_gone_blocks_with_overlap_at_any_capacity() -> None:
    options = ReplayOptions(simulate=True, overlap=True, store_fields={"bucket_keys_limit": 64})
    report = replay(short_trace(), [700, 1500, 3000], options)
    for result in report.results:
        assert result.evicted_buckets > 0 and result.kvbucket.hits > 100
        assert result.kvbucket.found_then_gone == 0, result.capacity_blocks


def test_a_replay_leaves_no_lease_behind() -> None:
    options = ReplayOptions(simulate=True, overlap=True, store_fields={"bucket_keys_limit": 64})
    with open_store(1500 * 4096, options) as (store, _):
        tier = KvBucketTier(store, 4096)
        counts = replay_tier(tier, tier_requests(short_trace(), 0), overlap=True)
        leased = store.stats().leased_keys
        tier.close()
    assert counts.found > 100 and leased == 0


def test_parse_capacity() -> None:
    assert parse_capacity("10%", 4096, 43924) == 4392
    assert parse_capacity("1MiB", 4096, 10) == 256
    assert parse_capacity("200G", 2 << 20, 10) == 102400
    with pytest.raises(InvalidArgument, match="holds no"):
        parse_capacity("1KiB", 4096, 10)
    with pytest.raises(InvalidArgument, match="percentage"):
        parse_capacity("lots", 4096, 10)


# -- kvbucket through the OffloadQueue -------------------------------------------------------


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
def test_replay_is_deterministic(overlap: bool) -> None:
    trace = short_trace()
    options = ReplayOptions(simulate=True, overlap=overlap, store_fields={"bucket_keys_limit": 64})
    first, second = (replay(trace, [1500], options).to_json() for _ in range(2))
    for report in (first, second):
        for capacity in report["capacities"]:
            del capacity["kvbucket"]["wall_s"]
    assert first == second
    assert all(c["kvbucket"]["evicted_buckets"] > 0 and c["kvbucket"]["hits"] > 100 for c in first["capacities"])


def _replay_through_store(simulate: bool, tmp_path: Path) -> tuple[object, list[str], object]:
    options = ReplayOptions(simulate=simulate, directory=os.fspath(tmp_path), store_fields={"bucket_keys_limit": 64})
    with open_store(3000 * 4096, options) as (store, fs):
        tier = KvBucketTier(store, 4096)
        counts = replay_tier(tier, tier_requests(short_trace(), 0))
        held = sorted(key for page in store.scan_meta() for key, _ in page)
        tier.close()
    return counts, held, fs.counts


def test_simulation_and_the_real_store_give_the_same_hits(tmp_path: Path) -> None:
    simulated = _replay_through_store(True, tmp_path)
    real = _replay_through_store(False, tmp_path)
    assert simulated == real
    counts, held, written = real
    assert counts.hits > 100 and 0 < len(held) <= 3000  # eviction ran
    assert written.data == counts.admitted * 4096


def test_write_amplification_counts_every_byte_written(tmp_path: Path) -> None:
    result = replay(trace_of(*[[i, i + 1000] for i in range(600)]), [1000], ReplayOptions(simulate=True)).results[0]
    # 1,200 blocks in 600 buckets (one per write-back), 600 metas, and
    # LOCK's initial slot.
    assert result.written.data == 1200 * 4096
    assert result.written.meta > 0 and result.written.other > 0
    assert result.write_amplification == result.written.total / (1200 * 4096)


def test_a_capacity_below_one_bucket_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="smaller than one bucket"):
        replay(trace_of([1]), [499], ReplayOptions(simulate=True))


# -- the simulated file system --------------------------------------------------------------


def test_simulated_store_keeps_data_lengths_and_recovers(tmp_path: Path) -> None:
    fs = SimulatedFileSystem("/sim")
    with BucketStore.open("/sim/store", filesystem=fs, verify_checksums=False) as store:
        bucket = store.batch_offload({"a": b"\x01" * 5000, "b": b"\x02" * 10})
        assert store.batch_get(["b"]) == {"b": bytes(10)}  # data bytes are not kept
    assert fs.stat(f"/sim/store/{data_name(bucket)}").st_size == 5010
    assert not os.path.exists("/sim")
    with BucketStore.open("/sim/store", filesystem=fs, verify_checksums=False) as store:  # recovery reads the metas back
        assert sorted(store.batch_query(["a", "b"])) == ["a", "b"]
        assert store.stats().physical_bytes > 0


def test_counting_file_system_counts_data_and_meta_bytes(tmp_path: Path) -> None:
    fs = CountingFileSystem()
    with BucketStore.open(tmp_path / "store", filesystem=fs) as store:
        store.batch_offload({"a": b"x" * 3000})
    meta_size = os.path.getsize(tmp_path / "store" / "1.meta")
    assert (fs.counts.data, fs.counts.meta) == (3000, meta_size)


# -- the command ------------------------------------------------------------------------------


def kvbucket(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.fspath(SRC), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "kvbucket.tools.cli", *map(os.fspath, args)], capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_replay_command_reports_json(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(300):
            f.write(json.dumps({"timestamp": i, "input_length": 1, "output_length": 1, "hash_ids": [i % 7, 1000 + i % 13, 2000 + i]}) + "\n")
    proc = kvbucket("replay", path, "--capacity-blocks", "500", "--capacity", "4MiB", "--simulate", "--l2", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["requests"], report["l2_blocks"], report["simulated"]) == (300, 5, True)
    assert [c["capacity_blocks"] for c in report["capacities"]] == [1024, 500]
    assert (report["eviction_policy"], report["bucket_per_batch"]) == ("2q", True)
    for capacity in report["capacities"]:
        for tier in ("kvbucket", "lru", "belady"):
            assert 0 < capacity[tier]["hit_rate"] <= 1
        assert capacity["kvbucket"]["write_amplification"] >= 1


def test_replay_command_takes_the_eviction_policy(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    requests = (json.dumps({"timestamp": i, "input_length": 1, "output_length": 1, "hash_ids": [i % 5, 100 + i]}) for i in range(600))
    path.write_text("".join(request + "\n" for request in requests))
    runs = {
        policy: kvbucket("replay", path, "--capacity-blocks", "520", "--simulate", "--eviction-policy", policy, "--json") for policy in ("2q", "FIFO")
    }
    reports = {policy: json.loads(proc.stdout) for policy, proc in runs.items() if proc.returncode == 0}
    assert [report["eviction_policy"] for report in reports.values()] == ["2q", "fifo"]
    hits = {policy: report["capacities"][0]["kvbucket"]["hits"] for policy, report in reports.items()}
    assert hits["2q"] > hits["FIFO"]  # 2Q keeps the blocks read again; FIFO lets them age out
    assert kvbucket("replay", path, "--eviction-policy", "random").returncode == 2


def test_replay_command_fails_cleanly_on_a_bad_trace(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0}\n')
    proc = kvbucket("replay", path, "--capacity-blocks", "600", "--simulate")
    assert proc.returncode == 2
    assert f"{path}:1: 'hash_ids' must be a list of integers" in proc.stderr
