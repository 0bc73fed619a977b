"""What the store's operation counters cost on the hot path, with 64 KiB objects.

    .venv/bin/python benchmarks/counters_cost.py [--objects 2048] [--repeats 9]

Each repeat runs the same workload twice in one process, alternating which
goes first: once with the store's counters, once with a stand-in whose every
bump does nothing. The workload, on a store with ``durability="relaxed"``
(no fsync, so the CPU path is all there is to measure), is:

* ``batch_offload`` of 32-object buckets of 64 KiB values;
* ``batch_load`` of the same objects, 32 a call (page cache warm, checksums verified);
* ``batch_exists`` of 32 keys a call (memory only: the most sensitive path).

Prints, for each phase, the median CPU seconds of the process (all threads:
less sensitive than wall time to other processes on a busy machine) and
wall seconds, with the ratios counted / no-op; then the cost of the bumps
themselves, timed alone, per call and as a share of one call of each phase.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import kvbucket  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from kvbucket import BucketStore  # noqa: E402
from kvbucket._core.counters import StoreCounters  # noqa: E402

OBJECT = 64 << 10
BATCH = 32


class NoCounters(StoreCounters):
    """Counters whose bumps do nothing: the baseline."""

    def exists(self, hits: int, lookups: int) -> None:
        """Count nothing."""

    def looked_up(self, op: str, hits: int, misses: int, hit_bytes: int = 0, miss_bytes: int = 0) -> None:
        """Count nothing."""

    def read(self, objects: int, nbytes: int, seconds: float) -> None:
        """Count nothing."""

    def wrote(self, objects: int, nbytes: int, seconds: float | None) -> None:
        """Count nothing."""


def run_once(root: str, objects: int, counted: bool, exists_rounds: int) -> dict[str, tuple[float, float]]:
    """``(CPU seconds, wall seconds)`` of each phase on a fresh store."""
    path = tempfile.mkdtemp(dir=root)
    value = os.urandom(OBJECT)
    keys = [f"page-{i:08d}" for i in range(objects)]
    batches = [keys[i : i + BATCH] for i in range(0, objects, BATCH)]
    try:
        store = BucketStore.open(path, durability="relaxed", bucket_keys_limit=BATCH)
        if not counted:
            store._catalog.counters = NoCounters()
        with store:
            times = {
                "offload": timed(lambda: [store.batch_offload({k: value for k in batch}) for batch in batches]),
            }
            buffers = {k: bytearray(OBJECT) for k in batches[0]}
            times["load"] = timed(lambda: [store.batch_load(dict(zip(batch, buffers.values()))) for batch in batches])
            times["exists"] = timed(lambda: [store.batch_exists(batch) for _ in range(exists_rounds) for batch in batches])
        return times
    finally:
        shutil.rmtree(path)


def timed(work: Callable[[], object]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    return time.process_time() - cpu, time.perf_counter() - wall


def bump_costs() -> dict[str, float]:
    """Seconds the counting adds to one call of each phase, timed alone (best of 5)."""
    counters = StoreCounters()
    clock = time.perf_counter

    def offload() -> None:  # a start time, then one bump at commit
        started = clock()
        counters.wrote(BATCH, BATCH * OBJECT, clock() - started)

    def load() -> None:  # a start time, the lookup bump, the size sum and the completion bump
        started = clock()
        counters.looked_up("load", BATCH, 0, BATCH * OBJECT)
        nbytes = sum(OBJECT for _ in range(BATCH))
        counters.read(BATCH, nbytes, clock() - started)

    flags = [True] * BATCH

    def exists() -> None:  # counting the hits of a batch and one bump
        counters.exists(flags.count(True), len(flags))

    steps = (("offload", offload), ("load", load), ("exists", exists))
    return {name: min(timeit.repeat(fn, number=100_000, repeat=5)) / 100_000 for name, fn in steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=2048, help="64 KiB objects per run (default 2048 = 128 MiB)")
    parser.add_argument("--repeats", type=int, default=9, help="runs of each variant (default 9)")
    parser.add_argument("--exists-rounds", type=int, default=20, help="passes of batch_exists over all keys")
    parser.add_argument("--dir", default=None, help="where the stores go (default: the system temp dir)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="kvbucket-counters-", dir=args.dir)
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    try:
        run_once(root, min(args.objects, 256), True, 1)  # warm-up: imports, page cache, thread pool
        for repeat in range(args.repeats):
            for counted in (True, False) if repeat % 2 else (False, True):
                results[counted].append(run_once(root, args.objects, counted, args.exists_rounds))
    finally:
        shutil.rmtree(root)
    calls = {"offload": len(range(0, args.objects, BATCH))}
    calls["load"] = calls["offload"]
    calls["exists"] = calls["offload"] * args.exists_rounds
    bumps = bump_costs()
    print(f"{args.objects} objects of 64 KiB, {BATCH} a call, {args.repeats} runs each (medians)")
    for phase in ("offload", "load", "exists"):
        cpu = [statistics.median(r[phase][0] for r in results[counted]) for counted in (True, False)]
        wall = [statistics.median(r[phase][1] for r in results[counted]) for counted in (True, False)]
        share = bumps[phase] / (wall[1] / calls[phase])
        print(
            f"  {phase:<8} CPU counted {cpu[0]:7.4f}s no-op {cpu[1]:7.4f}s ratio {cpu[0] / cpu[1]:5.3f} | "
            f"wall ratio {wall[0] / wall[1]:5.3f} | bumps alone {bumps[phase] * 1e9:5.0f} ns a call = {share:6.2%} of a call"
        )


if __name__ == "__main__":
    main()
