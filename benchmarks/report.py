"""Turn the suite's raw runs into summaries, targets, BENCHMARKS.md and a chart."""

from __future__ import annotations

import os
import sys
from typing import Any

from kvbucket.tools.bench import summarize

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
KV_STRICT = ("kvbucket strict buffered", "kvbucket strict direct")
KV_RELAXED = ("kvbucket relaxed buffered", "kvbucket relaxed direct")
DURABLE = {"raw fio buffered", "raw fio direct", "raw python buffered", "raw python direct", "lmdb", *KV_STRICT}


# -- summaries ----------------------------------------------------------------


def _median(s: dict[str, Any] | None) -> float:
    return (s or {}).get("median") or 0.0


def _best(table: dict[str, dict[str, Any]], names: tuple[str, ...] | list[str], metric: str) -> tuple[str | None, float]:
    """The name and median of the best of ``names`` on ``metric``."""
    cands = [(n, _median(table.get(n, {}).get(metric))) for n in names if metric in table.get(n, {})]
    if not cands:
        return None, 0.0
    return max(cands, key=lambda c: c[1])


def _reference(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The raw baseline of each metric: the faster fio mode (Python loop without fio)."""
    names = [n for n in table if n.startswith("raw fio")] or [n for n in table if n.startswith("raw python")]
    ref = {}
    for metric in ("write", "read"):
        name, value = _best(table, names, metric)
        ref[metric] = {"system": name, "median": value}
    return ref


def summarize_all(out: dict[str, Any]) -> dict[str, Any]:
    """Add medians/min/max, the raw reference, ratios and the targets to ``out``."""
    for size in out["sizes"].values():
        table = {
            name: {m: summarize(v, "keys/s" if m == "exists" else "MiB/s") for m, v in metrics.items()}
            for name, metrics in size["results"].items()
        }
        ref = _reference(table)
        for metrics in table.values():
            for m in ("write", "read"):
                if m in metrics and ref[m]["median"]:
                    metrics[m]["x_raw"] = metrics[m]["median"] / ref[m]["median"]
        size["summary"], size["reference"] = table, ref
    meta = out.get("metadata")
    if meta:
        meta["summary"] = {name: summarize(v, "keys/s") for name, v in meta["rates"].items()}
        meta["open_warm"] = summarize(meta["open_warm_s"], "s")
        meta["open_cold"] = summarize(meta["open_cold_s"], "s")
        meta["rss_per_key"] = summarize(meta["rss_bytes_per_key"], "bytes")
    out["targets"] = targets(out)
    return out


# -- targets ------------------------------------------------------------------


def _target(name: str, measured: str, value: float | None, goal: float, higher: bool = True) -> dict[str, Any]:
    met = None if value is None else (value >= goal if higher else value <= goal)
    return {"target": name, "measured": measured, "value": value, "goal": goal, "met": met}


def _io_targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    specs = [("1MiB", "write", 0.9, "durable offload 1 MiB >= 0.9x raw sequential write"),
             ("1MiB", "read", 0.9, "cold random batch_load 1 MiB >= 0.9x raw random read"),
             ("64KiB", "write", 0.8, "durable offload 64 KiB >= 0.8x raw sequential write"),
             ("64KiB", "read", 0.8, "cold random batch_load 64 KiB >= 0.8x raw random read")]
    for label, metric, goal, text in specs:
        size = out["sizes"].get(label)
        if not size:
            continue
        name, value = _best(size["summary"], KV_STRICT, metric)
        ref = size["reference"][metric]
        if name is None or not ref["median"]:
            continue
        x = value / ref["median"]
        rows.append(_target(text, f"{name}: {value:.0f} MiB/s vs {ref['system']} {ref['median']:.0f} MiB/s = {x:.2f}x",
                            x, goal))
    return rows


def _peer_targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    peers = out["config"]["peers"]
    for label, size in out["sizes"].items():
        table = size["summary"]
        for metric, ours in (("write", KV_RELAXED), ("read", KV_STRICT)):
            kv_name, kv = _best(table, ours, metric)
            peer_name, peer = _best(table, peers, metric)
            if kv_name is None or peer_name is None:
                continue
            rows.append(_target(f"{label} {'write' if metric == 'write' else 'cold read'} faster than every peer",
                                f"{kv_name} {kv:.0f} MiB/s vs best peer {peer_name} {peer:.0f} MiB/s = {kv / peer:.2f}x",
                                kv / peer if peer else None, 1.0))
    return rows


def _meta_targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    meta = out.get("metadata")
    if not meta:
        return []
    rows = []
    for name in ("batch_exists, batch 128", "batch_query, batch 128"):
        v = _median(meta["summary"].get(name))
        rows.append(_target(f"metadata {name.split(',')[0]} >= 1,000,000 keys/s",
                            f"{name}: {v:,.0f} keys/s at {meta['n']:,} keys", v, 1e6))
    for kind in ("warm", "cold"):
        v = _median(meta[f"open_{kind}"])
        rows.append(_target(f"open() of {meta['n']:,} objects <= 3 s ({kind} page cache)", f"{v:.2f} s", v, 3.0, False))
    beyond = _median(meta["rss_per_key"]) - meta["key_object_bytes"]
    rows.append(_target("index memory <= 200 bytes/key beyond the key",
                        f"{_median(meta['rss_per_key']):.0f} B/key RSS - {meta['key_object_bytes']:.0f} B key object "
                        f"= {beyond:.0f} B (tracemalloc: {meta['traced_bytes_per_key'] - meta['key_object_bytes']:.0f} B)",
                        beyond, 200.0, False))
    return rows


def targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 4 with its measured value and whether it is met."""
    return _io_targets(out) + _meta_targets(out) + _peer_targets(out)


# -- text ---------------------------------------------------------------------


def _cell(s: dict[str, Any] | None, fmt: str = "{:.0f}") -> str:
    if not s or s.get("median") is None:
        return "-"
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def _x(s: dict[str, Any] | None) -> str:
    return f"{s['x_raw']:.2f}x" if s and "x_raw" in s else "-"


def size_table(label: str, size: dict[str, Any]) -> list[str]:
    """Markdown rows of one object size."""
    ref = size["reference"]
    lines = [
        f"### {label} objects ({size['n_objects']} objects, {size['bytes'] / MiB:.0f} MiB)",
        "",
        f"Raw reference: write = {ref['write']['system']}, read = {ref['read']['system']} (the faster fio mode).",
        "",
        "| system | durable | write MiB/s median (min–max) | × raw | cold random read MiB/s median (min–max) | × raw | exists keys/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in size["summary"].items():
        lines.append(f"| {name} | {'yes' if name in DURABLE else 'no'} | {_cell(m.get('write'))} | {_x(m.get('write'))} "
                     f"| {_cell(m.get('read'))} | {_x(m.get('read'))} | {_cell(m.get('exists'), '{:,.0f}')} |")
    return [*lines, ""]


def target_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table of the targets."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    for r in rows:
        met = "n/a" if r["met"] is None else ("**yes**" if r["met"] else "**no**")
        lines.append(f"| {r['target']} | {r['measured']} | {met} |")
    return [*lines, ""]


def meta_tables(meta: dict[str, Any]) -> list[str]:
    """Markdown tables of the metadata phase."""
    lines = [
        f"{meta['n']:,} objects in {meta['buckets']:,} buckets (64-character hex keys, 64-byte values), "
        f"built in {meta['build_s']:.1f} s (durability relaxed).",
        "",
        "| lookup | keys/s median (min–max) | × dict baseline |",
        "|---|---|---|",
    ]
    base = {"batch 128": _median(meta["summary"].get("dict `in` (baseline), batch 128"))}
    for name, s in meta["summary"].items():
        x = s["median"] / base["batch 128"] if base["batch 128"] else 0
        lines.append(f"| {name} | {_cell(s, '{:,.0f}')} | {x:.2f}x |")
    lines += [
        "",
        "| open() / memory | median (min–max) |",
        "|---|---|",
        f"| open(), warm page cache, s | {_cell(meta['open_warm'], '{:.2f}')} |",
        f"| open(), cold page cache (drop_caches), s | {_cell(meta['open_cold'], '{:.2f}')} |",
        f"| resident memory growth across open(), bytes/key | {_cell(meta['rss_per_key'])} |",
        f"| ... of which the key string object (sys.getsizeof), bytes | {meta['key_object_bytes']:.0f} |",
        f"| Python allocations retained by open() (tracemalloc), bytes/key | {meta['traced_bytes_per_key']:.0f} |",
        "",
    ]
    return lines


def text_tables(out: dict[str, Any]) -> str:
    """The tables as plain Markdown text (also printed at the end of a run)."""
    lines: list[str] = ["## Targets", "", *target_table(out["targets"])]
    for label, size in out["sizes"].items():
        lines += size_table(label, size)
    if out.get("metadata"):
        lines += ["## Metadata", "", *meta_tables(out["metadata"])]
    return "\n".join(lines)


def _machine(m: dict[str, Any]) -> list[str]:
    return [
        f"- CPU: {m.get('cpu_model', '?')}, {m.get('cpus')} CPUs; memory {m.get('mem_total_kib', 0) / MiB:.1f} GiB",
        f"- Kernel: `{m.get('uname', '?')}`; Python {m.get('python')}",
        f"- Disk: `{m.get('device', '?')}` ({m.get('fstype', '?')}, `{m.get('mount_options', '')}`), "
        f"scheduler `{m.get('scheduler', '?')}`, max_sectors_kb {m.get('max_sectors_kb', '?')}, "
        f"logical block {m.get('logical_block_size', '?')} B",
    ]


METHOD = """\
## Method

- Each object size writes the same dataset of random bytes (values are views of one page-aligned random pool,
  so no system pays for generating data) and reads all of it back once, in a random order, in batches of
  {batch} objects spread over {threads} threads; each batch completes before the next starts (as a serving
  engine's `batch_get` does). Destination buffers are preallocated, page-aligned and pre-faulted.
- The page cache is emptied before every write and every read phase (`sync` + `/proc/sys/vm/drop_caches`,
  method: `{cold}`), so reads are cold and no write starts with a backlog of another's dirty pages.
- Raw write: fio (`--rw=write --ioengine=psync --fdatasync=<one bucket> --end_fsync=1 --fallocate=none`,
  block = max(object size, 1 MiB)) buffered and `--direct=1`, and the same loop in Python (`os.pwritev`).
  Raw read: fio `--rw=randread --ioengine=psync --numjobs={threads} --thread` over disjoint slices (every block once),
  and a Python `os.preadv` thread pool over the same batches as kvbucket. "× raw" divides by the faster fio mode
  measured in the same repeat loop.
- kvbucket: `batch_offload` of one 256 MiB bucket per call (timed until the last call returns: in `strict`
  mode the bucket is durable then), `batch_load` with `verify_checksums=True`. Reads are measured on the
  strict store (reading does not depend on durability). `relaxed` and the peers do not fsync: their write
  figure is how fast the call returns, with data left in the page cache.
- Peers (each reopened before its cold read):
{peers}
- Every figure is the median of {repeats} repeats with min and max. Systems run in a fixed order within a repeat,
  raw baselines first. The disk of this VM is noisy (the same fio job varies up to 3x between runs), so read
  ratios within ~±15% of 1.0 are within noise.
"""


def markdown(out: dict[str, Any]) -> str:
    """The whole BENCHMARKS.md."""
    cfg = out["config"]
    peers = "\n".join(f"  - `{n}`: {out['descriptions'].get(n, '')}" for n in cfg["peers"])
    lines = [
        "# kvbucket benchmarks",
        "",
        "Generated by `benchmarks/run.py` (do not edit by hand; analysis notes come from `benchmarks/ANALYSIS.md`).",
        "",
        f"Reproduce: `{out['command']}` (run as root so drop_caches works; fio from the distribution: "
        "`apt-get install -y fio`). Took "
        f"{out['elapsed_s'] / 60:.1f} min on {out['started']}. Dataset {cfg['dataset'] / MiB:.0f} MiB per object size, "
        f"{cfg['repeats']} repeats, fio: {out.get('fio') or 'not installed (Python loop only)'}.",
        "",
        "Machine:",
        "",
        *_machine(out["machine"]),
        "",
        "![write and cold read throughput](benchmarks.png)",
        "",
        text_tables(out),
        METHOD.format(batch=cfg["batch"], threads=cfg["threads"], cold=out["cold_cache"], peers=peers,
                      repeats=cfg["repeats"]),
    ]
    analysis = os.path.join(HERE, "ANALYSIS.md")
    if os.path.exists(analysis):
        with open(analysis) as f:
            lines += ["", f.read()]
    return "\n".join(lines)


# -- chart --------------------------------------------------------------------


def chart(out: dict[str, Any], path: str) -> None:
    """Grouped bars of write and cold read MiB/s per object size, min–max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(out["sizes"])
    names: list[str] = []
    for size in out["sizes"].values():
        names += [n for n in size["summary"] if n not in names and not n.startswith("raw python")]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    width = 0.8 / max(1, len(names))
    cmap = plt.get_cmap("tab20")
    for ax, metric, title in ((axes[0], "write", "write (strict/lmdb/raw: durable; others: no fsync)"),
                              (axes[1], "read", "cold random read, batches of 32")):
        for j, name in enumerate(names):
            med, lo, hi = [], [], []
            for label in labels:
                s = out["sizes"][label]["summary"].get(name, {}).get(metric)
                med.append(s["median"] if s else float("nan"))
                lo.append(s["median"] - s["min"] if s else 0)
                hi.append(s["max"] - s["median"] if s else 0)
            xs = [i + (j - len(names) / 2 + 0.5) * width for i in range(len(labels))]
            ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=name, color=cmap(j % 20),
                   hatch="//" if name.startswith("raw") else None, edgecolor="black", linewidth=0.3)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel("MiB/s (median, whiskers min–max)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2, loc="upper right")
    fig.suptitle(f"kvbucket vs raw disk and peers ({out['config']['dataset'] / MiB:.0f} MiB per size, "
                 f"median of {out['config']['repeats']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(out: dict[str, Any], directory: str) -> None:
    """Write BENCHMARKS.md and benchmarks.png into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    chart(out, os.path.join(directory, "benchmarks.png"))
    with open(os.path.join(directory, "BENCHMARKS.md"), "w") as f:
        f.write(markdown(out))
    print(f"wrote {os.path.join(directory, 'BENCHMARKS.md')} and benchmarks.png", file=sys.stderr)
