"""Crash harnesses over removal, deletion, compaction and eviction (issue 3).

Workloads mix offloads with ``remove``, ``batch_remove``, ``delete_bucket``,
``compact``, reads and eviction (the default 2Q policy under a tight
``max_physical_bytes``, and ``evict_to_watermark``). After a kill -9 or a power cut at any step:

* no removed object resurrects (strict mode; a removal counts once it
  returned; a key deleted with its bucket likewise);
* no live acknowledged object is lost unless it was handed to ``on_evict``
  or removed;
* no file leaks, and an interrupted compaction leaves each key in one bucket.
"""

from __future__ import annotations

import pytest

import crash_harness as H
from crash_sweeps import kill_sweep, powerloss_sweep

# The default eviction policy. The evictor thread stays off: its timing would
# race the workload's own steps (delete_bucket_of looks a bucket up first);
# test_background_eviction_crash.py sweeps crashes with it running.
EVICTING = {"max_physical_bytes": 96 * 1024, "background_eviction": False}
SEEDS = [1, 2, 3] if not H.FULL else list(range(1, 9))


@pytest.mark.parametrize("seed", SEEDS)
def test_lifecycle_kill9(runner, tmp_path, crash_counts, seed):
    ops = H.lifecycle_workload(seed=seed, n=12)
    durability = "strict" if seed % 2 else "relaxed"
    config = {"durability": durability, "io_threads": 1, **EVICTING}
    failures, stats = kill_sweep(runner, tmp_path, ops, config, budget=100, seed=seed)
    crash_counts(**stats)
    assert not failures, H.format_failures(failures)


@pytest.mark.parametrize("seed", SEEDS)
def test_lifecycle_powerloss_strict(tmp_path, crash_counts, small_writes, seed):
    ops = H.lifecycle_workload(seed=seed, n=12)
    config = {"durability": "strict", "io_threads": 1, **EVICTING}
    kw = {"point_budget": 10**9, "n_random": 16, "exhaustive_limit": 256} if H.FULL else {"point_budget": 10**9, "n_random": 3}
    failures, stats = powerloss_sweep(tmp_path, ops, config, seed=seed, **kw)
    crash_counts(**stats)
    assert not failures, H.format_failures(failures)


def test_lifecycle_powerloss_relaxed(tmp_path, crash_counts, small_writes):
    ops = H.lifecycle_workload(seed=4, n=12)
    config = {"durability": "relaxed", "io_threads": 1, **EVICTING}
    kw = {"point_budget": 10**9, "n_random": 16} if H.FULL else {"point_budget": 10**9, "n_random": 3}
    failures, stats = powerloss_sweep(tmp_path, ops, config, seed=4, **kw)
    crash_counts(**stats)
    assert not failures, H.format_failures(failures)


def test_workloads_exercise_eviction_and_compaction(tmp_path):
    """Guard against a harness that tests nothing: the lifecycle workloads do
    evict (2Q, with buckets promoted by reads before), remove and compact on
    the real store."""
    from kvbucket import BucketStore

    evicted, removed, compacted, read_before_eviction = 0, 0, 0, 0
    for seed in SEEDS:
        events: list[dict] = []
        path = H.fresh_dir(str(tmp_path / f"s{seed}"))
        ops = H.lifecycle_workload(seed=seed, n=12)
        with BucketStore.open(path, io_threads=1, **EVICTING) as store:
            assert store.config.eviction_policy == "2q"
            H.run_ops(store, ops, events.append)
        evicted += sum(len(e["keys"]) for e in events if e["ev"] == "evict")
        last_evict = max((e.get("after", e.get("i", -1)) for e in events if e["ev"] == "evict"), default=-1)
        read_before_eviction += sum(1 for op in ops[:last_evict] if op["op"] == "get")
        removed += sum(len(e["result"]) for e in events if e["ev"] == "done" and ops[e["i"]]["op"].endswith("remove"))
        compacted += sum(1 for e in events if e["ev"] == "done" and ops[e["i"]]["op"] == "compact" and e["result"])
    assert evicted and removed and compacted and read_before_eviction, (evicted, removed, compacted, read_before_eviction)
