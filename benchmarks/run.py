"""The kvbucket benchmark suite: raw disk, kvbucket and its peers, in one run.

    .venv/bin/python benchmarks/run.py            # full run (~15-20 min), writes docs/
    .venv/bin/python benchmarks/run.py --quick    # smoke run (~3 min)
    .venv/bin/python benchmarks/run.py --report-only bench-results/results.json   # redraw

For each object size (64 KiB, 1 MiB, 4 MiB) and each repeat, every system
writes the same bytes (a ``--dataset`` of 1 GiB) and then reads them all back
in random batches of 32 objects over 16 threads, cold (page cache dropped):

* raw baselines: fio (buffered and O_DIRECT) and a minimal Python
  ``os.pwritev``/``os.preadv`` loop, one fdatasync per 256 MiB "bucket";
* kvbucket: durability strict in every io_mode the configuration offers
  (the default among them) and relaxed buffered and direct;
* peers: SGLang-HiCacheFile-style and LMCache-style file per key, LMDB,
  RocksDB (rocksdict), diskcache (see ``benchmarks/peers.py``).

Then, each against its own raw baseline measured in the same run:

* ``async``: asynchronous loads (``benchmarks/async_load.py``) of each
  object size, default configuration, ``submit_load`` with ``--depth``
  batches in flight and ``batch_load``, against ``--threads`` raw readers
  with no barrier;
* ``small``: 64 KiB objects (``benchmarks/small_objects.py``): durable
  writes, cold and warm reads against raw loops, trial by trial;
* ``group``: group commit (``benchmarks/group_commit.py``): four
  OffloadQueue workers, grouped and a bucket per commit, against four raw
  writer threads;
* ``metadata`` (``benchmarks/metadata.py``): ``batch_exists`` and
  ``batch_query`` rates, ``open()`` time and index memory per key at
  1,000,000 objects.

Every figure is a median of the repeats with min and max, and ratios are
taken against the raw baseline measured in the same run. Results go to
``bench-results/results.json``, ``docs/BENCHMARKS.md``,
``docs/benchmarks.png`` (throughput) and ``docs/speed.png`` (the ratios);
every data file is deleted as soon as it is read.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
try:
    import kvbucket  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(ROOT, "src"))

import async_load  # noqa: E402
import group_commit  # noqa: E402
import metadata  # noqa: E402
import peers as peer_mod  # noqa: E402
import report  # noqa: E402
import small_objects  # noqa: E402
from kvbucket.tools import bench as kb  # noqa: E402

MiB = 1 << 20
SIZES = {"64KiB": 64 << 10, "1MiB": 1 << 20, "4MiB": 4 << 20}
PHASES = ("sizes", "async", "small", "group", "metadata")
SMALL_SIZE = 64 << 10
QUICK_DATASET = 128 * MiB


def kv_variants() -> list[tuple[str, str]]:
    """(durability, io_mode) of the kvbucket systems: strict in every mode
    the configuration offers, relaxed buffered and direct."""
    return [("strict", mode) for mode in kb.kv_io_modes(kb.Workload())] + [("relaxed", "buffered"), ("relaxed", "direct")]


def kv_available() -> bool:
    """Whether the store can be imported (the suite still runs the rest without it)."""
    try:
        from kvbucket import BucketStore  # noqa: F401
    except ImportError:
        return False
    return True


class Context:
    """What every step of one object size shares."""

    def __init__(self, wl: kb.Workload, work: str, pool: cf.ThreadPoolExecutor, exists_rate: bool) -> None:
        self.wl = wl
        self.work = work
        self.pool = pool
        self.exists_rate = exists_rate
        self.source = kb.Source(wl.object_size)
        self.area, self.dests = kb.dest_views(wl)
        self.keys = kb.make_keys(wl.n_objects)
        self.batches = kb.read_batches(wl)

    def close(self) -> None:
        self.dests.clear()
        self.area.close()
        self.source.close()


def exists_rate(fn: Callable[[list[str]], Any], keys: list[str], batch: int = 128, min_s: float = 0.3) -> float:
    """Keys per second of ``fn`` over all ``keys`` in shuffled batches."""
    order = keys[:]
    random.Random(2).shuffle(order)
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]
    done, t0 = 0, time.perf_counter()
    while True:
        for b in batches:
            fn(b)
        done += len(order)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return done / elapsed


# -- one step per system ----------------------------------------------------


def step_raw(ctx: Context, engine: str, mode: str) -> dict[str, float]:
    """Raw write then cold random read by fio or the Python loop."""
    direct = mode == "direct"
    path = os.path.join(ctx.work, "raw.dat")
    try:
        kb.make_cold()
        w = kb.fio_write(path, ctx.wl, direct) if engine == "fio" else kb.py_write(path, ctx.wl, ctx.source, direct)
        kb.make_cold([path])
        r = kb.fio_read(path, ctx.wl, direct) if engine == "fio" else kb.py_read(path, ctx.wl, ctx.dests, direct, ctx.pool)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return {"write": w, "read": r}


def step_kv(ctx: Context, durability: str, mode: str) -> dict[str, float]:
    """kvbucket offload (timed to the last return), then cold batch_load."""
    path = os.path.join(ctx.work, "kv")
    out: dict[str, float] = {}
    try:
        kb.make_cold()
        store = kb.open_store(path, ctx.wl, durability, mode)
        try:
            out["write"] = kb.mib_s(ctx.wl.nbytes, kb.kv_offload(store, ctx.wl, ctx.keys, ctx.source))
            if durability == "strict":  # reads do not depend on durability: measure them once
                kb.make_cold([path])
                out["read"] = kb.mib_s(ctx.wl.nbytes, kb.kv_load(store, ctx.wl, ctx.keys, ctx.dests))
                kb.verify_sample(store, ctx.keys, ctx.source)
                if ctx.exists_rate and mode == "buffered":
                    out["exists"] = exists_rate(store.batch_exists, ctx.keys)
        finally:
            store.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return out


def step_peer(ctx: Context, name: str) -> dict[str, float]:
    """A peer: write the same objects bucket by bucket, reopen, cold read."""
    path = os.path.join(ctx.work, name)
    kb.make_cold()
    peer = peer_mod.make_peer(name, path, ctx.pool, ctx.wl.nbytes)
    out: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        for rng in ctx.wl.buckets():
            peer.write([(ctx.keys[i], ctx.source.value(i)) for i in rng])
        out["write"] = kb.mib_s(ctx.wl.nbytes, time.perf_counter() - t0)
        peer.reopen()
        kb.make_cold([path])
        t0 = time.perf_counter()
        for b in ctx.batches:
            peer.read([(ctx.keys[i], ctx.dests[j]) for j, i in enumerate(b)])
        out["read"] = kb.mib_s(ctx.wl.nbytes, time.perf_counter() - t0)
        _check_peer(ctx, peer)
        if ctx.exists_rate:
            out["exists"] = exists_rate(peer.exists, ctx.keys)
    finally:
        peer.destroy()
    return out


def _check_peer(ctx: Context, peer: peer_mod.Peer) -> None:
    """Spot-check a peer's bytes (a benchmark of a broken store means nothing)."""
    i = len(ctx.keys) // 2
    peer.read([(ctx.keys[i], ctx.dests[0])])
    if ctx.dests[0] != ctx.source.value(i):
        raise AssertionError(f"{peer.name} returned wrong bytes")


