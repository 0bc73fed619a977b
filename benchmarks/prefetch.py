"""Does a prefetch hint make cold loads faster?

Writes ``--total-mib`` of ``--object-kib`` objects into 256 MiB buckets
(default configuration otherwise), then, cold (page cache dropped before
every pass), loads every object once in random batches of ``--batch`` with
``batch_load``, one batch at a time, four ways:

* ``none``: load each batch, no hint;
* ``ahead``: when batch ``i`` starts loading, hint batch ``i + --ahead``
  first (an engine hints at lookup time and loads a little later), then
  load batch ``i`` (the first ``--ahead`` batches are hinted up front);
* ``gap``: load each batch after ``--gap-ms`` of "compute" (a GPU step),
  no hint: the baseline of ``gap+hint``;
* ``gap+hint``: hint the batch, wait ``--gap-ms``, then load it.

Per pass: the median latency of a batch's load (the hint call included in
``ahead``, where it runs on the loading thread; not in ``gap+hint``, where it
runs before the gap) and the throughput (bytes over the pass's wall time,
gaps included). Each pass runs ``--repeats`` times, interleaved; the figures
are medians of the repeats, measured in one process::

    python benchmarks/prefetch.py --dir /var/tmp/kv-prefetch --total-mib 512
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from kvbucket import BucketStore
from kvbucket.tools.bench import Source, Workload, make_cold, make_keys, mib_s, read_batches

MiB = 1 << 20

Hint = Callable[[Sequence[str]], int]


def write_store(path: str, wl: Workload, source: Source, keys: Sequence[str]) -> None:
    """The workload's objects, one bucket per ``per_bucket`` objects, durable."""
    with BucketStore.open(path, bucket_size_limit=wl.bucket_size, bucket_keys_limit=max(500, wl.per_bucket)) as store:
        for objects in wl.buckets():
            store.batch_offload({keys[i]: source.value(i) for i in objects})


def load_pass(store: BucketStore, batches: list[list[str]], dests: list[memoryview], hint: Hint | None, ahead: int, gap_s: float) -> dict[str, float]:
    """Load ``batches`` in order; with ``hint``, hint batch ``i + ahead``
    when batch ``i`` starts (``ahead`` 0: before the gap). Returns the median
    load latency (ms), the median hint call (ms) and the throughput (MiB/s)."""
    latencies: list[float] = []
    hint_calls: list[float] = []
    nbytes = 0
    started = time.perf_counter()
    if hint is not None and ahead:
        for batch in batches[:ahead]:
            hint(batch)
    for i, batch in enumerate(batches):
        hinted = time.perf_counter()
        if hint is not None and not ahead:
            hint(batch)
            hint_calls.append(time.perf_counter() - hinted)
        if gap_s:
            time.sleep(gap_s)  # the engine's compute between its lookup and its load
        load_started = time.perf_counter()
        if hint is not None and ahead and i + ahead < len(batches):
            hint(batches[i + ahead])
            hint_calls.append(time.perf_counter() - load_started)
        store.batch_load({key: dests[j] for j, key in enumerate(batch)})
        latencies.append(time.perf_counter() - load_started)
        nbytes += len(batch) * len(dests[0])
    elapsed = time.perf_counter() - started
    return {
        "latency_ms": 1e3 * statistics.median(latencies),
        "hint_call_ms": 1e3 * statistics.median(hint_calls) if hint_calls else 0.0,
        "mib_s": mib_s(nbytes, elapsed),
    }


def measure(path: str, wl: Workload, ahead: int, gap_s: float, repeats: int) -> dict[str, object]:
    """Median latency and throughput of each pass, and the ratios hinted/unhinted."""
    keys = make_keys(wl.n_objects)
    source = Source(wl.object_size)
    write_store(path, wl, source, keys)
    batches = [[keys[i] for i in batch] for batch in read_batches(wl)]
    dests = _dests(wl.batch, wl.object_size)
    runs: dict[str, list[dict[str, float]]] = {"none": [], "ahead": [], "gap": [], "gap+hint": []}
    with BucketStore.open(path, bucket_size_limit=wl.bucket_size) as store:
        hint = store.prefetch
        passes: dict[str, Callable[[], dict[str, float]]] = {
            "none": lambda: load_pass(store, batches, dests, None, 0, 0.0),
            "ahead": lambda: load_pass(store, batches, dests, hint, ahead, 0.0),
            "gap": lambda: load_pass(store, batches, dests, None, 0, gap_s),
            "gap+hint": lambda: load_pass(store, batches, dests, hint, 0, gap_s),
        }
        cold = ""
        for _ in range(repeats):
            for name, run in passes.items():
                cold = make_cold([path])
                runs[name].append(run())
        check = {keys[0]: bytearray(wl.object_size)}
        store.batch_load(check)
        if check[keys[0]] != source.value(0):
            raise AssertionError("kvbucket returned wrong bytes")
    medians = {name: {m: statistics.median(r[m] for r in values) for m in values[0]} for name, values in runs.items()}
    return {
        "object_bytes": wl.object_size,
        "total_bytes": wl.nbytes,
        "batch": wl.batch,
        "ahead": ahead,
        "gap_ms": 1e3 * gap_s,
        "cache": cold,
        "runs": runs,
        "medians": medians,
        "ahead_latency_vs_none": medians["ahead"]["latency_ms"] / medians["none"]["latency_ms"],
        "ahead_throughput_vs_none": medians["ahead"]["mib_s"] / medians["none"]["mib_s"],
        "gap_hint_latency_vs_gap": medians["gap+hint"]["latency_ms"] / medians["gap"]["latency_ms"],
        "gap_hint_throughput_vs_gap": medians["gap+hint"]["mib_s"] / medians["gap"]["mib_s"],
    }


def _dests(count: int, size: int) -> list[memoryview]:
    """``count`` pre-faulted destination buffers of ``size`` bytes."""
    view = memoryview(bytearray(b"\x01" * (count * size)))
    return [view[i * size : (i + 1) * size] for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="a new directory for the store (removed at the end)")
    parser.add_argument("--total-mib", type=int, default=512)
    parser.add_argument("--object-kib", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32, help="objects per batch")
    parser.add_argument("--ahead", type=int, default=1, help="batches between the hint and the load (ahead pass)")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="compute time between hint and load (gap passes)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if os.path.exists(args.dir):
        parser.error(f"{args.dir} exists; give a new directory")
    if args.ahead < 1:
        parser.error("--ahead must be at least 1")
    wl = Workload(object_size=args.object_kib << 10, total_bytes=args.total_mib * MiB, batch=args.batch)
    try:
        result = measure(args.dir, wl, args.ahead, args.gap_ms / 1e3, args.repeats)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
