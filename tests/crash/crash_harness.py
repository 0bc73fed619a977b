"""Workloads, the expected-state model and the invariant checker shared by the
crash, power-loss, fault-injection and corruption tests.

Values are derived from keys (``value_for``): a key names its size, and its
bytes are a pseudo-random stream seeded by the key, so any byte served for a
key can be checked without remembering what was written, and a misplaced or
stale block of another key never matches by accident.

A workload is a list of JSON-able operations (dicts):

* ``{"op": "offload", "keys": [...]}``: one ``batch_offload``; keys are never
  reused within a workload;
* ``{"op": "offload_group", "groups": [[...], ...], "keys": [...]}``: one
  ``offload_group`` (a bucket per group, committed together); ``keys`` lists
  every group's keys;
* ``{"op": "get", "keys": [...]}``: read (and check) the keys that exist;
* ``{"op": "load", "keys": [...]}``: the same through ``submit_load``, one
  batch per key, all in flight at once;
* ``{"op": "remove", "keys": [k]}``: ``remove(k)`` (``KeyNotFound`` = not removed);
* ``{"op": "batch_remove", "keys": [...]}``;
* ``{"op": "delete_bucket_of", "key": k}``: ``delete_bucket`` of the bucket
  that holds ``k`` now (skipped when ``k`` is gone);
* ``{"op": "compact", "ratio": r}``: ``compact(min_dead_ratio=r)``;
* ``{"op": "evict", "high": h, "low": l}``: ``evict_to_watermark``;
* ``{"op": "settle"}``: ``wait_for_eviction`` (the background evictor is idle).

:func:`run_ops` executes it and emits events: ``begin``/``done`` around each
operation (``done`` only after the call returned: the acknowledgement),
``evict`` from inside ``on_evict`` and from a store eviction listener (which
also sees the background evictor's evictions). The kill-9 child writes them to a file;
the power-loss recorder puts them in its log. :func:`expectation` turns the
events seen before a crash into what must, may and must not be in the store.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from kvbucket import BucketStore
from kvbucket._core.format import ALIGNMENT, LOCK_NAME, META_MAGIC, QUARANTINE_DIR, FileKind, data_name, decode_meta, meta_name, parse_name
from kvbucket._core.write_mode import AUTO_DIRECT_MIN_OBJECT
from kvbucket.errors import CorruptionError, KeyNotFound, KvBucketError

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.abspath(os.path.join(HERE, "..", "..", "src"))
FULL = os.environ.get("KVBUCKET_FULL_SWEEP", "") not in ("", "0")
SMALL_WRITE_CHUNK = 8192
"""Crash workloads write in 8 KiB calls so that one bucket takes several
``pwritev`` calls (each a kill point) without megabytes of test data."""

AUTO_WRITE_CHUNK = 64 << 10
"""Write calls of workloads with AUTO_DIRECT_SIZES objects: still several
per object, without a hundred crash points per bucket."""

Emit = Callable[[dict], None]


# ---------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------


def make_key(tag: str, size: int) -> str:
    return f"{tag}#{size}"


@lru_cache(maxsize=4096)
def value_for(key: str) -> bytes:
    size = int(key.rsplit("#", 1)[1])
    seed = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).bytes(size)


def offload_takes_on_evict() -> bool:
    try:
        return "on_evict" in inspect.signature(BucketStore.batch_offload).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------

SIZES = (0, 1, 511, 4096, 4097, 9000, 12288, 20000)

AUTO_DIRECT_SIZES = (AUTO_DIRECT_MIN_OBJECT, AUTO_DIRECT_MIN_OBJECT + ALIGNMENT)
"""Object sizes that io_mode="auto" writes aligned with O_DIRECT: multiples
of 4 KiB whose mean is at least the threshold (SIZES are written packed)."""


def _bucket_sizes(b: int, sizes, direct_every: int):
    """The sizes bucket ``b`` draws from: AUTO_DIRECT_SIZES for every
    ``direct_every``-th bucket (from the second), else ``sizes``."""
    return AUTO_DIRECT_SIZES if direct_every and b % direct_every == 1 else sizes


def check_strict_sweep(failures, stats, root, io_mode: str) -> None:
    """A strict power-loss sweep under ``root`` checked states beyond its crash
    points and found no failure; under ``auto`` its recorded store holds
    buckets of both layouts."""
    assert stats["states_checked"] > stats["crash_points_tried"]
    assert not failures, format_failures(failures)
    if io_mode == "auto":
        assert layouts(os.path.join(root, "recorded")) == {True, False}, "the workload wrote both layouts"


def layouts(path) -> set[bool]:
    """The aligned flags of the metas in the store directory ``path``."""
    return {
        decode_meta(open(os.path.join(path, name), "rb").read(), parsed[0]).aligned
        for name in os.listdir(path)
        if (parsed := parse_name(name)) is not None and parsed[1] is FileKind.META
    }


def simple_workload(
    n_buckets: int, per_bucket: int = 3, tag: str = "w", sizes=SIZES, seed: int = 0, direct_every: int = 0
) -> list[dict]:
    """``n_buckets`` offloads of ``per_bucket`` keys each, with a read at the
    end; with ``direct_every``, every ``direct_every``-th bucket (from the
    second) holds objects that io_mode="auto" writes with O_DIRECT."""
    import random

    rng = random.Random(seed)
    ops, everything = [], []
    for b in range(n_buckets):
        keys = [make_key(f"{tag}{b}.{i}", rng.choice(_bucket_sizes(b, sizes, direct_every))) for i in range(per_bucket)]
        everything += keys
        ops.append({"op": "offload", "keys": keys})
    ops.append({"op": "get", "keys": everything})
    return ops


def group_workload(
    n_groups: int, buckets: int = 3, per_bucket: int = 2, tag: str = "g", sizes=SIZES, seed: int = 0, direct_every: int = 0
) -> list[dict]:
    """``n_groups`` group commits of ``buckets`` buckets of ``per_bucket`` keys,
    each group preceded by a lone offload (so a lost group is not the first
    thing written), with a read at the end; with ``direct_every``, every
    ``direct_every``-th bucket of a group (from the second) holds objects
    that io_mode="auto" writes with O_DIRECT, so a group mixes both layouts."""
    import random

    rng = random.Random(seed)
    ops, everything = [], []
    for g in range(n_groups):
        lone = [make_key(f"{tag}{g}.lone", rng.choice(sizes))]
        groups = [
            [make_key(f"{tag}{g}.{b}.{i}", rng.choice(_bucket_sizes(b, sizes, direct_every))) for i in range(per_bucket)]
            for b in range(buckets)
        ]
        keys = [k for group in groups for k in group]
        everything += lone + keys
        ops.append({"op": "offload", "keys": lone})
        ops.append({"op": "offload_group", "groups": groups, "keys": keys})
    ops.append({"op": "get", "keys": everything})
    return ops


def lifecycle_workload(seed: int = 0, n: int = 10, tag: str = "L", evict: bool = True) -> list[dict]:
    """Offloads mixed with remove, batch_remove, delete_bucket, compact (and
    watermark eviction when ``evict``): the issue-3 workload. Reads of single
    keys come in between (their own random stream, so the other ops are the
    same with or without them): a read moves a bucket out of 2Q's probation."""
    import random

    rng = random.Random(seed)
    reader = random.Random(-1 - seed)
    ops: list[dict] = []
    live: list[str] = []
    b = 0

    def offload() -> None:
        nonlocal b
        keys = [make_key(f"{tag}{b}.{i}", rng.choice((1, 4096, 6000, 9000, 16384))) for i in range(rng.randint(2, 4))]
        b += 1
        live.extend(keys)
        ops.append({"op": "offload", "keys": keys})

    def read() -> None:
        if live and reader.random() < 0.3:
            ops.append({"op": "get", "keys": [reader.choice(live)]})

    offload()
    offload()
    while sum(op["op"] != "get" for op in ops) < n:
        read()
        r = rng.random()
        if r < 0.4 or len(live) < 3:
            offload()
        elif r < 0.55:
            k = rng.choice(live)
            live.remove(k)
            ops.append({"op": "remove", "keys": [k]})
        elif r < 0.7:
            ks = rng.sample(live, min(len(live), rng.randint(2, 3)))
            for k in ks:
                live.remove(k)
            ops.append({"op": "batch_remove", "keys": [*ks, make_key("never-stored", 5)]})
        elif r < 0.8:
            ops.append({"op": "delete_bucket_of", "key": rng.choice(live)})
        elif r < 0.92 or not evict:
            ops.append({"op": "compact", "ratio": rng.choice((0.01, 0.3, 0.5))})
        else:
            ops.append({"op": "evict", "high": 0.5, "low": 0.3})
    ops.append({"op": "get", "keys": [k for op in ops for k in op.get("keys", [])]})
    return ops


