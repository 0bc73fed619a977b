"""Group commit against a bucket per commit, with the same OffloadQueue.

Four OffloadQueue workers write ``--buckets`` buckets of 64 objects of
64 KiB (4 MiB buckets), strict durability. ``grouped`` is the store itself
(workers that find buckets ready together commit them with one directory
fsync); ``per-bucket`` is the same store behind a forwarding wrapper whose
class has no ``offload_group``, so every bucket is committed on its own.
The two alternate, three runs each, in one process; the figures are
medians, the sync calls counted through the FileSystem seam::

    python benchmarks/group_commit.py --dir /var/tmp/kv-group --buckets 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from collections import Counter
from typing import Any

from kvbucket import BucketStore, OffloadQueue
from kvbucket.replay.iocount import CountingFileSystem

OBJECT_BYTES = 64 << 10
OBJECTS_PER_BUCKET = 64
SYNCS = ("fdatasync", "fsync", "fsync_dir")


class PerBucket:
    """Forwards to the store; its class has no ``offload_group``, so the queue commits a bucket per call."""

    def __init__(self, store: BucketStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def run(root: str, grouped: bool, buckets: int) -> tuple[float, Counter[str]]:
    """MiB/s of one run, and its sync calls."""
    path = os.path.join(root, "grouped" if grouped else "per-bucket")
    shutil.rmtree(path, ignore_errors=True)
    fs = CountingFileSystem()
    value = os.urandom(OBJECT_BYTES)
    with BucketStore.open(path, filesystem=fs, durability="strict", bucket_size_limit=OBJECT_BYTES * OBJECTS_PER_BUCKET) as store:
        target: Any = store if grouped else PerBucket(store)
        with OffloadQueue(target, workers=4, max_staged_bytes=1 << 30) as queue:
            fs.syncs.clear()
            start = time.perf_counter()
            jobs = [queue.put_batch({f"b{b}.{i}": value for i in range(OBJECTS_PER_BUCKET)}) for b in range(buckets)]
            queue.flush()
            elapsed = time.perf_counter() - start
            failed = [key for job in jobs for key, future in job.items() if future.exception() is not None]
            assert not failed, failed
        calls = Counter(fs.syncs)
    shutil.rmtree(path, ignore_errors=True)
    return buckets * OBJECTS_PER_BUCKET * OBJECT_BYTES / elapsed / 2**20, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="a scratch directory on the disk to measure")
    parser.add_argument("--buckets", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[bool, list[tuple[float, Counter[str]]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for grouped in (False, True):
            results[grouped].append(run(args.dir, grouped, args.buckets))
    for grouped in (False, True):
        speeds = [speed for speed, _ in results[grouped]]
        syncs = {name: statistics.median(calls[name] for _, calls in results[grouped]) for name in SYNCS}
        label = "grouped" if grouped else "per-bucket"
        print(f"{label:>10}: MiB/s {[round(s) for s in speeds]} median {statistics.median(speeds):.0f}; syncs {syncs}")
    ratio = statistics.median(s for s, _ in results[True]) / statistics.median(s for s, _ in results[False])
    print(f"throughput grouped / per-bucket = {ratio:.2f}x")


if __name__ == "__main__":
    main()