def systems(with_kv: bool, fio: bool, peer_names: list[str]) -> list[tuple[str, Callable[[Context], dict]]]:
    """Every (label, step) measured for one object size, in run order."""
    out: list[tuple[str, Callable[[Context], dict]]] = []
    for engine in (["fio"] if fio else []) + ["python"]:
        out.extend((f"raw {engine} {mode}", lambda c, e=engine, m=mode: step_raw(c, e, m)) for mode in ("buffered", "direct"))
    if with_kv:
        out.extend((f"kvbucket {durability} {mode}", lambda c, d=durability, m=mode: step_kv(c, d, m)) for durability, mode in kv_variants())
    out.extend((name, lambda c, n=name: step_peer(c, n)) for name in peer_names)
    return out


def run_size(label: str, wl: kb.Workload, steps: list, repeats: int, work: str, bar: Any,
             with_exists: bool) -> dict[str, dict[str, list[float]]]:
    """All systems, ``repeats`` times, for one object size; raw runs first in
    every repeat so drift of the disk hits every system alike."""
    results: dict[str, dict[str, list[float]]] = {}
    with cf.ThreadPoolExecutor(wl.threads) as pool:
        ctx = Context(wl, work, pool, with_exists)
        try:
            for rep in range(repeats):
                for name, step in steps:
                    bar.set_postfix_str(f"{label} {name} {rep + 1}/{repeats}")
                    for metric, value in step(ctx).items():
                        results.setdefault(name, {}).setdefault(metric, []).append(value)
                    bar.update(1)
        finally:
            ctx.close()
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke run: 128 MiB, 2 repeats, 100k keys, 16 group buckets")
    p.add_argument("--dir", default=os.path.join(ROOT, "bench-tmp"), help="scratch directory on the disk under test")
    p.add_argument("--dataset", default=None, help="bytes per workload (default 1GiB, quick 128MiB)")
    p.add_argument("--repeats", type=int, default=None, help="runs per figure (default 3, quick 2)")
    p.add_argument("--sizes", default="64KiB,1MiB,4MiB", help="object sizes, among " + ",".join(SIZES))
    p.add_argument("--meta-keys", type=int, default=None, help="objects in the metadata phase (default 1000000)")
    p.add_argument("--peers", default=",".join(peer_mod.PEERS), help="peers to run ('' for none)")
    p.add_argument("--phases", default=",".join(PHASES), help="among " + ",".join(PHASES))
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--depth", type=int, default=4, help="batches in flight in the async phase")
    p.add_argument("--group-buckets", type=int, default=None, help="buckets in the group phase (default 64, quick 16)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs"), help="where BENCHMARKS.md and the chart go")
    p.add_argument("--json", default=os.path.join(ROOT, "bench-results", "results.json"))
    p.add_argument("--no-docs", action="store_true", help="write only the JSON")
    p.add_argument("--report-only", metavar="JSON", help="measure nothing: rewrite the docs from a results JSON")
    return p.parse_args(argv)