def ops_need(ops: list[dict]) -> set[str]:
    """The store methods a workload needs beyond the core API."""
    need = set()
    for op in ops:
        need |= {
            "remove": {"remove"},
            "batch_remove": {"batch_remove"},
            "compact": {"compact"},
            "evict": {"evict_to_watermark"},
            "settle": {"wait_for_eviction"},
            "load": {"submit_load"},
            "offload_group": {"offload_group"},
        }.get(op["op"], set())
    return need


class WrongBytes(AssertionError):
    pass


def run_ops(store: BucketStore, ops: list[dict], emit: Emit, start: int = 0) -> None:
    """Run ``ops`` from ``start``, emitting their events (evictions through
    :func:`report_evictions`)."""
    evict_kw = offload_takes_on_evict()
    current = report_evictions(store, emit)
    for i, op in enumerate(ops[start:], start):
        current[0] = i
        run_op(store, i, op, emit, evict_kw)


def report_evictions(store: BucketStore, emit: Emit) -> list[int]:
    """Emit every eviction of ``store``, the background evictor's too, as
    ``{"ev": "evict", "after": i, "keys": [...], "bg": bool}`` from a store
    listener: ``i`` is the operation running (or last run) when the keys
    left the index, which the caller keeps in the returned one-item list;
    ``bg`` says whether the evictor thread took them."""
    current = [0]
    if hasattr(store, "add_eviction_listener"):

        def evicted(keys: list[str]) -> None:
            background = threading.current_thread().name.startswith("kvbucket-evict")
            emit({"ev": "evict", "after": current[0], "keys": sorted(keys), "bg": background})

        store.add_eviction_listener(evicted)
    return current


