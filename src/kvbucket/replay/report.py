"""Showing a replay: a text table for the terminal, and a chart."""

from __future__ import annotations

from collections.abc import Sequence

from .run import ReplayReport

__all__ = ["format_report", "plot_reports", "MissingPlotLibrary"]


class MissingPlotLibrary(RuntimeError):
    """matplotlib is not installed."""


def format_report(report: ReplayReport) -> str:
    """The replay as a table, one row per capacity."""
    trace, options = report.trace, report.options
    mode = "simulated store" if options.simulate else "real store"
    if options.overlap:
        mode += ", write-back landing after the next lookup"
    lines = [
        f"replay of {trace.name}: {len(trace.requests):,} requests, {trace.block_references:,} block references, "
        f"{trace.distinct_blocks:,} distinct blocks, {trace.duration_s:,.0f} s",
        f"object size {options.object_size:,} bytes, L2 {options.l2_blocks:,} blocks, eviction policy {options.eviction_policy}, {mode}",
        "",
        f"{'capacity':>18} {'kvbucket':>9} {'LRU':>7} {'Belady':>7} {'vs LRU':>7} {'WA':>6} "
        f"{'gone':>5} {'loads/s':>8} {'writes/s':>8} {'e2e':>6}",
    ]
    for r in report.results:
        capacity = f"{r.capacity_blocks:,} ({r.capacity_blocks / trace.distinct_blocks:.0%})"
        lines.append(
            f"{capacity:>18} {r.kvbucket.hit_rate:>9.4f} {r.lru.hit_rate:>7.4f} {r.belady.hit_rate:>7.4f} "
            f"{r.ratio_to_lru:>6.3f}x {r.write_amplification:>6.3f} {r.kvbucket.found_then_gone:>5} "
            f"{r.kvbucket.hits / trace.duration_s:>8.1f} {r.kvbucket.admitted / trace.duration_s:>8.1f} "
            f"{r.kvbucket.prefix_hit_rate:>6.4f}"
        )
    lines += [
        "",
        "hit rate = blocks loaded from the tier / block references that reached it; e2e = with L2;",
        "WA = bytes written to the files / bytes of blocks accepted; gone = found by a lookup, gone when loaded;",
        "loads/s, writes/s = blocks per second of trace time.",
    ]
    return "\n".join(lines)


def plot_reports(reports: Sequence[ReplayReport], path: str, baselines: Sequence[ReplayReport] = (), baseline_label: str = "") -> None:
    """Hit rate against capacity, one panel per report, saved as a PNG.

    ``baselines`` (one per report, same capacities), when given, add
    kvbucket's hit rate under another configuration, named ``baseline_label``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingPlotLibrary("plotting needs matplotlib: pip install 'kvbucket[bench]' (or pip install matplotlib)") from exc
    figure, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4.2), squeeze=False)
    for index, (axis, report) in enumerate(zip(axes[0], reports)):
        distinct = report.trace.distinct_blocks
        x = [100 * r.capacity_blocks / distinct for r in report.results]
        lines = [
            ("Belady (offline optimum)", [r.belady.hit_rate for r in report.results], "k:"),
            ("per-object LRU", [r.lru.hit_rate for r in report.results], "s--"),
            ("kvbucket", [r.kvbucket.hit_rate for r in report.results], "o-"),
        ]
        if baselines:
            lines.append((baseline_label, [r.kvbucket.hit_rate for r in baselines[index].results], "^-."))
        for label, values, style in lines:
            axis.plot(x, values, style, label=label)
        l2 = report.options.l2_blocks
        axis.set_title(f"{report.trace.name}, " + (f"L2 of {l2:,} blocks" if l2 else "no L2"))
        axis.set_xlabel("tier capacity (% of distinct blocks)")
        axis.set_ylabel("tier hit rate")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
