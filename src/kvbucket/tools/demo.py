"""The demo: offload a synthetic KV-cache, kill the writer mid-bucket, recover.

Run ``python -m kvbucket.tools.demo [DIR]`` (the README's first command). Without
DIR it uses a fresh folder under the system temp directory and removes it at
the end; a DIR it is given is kept. It says where it writes and how much
(about 400 MiB with the default 1 MiB pages). Steps:

1. a writer process offloads synthetic KV pages (1 MiB, ``--page-kib`` to
   change; keys are hashes of a token prefix), printing an acknowledgement
   after each ``batch_offload``;
2. while it is in the middle of a bucket (data file written, meta not yet),
   the demo kills it with SIGKILL;
3. it reopens the store and prints the recovery report (orphans removed,
   bytes freed);
4. it checks every acknowledged page byte for byte, and measures durable
   offload and parallel load throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from .. import BucketStore
from .._core.fs import FileSystem

DEFAULT_PAGE_KIB = 1024
PAGES_PER_BUCKET = 32
ACKED_BUCKETS = 4
THROUGHPUT_BUCKETS = 8


def page_key(n: int) -> str:
    """A content-hash key, as serving engines name pages of a token prefix."""
    return hashlib.sha256(f"prefix-{n}".encode()).hexdigest()


def page_value(n: int, page: int) -> bytes:
    """Deterministic bytes of page ``n`` (``page`` bytes long), so any process can check them."""
    seed = hashlib.sha256(f"page-{n}".encode()).digest()
    return (seed * (page // len(seed) + 1))[:page]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _page_text(page: int) -> str:
    """``1 MiB`` or ``64 KiB``."""
    return f"{page >> 20} MiB" if page % (1 << 20) == 0 else f"{page >> 10} KiB"


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


def _writer(directory: str, page: int) -> None:
    """Child process: offload buckets, acknowledging each, until killed."""
    with BucketStore.open(directory, filesystem=_PauseBeforeMeta(ACKED_BUCKETS + 1)) as store:
        for b in range(ACKED_BUCKETS + 1):
            pages = range(b * PAGES_PER_BUCKET, (b + 1) * PAGES_PER_BUCKET)
            bucket_id = store.batch_offload({page_key(n): page_value(n, page) for n in pages})
            print(f"ACK {bucket_id} {pages.start} {pages.stop}", flush=True)


def _kill_writer_midway(directory: str, page: int) -> list[range]:
    """Run the writer, kill it mid-bucket, return the acknowledged page ranges."""
    child = subprocess.Popen(
        [sys.executable, "-m", "kvbucket.tools.demo", "--writer", directory, "--page-kib", str(page >> 10)],
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


def _verify(store: BucketStore, acked: list[range], page: int) -> int:
    pages = [n for r in acked for n in r]
    values = store.batch_get([page_key(n) for n in pages])
    bad = [n for n in pages if values[page_key(n)] != page_value(n, page)]
    if bad:
        raise SystemExit(f"FAILED: {len(bad)} acknowledged pages differ")
    return len(pages)


def _throughput(directory: str, page: int) -> int:
    """Durable offload and parallel load of THROUGHPUT_BUCKETS more buckets;
    returns the store's allocated bytes afterwards."""
    start_page = 10_000
    with BucketStore.open(directory) as store:
        values = {n: page_value(n, page) for n in range(start_page, start_page + THROUGHPUT_BUCKETS * PAGES_PER_BUCKET)}
        began = time.perf_counter()
        for b in range(THROUGHPUT_BUCKETS):
            ns = range(start_page + b * PAGES_PER_BUCKET, start_page + (b + 1) * PAGES_PER_BUCKET)
            store.batch_offload({page_key(n): values[n] for n in ns})
        written = time.perf_counter() - began
        buffers = {page_key(n): bytearray(page) for n in values}  # any writable buffer works
        began = time.perf_counter()
        keys = list(buffers)
        for i in range(0, len(keys), 32):
            store.batch_load({k: buffers[k] for k in keys[i : i + 32]})
        loaded = time.perf_counter() - began
        assert all(buffers[page_key(n)] == values[n] for n in values)
        physical = store.stats().physical_bytes
    size = len(values) * page
    print(f"  durable offload: {size / (1 << 20) / written:.0f} MiB/s ({_mib(size)} in {THROUGHPUT_BUCKETS} buckets, fdatasync per bucket)")
    print(f"  batch_load (32 pages a batch, page cache warm, checksums verified): {size / (1 << 20) / loaded:.0f} MiB/s")
    return physical


@contextlib.contextmanager
def demo_directory(requested: str | None) -> Iterator[str]:
    """The store directory of a run: ``requested`` (kept afterwards), or a new
    folder under the system temp directory that is removed afterwards, also
    when the run fails."""
    if requested:
        yield requested
        return
    created = tempfile.mkdtemp(prefix="kvbucket-demo-")
    try:
        yield created
    finally:
        # The folder is the one mkdtemp made for this run: everything in it is the demo's.
        shutil.rmtree(created, ignore_errors=True)
        print(f"removed {created} (pass a DIR to keep the store)")


def run(directory: str, page: int) -> None:
    """The four steps of the demo, in ``directory``."""
    planned = (ACKED_BUCKETS + 1 + THROUGHPUT_BUCKETS) * PAGES_PER_BUCKET * page
    print(f"kvbucket demo in {directory} (writes about {_mib(planned)})")
    print(f"1. offloading {_page_text(page)} KV pages from a writer process")
    acked = _kill_writer_midway(directory, page)
    leftovers = sorted(n for n in os.listdir(directory) if n != "LOCK")
    print(f"  left on disk by the killed writer: {', '.join(leftovers)}")
    print("2. reopening the store (recovery)")
    with BucketStore.open(directory) as store:
        report = store.recovery_report
        print(f"  loaded {report.buckets} buckets, {report.keys} objects")
        for bucket_id, reason in report.dropped_buckets:
            print(f"  dropped bucket {bucket_id}: {reason}")
        print(f"  removed files: {', '.join(report.removed_files) or 'none'}; freed {report.freed_bytes} bytes")
        print(f"3. verifying every acknowledged page: {_verify(store, acked, page)} pages byte-exact")
    print("4. throughput")
    physical = _throughput(directory, page)
    print(f"done; the store in {directory} takes {_mib(physical)} on disk")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m kvbucket.tools.demo``."""
    parser = argparse.ArgumentParser(prog="python -m kvbucket.tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "directory", nargs="?", help="store directory, kept afterwards (default: a new folder under the temp dir, removed afterwards)"
    )
    parser.add_argument("--page-kib", type=int, default=DEFAULT_PAGE_KIB, help="KV page size in KiB (default: %(default)s)")
    parser.add_argument("--writer", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.page_kib < 1:
        parser.error("--page-kib must be at least 1")
    page = args.page_kib << 10
    if args.writer:
        _writer(args.writer, page)
        return
    with demo_directory(args.directory) as directory:
        run(directory, page)


if __name__ == "__main__":
    main()