def run_op(store: BucketStore, i: int, op: dict, emit: Emit, evict_kw: bool | None = None) -> Any:
    kind = op["op"]

    def on_evict(keys) -> None:
        emit({"ev": "evict", "i": i, "keys": sorted(keys), "bg": False})  # the caller's own eviction

    if kind == "offload":
        objects = {k: value_for(k) for k in op["keys"]}
        kwargs = {"on_evict": on_evict} if (offload_takes_on_evict() if evict_kw is None else evict_kw) else {}
        emit({"ev": "begin", "i": i})
        result = store.batch_offload(objects, **kwargs)
    elif kind == "offload_group":
        batches = [{k: value_for(k) for k in group} for group in op["groups"]]
        emit({"ev": "begin", "i": i})
        result = store.offload_group(batches, on_evict=on_evict)
    elif kind == "get":
        emit({"ev": "begin", "i": i})
        present = [k for k in op["keys"] if store.exists(k)]
        got = store.batch_get(present) if present else {}
        for k in present:
            if got[k] != value_for(k):
                emit({"ev": "wrong", "i": i, "key": k})
                raise WrongBytes(f"batch_get({k!r}) returned wrong bytes in the writer")
        result = len(present)
    elif kind == "load":
        emit({"ev": "begin", "i": i})
        present = [k for k in op["keys"] if store.exists(k)]
        buffers = {k: bytearray(len(value_for(k))) for k in present}
        handles = [store.submit_load({k: buffers[k]}) for k in present]
        for handle in handles:
            handle.wait()
        for handle in handles:
            handle.result()  # the first failed batch's error
        for k in present:
            if buffers[k] != value_for(k):
                emit({"ev": "wrong", "i": i, "key": k})
                raise WrongBytes(f"submit_load({k!r}) returned wrong bytes in the writer")
        result = len(present)
    elif kind == "remove":
        emit({"ev": "begin", "i": i})
        try:
            store.remove(op["keys"][0])
            result = list(op["keys"])
        except KeyNotFound:
            result = []
    elif kind == "batch_remove":
        emit({"ev": "begin", "i": i})
        flags = store.batch_remove(op["keys"])
        result = [k for k, f in zip(op["keys"], flags) if f]
    elif kind == "delete_bucket_of":
        key = op["key"]
        if not store.exists(key):
            emit({"ev": "begin", "i": i, "keys": []})
            result = None
        else:
            bucket = store.batch_query([key])[key].bucket_id
            emit({"ev": "begin", "i": i, "keys": sorted(store.bucket_keys(bucket)), "bucket": bucket})
            store.delete_bucket(bucket)
            result = bucket
    elif kind == "compact":
        emit({"ev": "begin", "i": i})
        result = store.compact(min_dead_ratio=op["ratio"])
    elif kind == "evict":
        emit({"ev": "begin", "i": i})
        result = sorted(store.evict_to_watermark(high=op["high"], low=op["low"], on_evict=on_evict))
    elif kind == "settle":
        emit({"ev": "begin", "i": i})
        store.wait_for_eviction()
        result = None
    else:
        raise ValueError(kind)
    emit({"ev": "done", "i": i, "result": result})
    return result


