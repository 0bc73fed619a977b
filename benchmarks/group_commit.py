"""Group commit against a bucket per commit and a raw loop, with the same OffloadQueue.

Four OffloadQueue workers write ``--buckets`` buckets of 64 objects of
64 KiB (4 MiB buckets), strict durability. ``grouped`` is the store itself
(workers that find buckets ready together commit them with one directory
fsync); ``per-bucket`` is the same store behind a forwarding wrapper whose
class has no ``offload_group``, so every bucket is committed on its own.
The raw baselines are four threads, each writing the next bucket's bytes
into a new file with ``os.pwritev`` (1 MiB a call): ``raw`` with one
``fdatasync`` (the data's sync alone), ``raw-commit`` with the syncs of a
bucket committed on its own (``fdatasync`` of the data, a 4 KiB meta file
written and ``fsync``-ed, an ``fsync`` of the directory). The four
alternate, three runs each, in one process; the figures are medians, the
store's sync calls counted through the FileSystem seam::

    python benchmarks/group_commit.py --dir /var/tmp/kv-group --buckets 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from collections import Counter
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import kvbucket  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from kvbucket import BucketStore, OffloadQueue  # noqa: E402
from kvbucket.replay.iocount import CountingFileSystem  # noqa: E402

OBJECT_BYTES = 64 << 10
OBJECTS_PER_BUCKET = 64
WORKERS = 4
SYNCS = ("fdatasync", "fsync", "fsync_dir")
VARIANTS = ("raw", "raw-commit", "per-bucket", "grouped")
WRITE_CALL = 1 << 20
META_BYTES = 4096
RATIOS = (("grouped", "raw-commit"), ("per-bucket", "raw-commit"), ("grouped", "raw"), ("grouped", "per-bucket"))
"""The ratios reported: (numerator, denominator) variants."""


class PerBucket:
    """Forwards to the store; its class has no ``offload_group``, so the queue commits a bucket per call."""

    def __init__(self, store: BucketStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _mib_s(buckets: int, seconds: float) -> float:
    return buckets * OBJECTS_PER_BUCKET * OBJECT_BYTES / seconds / 2**20


def run(root: str, grouped: bool, buckets: int) -> tuple[float, Counter[str]]:
    """MiB/s of one run of the store, and its sync calls."""
    path = os.path.join(root, "grouped" if grouped else "per-bucket")
    shutil.rmtree(path, ignore_errors=True)
    fs = CountingFileSystem()
    value = os.urandom(OBJECT_BYTES)
    with BucketStore.open(path, filesystem=fs, durability="strict", bucket_size_limit=OBJECT_BYTES * OBJECTS_PER_BUCKET) as store:
        target: Any = store if grouped else PerBucket(store)
        with OffloadQueue(target, workers=WORKERS, max_staged_bytes=1 << 30) as queue:
            fs.syncs.clear()
            start = time.perf_counter()
            jobs = [queue.put_batch({f"b{b}.{i}": value for i in range(OBJECTS_PER_BUCKET)}) for b in range(buckets)]
            queue.flush()
            elapsed = time.perf_counter() - start
            failed = [key for job in jobs for key, future in job.items() if future.exception() is not None]
            assert not failed, failed
        calls = Counter(fs.syncs)
    shutil.rmtree(path, ignore_errors=True)
    return _mib_s(buckets, elapsed), calls


def raw_run(root: str, buckets: int, commit: bool) -> float:
    """MiB/s of a raw baseline: ``WORKERS`` threads, each writing the next
    bucket's bytes into a new file and ``fdatasync``-ing it; with ``commit``
    also a meta file, ``fsync``-ed, and an ``fsync`` of the directory."""
    path = os.path.join(root, "raw")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    value = memoryview(os.urandom(OBJECT_BYTES))
    calls = [[value] * (WRITE_CALL // OBJECT_BYTES)] * (OBJECTS_PER_BUCKET * OBJECT_BYTES // WRITE_CALL)
    meta = os.urandom(META_BYTES)
    order = iter(range(buckets))
    lock = threading.Lock()

    def write_file(name: str, views: list[list[memoryview]], sync: Any) -> None:
        fd = os.open(os.path.join(path, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            offset = 0
            for call in views:
                offset += os.pwritev(fd, call, offset)
            sync(fd)
        finally:
            os.close(fd)

    def writer() -> None:
        while True:
            with lock:
                b = next(order, None)
            if b is None:
                return
            write_file(f"{b}.dat", calls, os.fdatasync)
            if commit:
                write_file(f"{b}.meta", [[memoryview(meta)]], os.fsync)
                directory = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)

    threads = [threading.Thread(target=writer) for _ in range(WORKERS)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    data = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path) if name.endswith(".dat"))
    shutil.rmtree(path, ignore_errors=True)
    assert data == buckets * OBJECTS_PER_BUCKET * OBJECT_BYTES, data
    return _mib_s(buckets, elapsed)


def measure(root: str, buckets: int, repeats: int) -> dict[str, Any]:
    """Every variant ``repeats`` times, alternating: MiB/s runs, the store's
    median sync calls per variant, and the per-trial ratios."""
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    syncs: dict[str, list[Counter[str]]] = {"per-bucket": [], "grouped": []}
    for _ in range(repeats):
        runs["raw"].append(raw_run(root, buckets, commit=False))
        runs["raw-commit"].append(raw_run(root, buckets, commit=True))
        for grouped in (False, True):
            speed, calls = run(root, grouped, buckets)
            name = "grouped" if grouped else "per-bucket"
            runs[name].append(speed)
            syncs[name].append(calls)

    def trial_ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(runs[a], runs[b])]

    return {
        "buckets": buckets,
        "objects_per_bucket": OBJECTS_PER_BUCKET,
        "object_bytes": OBJECT_BYTES,
        "workers": WORKERS,
        "runs_mib_s": runs,
        "syncs": {name: {s: statistics.median(c[s] for c in calls) for s in SYNCS} for name, calls in syncs.items()},
        "trial_ratios": {f"{a} / {b}": trial_ratios(a, b) for a, b in RATIOS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="a scratch directory on the disk to measure")
    parser.add_argument("--buckets", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = measure(args.dir, args.buckets, args.repeats)
    for name in VARIANTS:
        speeds = result["runs_mib_s"][name]
        syncs = f"; syncs {result['syncs'][name]}" if name in result["syncs"] else ""
        print(f"{name:>10}: MiB/s {[round(s) for s in speeds]} median {statistics.median(speeds):.0f}{syncs}")
    for name, ratios in result["trial_ratios"].items():
        print(f"throughput {name} = {statistics.median(ratios):.2f}x (per-trial {[round(r, 2) for r in ratios]})")


if __name__ == "__main__":
    main()
