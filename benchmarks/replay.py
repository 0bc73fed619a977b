"""Cache effectiveness of kvbucket's default configuration on the shipped trace.

    .venv/bin/python benchmarks/replay.py            # simulated store (~3 min), writes docs/
    .venv/bin/python benchmarks/replay.py --real     # the same on a real directory

Replays the Mooncake synthetic trace (4 KiB blocks) at 5%, 10%, ..., 30% of
its distinct blocks, without and with a 3,000-block host-memory LRU (L2) in
front, through kvbucket's OffloadQueue path and the two references (ideal
per-object LRU, Belady's MIN) of the same capacity; then kvbucket's old
default (bucket LRU, requests pooled into buckets) for comparison; then the
default again with each write-back landing after the next request's lookup
(``--overlap``), for the found-then-gone counts. Writes
``docs/REPLAY.md``, ``docs/replay.png`` and ``bench-results/replay.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import kvbucket  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(ROOT, "src"))

from kvbucket.replay import CapacityResult, ReplayOptions, ReplayReport, default_trace_path, parse_capacity, read_trace, replay  # noqa: E402
from kvbucket.replay.report import plot_reports  # noqa: E402

PERCENTS = (5, 10, 15, 20, 25, 30)
L2_BLOCKS = (0, 3000)
OBJECT_SIZE = 4096
OLD_DEFAULT = {"store_fields": {"eviction_policy": "lru", "background_eviction": False}, "bucket_per_batch": False}  # before the evictor thread
"""kvbucket's configuration before 2Q: bucket LRU, write-backs of many requests pooled into a bucket."""
OLD_LABEL = "old default (bucket LRU, pooled buckets)"


def run(real: bool, directory: str | None) -> tuple[list[ReplayReport], list[ReplayReport]]:
    """The sweep: one report per L2 size (the default, sequential then
    overlapped), and one per L2 size of the old default (sequential)."""
    trace = read_trace(default_trace_path())
    capacities = [parse_capacity(f"{p}%", OBJECT_SIZE, trace.distinct_blocks) for p in PERCENTS]
    reports, old = [], []
    for overlap, variant, into in ((False, {}, reports), (False, OLD_DEFAULT, old), (True, {}, reports)):
        for l2 in L2_BLOCKS:
            options = ReplayOptions(object_size=OBJECT_SIZE, l2_blocks=l2, overlap=overlap, simulate=not real, directory=directory, **variant)
            into.append(replay(trace, capacities, options))
            print(f"replayed {'the old default' if variant else 'the default'} with L2={l2}{' and overlap' if overlap else ''}", file=sys.stderr)
    return reports, old