# ---------------------------------------------------------------------------
# what must be in the store after a crash
# ---------------------------------------------------------------------------


@dataclass
class Expectation:
    live: set[str] = field(default_factory=set)  # must be present, byte-exact
    gone: set[str] = field(default_factory=set)  # must be absent
    maybe: set[str] = field(default_factory=set)  # either, but exact when present
    max_acked_id: int = -1  # the next bucket id must be larger
    acked: int = 0  # acknowledged operations
    in_flight: int | None = None

    def all_keys(self) -> set[str]:
        return self.live | self.gone | self.maybe


def expectation(ops: list[dict], events: list[dict], *, acked_durable: bool = True) -> Expectation:
    """What the store must hold after a crash that came after ``events``.

    ``acked_durable``: acknowledged offloads and removals must have survived
    (kill -9 in any mode, power loss in strict mode); otherwise they may be
    lost (power loss in relaxed mode), but nothing may be served wrong.
    """
    done = {e["i"]: e.get("result") for e in events if e.get("ev") == "done"}
    begun: dict[int, dict] = {}
    for e in events:  # a retried operation begins twice: keep every key it touched
        if e.get("ev") == "begin":
            entry = begun.setdefault(e["i"], {"keys": []})
            entry["keys"] = sorted(set(entry["keys"]) | set(e.get("keys", [])))
    evicted: dict[int, list[str]] = {}  # on_evict of operation i: before its own effect
    evicted_after: dict[int, list[str]] = {}  # store listener: during or after operation i
    for e in events:
        if e.get("ev") == "evict":
            if "after" in e:
                evicted_after.setdefault(e["after"], []).extend(e["keys"])
            else:
                evicted.setdefault(e["i"], []).extend(e["keys"])
    exp = Expectation(acked=len(done))
    state: dict[str, str] = {}
    for i, op in enumerate(ops):
        for k in evicted.get(i, []):
            if state.get(k) == "live":
                state[k] = "maybe"
        keys = op.get("keys", [])
        if i in done:
            result = done[i]
            if op["op"] in ("offload", "offload_group"):
                for k in keys:
                    state[k] = "live" if acked_durable else "maybe"
                ids = [r for r in (result if isinstance(result, list) else [result]) if isinstance(r, int)]
                if ids and acked_durable:
                    exp.max_acked_id = max(exp.max_acked_id, *ids)
            elif op["op"] in ("remove", "batch_remove"):
                for k in result:
                    state[k] = "gone" if acked_durable else "maybe"
            elif op["op"] == "delete_bucket_of":
                for k in begun[i].get("keys", []):
                    state[k] = "gone" if acked_durable else "maybe"
        elif i in begun:
            exp.in_flight = i
            if op["op"] in ("offload", "offload_group"):
                for k in keys:
                    state[k] = "maybe"
            elif op["op"] in ("remove", "batch_remove"):
                for k in keys:
                    if state.get(k) == "live":
                        state[k] = "maybe"
            elif op["op"] == "delete_bucket_of":
                for k in begun[i].get("keys", []):
                    if state.get(k) == "live":
                        state[k] = "maybe"
        else:
            if op["op"] in ("offload", "offload_group"):
                for k in keys:
                    state.setdefault(k, "gone")
        for k in evicted_after.get(i, []):
            if state.get(k) == "live":
                state[k] = "maybe"
    for k, s in state.items():
        getattr(exp, s).add(k)
    return exp


# ---------------------------------------------------------------------------
# the checker
# ---------------------------------------------------------------------------


def _regular(full: str) -> bool:
    return os.path.isfile(full) and not os.path.islink(full)


def _meta_content_is_ours(full: str) -> bool:
    """docs/FORMAT.md: a meta is ours when it starts with the meta magic or
    is what a lost write leaves (empty, cut inside the magic, zero-filled)."""
    with open(full, "rb") as f:
        raw = f.read()
    return META_MAGIC.startswith(raw[: len(META_MAGIC)]) or raw.count(0) == len(raw)


