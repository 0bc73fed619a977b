"""kill -9 sweeps (issue 2, "What it must show" item 1).

A child process runs a workload through :class:`crash_fs.KillFS`, which
``os._exit(137)``s before, after, or in the middle of (torn write) its Nth
mutating call. The parent then opens the store in-process and checks every
invariant of SPEC section 3 (:func:`crash_harness.check_recovered`). A first
run without a kill point lists the calls; CI tries a sample of the
(call, mode) pairs, ``KVBUCKET_FULL_SWEEP=1`` all of them. The random-delay
test SIGKILLs a longer writer at an arbitrary instant instead, catching
deaths inside C calls and between bytecodes that the seam does not see.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import crash_harness as H
from crash_sweeps import kill_sweep

CONFIGS = {
    "strict": {"durability": "strict"},
    "relaxed": {"durability": "relaxed"},
    "strict-direct": {"durability": "strict", "io_mode": "direct"},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kill9_sweep(runner, tmp_path, crash_counts, name):
    config = dict(CONFIGS[name], io_threads=1)
    ops = H.simple_workload(6 if H.FULL else 3, per_bucket=3, seed=1)
    failures, stats = kill_sweep(runner, tmp_path, ops, config, budget=10**6, seed=list(CONFIGS).index(name))
    crash_counts(**stats)
    assert stats["killed"] > 0
    assert not failures, H.format_failures(failures)


def test_kill9_during_recovery(runner, tmp_path, crash_counts):
    """Kill points inside open()'s recovery of a dirty directory, then in the
    writes that follow: a crash while cleaning up must not lose or leak."""
    fates: dict = {}

    def prepare(path: str) -> None:
        fates.update(H.make_dirty(path))

    def base_expect(exp: H.Expectation) -> None:
        exp.live |= set(fates["good"]) | set(fates["salvaged"])
        exp.maybe |= set(fates["short"])
        exp.gone |= set(fates["cut"])

    ops = H.simple_workload(2, per_bucket=2, tag="r", seed=2)
    failures, stats = kill_sweep(
        runner,
        tmp_path,
        ops,
        {"durability": "strict", "io_threads": 1},
        budget=10**6,
        seed=3,
        prepare=prepare,
        base_expect=base_expect,
    )
    crash_counts(**stats)
    assert not failures, H.format_failures(failures)


def test_kill9_quarantine_recovery(runner, tmp_path, crash_counts):
    """The same with quarantine=True: files are moved, not deleted."""
    fates: dict = {}

    def prepare(path: str) -> None:
        fates.update(H.make_dirty(path))

    def base_expect(exp: H.Expectation) -> None:
        exp.live |= set(fates["good"]) | set(fates["salvaged"])
        exp.maybe |= set(fates["short"])
        exp.gone |= set(fates["cut"])

    ops = H.simple_workload(1, per_bucket=2, tag="q", seed=4)
    failures, stats = kill_sweep(
        runner,
        tmp_path,
        ops,
        {"durability": "strict", "quarantine": True, "io_threads": 1},
        budget=10**6,
        seed=5,
        prepare=prepare,
        base_expect=base_expect,
    )
    crash_counts(**stats)
    assert not failures, H.format_failures(failures)


def test_sigkill_random_delay(tmp_path, crash_counts):
    """RocksDB blackbox style: a writer of larger buckets (many write calls
    each) is SIGKILLed a random moment after its Kth acknowledgement."""
    runs = 50 if H.FULL else 8
    rng = random.Random(7)
    failures, mid_write = [], 0
    for run in range(runs):
        work = H.fresh_dir(str(tmp_path / f"s{run}"))
        ackpath = str(tmp_path / f"acks{run}")
        durability = "strict" if run % 2 == 0 else "relaxed"
        ops = H.simple_workload(12, per_bucket=4, tag=f"z{run}.", sizes=(65536, 200000, 300001), seed=run)
        spec = {
            "path": work,
            "ackpath": ackpath,
            "config": {"durability": durability, "io_threads": 1},
            "ops": ops,
            "write_chunk": 65536,
        }
        proc = subprocess.Popen(
            [sys.executable, os.path.join(H.HERE, "crash_child.py"), "--stream", json.dumps(spec)],
            stdout=subprocess.PIPE,
            env=H.child_env(),
        )
        assert proc.stdout
        target = rng.randint(0, len(ops) - 3)
        acked = 0
        while acked <= target:
            if not proc.stdout.readline():
                break
            acked += 1
        time.sleep(rng.uniform(0, 0.004))  # a random instant, not synchronisation
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
        proc.stdout.close()
        events = H.read_events(ackpath)
        if code not in (-signal.SIGKILL, 0):
            failures.append((f"run {run}", [f"writer exited {code}: {events[-1] if events else ''}"]))
            continue
        done = sum(e["ev"] == "done" for e in events)
        mid_write += code != 0 and done < len(ops)
        exp = H.expectation(ops, events, acked_durable=True)
        res = H.check_recovered(work, exp, config={"durability": durability, "io_threads": 1})
        if res.failures:
            failures.append((f"run {run} ({durability}), killed after {done} acks", res.failures))
    crash_counts(sigkill_runs=runs, killed_mid_workload=mid_write)
    assert not failures, H.format_failures(failures)
