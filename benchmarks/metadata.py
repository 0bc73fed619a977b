"""Metadata phase of the suite: key lookups, ``open()`` time, index memory.

A store of ``n`` objects (64-character hex keys, 64-byte values, the default
500 objects per bucket) is built once, then:

* ``batch_exists`` / ``batch_query`` / ``exists`` rates in keys per second,
  next to the same lookups on a plain ``dict`` of the same keys (the ceiling
  for any Python index), medians of ``repeats`` passes over all keys. The
  lookups use key objects distinct from the indexed ones (as a caller's keys
  are), so every hit compares the strings, not just their identity;
* ``BucketStore.open()`` (full recovery scan) timed inside fresh child
  processes, with a warm page cache and a cold one (drop_caches first);
* the index's memory: the child's resident-set growth across ``open()``
  (after ``gc.collect()`` and ``malloc_trim``) divided by the keys, and the bytes ``tracemalloc`` sees retained (the
  Python-level allocations only); both also minus ``sys.getsizeof`` of the key
  string itself ("beyond the key").

Run as a script it is the child: ``metadata.py open PATH [--trace]`` prints
one JSON line.
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import kvbucket  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(ROOT, "src"))

from kvbucket.tools import bench as kb  # noqa: E402

VALUE = bytes(range(64))
PER_BUCKET = 500


def build(path: str, n: int) -> tuple[list[str], float]:
    """Create a store of ``n`` objects; returns the keys and the seconds taken."""
    from kvbucket import BucketStore

    keys = kb.make_keys(n, prefix="")
    t0 = time.perf_counter()
    with BucketStore.open(path, durability="relaxed", bucket_keys_limit=PER_BUCKET) as store:
        for start in range(0, n, PER_BUCKET):
            store.batch_offload({k: VALUE for k in keys[start : start + PER_BUCKET]})
    os.sync()
    return keys, time.perf_counter() - t0


def _rate(fn: Any, batches: list[list[str]], n: int) -> float:
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    return n / (time.perf_counter() - t0)


def lookup_rates(path: str, keys: list[str], repeats: int) -> dict[str, list[float]]:
    """Keys/s of the store's lookups and of a dict's, per batch size."""
    from kvbucket import BucketStore

    order = [k.encode().decode() for k in keys]  # the caller's own str objects, as in a real lookup
    random.Random(3).shuffle(order)
    table = dict.fromkeys(keys, 0)  # same key order as the store's index, distinct objects from `order`
    out: dict[str, list[float]] = {}
    with BucketStore.open(path, readonly=True) as store:
        cases = {
            "dict `in` (baseline), batch 128": lambda b: [k in table for k in b],
            "dict lookup (baseline), batch 128": lambda b: {k: table[k] for k in b},
            "batch_exists, batch 128": store.batch_exists,
            "batch_query, batch 128": store.batch_query,
            "exists, one key per call": lambda b: [store.exists(k) for k in b],
        }
        big = [order[i : i + 1024] for i in range(0, len(order), 1024)]
        small = [order[i : i + 128] for i in range(0, len(order), 128)]
        for _ in range(repeats):
            for name, fn in cases.items():
                out.setdefault(name, []).append(_rate(fn, small, len(order)))
            out.setdefault("batch_exists, batch 1024", []).append(_rate(store.batch_exists, big, len(order)))
            out.setdefault("batch_query, batch 1024", []).append(_rate(store.batch_query, big, len(order)))
    return out


def _child(path: str, trace: bool) -> list[float]:
    """Run one child open; returns its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "open", path] + (["--trace"] if trace else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def open_times(path: str, repeats: int) -> dict[str, Any]:
    """open() seconds warm and cold, and memory per key, from child processes."""
    _child(path, False)  # warm the page cache
    warm = [_child(path, False) for _ in range(repeats)]
    cold = []
    for _ in range(repeats):
        kb.make_cold([path])
        cold.append(_child(path, False))
    traced = _child(path, True)
    return {
        "open_warm_s": [r["open_s"] for r in warm],
        "open_cold_s": [r["open_s"] for r in cold],
        "rss_bytes_per_key": [r["rss_per_key"] for r in warm + cold],
        "key_object_bytes": warm[0]["key_bytes"],
        "traced_bytes_per_key": traced["traced_per_key"],
        "keys": warm[0]["keys"],
        "buckets": warm[0]["buckets"],
    }


def run(path: str, n: int, repeats: int = 3) -> dict[str, Any]:
    """The whole metadata phase on a scratch directory ``path`` (deleted after)."""
    try:
        keys, build_s = build(path, n)
        rates = lookup_rates(path, keys, repeats)
        del keys
        gc.collect()
        opened = open_times(path, repeats)
        return {"n": n, "build_s": build_s, "rates": rates, **opened}
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _trim() -> None:
    """Collect garbage and hand free heap back to the OS, so RSS counts what is retained."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_main(path: str, trace: bool) -> None:
    """Open the store once and print open time and memory as one JSON line."""
    import tracemalloc

    from kvbucket import BucketStore

    _trim()
    before = _rss()
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    store = BucketStore.open(path)
    open_s = time.perf_counter() - t0
    _trim()
    traced = tracemalloc.get_traced_memory()[0] if trace else 0
    rss = _rss() - before
    stats = store.stats()
    first = store.bucket_ids()[0]
    sample = store.bucket_keys(first)
    key_bytes = sum(sys.getsizeof(k) for k in sample) / len(sample)
    keys = stats.keys
    print(json.dumps({"open_s": open_s, "keys": keys, "buckets": stats.buckets, "rss_per_key": rss / keys,
                      "traced_per_key": traced / keys, "key_bytes": key_bytes}))
    store.close()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "open":
        child_main(sys.argv[2], "--trace" in sys.argv[3:])
    else:
        print("usage: metadata.py open PATH [--trace]", file=sys.stderr)
        sys.exit(2)