def is_ours(path: str, name: str) -> bool:
    """A store file: one of our names on a regular file (a directory or a
    symlink that carries our name is foreign, and never touched), and for a
    bucket's meta and data file, a meta whose content is ours (a meta of
    another format makes both foreign)."""
    full = os.path.join(path, name)
    parsed = parse_name(name)
    if parsed is None or not _regular(full):
        return False
    bucket_id, kind = parsed
    meta = os.path.join(path, meta_name(bucket_id))
    return kind.name == "TMP" or not _regular(meta) or _meta_content_is_ours(meta)


def _entry_snapshot(full: str) -> object:
    if os.path.islink(full):
        return ("link", os.readlink(full))
    if os.path.isdir(full):
        return ("dir", sorted((n, _entry_snapshot(os.path.join(full, n))) for n in os.listdir(full)))
    if os.path.isfile(full):
        with open(full, "rb") as f:
            return ("file", f.read())
    return ("other", os.lstat(full).st_mode)


def snapshot_foreign(path: str) -> dict[str, object]:
    """Entries of ``path`` that are not the store's, with their content."""
    return {
        name: _entry_snapshot(os.path.join(path, name))
        for name in os.listdir(path)
        if not is_ours(path, name) and name not in (LOCK_NAME, QUARANTINE_DIR)
    }


def store_keys(store: BucketStore) -> list[str]:
    return [key for page in store.scan_meta() for key, _ in page]


def _files(path: str) -> dict[str, int]:
    out = {}
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full) and not os.path.islink(full):
            out[name] = os.path.getsize(full)
    return out


def index_files(store: BucketStore) -> set[str]:
    return {n for b in store.bucket_ids() for n in (data_name(b), meta_name(b))}


def dir_vs_index(path: str, store: BucketStore) -> list[str]:
    """Our files in ``path`` that the index does not account for, and the reverse."""
    ours = {n for n in os.listdir(path) if is_ours(path, n)}
    expected = index_files(store)
    problems = []
    if ours - expected:
        problems.append(f"files not accounted for by the index: {sorted(ours - expected)}")
    if expected - ours:
        problems.append(f"index buckets without files: {sorted(expected - ours)}")
    return problems


@dataclass
class CheckResult:
    failures: list[str] = field(default_factory=list)
    corruption_detected: int = 0
    keys_present: int = 0
    removed_files: int = 0


