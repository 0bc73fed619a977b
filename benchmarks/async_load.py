"""Asynchronous loads against a raw ``os.preadv`` loop at the same parallelism.

Writes ``--total-mib`` of ``--object-kib`` objects into 256 MiB buckets
(default configuration otherwise), then, cold (page cache dropped before
every pass), reads every object once in a random order:

* ``raw``: ``--threads`` Python threads, each ``os.preadv``-ing the next
  object from the store's own data files at the object's offset (no
  checksum, no lookup), pipelined: no barrier anywhere;
* ``async``: :meth:`BucketStore.submit_load` of random batches of
  ``--batch`` objects, ``--depth`` batches in flight (``io_threads`` =
  ``--threads``, ``load_queue_depth`` = ``--depth``), checksums verified;
* ``batch_load``: the synchronous call, one batch at a time (a barrier
  after each batch).

Each pass is run ``--repeats`` times, interleaved; the figures are medians
and the ratios are of medians, measured in one process::

    python benchmarks/async_load.py --dir /var/tmp/kv-async --total-mib 1024
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from kvbucket import BucketStore, LoadHandle
from kvbucket._core.format import data_name
from kvbucket.tools.bench import Source, Workload, make_cold, make_keys, mib_s, read_batches

MiB = 1 << 20


def _dests(count: int, size: int) -> list[memoryview]:
    """``count`` pre-faulted destination buffers of ``size`` bytes."""
    area = bytearray(b"\x01" * (count * size))
    view = memoryview(area)
    return [view[i * size : (i + 1) * size] for i in range(count)]


def write_store(path: str, wl: Workload, source: Source, keys: Sequence[str]) -> None:
    """The workload's objects, one bucket per ``per_bucket`` objects, durable."""
    with BucketStore.open(path, bucket_size_limit=wl.bucket_size, bucket_keys_limit=max(500, wl.per_bucket)) as store:
        for objects in wl.buckets():
            store.batch_offload({keys[i]: source.value(i) for i in objects})


def raw_pass(path: str, wl: Workload, locations: list[tuple[str, int]]) -> float:
    """Cold random ``os.preadv`` of every object by ``wl.threads`` threads; MiB/s."""
    fds = {name: os.open(os.path.join(path, name), os.O_RDONLY) for name in {name for name, _ in locations}}
    order = iter([i for batch in read_batches(wl) for i in batch])
    lock = threading.Lock()

    def reader(dest: memoryview) -> None:
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            name, offset = locations[i]
            got = 0
            while got < len(dest):
                n = os.preadv(fds[name], [dest[got:]], offset + got)
                if n == 0:
                    raise OSError(f"short read of object {i}")
                got += n

    threads = [threading.Thread(target=reader, args=(dest,)) for dest in _dests(wl.threads, wl.object_size)]
    try:
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return mib_s(wl.nbytes, time.perf_counter() - started)
    finally:
        for fd in fds.values():
            os.close(fd)


def async_pass(store: BucketStore, wl: Workload, keys: Sequence[str], depth: int) -> float:
    """Cold random loads, ``depth`` batches of ``wl.batch`` in flight; MiB/s."""
    free = deque(_dests(depth * wl.batch, wl.object_size)[i * wl.batch : (i + 1) * wl.batch] for i in range(depth))
    in_flight: deque[tuple[LoadHandle, list[memoryview]]] = deque()
    started = time.perf_counter()
    for batch in read_batches(wl):
        if not free:
            handle, dests = in_flight.popleft()
            handle.result()
            free.append(dests)
        dests = free.popleft()
        in_flight.append((store.submit_load({keys[i]: dests[j] for j, i in enumerate(batch)}), dests))
    for handle, _ in in_flight:
        handle.result()
    return mib_s(wl.nbytes, time.perf_counter() - started)


def sync_pass(store: BucketStore, wl: Workload, keys: Sequence[str]) -> float:
    """Cold random ``batch_load`` calls, one batch at a time; MiB/s."""
    dests = _dests(wl.batch, wl.object_size)
    started = time.perf_counter()
    for batch in read_batches(wl):
        store.batch_load({keys[i]: dests[j] for j, i in enumerate(batch)})
    return mib_s(wl.nbytes, time.perf_counter() - started)


def measure(path: str, wl: Workload, depth: int, repeats: int) -> dict[str, object]:
    """Median MiB/s of each pass and the ratios to the raw loop."""
    keys = make_keys(wl.n_objects)
    source = Source(wl.object_size)
    write_store(path, wl, source, keys)
    runs: dict[str, list[float]] = {"raw": [], "async": [], "batch_load": []}
    with BucketStore.open(path, io_threads=wl.threads, load_queue_depth=depth) as store:
        metas = store.batch_query(keys)
        locations = [(data_name(metas[k].bucket_id), metas[k].offset) for k in keys]
        cold = ""
        passes: dict[str, Callable[[], float]] = {
            "raw": lambda: raw_pass(path, wl, locations),
            "async": lambda: async_pass(store, wl, keys, depth),
            "batch_load": lambda: sync_pass(store, wl, keys),
        }
        for _ in range(repeats):
            for name, run in passes.items():
                cold = make_cold([path])
                runs[name].append(run())
        check = {keys[0]: bytearray(wl.object_size)}
        store.batch_load(check)
        if check[keys[0]] != source.value(0):
            raise AssertionError("kvbucket returned wrong bytes")
    medians = {name: statistics.median(values) for name, values in runs.items()}
    return {
        "object_bytes": wl.object_size,
        "total_bytes": wl.nbytes,
        "threads": wl.threads,
        "batch": wl.batch,
        "depth": depth,
        "cache": cold,
        "runs_mib_s": runs,
        "median_mib_s": medians,
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
    wl = Workload(object_size=args.object_kib << 10, total_bytes=args.total_mib * MiB, threads=args.threads, batch=args.batch)
    try:
        result = measure(args.dir, wl, args.depth, args.repeats)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
