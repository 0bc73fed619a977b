"""Small objects: kvbucket's per-object cost against raw loops in the same process.

    .venv/bin/python benchmarks/small_objects.py                     # every phase, ~3 min
    .venv/bin/python benchmarks/small_objects.py --phases write --modes direct --profile

Phases (each trial runs the raw loop and kvbucket back to back, so drift of a
shared machine or a noisy disk hits both alike; every figure is the median of
``--trials``, and each ratio is the median of the per-trial ratios):

* ``write``: ``batch_offload`` of one bucket's worth of 64 KiB objects per
  call, durability strict (durable on return), against a raw ``os.pwritev``
  loop over the same bytes with one ``fdatasync`` per bucket (the store pays
  three syncs a bucket: data, meta, directory);
* ``read``: ``batch_load`` (checksums verified) in random batches over
  ``--threads`` threads, cold (page cache dropped first) and warm, against a
  raw ``os.preadv`` thread pool over the same batches into the same buffers;
* ``query``: ``batch_query`` and ``batch_exists`` keys/s at ``--keys`` keys,
  in batches of 128, next to a plain ``dict`` lookup of the same keys.

``--profile`` prints a cProfile of kvbucket's side of the last trial of each
phase (where the per-object time goes). ``--json`` writes the figures,
``--plot`` a PNG of the ratios (needs matplotlib, the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import cProfile
import io
import json
import os
import pstats
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
except ImportError:
    sys.path.insert(0, os.path.join(ROOT, "src"))

import metadata  # noqa: E402
from kvbucket.config import parse_size  # noqa: E402
from kvbucket.tools import bench as kb  # noqa: E402
from report import paired  # noqa: E402

MiB = 1 << 20
Row = dict[str, Any]


class Profiler:
    """A cProfile enabled only around the timed kvbucket calls of chosen trials."""

    def __init__(self, enabled: bool) -> None:
        self.profile = cProfile.Profile() if enabled else None
        self.active = False

    def runs(self, trials: int) -> range:
        """Trial numbers: one more than ``trials`` when profiling (the profiled
        one, whose figures are dropped)."""
        return range(trials + (self.profile is not None))

    def watch(self, trial: int, trials: int) -> bool:
        """Profile trial ``trial`` when it is the extra one; whether to keep its figures."""
        self.active = trial == trials
        return not self.active

    def __enter__(self) -> Profiler:
        if self.profile is not None and self.active:
            self.profile.enable()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.profile is not None and self.active:
            self.profile.disable()

    def report(self, title: str, count: int = 18) -> str:
        """The top functions by own time, then resets."""
        if self.profile is None:
            return ""
        out = io.StringIO()
        pstats.Stats(self.profile, stream=out).sort_stats("tottime").print_stats(count)
        self.profile = cProfile.Profile()
        return f"--- cProfile of kvbucket, {title} ---\n{out.getvalue()}"


# -- writes -------------------------------------------------------------------


def write_phase(wl: kb.Workload, mode: str, work: str, trials: int, prof: Profiler) -> Row:
    """Durable 64 KiB offload against the raw pwritev + fdatasync loop."""
    source = kb.Source(wl.object_size)
    keys = kb.make_keys(wl.n_objects)
    kv, raw = [], []
    try:
        for trial in prof.runs(trials):
            keep = prof.watch(trial, trials)
            path = os.path.join(work, "raw.dat")
            kb.make_cold()
            raw_rate = kb.py_write(path, wl, source, mode == "direct")
            os.unlink(path)
            store_dir = os.path.join(work, "kv")
            kb.make_cold()
            store = kb.open_store(store_dir, wl, "strict", mode)
            try:
                with prof:
                    kv_rate = kb.mib_s(wl.nbytes, kb.kv_offload(store, wl, keys, source))
                kb.verify_sample(store, keys, source)
                if keep:
                    raw.append(raw_rate)
                    kv.append(kv_rate)
            finally:
                store.close()
                shutil.rmtree(store_dir, ignore_errors=True)
    finally:
        source.close()
    return paired(f"durable write, {mode}", "MiB/s", kv, raw)


# -- reads --------------------------------------------------------------------


def _raw_read(path: str, wl: kb.Workload, dests: list[memoryview], mode: str, cold: bool, pool: cf.ThreadPoolExecutor) -> float:
    if cold:
        kb.make_cold([path])
    return kb.py_read(path, wl, dests, mode == "direct", pool)


def _kv_read(store: Any, store_dir: str, wl: kb.Workload, keys: list[str], dests: list[memoryview], cold: bool,
             prof: Profiler) -> float:
    if cold:
        kb.make_cold([store_dir])
    with prof:
        return kb.mib_s(wl.nbytes, kb.kv_load(store, wl, keys, dests))


def read_phase(wl: kb.Workload, mode: str, work: str, trials: int, prof: Profiler) -> list[Row]:
    """Cold and warm 64 KiB batch_load against the raw preadv thread pool."""
    source = kb.Source(wl.object_size)
    keys = kb.make_keys(wl.n_objects)
    area, dests = kb.dest_views(wl)
    raw_path, store_dir = os.path.join(work, "raw.dat"), os.path.join(work, "kv")
    temperatures = ("cold", "warm") if mode == "buffered" else ("cold",)  # O_DIRECT reads bypass the cache
    results: dict[str, tuple[list[float], list[float]]] = {t: ([], []) for t in temperatures}
    try:
        kb.py_write(raw_path, wl, source, False)
        store = kb.open_store(store_dir, wl, "strict", mode)
        try:
            kb.kv_offload(store, wl, keys, source)
            kb.verify_sample(store, keys, source)
            with cf.ThreadPoolExecutor(wl.threads) as pool:
                for temperature in temperatures:
                    kv, raw = results[temperature]
                    cold = temperature == "cold"
                    prof.active = False
                    if not cold:  # both files wholly in the page cache
                        _raw_read(raw_path, wl, dests, mode, False, pool)
                        kb.kv_load(store, wl, keys, dests)
                    for trial in prof.runs(trials) if cold else range(trials):  # the cold reads are profiled
                        keep = prof.watch(trial, trials) if cold else True
                        raw_rate = _raw_read(raw_path, wl, dests, mode, cold, pool)
                        kv_rate = _kv_read(store, store_dir, wl, keys, dests, cold, prof)
                        if keep:
                            raw.append(raw_rate)
                            kv.append(kv_rate)
        finally:
            store.close()
    finally:
        dests.clear()
        area.close()
        source.close()
        os.unlink(raw_path)
        shutil.rmtree(store_dir, ignore_errors=True)
    return [paired(f"{t} random read, {mode}", "MiB/s", *results[t]) for t in temperatures]


# -- metadata -----------------------------------------------------------------


def query_phase(n: int, work: str, trials: int, prof: Profiler) -> list[Row]:
    """batch_query and batch_exists against a dict of the same keys."""
    path = os.path.join(work, "meta")
    try:
        keys, _ = metadata.build(path, n)
        rates = metadata.lookup_rates(path, keys, trials)
        if prof.profile is not None:
            _profile_query(path, keys, prof)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    lookup, member = rates["dict lookup (baseline), batch 128"], rates["dict `in` (baseline), batch 128"]
    return [paired("batch_query, batch 128", "keys/s", rates["batch_query, batch 128"], lookup),
            paired("batch_exists, batch 128", "keys/s", rates["batch_exists, batch 128"], member)]


def _profile_query(path: str, keys: list[str], prof: Profiler) -> None:
    """One profiled pass of batch_query over every key, in batches of 128."""
    from kvbucket import BucketStore

    batches = [keys[i : i + 128] for i in range(0, len(keys), 128)]
    with BucketStore.open(path, readonly=True) as store:
        prof.active = True
        with prof:
            for batch in batches:
                store.batch_query(batch)


# -- output -------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    """Markdown table of the rows."""
    lines = ["| measurement | kvbucket median | raw loop median | kvbucket / raw (min–max) |", "|---|---|---|---|"]
    for r in rows:
        fmt = "{:,.0f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"
        lines.append(f"| {r['name']} | {fmt.format(r['kv_median'])} {r['unit']} | {fmt.format(r['raw_median'])} {r['unit']} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str, title: str) -> None:
    """Bars of the kvbucket / raw ratios with min–max whiskers and the 0.8x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["ratio"] is not None]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ys = range(len(shown))
    ax.barh(list(ys), [r["ratio"] for r in shown], color="tab:blue",
            xerr=[[r["ratio"] - r["ratio_min"] for r in shown], [r["ratio_max"] - r["ratio"] for r in shown]], capsize=3)
    ax.set_yticks(list(ys), [r["name"] for r in shown])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.axvline(0.8, color="tab:red", linestyle="--", linewidth=0.8, label="0.8x target")
    ax.set_xlabel("kvbucket / raw loop in the same process (median of per-trial ratios, whiskers min–max)")
    ax.set_title(title)
    ax.invert_yaxis()
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="write,read,query", help="among write, read, query")
    p.add_argument("--modes", default="buffered,direct", help="io_mode(s) of the write and read phases")
    p.add_argument("--size", default="64KiB", help="object size")
    p.add_argument("--dataset", default="1GiB", help="bytes written and read per trial")
    p.add_argument("--bucket", default="256MiB", help="bytes per bucket (one batch_offload call)")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--keys", type=int, default=1_000_000, help="objects in the query phase")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--dir", default=os.path.join(ROOT, "bench-tmp"), help="scratch directory on the disk under test")
    p.add_argument("--profile", action="store_true", help="print a cProfile of kvbucket's side of each phase")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--plot", help="write a PNG of the ratios here")
    p.add_argument("--from-json", metavar="JSON", nargs="+", help="measure nothing: print and plot the rows of these --json files")
    return p.parse_args(argv)