def check_recovered(
    path: str,
    exp: Expectation,
    *,
    config: dict | None = None,
    corruption_ok: bool = False,
    foreign: dict[str, object] | None = None,
    readonly_first: bool = True,
    post_ops: bool = True,
) -> CheckResult:
    """Open a crashed directory and check SPEC section 3's invariants.

    1. ``open()`` succeeds (a readonly open first changes nothing);
    2. every key of ``exp.live`` is present and byte-exact; none of
       ``exp.gone`` and no unknown key is present; every present key reads
       back exact (``CorruptionError`` counts as a failure unless
       ``corruption_ok``);
    3. the directory holds only LOCK, the foreign files (unchanged) and
       complete pairs for exactly the index's buckets; each key lives in one
       bucket; ``removed_files`` and ``freed_bytes + quarantined_bytes``
       match what left the listing;
    4. a second open removes nothing and sees the same store;
    5. a new bucket gets an id above every acknowledged one and reads back;
       a key removed after recovery stays removed across a reopen.
    """
    config = dict(config or {})
    res = CheckResult()
    fail = res.failures.append
    if foreign is None:
        foreign = snapshot_foreign(path)
    before = _files(path)

    if readonly_first:
        try:
            with BucketStore.open(path, readonly=True, **_ro(config)) as ro:
                _check_reads(ro, exp, res, corruption_ok, "readonly open: ", check_live=True)
        except KvBucketError as exc:
            fail(f"readonly open raised {exc!r}")
        if _files(path) != before:
            fail(f"readonly open changed the directory: {sorted(before)} -> {sorted(_files(path))}")

    try:
        store = BucketStore.open(path, **config)
    except Exception as exc:  # noqa: BLE001 - any exception is a failure
        fail(f"open() raised {exc!r}")
        return res
    try:
        report = store.recovery_report
        after = _files(path)
        gone_files = {n for n in before if n not in after and parse_name(n) is not None}  # regular files only
        reported = {os.path.basename(str(n)) for n in report.removed_files}
        res.removed_files = len(reported)
        if reported != gone_files:
            fail(f"removed_files {sorted(reported)} != files that left the directory {sorted(gone_files)}")
        if report.freed_bytes + report.quarantined_bytes != sum(before[n] for n in gone_files):
            fail(f"freed_bytes {report.freed_bytes} + quarantined_bytes {report.quarantined_bytes} != {sum(before[n] for n in gone_files)}")
        if report.quarantined and report.freed_bytes > sum(before[n] for n in gone_files if not os.path.exists(os.path.join(path, "quarantine", n))):
            fail(f"freed_bytes {report.freed_bytes} counts quarantined files")
        if any(parse_name(n) is None and n != LOCK_NAME for n in set(before) - set(after)):
            fail(f"open() removed foreign files {sorted(set(before) - set(after))}")
        res.failures += dir_vs_index(path, store)
        if snapshot_foreign(path) != foreign:
            fail("foreign files changed")
        if any(is_ours(path, n) and parse_name(n)[1].name == "TMP" for n in os.listdir(path)):
            fail("temporary file left after open()")
        keys = store_keys(store)
        if len(keys) != len(set(keys)):
            fail("scan_meta lists a key twice")
        by_bucket = [k for b in store.bucket_ids() for k in store.bucket_keys(b)]
        if sorted(by_bucket) != sorted(keys):
            fail("bucket_keys of all buckets differ from scan_meta (a key in two buckets?)")
        unknown = set(keys) - exp.all_keys()
        if unknown:
            fail(f"keys never written are present: {sorted(unknown)[:5]}")
        _check_reads(store, exp, res, corruption_ok, "", check_live=True)
        res.keys_present = len(keys)
        ids, key_set = store.bucket_ids(), set(keys)
    finally:
        store.close()

    if not post_ops or res.failures:
        return res
    try:
        _post_checks(path, config, exp, ids, key_set, res)
    except Exception as exc:  # noqa: BLE001 - any exception is a failure
        fail(f"using the recovered store raised {exc!r}")
    if snapshot_foreign(path) != foreign:
        fail("foreign files changed after the post-recovery writes")
    return res


def _ro(config: dict) -> dict:
    return {k: v for k, v in config.items() if k in ("verify_checksums", "io_mode", "io_threads")}


def _check_reads(store, exp: Expectation, res: CheckResult, corruption_ok: bool, where: str, check_live: bool) -> None:
    fail = res.failures.append
    for k in sorted(exp.all_keys()):
        present = store.exists(k)
        if k in exp.live and not present and check_live:
            fail(f"{where}acknowledged key {k!r} lost")
        if k in exp.gone and present:
            fail(f"{where}key {k!r} present but it was removed or never acknowledged nor written")
        if not present:
            continue
        try:
            got = store.batch_get([k])[k]
        except CorruptionError:
            if not corruption_ok:
                fail(f"{where}CorruptionError reading {k!r}")
            res.corruption_detected += 1
            continue
        if got != value_for(k):
            fail(f"{where}WRONG BYTES served for {k!r}")


def _post_checks(path: str, config: dict, exp: Expectation, ids: list[int], keys: set[str], res: CheckResult) -> None:
    fail = res.failures.append
    with BucketStore.open(path, **config) as store:
        if store.recovery_report.removed_files:
            fail(f"second open removed {store.recovery_report.removed_files}: recovery is not idempotent")
        if store.bucket_ids() != ids or set(store_keys(store)) != keys:
            fail("second open sees a different store")
        new_key = make_key("post-recovery", 4097)
        new_id = store.batch_offload({new_key: value_for(new_key)})
        floor = max([exp.max_acked_id, *ids])
        if new_id is None or new_id <= floor:
            fail(f"new bucket got id {new_id}, not above {floor} (acknowledged or existing)")
        if store.batch_get([new_key])[new_key] != value_for(new_key):
            fail("new bucket reads back wrong")
        victim = None
        if keys:
            victim = min(keys)
            store.remove(victim)
    with BucketStore.open(path, **config) as store:
        if store.recovery_report.removed_files:
            fail(f"open after post-recovery writes removed {store.recovery_report.removed_files}")
        if not store.exists(new_key):
            fail("bucket written after recovery lost on reopen")
        if victim is not None and store.exists(victim):
            fail(f"key {victim!r} removed after recovery came back")
        res.failures += dir_vs_index(path, store)


