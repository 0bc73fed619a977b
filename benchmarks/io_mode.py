"""io_mode sweep: durable offload speed by object size, buffered vs direct vs auto.

    .venv/bin/python benchmarks/io_mode.py                             # 6 sizes x 5 writers x 3 trials
    .venv/bin/python benchmarks/io_mode.py --sizes 64KiB,1MiB --dataset 64MiB --trials 1 --json out.json

For each object size, each trial writes ``--dataset`` bytes five ways, one
after the other (the order rotates from trial to trial, so drift of a shared
machine or disk hits every writer alike):

* ``raw buffered`` / ``raw direct``: a minimal ``os.pwritev`` loop
  (:func:`kvbucket.tools.bench.py_write`), one ``fdatasync`` per bucket,
  through the page cache / with O_DIRECT;
* ``kv buffered`` / ``kv direct`` / ``kv auto``: ``batch_offload`` of one
  bucket (``--bucket`` bytes) per call, durability strict (durable on return;
  three syncs a bucket: data, meta, directory), with that ``io_mode``.

Dirty pages are flushed before each writer starts. Figures are MiB/s, medians
of ``--trials``; the ``auto writes`` column says which layout ``auto`` chose
(read back from the buckets' metas). The table answers where
``AUTO_DIRECT_MIN_OBJECT`` (kvbucket._core.write_mode) should sit: the
smallest size from which ``kv direct`` beats ``kv buffered``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import kvbucket  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(ROOT, "src"))

from kvbucket._core.format import FileKind, decode_meta, parse_name  # noqa: E402
from kvbucket._core.write_mode import AUTO_DIRECT_MIN_OBJECT  # noqa: E402
from kvbucket.config import parse_size  # noqa: E402
from kvbucket.tools import bench as kb  # noqa: E402

WRITERS = ("raw buffered", "raw direct", "kv buffered", "kv direct", "kv auto")
DEFAULT_SIZES = "64KiB,128KiB,256KiB,512KiB,1MiB,4MiB"


def layouts(path: str) -> set[str]:
    """The layouts (``aligned``/``packed``) of the buckets in store directory ``path``."""
    found = set()
    for name in os.listdir(path):
        parsed = parse_name(name)
        if parsed is not None and parsed[1] is FileKind.META:
            with open(os.path.join(path, name), "rb") as f:
                found.add("aligned" if decode_meta(f.read(), parsed[0]).aligned else "packed")
    return found


def raw_writer(direct: bool) -> Callable[[str, kb.Workload, kb.Source, list[str]], tuple[float, set[str]]]:
    """The raw loop as a writer: (MiB/s, no layouts)."""

    def write(work: str, wl: kb.Workload, source: kb.Source, keys: list[str]) -> tuple[float, set[str]]:
        path = os.path.join(work, "raw.dat")
        try:
            return kb.py_write(path, wl, source, direct), set()
        finally:
            os.unlink(path)

    return write


def kv_writer(io_mode: str) -> Callable[[str, kb.Workload, kb.Source, list[str]], tuple[float, set[str]]]:
    """kvbucket with ``io_mode`` as a writer: (MiB/s, layouts it wrote)."""

    def write(work: str, wl: kb.Workload, source: kb.Source, keys: list[str]) -> tuple[float, set[str]]:
        path = os.path.join(work, f"kv-{io_mode}")
        try:
            store = kb.open_store(path, wl, "strict", io_mode)
            try:
                seconds = kb.kv_offload(store, wl, keys, source)
                kb.verify_sample(store, keys, source)
            finally:
                store.close()
            return kb.mib_s(wl.nbytes, seconds), layouts(path)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    return write


WRITER_FUNCS = {
    "raw buffered": raw_writer(False),
    "raw direct": raw_writer(True),
    "kv buffered": kv_writer("buffered"),
    "kv direct": kv_writer("direct"),
    "kv auto": kv_writer("auto"),
}


def sweep_size(work: str, size: int, dataset: int, bucket: int, trials: int) -> dict[str, Any]:
    """Every writer, ``trials`` times, at one object size."""
    wl = kb.Workload(object_size=size, total_bytes=dataset, bucket_size=bucket)
    source = kb.Source(size)
    keys = kb.make_keys(wl.n_objects)
    rates: dict[str, list[float]] = {w: [] for w in WRITERS}
    auto_layouts: set[str] = set()
    try:
        for trial in range(trials):
            order = WRITERS[trial % len(WRITERS) :] + WRITERS[: trial % len(WRITERS)]
            for writer in order:
                kb.make_cold([])
                rate, found = WRITER_FUNCS[writer](work, wl, source, keys)
                rates[writer].append(rate)
                if writer == "kv auto":
                    auto_layouts |= found
    finally:
        source.close()
    return {
        "object_size": size,
        "objects": wl.n_objects,
        "per_bucket": wl.per_bucket,
        "auto_writes": "+".join(sorted(auto_layouts)),
        "writers": {w: kb.summarize(rates[w]) for w in WRITERS},
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: median MiB/s per writer, and what auto chose."""
    head = "| object size | " + " | ".join(WRITERS) + " | kv direct / kv buffered | auto writes |"
    lines = [head, "|" + "---|" * (len(WRITERS) + 3)]
    for r in rows:
        med = {w: r["writers"][w]["median"] for w in WRITERS}
        cells = " | ".join(f"{med[w]:,.0f}" for w in WRITERS)
        lines.append(f"| {r['object_size'] >> 10} KiB | {cells} | {med['kv direct'] / med['kv buffered']:.2f}x | {r['auto_writes']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="object sizes, comma-separated")
    p.add_argument("--dataset", default="512MiB", help="bytes written per writer per trial")
    p.add_argument("--bucket", default="256MiB", help="bytes per bucket (one batch_offload call, one raw fdatasync)")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--dir", default=os.path.join(ROOT, "bench-tmp"), help="scratch directory on the disk under test")
    p.add_argument("--json", help="write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Sweep the sizes; print the table (and write the JSON)."""
    args = parse_args(argv)
    work = os.path.join(args.dir, "io-mode")
    os.makedirs(work, exist_ok=True)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    try:
        rows = [sweep_size(work, size, parse_size(args.dataset), parse_size(args.bucket), args.trials) for size in sizes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"durable offload, MiB/s, median of {args.trials}; {args.dataset} per writer, {args.bucket} buckets; "
          f"AUTO_DIRECT_MIN_OBJECT = {AUTO_DIRECT_MIN_OBJECT >> 10} KiB")
    print(table(rows))
    if args.json:
        result = {"trials": args.trials, "dataset": args.dataset, "bucket": args.bucket,
                  "auto_direct_min_object": AUTO_DIRECT_MIN_OBJECT, "rows": rows,
                  "medians": {r["object_size"]: {w: r["writers"][w]["median"] for w in WRITERS} for r in rows},
                  "machine": kb.machine_info(args.dir)}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print("ratio spread (min-max of kv direct / kv buffered per trial):",
          ", ".join(f"{r['object_size'] >> 10} KiB {_spread(r)}" for r in rows))
    return 0


def _spread(row: dict[str, Any]) -> str:
    ratios = [d / b for d, b in zip(row["writers"]["kv direct"]["runs"], row["writers"]["kv buffered"]["runs"])]
    return f"{min(ratios):.2f}-{max(ratios):.2f} (median {statistics.median(ratios):.2f})"


if __name__ == "__main__":
    sys.exit(main())
