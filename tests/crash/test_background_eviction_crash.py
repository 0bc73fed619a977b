"""Crash harnesses over background eviction.

The background evictor deletes buckets on its own thread, through the same
durable deletion as foreground eviction, while offloads go on. Workloads
fill a store under a tight ``max_physical_bytes`` with low watermarks, so
the evictor runs between (and during) the offloads; ``settle`` operations
wait for it. After a power cut or a kill -9 at any step: no acknowledged
object is lost unless an eviction (reported by the store's listener, the
background ones marked) took it, nothing removed comes back, nothing leaks;
and the directory never holds more than ``max_physical_bytes``. A fault
in one of the evictor's deletions loses and leaks nothing either.
"""

from __future__ import annotations

import errno
import threading

import pytest

import crash_harness as H
from crash_fs import CANARIES
from crash_sweeps import check_config, kill_sweep, powerloss_sweep
from kvbucket import BucketStore
from kvbucket.errors import StorageIOError
from storeutil import DeletionGate, du

LIMIT = 96 * 1024
BACKGROUND = {
    "eviction_policy": "fifo",
    "max_physical_bytes": LIMIT,
    "eviction_high_watermark": 0.5,
    "eviction_low_watermark": 0.3,
    "io_threads": 1,
}


def workload(seed: int) -> list[dict]:
    """Offloads with a ``settle`` after every third, then a removal and a read of everything."""
    ops: list[dict] = []
    for n, op in enumerate(H.simple_workload(9, per_bucket=2, seed=seed)[:-1]):
        ops.append(op)
        if n % 3 == 2:
            ops.append({"op": "settle"})
    ops.append({"op": "batch_remove", "keys": [ops[-2]["keys"][0]]})
    ops.append({"op": "get", "keys": [k for op in ops if op["op"] == "offload" for k in op["keys"]]})
    return ops


@pytest.mark.parametrize("seed", [1, 2])
def test_the_workload_evicts_in_the_background_and_never_overshoots(tmp_path, seed) -> None:
    """Guard against a harness that tests nothing: the background evictor
    does delete buckets in these workloads, and ``du`` of the directory
    stays within the limit after every operation."""
    events: list[dict] = []
    path = H.fresh_dir(str(tmp_path / f"s{seed}"))
    ops = workload(seed)
    over: list[int] = []

    gate = DeletionGate()

    def emit(event: dict) -> None:
        events.append(event)
        if event["ev"] == "done":
            with gate.held:  # the evictor deletes nothing while du scans
                used = du(path)
            if used > LIMIT:
                over.append(used)

    with BucketStore.open(path, filesystem=gate, durability="strict", **BACKGROUND) as store:
        H.run_ops(store, ops, emit)
    assert not over
    assert sum(len(e["keys"]) for e in events if e["ev"] == "evict" and e["bg"]) > 0


@pytest.mark.parametrize("durability", ["strict", "relaxed"])
def test_background_eviction_powerloss(tmp_path, crash_counts, small_writes, durability) -> None:
    config = {"durability": durability, **BACKGROUND}
    kw = {"point_budget": 10**9, "n_random": 16} if H.FULL else {"point_budget": 60, "n_random": 3}
    failures, stats = powerloss_sweep(tmp_path, workload(3), config, seed=3, **kw)
    crash_counts(**stats)
    assert not failures, H.format_failures(failures)


@pytest.mark.parametrize("seed", [1, 2])
def test_background_eviction_kill9(runner, tmp_path, crash_counts, seed) -> None:
    config = {"durability": "strict" if seed % 2 else "relaxed", **BACKGROUND}
    failures, stats = kill_sweep(runner, tmp_path, workload(seed), config, budget=40 if not H.FULL else 10**9, seed=seed)
    crash_counts(**stats)
    assert not failures, H.format_failures(failures)


def test_canary_is_caught_with_background_eviction(tmp_path, crash_counts, small_writes) -> None:
    """The harness still catches a broken protocol (no directory fsync) on
    this workload, with the evictor running."""
    config = {"durability": "strict", **BACKGROUND}
    bad, stats = powerloss_sweep(
        tmp_path, workload(4), config, seed=4, canary=CANARIES["no_dir_fsync"], stop_at_first=True, point_budget=10**9, n_random=3
    )
    crash_counts(canary_states=stats["states_checked"], canary_failures=len(bad))
    assert bad, f"the power-loss harness did not catch the no_dir_fsync canary in {stats['states_checked']} states"


class EvictorFaults(DeletionGate):
    """Fails (EIO) the ``n``-th unlink or directory fsync that the background
    evictor's thread makes; every other call goes through."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.seen = 0
        self.fired = 0

    def _maybe_fail(self, call: str, path: str) -> None:
        if not threading.current_thread().name.startswith("kvbucket-evict"):
            return
        self.seen += 1
        if self.seen == self.n:
            self.fired += 1
            raise OSError(errno.EIO, f"Input/output error (injected at background {call} #{self.n})", path)

    def unlink(self, path: str) -> None:
        self._maybe_fail("unlink", path)
        super().unlink(path)

    def fsync_dir(self, path: str) -> None:
        self._maybe_fail("fsync_dir", path)
        super().fsync_dir(path)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_a_failing_background_deletion_loses_nothing_and_leaks_nothing(tmp_path, n) -> None:
    """A fault in the evictor's deletions is counted, the next write retries
    the deletion (and raises while it fails: the caller retries once), and
    after reopening no acknowledged object is lost but evicted ones, no
    removed one is back and no file leaks."""
    path = H.fresh_dir(str(tmp_path / "store"))
    config = {"durability": "strict", **BACKGROUND}
    ops = workload(5)
    fs = EvictorFaults(n)
    events: list[dict] = []
    with BucketStore.open(path, filesystem=fs, **config) as store:
        current = H.report_evictions(store, events.append)
        for i, op in enumerate(ops):
            current[0] = i
            try:
                H.run_op(store, i, op, events.append)
            except StorageIOError:
                H.run_op(store, i, op, events.append)  # the failed deletion is retried first
            with fs.held:
                assert du(path) <= LIMIT
        assert fs.fired == 1 and store.stats().background_eviction_errors == 1
    exp = H.expectation(ops, events, acked_durable=True)
    res = H.check_recovered(path, exp, config=check_config(config))
    assert not res.failures, res.failures