# ---------------------------------------------------------------------------
# a directory as a crash leaves it
# ---------------------------------------------------------------------------


def make_dirty(path: str) -> dict:
    """A directory as a crash could leave it, plus foreign files: two good
    buckets, one whose data file is short, one cut after its first object
    (recovery keeps that object: ``salvaged``, drops the other: ``cut``), an
    orphan data file, a meta without data, a leftover tmp, a corrupt meta
    with its data. Returns the keys by fate."""
    good = [make_key(f"base{i}", s) for i, s in enumerate((5000, 1, 9000, 0))]
    short = [make_key("short", 8000)]
    salvaged, cut = [make_key("salvaged", 3000)], [make_key("cut", 5000)]
    with BucketStore.open(path) as store:
        store.batch_offload({k: value_for(k) for k in good[:2]})
        b_short = store.batch_offload({k: value_for(k) for k in short})
        b_cut = store.batch_offload({k: value_for(k) for k in salvaged + cut})
        store.batch_offload({k: value_for(k) for k in good[2:]})
        top = max(store.bucket_ids())
    os.truncate(os.path.join(path, f"{b_short}.bucket"), 4000)
    os.truncate(os.path.join(path, f"{b_cut}.bucket"), 3000)  # no dead tail: compaction leaves it alone
    junk = {
        f"{top + 1}.bucket": b"orphan data" * 100,
        f"{top + 2}.meta": b"meta without data",
        f"{top + 3}.meta.tmp": b"half a meta",
        f"{top + 4}.meta": _noise(200, 1),
        f"{top + 4}.bucket": _noise(3000, 2),
        "05.meta": b"foreign",
        "x.bucket": b"foreign",
        "12.meta.tmp.bak": b"foreign",
    }
    for name, data in junk.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return {"good": good, "short": short, "salvaged": salvaged, "cut": cut}


def _noise(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def dirty_expect(fates: dict) -> Callable[[Expectation], None]:
    """What a directory from :func:`make_dirty` adds to an expectation."""

    def add(exp: Expectation) -> None:
        exp.live |= set(fates["good"]) | set(fates["salvaged"])
        exp.maybe |= set(fates["short"])
        exp.gone |= set(fates["cut"])

    return add


# ---------------------------------------------------------------------------
# the child process (kill -9 sweeps)
# ---------------------------------------------------------------------------


def read_events(ackpath: str) -> list[dict]:
    try:
        with open(ackpath, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return []
    events = []
    for line in raw.split(b"\n"):
        if not line:
            continue
        try:
            events.append(json.loads(line))
        except ValueError:  # a line cut by SIGKILL (random-delay test)
            break
    return events


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, HERE, env.get("PYTHONPATH", "")])
    return env


class ChildRunner:
    """Runs workload specs in child processes: forked from a pre-imported
    fork server (one long-lived ``crash_child.py --serve`` that imported
    kvbucket and numpy once and has no threads), or one fresh interpreter per
    run when ``KVBUCKET_CRASH_NOFORK=1``. ``run(spec)`` returns the child's
    exit code (137 = killed at its kill point)."""

    def __init__(self) -> None:
        self.fork = os.environ.get("KVBUCKET_CRASH_NOFORK", "") in ("", "0") and hasattr(os, "fork")
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def _server(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "crash_child.py"), "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=child_env(),
                text=True,
            )
        return self.proc

    def run(self, spec: dict) -> int:
        self.runs += 1
        if not self.fork:
            proc = subprocess.run(
                [sys.executable, os.path.join(HERE, "crash_child.py"), "--run", json.dumps(spec)],
                env=child_env(),
            )
            return proc.returncode
        server = self._server()
        assert server.stdin and server.stdout
        server.stdin.write(json.dumps(spec) + "\n")
        server.stdin.flush()
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"crash fork server died (exit {server.wait()})")
        return json.loads(line)["code"]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.proc = None


def fresh_dir(path: str) -> str:
    if os.path.lexists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def format_failures(failures: list[tuple[str, list[str]]], limit: int = 8) -> str:
    lines = [f"{len(failures)} failing case(s); first {min(limit, len(failures))}:"]
    for where, msgs in failures[:limit]:
        lines.append(f"- {where}")
        lines += [f"    {m}" for m in msgs[:6]]
    return "\n".join(lines)
