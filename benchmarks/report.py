"""Turn the suite's raw runs into summaries, targets, BENCHMARKS.md and a chart."""

from __future__ import annotations

import os
import statistics
import sys
from typing import Any

from kvbucket.tools.bench import summarize

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
KV_STRICT = "kvbucket strict "
KV_RELAXED = "kvbucket relaxed "
"""Name prefixes of the kvbucket systems (one per io_mode)."""
DURABLE_PREFIXES = ("raw fio ", "raw python ", "lmdb", KV_STRICT)
"""Systems whose write returns with the data durable."""
SIZE_GOALS = {"64KiB": 0.8}
"""The least kvbucket / raw ratio wanted per object size (0.9 when not listed)."""


def _goal(label: str) -> float:
    return SIZE_GOALS.get(label, 0.9)


def _kv(table: dict[str, Any], prefix: str) -> list[str]:
    """The kvbucket systems of ``table`` whose names start with ``prefix``."""
    return [name for name in table if name.startswith(prefix)]


def _default_kv(out: dict[str, Any], table: dict[str, Any]) -> str | None:
    """The strict kvbucket system in the default io_mode, when the run recorded it."""
    name = f"{KV_STRICT}{out['config'].get('default_io_mode')}"
    return name if name in table else None


def paired(name: str, unit: str, kv: list[float], raw: list[float]) -> dict[str, Any]:
    """One ratio row: medians of both sides and the median of the per-trial
    ratios, with their min and max (the ``small_objects`` row format)."""
    ratios = [k / r for k, r in zip(kv, raw) if r]
    return {"name": name, "unit": unit, "kvbucket": kv, "raw": raw,
            "kv_median": statistics.median(kv) if kv else None, "raw_median": statistics.median(raw) if raw else None,
            "ratio": statistics.median(ratios) if ratios else None,
            "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None)}


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
    out["speed"] = speed_rows(out)
    out["targets"] = targets(out)
    return out


# -- ratios to the raw baselines ----------------------------------------------


def _default_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Durable offload and cold batch_load in the default io_mode, per size,
    trial by trial against the raw reference of the same repeat."""
    rows = []
    for label, size in out["sizes"].items():
        name = _default_kv(out, size["summary"])
        for metric, text in (("write", "durable offload"), ("read", "cold batch_load")):
            ref = size["reference"][metric]["system"]
            if name is None or ref is None or metric not in size["results"].get(name, {}):
                continue
            row = paired(f"{label} {text}, {name.removeprefix(KV_STRICT)} vs {ref}", "MiB/s",
                         size["results"][name][metric], size["results"][ref][metric])
            rows.append({**row, "group": "default configuration vs the faster raw mode", "goal": _goal(label)})
    return rows


def _async_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    """submit_load and batch_load against the raw readers with no barrier."""
    rows = []
    for label, r in out.get("async_load", {}).items():
        runs = r["runs_mib_s"]
        group = f"async loads, default configuration, vs {r['threads']} raw readers"
        rows.append({**paired(f"{label} submit_load, {r['depth']} batches in flight", "MiB/s", runs["async"], runs["raw"]),
                     "group": group, "goal": _goal(label)})
        rows.append({**paired(f"{label} batch_load", "MiB/s", runs["batch_load"], runs["raw"]), "group": group, "goal": None})
    return rows


def _small_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The small-object phase's rows, and batch_query / batch_exists against a dict."""
    small = out.get("small_objects")
    rows = []
    if small:
        label = f"{small['object_size'] >> 10}KiB"
        rows += [{**row, "name": f"{label} {row['name']}", "group": "small objects vs raw loops", "goal": 0.8}
                 for row in small["rows"]]
    meta = out.get("metadata")
    if meta:
        for name, base in (("batch_query, batch 128", "dict lookup (baseline), batch 128"),
                           ("batch_exists, batch 128", "dict `in` (baseline), batch 128")):
            if name in meta["rates"] and base in meta["rates"]:
                rows.append({**paired(f"{name} vs {base.split(' (')[0]}", "keys/s", meta["rates"][name], meta["rates"][base]),
                             "group": "small objects vs raw loops", "goal": None})
    return rows


def _group_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Group commit against a bucket per commit and against raw writers."""
    g = out.get("group_commit")
    if not g:
        return []
    runs = g["runs_mib_s"]
    group = f"group commit, {g['workers']} OffloadQueue workers, {g['buckets']} buckets of {g['objects_per_bucket']} x 64 KiB"
    names = {"raw": "raw writers, data sync only", "raw-commit": "raw writers, a bucket commit's syncs"}
    pairs = [(a, b) for a, b in (("grouped", "raw-commit"), ("per-bucket", "raw-commit"), ("grouped", "raw"),
                                 ("grouped", "per-bucket")) if a in runs and b in runs]
    return [{**paired(f"{a} / {names.get(b, b)}", "MiB/s", runs[a], runs[b]), "group": group,
             "goal": 0.9 if b == "raw-commit" and a == "grouped" else None} for a, b in pairs]



def speed_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Every kvbucket / raw-baseline ratio of the run, grouped, with its goal."""
    return _default_rows(out) + _async_rows(out) + _small_rows(out) + _group_rows(out)


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
        default = _default_kv(out, size["summary"])
        if default is not None:  # the configuration a user gets
            name, value = default, _median(size["summary"][default].get(metric))
            text = text.replace(" >=", ", default configuration, >=")
        else:
            name, value = _best(size["summary"], _kv(size["summary"], KV_STRICT), metric)
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
            kv_name, kv = _best(table, _kv(table, ours), metric)
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


def _async_targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label, r in out.get("async_load", {}).items():
        if label not in ("1MiB", "64KiB"):
            continue
        row = paired("", "MiB/s", r["runs_mib_s"]["async"], r["runs_mib_s"]["raw"])
        goal = _goal(label)
        rows.append(_target(f"cold random submit_load {label}, default configuration, >= {goal}x "
                            f"{r['threads']} raw readers with no barrier",
                            f"io_mode {r.get('io_mode', '?')}, {r['depth']} batches in flight: {row['kv_median']:.0f} MiB/s vs "
                            f"{row['raw_median']:.0f} MiB/s, median per-trial ratio {row['ratio']:.2f}x", row["ratio"], goal))
    return rows


def targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it is met."""
    return _io_targets(out) + _async_targets(out) + _meta_targets(out) + _peer_targets(out)


# -- text ---------------------------------------------------------------------


def _cell(s: dict[str, Any] | None, fmt: str = "{:.0f}") -> str:
    if not s or s.get("median") is None:
        return "-"
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def _x(s: dict[str, Any] | None) -> str:
    return f"{s['x_raw']:.2f}x" if s and "x_raw" in s else "-"


def size_table(label: str, size: dict[str, Any], default: str | None = None) -> list[str]:
    """Markdown rows of one object size; ``default`` is the system in the default configuration."""
    ref = size["reference"]
    lines = [
        f"### {label} objects ({size['n_objects']} objects, {size['bytes'] / MiB:.0f} MiB)",
        "",
        f"Raw reference: write = {ref['write']['system']}, read = {ref['read']['system']} "
        "(the faster raw mode: fio's where fio is installed, else the Python loop's).",
        "",
        "| system | durable | write MiB/s median (min–max) | × raw | cold random read MiB/s median (min–max) | × raw | exists keys/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in size["summary"].items():
        shown = f"{name} (default)" if name == default else name
        lines.append(f"| {shown} | {'yes' if name.startswith(DURABLE_PREFIXES) else 'no'} | {_cell(m.get('write'))} | {_x(m.get('write'))} "
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


def _ratio_cell(r: dict[str, Any]) -> str:
    if r["ratio"] is None:
        return "-"
    return f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"


def speed_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table of the ratios to the raw baselines, one header row per group."""
    lines = ["| measurement | kvbucket median | raw median | kvbucket / raw, median of trials (min–max) | goal |",
             "|---|---|---|---|---|"]
    group = None
    for r in rows:
        if r["group"] != group:
            group = r["group"]
            lines.append(f"| **{group}** | | | | |")
        fmt = "{:,.0f}"
        goal = "" if r["goal"] is None else f">= {r['goal']}x"
        lines.append(f"| {r['name']} | {fmt.format(r['kv_median'])} {r['unit']} | {fmt.format(r['raw_median'])} {r['unit']} "
                     f"| {_ratio_cell(r)} | {goal} |")
    return [*lines, ""]


def _group_syncs(g: dict[str, Any]) -> list[str]:
    syncs = "; ".join(f"{name}: " + ", ".join(f"{s} {n:g}" for s, n in calls.items()) for name, calls in g["syncs"].items())
    return [f"Sync calls per run (median), counted through the FileSystem seam: {syncs}.", ""]


def text_tables(out: dict[str, Any]) -> str:
    """The tables as plain Markdown text (also printed at the end of a run)."""
    lines: list[str] = ["## Targets", "", *target_table(out["targets"])]
    if out.get("speed"):
        lines += ["## Ratios to the raw baselines", "", *speed_table(out["speed"])]
        if out.get("group_commit"):
            lines += _group_syncs(out["group_commit"])
    for label, size in out["sizes"].items():
        lines += size_table(label, size, _default_kv(out, size["summary"]))
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
- Asynchronous loads (`benchmarks/async_load.py`, per object size): a store in the default configuration
  (`io_threads={threads}`, `load_queue_depth={depth}`, 256 MiB buckets) reads the dataset cold in the same random batches, through
  `submit_load` with {depth} batches in flight and through `batch_load`, against {threads} Python threads each
  `os.preadv`-ing the next object from the store's own data files with no barrier between batches.
- Small objects (`benchmarks/small_objects.py`, 64 KiB): each trial runs the raw loop and kvbucket back to back
  (durable write with one `fdatasync` per bucket; cold and warm random read by an `os.preadv` pool over the same
  batches); `batch_query` / `batch_exists` are set against a `dict` of the same keys (metadata phase).
- Group commit (`benchmarks/group_commit.py`): four OffloadQueue workers write 4 MiB buckets of 64 KiB objects,
  strict, committed in groups and a bucket per commit, against four raw threads each writing the next bucket's
  bytes into a new file with one `fdatasync`, alone or followed by the other syncs of a bucket committed on its
  own (a 4 KiB meta file written and `fsync`-ed, a directory `fsync`).
- "Ratios to the raw baselines" are medians of per-trial ratios (kvbucket and its baseline measured back to back
  in the same repeat), with their min and max; `docs/speed.png` draws them.
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
        *(["![kvbucket / its raw baseline in the same run](speed.png)", ""] if out.get("speed") else []),
        text_tables(out),
        METHOD.format(batch=cfg["batch"], threads=cfg["threads"], cold=out["cold_cache"], peers=peers,
                      repeats=cfg["repeats"], depth=cfg.get("depth", 4)),
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
        names += [n for n in size["summary"] if n not in names]
    if any(n.startswith("raw fio") for n in names):  # the raw bars are fio's; the Python loop's are in the tables
        names = [n for n in names if not n.startswith("raw python")]
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
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, ncol=6, loc="lower center")
    fig.suptitle(f"kvbucket vs raw disk and peers ({out['config']['dataset'] / MiB:.0f} MiB per size, "
                 f"median of {out['config']['repeats']})")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


