"""Where kvbucket spends its time, next to the raw loop on the same workload.

    .venv/bin/python benchmarks/breakdown.py --size 1MiB --op read --mode direct
    .venv/bin/python benchmarks/breakdown.py --size 64KiB --op write --mode buffered --cprofile
    .venv/bin/python benchmarks/breakdown.py --op open --keys 1000000      # cProfile of open()
    .venv/bin/python benchmarks/breakdown.py --op query --keys 1000000     # cProfile of batch_query

Alternates the raw Python loop and kvbucket ``--repeats`` times (cold cache
before each), then prints medians and a breakdown of kvbucket's wall time:
seconds inside each system call of the I/O seam (a timing
:class:`~kvbucket._core.fs.FileSystem` passed to ``BucketStore.open``), inside
CRC32C, and the rest (Python). Thread-pool reads overlap, so per-call times
are summed over threads ("thread-seconds"). ``--cprofile`` adds the top
functions of one kvbucket run (cProfile sees the calling thread only; the
I/O workers' own time shows up in the seam totals).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import cProfile
import io
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import kvbucket  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(ROOT, "src"))

from kvbucket._core.fs import FileSystem  # noqa: E402
from kvbucket.tools import bench as kb  # noqa: E402

SIZES = {"64KiB": 64 << 10, "1MiB": 1 << 20, "4MiB": 4 << 20}


class Timings:
    """Thread-safe accumulators of seconds and calls per name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.calls[name] += 1

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()
            self.calls.clear()


def _timed(name: str, fn: Any, timings: Timings) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timings.add(name, time.perf_counter() - t0)

    return wrapper


class TimingFS(FileSystem):
    """The production I/O layer, timing every primitive call."""

    PRIMITIVES = ("open", "close", "pwritev", "preadv", "fdatasync", "fsync", "fstat", "rename", "unlink", "fsync_dir")

    def __init__(self, timings: Timings) -> None:
        for name in self.PRIMITIVES:
            setattr(self, name, _timed(name, getattr(super(), name), timings))


def patch_crc(timings: Timings) -> None:
    """Time CRC32C wherever the store and its helpers call it."""
    import kvbucket._core.checksum as checksum
    import kvbucket.store as store

    store.crc32c = _timed("crc32c (read verify)", checksum.crc32c, timings)
    store.crc32c_of = _timed("crc32c (write)", checksum.crc32c_of, timings)


def kv_run(op: str, wl: kb.Workload, mode: str, durability: str, work: str, ctx: dict, timings: Timings,
           profile: cProfile.Profile | None) -> float:
    """One kvbucket write (and, for reads, a cold batch_load); returns MiB/s of ``op``."""
    path = os.path.join(work, "kv")
    try:
        kb.make_cold()
        store = kb.open_store(path, wl, durability, mode, filesystem=TimingFS(timings))
        try:
            if op == "write":
                timings.reset()
                if profile:
                    profile.enable()
                seconds = kb.kv_offload(store, wl, ctx["keys"], ctx["source"])
            else:
                kb.kv_offload(store, wl, ctx["keys"], ctx["source"])
                kb.make_cold([path])
                timings.reset()
                if profile:
                    profile.enable()
                seconds = kb.kv_load(store, wl, ctx["keys"], ctx["dests"])
            if profile:
                profile.disable()
        finally:
            store.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return kb.mib_s(wl.nbytes, seconds), seconds


def raw_run(op: str, wl: kb.Workload, mode: str, work: str, ctx: dict, pool: cf.ThreadPoolExecutor) -> float:
    """The minimal Python loop on the same workload; MiB/s of ``op``."""
    path = os.path.join(work, "raw.dat")
    try:
        kb.make_cold()
        w = kb.py_write(path, wl, ctx["source"], mode == "direct")
        if op == "write":
            return w
        kb.make_cold([path])
        return kb.py_read(path, wl, ctx["dests"], mode == "direct", pool)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def breakdown(timings: Timings, wall: float) -> str:
    """Table of seam and CRC time against the wall time of the kvbucket run."""
    lines = [f"  {'where':24}{'calls':>8}{'thread-s':>10}{'% of wall':>10}{'us/call':>10}"]
    for name, secs in sorted(timings.seconds.items(), key=lambda kv: -kv[1]):
        calls = timings.calls[name]
        lines.append(f"  {name:24}{calls:>8}{secs:>10.3f}{100 * secs / wall:>9.1f}%{1e6 * secs / calls:>10.1f}")
    lines.append(f"  {'wall':24}{'':>8}{wall:>10.3f}")
    return "\n".join(lines)


