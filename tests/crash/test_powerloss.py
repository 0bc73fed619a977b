"""Power-loss simulation (issue 2, items 2 and 4).

A workload runs through :class:`crash_fs.RecordingFS`; :mod:`crash_power`
rebuilds the disk states a power cut could leave at each op boundary
(unsynced writes absent / full / zero-filled / torn; unsynced directory
operations lost as an in-order prefix or any subset), and each state is
recovered and checked. Strict durability: every acknowledged bucket
survives. Relaxed: acknowledged buckets may be lost, never served wrong,
never leaked.

The canaries break the commit protocol through a FileSystem wrapper (no data
fdatasync, no meta fsync, no directory fsync, meta written in place); the
harness must find failures for each, on the same workload where the real
protocol has none.
"""

from __future__ import annotations

import pytest

import crash_harness as H
import kvbucket._core.fs
from crash_fs import CANARIES
from crash_sweeps import powerloss_sweep

FULL_KW = {"point_budget": 10**9, "n_random": 24, "exhaustive_limit": 512}


def sweep_kw(point_budget: int, n_random: int) -> dict:
    return FULL_KW if H.FULL else {"point_budget": point_budget, "n_random": n_random}


@pytest.mark.parametrize("io_mode", ["buffered", "direct", "auto"])
def test_powerloss_strict(tmp_path, crash_counts, small_writes, io_mode, monkeypatch):
    if io_mode == "auto":
        monkeypatch.setattr(kvbucket._core.fs, "WRITE_CHUNK", H.AUTO_WRITE_CHUNK)
    # auto: the second bucket is written aligned with O_DIRECT, the others packed
    ops = H.simple_workload(5 if H.FULL else 3, per_bucket=3, seed=11, direct_every=2 if io_mode == "auto" else 0)
    config = {"durability": "strict", "io_mode": io_mode, "io_threads": 1}
    failures, stats = powerloss_sweep(tmp_path, ops, config, seed=1, **sweep_kw(10**9, 4))
    crash_counts(**stats)
    H.check_strict_sweep(failures, stats, tmp_path, io_mode)


def test_powerloss_relaxed(tmp_path, crash_counts, small_writes):
    ops = H.simple_workload(3, per_bucket=3, seed=12)
    config = {"durability": "relaxed", "io_threads": 1}
    failures, stats = powerloss_sweep(tmp_path, ops, config, seed=2, **sweep_kw(10**9, 6))
    crash_counts(**stats)
    assert not failures, H.format_failures(failures)


def canary_workload() -> list[dict]:
    """Offloads, then a removal that rewrites a meta: writing metas in place
    is only unsafe for a rewrite."""
    ops = H.simple_workload(3, per_bucket=3, seed=13)[:-1]
    ops.append({"op": "batch_remove", "keys": [ops[0]["keys"][0]]})
    ops.append({"op": "offload", "keys": [H.make_key("after-remove", 3000)]})
    return ops


@pytest.mark.parametrize("canary", list(CANARIES))
def test_canary_is_caught(tmp_path, crash_counts, small_writes, canary):
    ops = canary_workload()
    config = {"durability": "strict", "io_threads": 1}
    kw = sweep_kw(10**9, 3)
    # the real protocol on the same workload and sampling: no failure
    good, good_stats = powerloss_sweep(tmp_path / "good", ops, config, seed=3, **kw)
    assert not good, H.format_failures(good)
    bad, stats = powerloss_sweep(
        tmp_path / "canary", ops, config, seed=3, canary=CANARIES[canary], stop_at_first=not H.FULL, **kw
    )
    crash_counts(correct_states=good_stats["states_checked"], canary_states=stats["states_checked"], canary_failures=len(bad))
    assert bad, f"the power-loss harness did not catch the {canary} canary in {stats['states_checked']} states"
    print(f"{canary} caught: {bad[0][1][0]} -- {bad[0][0]}")
