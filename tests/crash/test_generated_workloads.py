"""Hypothesis-generated workloads through the power-loss and fault harnesses.

Each example draws a workload (offloads of 1-4 objects of awkward sizes,
removals, bucket deletions, compactions), a durability mode, an I/O mode and
whether a physical limit forces eviction (and by which policy), then checks a sample of power
cut states and one injected fault. CI runs a few derandomized examples;
``KVBUCKET_FULL_SWEEP=1`` runs many random ones.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crash_harness as H
from crash_sweeps import fault_run, powerloss_sweep

SIZES = st.sampled_from([0, 1, 511, 512, 4095, 4096, 4097, 8192, 13000])


@st.composite
def workloads(draw) -> list[dict]:
    ops: list[dict] = []
    live: list[str] = []
    kinds = ["offload", "offload", "remove", "batch_remove", "delete_bucket_of", "compact"]
    for b in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(kinds))
        if kind == "offload" or not live:
            sizes = draw(st.lists(SIZES, min_size=1, max_size=4))
            keys = [H.make_key(f"h{b}.{i}", s) for i, s in enumerate(sizes)]
            live += keys
            ops.append({"op": "offload", "keys": keys})
        elif kind == "remove":
            k = draw(st.sampled_from(live))
            live.remove(k)
            ops.append({"op": "remove", "keys": [k]})
        elif kind == "batch_remove":
            ks = draw(st.lists(st.sampled_from(live), min_size=1, max_size=3, unique=True))
            for k in ks:
                live.remove(k)
            ops.append({"op": "batch_remove", "keys": ks})
        elif kind == "delete_bucket_of":
            ops.append({"op": "delete_bucket_of", "key": draw(st.sampled_from(live))})
        else:
            ops.append({"op": "compact", "ratio": draw(st.sampled_from([0.0, 0.25, 0.75]))})
    ops.append({"op": "get", "keys": [k for op in ops for k in op.get("keys", [])]})
    return ops


CONFIGS = st.fixed_dictionaries(
    {
        "durability": st.sampled_from(["strict", "relaxed"]),
        "io_mode": st.sampled_from(["buffered", "direct", "auto"]),
        "io_threads": st.just(1),
        # Off: the evictor thread's timing would race the workload's steps;
        # test_background_eviction_crash.py sweeps crashes with it running.
        "background_eviction": st.just(False),
    },
    optional={"max_physical_bytes": st.just(64 * 1024), "eviction_policy": st.sampled_from(["2q", "fifo", "lru"])},
)

SETTINGS = settings(
    max_examples=80 if H.FULL else 15,
    deadline=None,
    derandomize=not H.FULL,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(ops=workloads(), config=CONFIGS, seed=st.integers(0, 2**16))
def test_generated_workload_power_loss(tmp_path, small_writes, crash_counts, ops, config, seed):
    kw = {"point_budget": 10**9, "n_random": 8} if H.FULL else {"point_budget": 15, "n_random": 2}
    failures, stats = powerloss_sweep(tmp_path, ops, config, seed=seed, **kw)
    crash_counts(examples=1, **{k: v for k, v in stats.items() if k in ("crash_points_tried", "states_checked")})
    assert not failures, f"workload {ops}\nconfig {config}\n" + H.format_failures(failures)


@SETTINGS
@given(
    ops=workloads(),
    config=CONFIGS,
    kind=st.sampled_from(["eio", "enospc", "short"]),
    n=st.integers(1, 45),
)
def test_generated_workload_fault(tmp_path, small_writes, crash_counts, ops, config, kind, n):
    fail, fs, raised = fault_run(str(tmp_path / "fault"), None, ops, config, kind, n)
    crash_counts(examples=1, faults_fired=len(fs.fired))
    assert not fail, f"workload {ops}\nconfig {config}\n{kind} at call {n} ({fs.fired}); raised {raised}\n" + "\n".join(fail)