def _top(profile: cProfile.Profile, sort: str, count: int = 22) -> str:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats(sort).print_stats(count)
    return out.getvalue()


def profile_metadata(op: str, n: int, directory: str) -> int:
    """cProfile of ``open()`` (recovery of ``n`` objects) or of ``batch_query``."""
    import random

    import metadata
    from kvbucket import BucketStore

    path = tempfile.mkdtemp(prefix="profile-meta-", dir=directory)
    try:
        keys, build_s = metadata.build(path, n)
        print(f"built {n} objects in {build_s:.1f} s")
        profile = cProfile.Profile()
        if op == "open":
            t0 = time.perf_counter()
            BucketStore.open(path).close()
            print(f"open() without profiler: {time.perf_counter() - t0:.2f} s")
            profile.enable()
            BucketStore.open(path).close()
            profile.disable()
        else:
            random.Random(1).shuffle(keys)
            batches = [keys[i : i + 128] for i in range(0, len(keys), 128)]
            with BucketStore.open(path, readonly=True) as store:
                t0 = time.perf_counter()
                for b in batches:
                    store.batch_query(b)
                print(f"batch_query without profiler: {n / (time.perf_counter() - t0):,.0f} keys/s")
                profile.enable()
                for b in batches:
                    store.batch_query(b)
                profile.disable()
        print(_top(profile, "tottime"))
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1MiB", choices=list(SIZES))
    p.add_argument("--op", default="write", choices=["write", "read", "open", "query"])
    p.add_argument("--keys", type=int, default=1_000_000, help="objects for --op open/query")
    p.add_argument("--mode", default="buffered", choices=["buffered", "direct"])
    p.add_argument("--durability", default="strict", choices=["strict", "relaxed"])
    p.add_argument("--dataset", type=int, default=1 << 30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--dir", default=os.path.join(ROOT, "bench-tmp"))
    p.add_argument("--cprofile", action="store_true")
    args = p.parse_args(argv)

    os.makedirs(args.dir, exist_ok=True)
    if args.op in ("open", "query"):
        return profile_metadata(args.op, args.keys, args.dir)
    wl = kb.Workload(SIZES[args.size], args.dataset, args.threads, 32)
    work = tempfile.mkdtemp(prefix="profile-", dir=args.dir)
    timings = Timings()
    patch_crc(timings)
    area, dests = kb.dest_views(wl)
    ctx = {"source": kb.Source(wl.object_size), "dests": dests, "keys": kb.make_keys(wl.n_objects)}
    raw, kv, walls = [], [], []
    profile = cProfile.Profile() if args.cprofile else None
    try:
        with cf.ThreadPoolExecutor(wl.threads) as pool:
            for rep in range(args.repeats):
                raw.append(raw_run(args.op, wl, args.mode, work, ctx, pool))
                rate, wall = kv_run(args.op, wl, args.mode, args.durability, work, ctx, timings,
                                    profile if rep == args.repeats - 1 else None)
                kv.append(rate)
                walls.append(wall)
                print(f"  run {rep + 1}: raw python {raw[-1]:.0f} MiB/s, kvbucket {kv[-1]:.0f} MiB/s", flush=True)
    finally:
        dests.clear()
        area.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.op} {args.size} {args.mode} {args.durability}: raw python {statistics.median(raw):.0f} MiB/s, "
          f"kvbucket {statistics.median(kv):.0f} MiB/s = {statistics.median(kv) / statistics.median(raw):.2f}x")
    print("kvbucket breakdown of the last run:")
    print(breakdown(timings, walls[-1]))
    if profile:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(18)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