GROUP_COLORS = ("tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown")


def speed_chart(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Horizontal bars of every kvbucket / raw-baseline ratio, coloured by
    group, min–max whiskers, with the 1.0x line and each row's goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["ratio"] is not None]
    groups = list(dict.fromkeys(r["group"] for r in shown))
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.32 * len(shown)))
    for i, r in enumerate(shown):
        color = GROUP_COLORS[groups.index(r["group"]) % len(GROUP_COLORS)]
        ax.barh(i, r["ratio"], color=color, xerr=[[r["ratio"] - r["ratio_min"]], [r["ratio_max"] - r["ratio"]]], capsize=3,
                label=r["group"] if r is next(x for x in shown if x["group"] == r["group"]) else None)
        if r["goal"] is not None:
            ax.plot([r["goal"]] * 2, [i - 0.4, i + 0.4], color="tab:red", linewidth=1.5)
    ax.set_yticks(range(len(shown)), [r["name"] for r in shown], fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("kvbucket / its raw baseline in the same run (median of per-trial ratios, whiskers min–max; red: goal)")
    ax.set_title(title)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    height = fig.get_figheight()
    fig.legend(fontsize=7, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.15 * (1 + len(groups) // 2) / height, 1, 1))  # room for the legend below
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(out: dict[str, Any], directory: str) -> None:
    """Write BENCHMARKS.md, benchmarks.png and (when the run has ratios) speed.png into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    written = ["BENCHMARKS.md"]
    if out["sizes"]:
        chart(out, os.path.join(directory, "benchmarks.png"))
        written.append("benchmarks.png")
    if out.get("speed"):
        speed_chart(out["speed"], os.path.join(directory, "speed.png"),
                    f"kvbucket vs raw baselines ({out['config']['dataset'] / MiB:.0f} MiB per size, {out['config']['repeats']} trials)")
        written.append("speed.png")
    with open(os.path.join(directory, "BENCHMARKS.md"), "w") as f:
        f.write(markdown(out))
    print(f"wrote {', '.join(written)} into {directory}", file=sys.stderr)
