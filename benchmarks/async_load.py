"""Asynchronous loads against a raw ``os.preadv`` loop at the same parallelism.

Writes ``--total-mib`` of ``--object-kib`` objects into 256 MiB buckets
(default configuration otherwise, its default ``io_mode`` included), then,
cold (page cache dropped before every pass), reads every object once in a
random order:

* ``raw``: ``--threads`` Python threads, each ``os.preadv``-ing the next
  object from the store's own data files at the object's offset (no
  checksum, no lookup), pipelined: no barrier anywhere;
* ``async``: :meth:`BucketStore.submit_load` of random batches of
  ``--batch`` objects, ``--depth`` batches in flight (``io_threads`` =
  ``--threads``, ``load_queue_depth`` = ``--depth``), checksums verified;
* ``batch_load``: the synchronous call, one batch at a time (a barrier
  after each batch).

Each pass is run ``--repeats`` times, interleaved; the figures are medians
and the ratios are of medians, measured in one process. The passes are
``kvbucket bench``'s own (:mod:`kvbucket.tools.bench`), so this script and
``kvbucket bench`` measure the same thing::

    python benchmarks/async_load.py --dir /var/tmp/kv-async --total-mib 1024
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import statistics
import sys
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import kvbucket  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from kvbucket.config import BucketConfig  # noqa: E402
from kvbucket.tools import bench as kb  # noqa: E402

MiB = 1 << 20
PASSES = ("raw", "async", "batch_load")


def measure(path: str, wl: kb.Workload, repeats: int) -> dict[str, Any]:
    """Median MiB/s of each pass and the ratios to the raw loop, in the
    store's default ``io_mode``; ``path`` is a new store directory."""
    mode = BucketConfig().io_mode
    keys = kb.make_keys(wl.n_objects)
    source = kb.Source(wl.object_size)
    area, dests = kb.dest_views(wl)
    sets_area, sets = kb.dest_sets(wl)
    runs: dict[str, list[float]] = {name: [] for name in PASSES}
    cold = ""
    try:
        with kb.open_store(path, wl, "strict", mode) as store, cf.ThreadPoolExecutor(wl.threads) as pool:
            kb.kv_offload(store, wl, keys, source)
            kb.verify_sample(store, keys, source)
            locations = kb.store_locations(store, keys)
            passes: dict[str, Callable[[], float]] = {
                "raw": lambda: kb.py_read_pipelined(locations, wl, mode == "direct", pool),
                "async": lambda: kb.mib_s(wl.nbytes, kb.kv_submit_load(store, wl, keys, sets)),
                "batch_load": lambda: kb.mib_s(wl.nbytes, kb.kv_load(store, wl, keys, dests)),
            }
            for _ in range(repeats):
                for name, run in passes.items():
                    cold = kb.make_cold([path])
                    runs[name].append(run())
                    if name == "async":
                        checked = kb.verify_loaded(wl, sets, source)
    finally:
        dests.clear()
        sets.clear()
        area.close()
        sets_area.close()
        source.close()
    medians = {name: statistics.median(values) for name, values in runs.items()}
    return {
        "object_bytes": wl.object_size,
        "total_bytes": wl.nbytes,
        "threads": wl.threads,
        "batch": wl.batch,
        "depth": wl.depth,
        "io_mode": mode,
        "cache": cold,
        "verified_objects": checked,
        "runs_mib_s": runs,
        "median_mib_s": medians,
        "trial_ratios": {name: [v / r for v, r in zip(runs[name], runs["raw"])] for name in ("async", "batch_load")},
        "async_vs_raw": medians["async"] / medians["raw"],
        "batch_load_vs_raw": medians["batch_load"] / medians["raw"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="a new directory for the store (removed at the end)")
    parser.add_argument("--total-mib", type=int, default=1024)
    parser.add_argument("--object-kib", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=16, help="raw reader threads = the store's io_threads")
    parser.add_argument("--batch", type=int, default=32, help="objects per submitted batch")
    parser.add_argument("--depth", type=int, default=4, help="batches in flight (load_queue_depth)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if os.path.exists(args.dir):
        parser.error(f"{args.dir} exists; give a new directory")
    wl = kb.Workload(object_size=args.object_kib << 10, total_bytes=args.total_mib * MiB, threads=args.threads,
                     batch=args.batch, depth=args.depth)
    try:
        result = measure(args.dir, wl, args.repeats)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