def async_phase(sizes: list[str], dataset: int, args: argparse.Namespace, repeats: int, work: str) -> dict[str, Any]:
    """Asynchronous loads of each object size against the pipelined raw read."""
    out = {}
    for label in sizes:
        wl = kb.Workload(SIZES[label], dataset, args.threads, args.batch, depth=args.depth)
        path = os.path.join(work, "async")
        try:
            out[label] = async_load.measure(path, wl, repeats)
        finally:
            shutil.rmtree(path, ignore_errors=True)
    return out


def small_phase(dataset: int, args: argparse.Namespace, repeats: int, work: str) -> dict[str, Any]:
    """64 KiB durable writes and cold/warm reads against the raw loops, trial by trial."""
    wl = kb.Workload(SMALL_SIZE, dataset, args.threads, args.batch)
    prof = small_objects.Profiler(False)
    rows = []
    for mode in kb.raw_io_modes(wl):
        rows.append(small_objects.write_phase(wl, mode, work, repeats, prof))
        rows += small_objects.read_phase(wl, mode, work, repeats, prof)
    return {"object_size": wl.object_size, "n_objects": wl.n_objects, "per_bucket": wl.per_bucket,
            "trials": repeats, "rows": rows}


def group_phase(buckets: int, repeats: int, work: str) -> dict[str, Any]:
    """Group commit, a bucket per commit and the raw writers."""
    path = os.path.join(work, "group")
    os.makedirs(path, exist_ok=True)
    try:
        return group_commit.measure(path, buckets, repeats)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; write the JSON results, BENCHMARKS.md and the charts."""
    from tqdm import tqdm

    from kvbucket.config import BucketConfig, parse_size

    args = parse_args(argv)
    if args.report_only:
        with open(args.report_only) as f:
            summary = report.summarize_all(json.load(f))
        print(report.text_tables(summary))
        report.write_docs(summary, args.out)
        return 0
    dataset = parse_size(args.dataset) if args.dataset else (QUICK_DATASET if args.quick else 1 << 30)
    repeats = args.repeats or (2 if args.quick else 3)
    meta_keys = args.meta_keys if args.meta_keys is not None else (100_000 if args.quick else 1_000_000)
    group_buckets = args.group_buckets or (16 if args.quick else 64)
    sizes = [s for s in args.sizes.split(",") if s]
    peer_names = [p for p in args.peers.split(",") if p]
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES) | set(sizes) - set(SIZES))
    if unknown:
        print(f"unknown phase or size: {', '.join(unknown)} (phases: {', '.join(PHASES)}; sizes: {', '.join(SIZES)})", file=sys.stderr)
        return 2
    fio = kb.fio_version()
    with_kv = kv_available()
    if not with_kv:
        print("kvbucket.BucketStore is not importable: measuring baselines and peers only", file=sys.stderr)
        phases = [p for p in phases if p == "sizes"]
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="suite-", dir=args.dir)
    steps = systems(with_kv, fio is not None, peer_names)
    started = time.time()
    out: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "machine": kb.machine_info(args.dir),
        "fio": fio,
        "cold_cache": kb.make_cold(),
        "config": {"dataset": dataset, "repeats": repeats, "threads": args.threads, "batch": args.batch,
                   "depth": args.depth, "bucket_size": 256 * MiB, "meta_keys": meta_keys, "peers": peer_names,
                   "kvbucket": with_kv, "group_buckets": group_buckets, "phases": phases,
                   "default_io_mode": BucketConfig().io_mode if with_kv else None},
        "descriptions": {name: cls.description for name, cls in peer_mod.PEERS.items()},
        "sizes": {},
    }
    extra = {"async": len(sizes), "small": 1, "group": 1, "metadata": 1 if meta_keys else 0}
    total = (len(sizes) * repeats * len(steps) if "sizes" in phases else 0) + sum(extra[p] for p in phases if p in extra)
    bar = tqdm(total=total, unit="step")
    try:
        if "sizes" in phases:
            for label in sizes:
                wl = kb.Workload(SIZES[label], dataset, args.threads, args.batch)
                raw = run_size(label, wl, steps, repeats, work, bar, with_exists=(label == sizes[0]))
                out["sizes"][label] = {"object_size": wl.object_size, "n_objects": wl.n_objects, "bytes": wl.nbytes,
                                       "results": raw}
        if "async" in phases:
            bar.set_postfix_str("async loads")
            out["async_load"] = async_phase(sizes, dataset, args, repeats, work)
            bar.update(len(sizes))
        if "small" in phases:
            bar.set_postfix_str("small objects")
            out["small_objects"] = small_phase(dataset, args, repeats, work)
            bar.update(1)
        if "group" in phases:
            bar.set_postfix_str(f"group commit, {group_buckets} buckets")
            out["group_commit"] = group_phase(group_buckets, repeats, work)
            bar.update(1)
        if "metadata" in phases and meta_keys:
            bar.set_postfix_str(f"metadata phase, {meta_keys} keys")
            out["metadata"] = metadata.run(os.path.join(work, "meta"), meta_keys, repeats=repeats)
            bar.update(1)
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)
    out["elapsed_s"] = time.time() - started
    summary = report.summarize_all(out)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=1)
    print(report.text_tables(summary))
    if not args.no_docs:
        report.write_docs(summary, args.out)
    print(f"\ntook {out['elapsed_s'] / 60:.1f} min; results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
