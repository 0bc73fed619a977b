"""The demo: offload a synthetic KV-cache, kill the writer mid-bucket, recover.

Run ``python -m kvbucket.demo [DIR]`` (the README's first command). Without
DIR it uses a fresh folder under the system temp directory. Steps:

1. a writer process offloads synthetic KV pages (1 MiB, keys are hashes of a
   token prefix), printing an acknowledgement after each ``batch_offload``;
2. while it is in the middle of a bucket (data file written, meta not yet),
   the demo kills it with SIGKILL;
3. it reopens the store and prints the recovery report (orphans removed,
   bytes freed);
4. it checks every acknowledged page byte for byte, and measures durable
   offload and parallel load throughput.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time

from . import BucketStore
from .fs import FileSystem

PAGE = 1 << 20
PAGES_PER_BUCKET = 32
ACKED_BUCKETS = 4


def page_key(n: int) -> str:
    """A content-hash key, as serving engines name pages of a token prefix."""
    return hashlib.sha256(f"prefix-{n}".encode()).hexdigest()


def page_value(n: int) -> bytes:
    """Deterministic page bytes, so any process can check them."""
    seed = hashlib.sha256(f"page-{n}".encode()).digest()
    return (seed * (PAGE // len(seed) + 1))[:PAGE]


class _PauseBeforeMeta(FileSystem):
    """Before the meta of the Nth bucket: announce that its data file is
    complete but its meta is not, then wait (forever) for the parent's SIGKILL."""

    def __init__(self, pause_at: int) -> None:
        self._metas_left = pause_at

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        if path.endswith(".meta.tmp"):
            self._metas_left -= 1
            if self._metas_left == 0:
                print(f"MIDWAY {os.path.basename(path).split('.')[0]}", flush=True)
                sys.stdin.read()
        return super().open(path, flags, mode)


def _writer(directory: str) -> None:
    """Child process: offload buckets, acknowledging each, until killed."""
    with BucketStore.open(directory, filesystem=_PauseBeforeMeta(ACKED_BUCKETS + 1)) as store:
        for b in range(ACKED_BUCKETS + 1):
            pages = range(b * PAGES_PER_BUCKET, (b + 1) * PAGES_PER_BUCKET)
            bucket_id = store.batch_offload({page_key(n): page_value(n) for n in pages})
            print(f"ACK {bucket_id} {pages.start} {pages.stop}", flush=True)


def _kill_writer_midway(directory: str) -> list[range]:
    """Run the writer, kill it mid-bucket, return the acknowledged page ranges."""
    child = subprocess.Popen(
        [sys.executable, "-m", "kvbucket.demo", "--writer", directory],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    acked: list[range] = []
    assert child.stdout is not None
    for line in child.stdout:
        word, *fields = line.split()
        if word == "ACK":
            acked.append(range(int(fields[1]), int(fields[2])))
            print(f"  writer acknowledged bucket {fields[0]} ({PAGES_PER_BUCKET} pages)")
        elif word == "MIDWAY":
            print(f"  writer is in the middle of bucket {fields[0]}: data written, meta not yet; kill -9")
            child.send_signal(signal.SIGKILL)
            break
    child.wait()
    return acked


def _verify(store: BucketStore, acked: list[range]) -> int:
    pages = [n for r in acked for n in r]
    values = store.batch_get([page_key(n) for n in pages])
    bad = [n for n in pages if values[page_key(n)] != page_value(n)]
    if bad:
        raise SystemExit(f"FAILED: {len(bad)} acknowledged pages differ")
    return len(pages)


def _throughput(directory: str) -> None:
    """Durable offload and parallel load of 256 MiB more pages."""
    import numpy as np  # noqa: PLC0415 - only the demo's throughput step needs it

    start_page = 10_000
    buckets = 8
    with BucketStore.open(directory) as store:
        values = {n: page_value(n) for n in range(start_page, start_page + buckets * PAGES_PER_BUCKET)}
        began = time.perf_counter()
        for b in range(buckets):
            ns = range(start_page + b * PAGES_PER_BUCKET, start_page + (b + 1) * PAGES_PER_BUCKET)
            store.batch_offload({page_key(n): values[n] for n in ns})
        written = time.perf_counter() - began
        buffers = {page_key(n): np.empty(PAGE, dtype=np.uint8) for n in values}
        began = time.perf_counter()
        keys = list(buffers)
        for i in range(0, len(keys), 32):
            store.batch_load({k: buffers[k] for k in keys[i : i + 32]})
        loaded = time.perf_counter() - began
        assert all(buffers[page_key(n)].tobytes() == values[n] for n in values)
    mib = len(values) * PAGE / (1 << 20)
    print(f"  durable offload: {mib / written:.0f} MiB/s ({mib:.0f} MiB in {buckets} buckets, fdatasync per bucket)")
    print(f"  batch_load (32 pages a batch, page cache warm, checksums verified): {mib / loaded:.0f} MiB/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvbucket.demo", description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", help="store directory (default: a new folder under the temp dir)")
    parser.add_argument("--writer", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.writer:
        _writer(args.writer)
        return
    directory = args.directory or tempfile.mkdtemp(prefix="kvbucket-demo-")
    print(f"kvbucket demo in {directory}")
    print("1. offloading 1 MiB KV pages from a writer process")
    acked = _kill_writer_midway(directory)
    leftovers = sorted(n for n in os.listdir(directory) if n != "LOCK")
    print(f"  left on disk by the killed writer: {', '.join(leftovers)}")
    print("2. reopening the store (recovery)")
    with BucketStore.open(directory) as store:
        report = store.recovery_report
        print(f"  loaded {report.buckets} buckets, {report.keys} objects")
        for bucket_id, reason in report.dropped_buckets:
            print(f"  dropped bucket {bucket_id}: {reason}")
        print(f"  removed files: {', '.join(report.removed_files) or 'none'}; freed {report.freed_bytes} bytes")
        print(f"3. verifying every acknowledged page: {_verify(store, acked)} pages byte-exact")
    print("4. throughput")
    _throughput(directory)
    print(f"done; the store is in {directory}")


if __name__ == "__main__":
    main()