def replot(paths: list[str], plot_path: str | None) -> int:
    """Print (and plot) the rows of earlier runs' JSON files, in order."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    rows = [row for run in runs for row in run["rows"]]
    print(table(rows))
    if plot_path:
        plot(rows, plot_path, f"kvbucket vs raw loops (same process, median of {runs[0]['trials']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the chosen phases; print the table (and profiles)."""
    args = parse_args(argv)
    if args.from_json:
        return replot(args.from_json, args.plot)
    wl = kb.Workload(parse_size(args.size), parse_size(args.dataset), args.threads, args.batch, parse_size(args.bucket))
    phases = [p for p in args.phases.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    runners: dict[str, Callable[[str, Profiler], list[Row]]] = {
        "write": lambda work, prof: [write_phase(wl, m, work, args.trials, prof) for m in modes],
        "read": lambda work, prof: [row for m in modes for row in read_phase(wl, m, work, args.trials, prof)],
        "query": lambda work, prof: query_phase(args.keys, work, args.trials, prof),
    }
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="small-", dir=args.dir)
    prof = Profiler(args.profile)
    rows: list[Row] = []
    started = time.time()
    try:
        for phase in phases:
            rows += runners[phase](work, prof)
            print(prof.report(phase), end="", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        if not row["name"].startswith("batch_"):
            row["name"] = f"{args.size} {row['name']}"
    title = (f"{args.size} objects, {wl.n_objects} per trial, buckets of {wl.per_bucket} objects, "
             f"{args.threads} read threads, batches of {args.batch}")
    print(f"{title}; median of {args.trials} trials; {time.time() - started:.0f} s\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "trials": args.trials, "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot, f"kvbucket vs raw loops, {args.size} objects (same process, median of {args.trials})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