def table(report: ReplayReport, old: ReplayReport) -> list[str]:
    """One Markdown table: a row per capacity, the default against the old default and the references."""
    duration = report.trace.duration_s
    rows = [
        "| capacity (blocks) | kvbucket | old default | per-object LRU | Belady | kvbucket / LRU | old default / LRU "
        "| write amplification (old) | found-then-gone | loads/s | writes/s | end-to-end (with L2) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, o in zip(report.results, old.results):
        share = r.capacity_blocks / report.trace.distinct_blocks
        rows.append(
            f"| {r.capacity_blocks:,} ({share:.0%}) | {r.kvbucket.hit_rate:.4f} | {o.kvbucket.hit_rate:.4f} | {r.lru.hit_rate:.4f} "
            f"| {r.belady.hit_rate:.4f} | **{_ratio(r)}** | {_ratio(o)} | {r.write_amplification:.3f} ({o.write_amplification:.3f}) "
            f"| {r.kvbucket.found_then_gone} | {r.kvbucket.hits / duration:.1f} | {r.kvbucket.admitted / duration:.1f} "
            f"| {r.kvbucket.prefix_hit_rate:.4f} |"
        )
    return rows


def _ratio(result: CapacityResult) -> str:
    """kvbucket's hits over the LRU's, or the hit counts when the LRU hits almost nothing."""
    if result.lru.hits < 100:
        return f"{result.kvbucket.hits:,} vs {result.lru.hits:,} hits"
    return f"{result.ratio_to_lru:.3f}x"


def overlap_table(report: ReplayReport) -> list[str]:
    """Hit rates and found-then-gone blocks with write-back landing after the next lookup."""
    rows = [
        "| capacity (blocks) | kvbucket | per-object LRU | kvbucket / LRU | kvbucket found-then-gone | LRU found-then-gone |",
        "|---|---|---|---|---|---|",
    ]
    for r in report.results:
        share = r.capacity_blocks / report.trace.distinct_blocks
        rows.append(
            f"| {r.capacity_blocks:,} ({share:.0%}) | {r.kvbucket.hit_rate:.4f} | {r.lru.hit_rate:.4f} | {_ratio(r)} "
            f"| {r.kvbucket.found_then_gone:,} | {r.lru.found_then_gone:,} |"
        )
    return rows


def document(reports: list[ReplayReport], old: list[ReplayReport], real: bool, seconds: float) -> str:
    """The whole REPLAY.md."""
    trace = reports[0].trace
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        "# Cache effectiveness: trace replay",
        "",
        "Generated by `benchmarks/replay.py` (do not edit by hand). How the replay works, what each",
        "number means and how to size a tier with `kvbucket replay`: [CAPACITY_PLANNING.md](CAPACITY_PLANNING.md).",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/replay.py{' --real' if real else ''}`. "
        f"Took {seconds / 60:.1f} min on {when}, {'real store in a temporary directory' if real else 'simulated store (in-memory files)'}.",
        "",
        f"Trace: `{trace.name}` (Mooncake FAST'25 synthetic workload, shipped in the package): "
        f"{len(trace.requests):,} requests, {trace.block_references:,} block references, "
        f"{trace.distinct_blocks:,} distinct blocks, {trace.duration_s:,.0f} s. Blocks of {OBJECT_SIZE:,} bytes; "
        "the store's configuration is the default but for `max_total_size` (the capacity) and "
        "`group_max_delay_s=0` (no wall-clock flushes in a replay): 2Q bucket eviction (`eviction_policy=\"2q\"`),",
        "a bucket per write-back, and background eviction from above the 0.995 watermark down to 0.985 (done in",
        "step after each write-back, so runs repeat exactly). The *old default* column is kvbucket's previous",
        "default, replayed the same way: `eviction_policy=\"lru\"`, `OffloadQueue(bucket_per_batch=False)`",
        "(write-backs of several requests pooled into 500-block buckets) and no background evictor. Why the",
        "default wins: [CACHE_POLICY.md](CACHE_POLICY.md).",
        "",
        "![hit rate against capacity](replay.png)",
        "",
    ]
    for report, before in zip((r for r in reports if not r.options.overlap), old):
        l2 = report.options.l2_blocks
        lines += [f"## {'No L2' if not l2 else f'L2 of {l2:,} blocks'}", "", *table(report, before), ""]
    lines += [
        "## Background write-back (`--overlap`)",
        "",
        "Each request's write-back lands after the next request's lookup and before its load, as when the",
        "engine serves the next request while the tier writes: blocks that lookup found can be evicted",
        "before they are loaded (found-then-gone, counted as misses).",
        "",
    ]
    for report in (r for r in reports if r.options.overlap):
        l2 = report.options.l2_blocks
        lines += [f"### {'No L2' if not l2 else f'L2 of {l2:,} blocks'}", "", *overlap_table(report), ""]
    lines += [
        "Hit rates are the tier's: blocks loaded from the tier / block references that reached it",
        "(behind L2, the references L2 did not serve). The ratio is kvbucket's hits over the LRU's.",
        "Write amplification: bytes written to the store's files (data, metas, LOCK) / bytes of the",
        "blocks the tier accepted. Loads/s and writes/s: blocks per second of trace time.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="Run real stores on disk instead of simulated ones.")
    parser.add_argument("--dir", default=None, help="With --real: where the temporary stores go.")
    parser.add_argument("--docs", default=os.path.join(ROOT, "docs"), help="Where REPLAY.md and replay.png go.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    reports, old = run(args.real, args.dir)
    seconds = time.perf_counter() - start
    os.makedirs(os.path.join(ROOT, "bench-results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench-results", "replay.json"), "w") as f:
        json.dump({"default": [r.to_json() for r in reports], "old_default": [r.to_json() for r in old]}, f, indent=2)
    with open(os.path.join(args.docs, "REPLAY.md"), "w") as f:
        f.write(document(reports, old, args.real, seconds))
    plot_reports([r for r in reports if not r.options.overlap], os.path.join(args.docs, "replay.png"), old, OLD_LABEL)
    print(f"wrote {os.path.join(args.docs, 'REPLAY.md')} and replay.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
