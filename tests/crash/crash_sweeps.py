"""The three sweeps: kill -9 points, power-loss states, injected faults.

Each returns ``(failures, stats)``: failures as ``(where, [messages])`` for
:func:`crash_harness.format_failures`, stats as the counts the tests record.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable

import crash_harness as H
import crash_power as P
from crash_fs import KILL_EXIT, FaultFS, RecordingFS
from kvbucket import BucketStore
from kvbucket.errors import KvBucketError

LIMIT_FIELDS = ("max_total_size", "max_physical_bytes", "total_keys_limit")


def check_config(config: dict) -> dict:
    """The configuration a recovery check opens with: the crashed one minus
    capacity limits (an open that evicts would hide what the check looks for)."""
    return {k: v for k, v in config.items() if k not in LIMIT_FIELDS}


def sample(points: list, budget: int, seed: int) -> list:
    """All of ``points`` in a full sweep; else ``budget`` of them (the first and
    last three always)."""
    if H.FULL or len(points) <= budget:
        return list(points)
    rng = random.Random(seed)
    keep = set(points[:3] + points[-3:])
    rest = [p for p in points if p not in keep]
    return sorted(keep | set(rng.sample(rest, budget - len(keep))))


# ---------------------------------------------------------------------------
# kill -9
# ---------------------------------------------------------------------------


def kill_points(calls: list[str]) -> list[tuple[int, str]]:
    points = []
    for n, kind in enumerate(calls, 1):
        points += [(n, "before"), (n, "after")]
        if kind == "pwritev":
            points.append((n, "torn"))
    return points


def kill_sweep(
    runner,
    tmp_path,
    ops: list[dict],
    config: dict,
    *,
    budget: int,
    seed: int = 0,
    prepare: Callable[[str], None] | None = None,
    base_expect: Callable[[H.Expectation], None] | None = None,
    wrap: str | None = None,
    stop_at_first: bool = False,
):
    """Run ``ops`` in a child killed at each sampled (call, mode) point and
    check the directory after each. ``prepare`` fills the directory first;
    ``base_expect`` adds what it holds to the expectation; ``wrap`` names a
    crash_fs wrapper class (a canary) for the child."""
    work = str(tmp_path / "store")
    ackpath = str(tmp_path / "acks")

    def start() -> None:
        H.fresh_dir(work)
        if prepare is not None:
            prepare(work)
        if os.path.exists(ackpath):
            os.unlink(ackpath)

    start()
    spec = {"path": work, "ackpath": ackpath, "config": config, "ops": ops, "kill_at": None, "wrap": wrap}
    code = runner.run(spec)
    events = H.read_events(ackpath)
    assert code == 0, f"uncrashed workload failed (exit {code}): {events[-1] if events else ''}"
    calls = next(e["calls"] for e in events if e["ev"] == "calls")
    points = kill_points(calls)
    chosen = sample(points, budget, seed)
    failures: list = []
    killed = completed = tried = 0
    for n, mode in chosen:
        start()
        foreign = H.snapshot_foreign(work)
        code = runner.run(dict(spec, kill_at=n, mode=mode))
        tried += 1
        events = H.read_events(ackpath)
        acked = sum(e["ev"] == "done" for e in events)
        where = f"kill {mode} call {n}/{len(calls)} ({calls[n - 1]}), {acked} ops acknowledged"
        if code not in (KILL_EXIT, 0):
            failures.append((where, [f"writer exited {code}: {events[-1].get('tb', events[-1]) if events else ''}"]))
            continue
        killed += code == KILL_EXIT
        completed += code == 0
        exp = H.expectation(ops, events, acked_durable=True)
        if base_expect is not None:
            base_expect(exp)
        res = H.check_recovered(work, exp, config=check_config(config), foreign=foreign)
        if res.failures:
            failures.append((where, res.failures))
            if stop_at_first:
                break
    stats = {"calls": len(calls), "kill_points_total": len(points), "kill_points_tried": tried, "killed": killed}
    if completed:
        stats["ran_to_completion"] = completed
    return failures, stats


# ---------------------------------------------------------------------------
# power loss
# ---------------------------------------------------------------------------


def record(
    directory: str,
    ops: list[dict],
    config: dict,
    *,
    canary: type | None = None,
    prepare: Callable[[str], None] | None = None,
) -> RecordingFS:
    """Run ``ops`` on ``directory`` through a RecordingFS (wrapped by ``canary``)."""
    H.fresh_dir(directory)
    if prepare is not None:
        prepare(directory)
    rec = RecordingFS(directory)
    fs = canary(rec) if canary is not None else rec
    store = BucketStore.open(directory, filesystem=fs, **config)
    rec.mark({"ev": "open"})
    H.run_ops(store, ops, rec.mark)
    store.close()
    rec.mark({"ev": "closed"})
    return rec


def powerloss_sweep(
    tmp_path,
    ops: list[dict],
    config: dict,
    *,
    point_budget: int,
    n_random: int,
    exhaustive_limit: int = 0,
    seed: int = 0,
    canary: type | None = None,
    prepare: Callable[[str], None] | None = None,
    base_expect: Callable[[H.Expectation], None] | None = None,
    stop_at_first: bool = False,
    post_ops: bool = True,
):
    """Record ``ops``, then check the disk states a power cut could leave at
    each sampled op boundary. Strict durability: acknowledged work must
    survive; relaxed: it may be lost, never served wrong, never leaked."""
    strict = config.get("durability", "strict") == "strict"
    rec = record(str(tmp_path / "recorded"), ops, config, canary=canary, prepare=prepare)
    points = list(P.crash_points(rec.base, rec.log))
    chosen = set(sample([p.k for p in points], point_budget, seed))
    rng = random.Random(seed)
    seen: set[bytes] = set()
    failures: list = []
    states = candidates = 0
    state_dir = str(tmp_path / "state")
    for point in points:
        if point.k not in chosen:
            continue
        exp = H.expectation(ops, point.events, acked_durable=strict)
        if base_expect is not None:
            base_expect(exp)
        for state in P.states_at(point, rng, n_random, exhaustive_limit):
            candidates += 1
            state.files = P.materialise(point, state.data_choice, state.dir_choice)
            fp = P.fingerprint(state.files, (sorted(exp.live), sorted(exp.gone), exp.max_acked_id))
            if fp in seen:
                continue
            seen.add(fp)
            states += 1
            if os.path.exists(state_dir):
                shutil.rmtree(state_dir)
            P.write_state(state_dir, state.files)
            res = H.check_recovered(state_dir, exp, config=check_config(config), corruption_ok=not strict, post_ops=post_ops)
            if res.failures:
                failures.append((state.describe(), res.failures))
                if stop_at_first:
                    break
        if failures and stop_at_first:
            break
    stats = {
        "logged_ops": rec.ops(),
        "crash_points_total": len(points),
        "crash_points_tried": len(chosen),
        "states_generated": candidates,
        "states_checked": states,
    }
    return failures, stats


# ---------------------------------------------------------------------------
# fault injection
# ---------------------------------------------------------------------------

SYNC_CALLS = {"fdatasync", "fsync", "fsync_dir"}
MUST_REPORT_OPS = {"offload", "remove", "batch_remove", "delete_bucket_of"}


def fault_run(
    directory: str,
    template: str | None,
    ops: list[dict],
    config: dict,
    kind: str,
    n: int | None,
    sticky: bool = False,
    base_expect: Callable[[H.Expectation], None] | None = None,
) -> tuple[list[str], FaultFS, list[str]]:
    """One run of ``ops`` with a fault at eligible call ``n``.

    Checks, besides the final recovery check: a failing call raises a
    KvBucketError; the failed operation is not visible; the directory holds
    nothing the index does not account for, right after the error; a sync
    error is never swallowed by a write or removal; the operation succeeds
    when retried; everything acknowledged reads back.
    Returns (failures, the FaultFS, names of the operations that raised).

    The store runs without background eviction unless ``config`` asks for
    it: a fault is charged to the operation that was running, and the
    evictor's thread would take some of them (its failures are logged and
    counted instead; tests/test_background_eviction.py checks that).
    """
    config = {"background_eviction": False, **config}
    fail: list[str] = []
    raised: list[str] = []
    if os.path.exists(directory):
        shutil.rmtree(directory)
    if template is not None:
        shutil.copytree(template, directory)
    else:
        os.makedirs(directory)
    foreign = H.snapshot_foreign(directory)
    fs = FaultFS(fail_at=n, kind=kind, sticky=sticky)
    events: list[dict] = []
    # a failed unlink cannot be undone: its files may stay until the next open
    tolerate_leftovers = False
    store = None
    try:
        store = BucketStore.open(directory, filesystem=fs, **config)
    except KvBucketError as exc:
        raised.append(f"open: {exc!r}")
    except Exception as exc:  # noqa: BLE001
        fail.append(f"open() raised {exc!r}, not a KvBucketError")
    if store is None:
        fs.disarm()
        try:
            store = BucketStore.open(directory, filesystem=fs, **config)
        except Exception as exc:  # noqa: BLE001
            fail.append(f"open() after a failed open() raised {exc!r}")
            return fail, fs, raised
    current = H.report_evictions(store, events.append)
    try:
        for i, op in enumerate(ops):
            current[0] = i
            before = len(fs.fired)
            try:
                H.run_op(store, i, op, events.append)
            except KvBucketError as exc:
                raised.append(f"{op['op']}: {exc!r}")
                unlink_failed = bool(fs.fired) and fs.fired[-1][1] == "unlink"
                tolerate_leftovers |= unlink_failed
                # a deletion that failed stays pending (counted in stats) until the next mutation
                pending = store.stats().pending_deletions > 0
                fail += _after_error(directory, store, op, i, events, leftovers_ok=unlink_failed or pending)
                fs.disarm()
                try:
                    H.run_op(store, i, op, events.append)
                except Exception as exc2:  # noqa: BLE001
                    fail.append(f"retry of op {i} {op['op']} raised {exc2!r}")
                    return fail, fs, raised
            except Exception as exc:  # noqa: BLE001
                fail.append(f"op {i} {op['op']} raised {exc!r}, not a KvBucketError")
                return fail, fs, raised
            else:
                swallowed = [c for _, c in fs.fired[before:] if c in SYNC_CALLS]
                if swallowed and op["op"] in MUST_REPORT_OPS:
                    fail.append(f"op {i} {op['op']} returned although its {swallowed[0]} failed (error swallowed)")
            if sticky and len(fs.fired) > before:
                fs.disarm()
        exp = H.expectation(ops, events, acked_durable=True)
        if base_expect is not None:
            base_expect(exp)
        fs.paused = True
        fail += _live_reads(store, exp)
        if not tolerate_leftovers:
            fail += H.dir_vs_index(directory, store)
        fs.paused = False
    finally:
        try:
            store.close()
        except KvBucketError as exc:
            raised.append(f"close: {exc!r}")
        except Exception as exc:  # noqa: BLE001
            fail.append(f"close() raised {exc!r}, not a KvBucketError")
    res = H.check_recovered(directory, exp, config=check_config(config), foreign=foreign, readonly_first=False)
    fail += res.failures
    if res.removed_files and not tolerate_leftovers:
        fail.append(f"reopen had to remove {res.removed_files} file(s): the failed call leaked them")
    return fail, fs, raised


def _after_error(directory: str, store: BucketStore, op: dict, i: int, events: list[dict], leftovers_ok: bool) -> list[str]:
    fail = []
    if any(e.get("ev") == "done" and e["i"] == i for e in events):
        fail.append(f"op {i} acknowledged and raised")
    if op["op"] == "offload":
        visible = [k for k in op["keys"] if store.exists(k)]
        if visible:
            fail.append(f"failed offload left keys visible: {visible}")
    if not leftovers_ok:
        fail += [f"right after the failed {op['op']}: {m}" for m in H.dir_vs_index(directory, store)]
    return fail


def _live_reads(store: BucketStore, exp: H.Expectation) -> list[str]:
    fail = []
    for k in sorted(exp.live):
        if not store.exists(k):
            fail.append(f"acknowledged key {k!r} missing in the running store")
        elif store.batch_get([k])[k] != H.value_for(k):
            fail.append(f"wrong bytes for {k!r} in the running store")
    fail.extend(f"removed or unwritten key {k!r} visible in the running store" for k in sorted(exp.gone) if store.exists(k))
    return fail


def fault_sweep(
    tmp_path, ops: list[dict], config: dict, kind: str, *, budget: int, seed: int = 0, template=None, sticky=False, base_expect=None
):
    """Fault at every (sampled) eligible call number of the workload."""
    directory = str(tmp_path / f"fault-{kind}")
    fail, fs, _ = fault_run(directory, template, ops, config, kind, None, base_expect=base_expect)
    assert not fail, f"the workload fails without faults: {fail}"
    total = len(fs.calls)
    chosen = sample(list(range(1, total + 1)), budget, seed)
    failures, raised_runs, fired_runs = [], 0, 0
    for n in chosen:
        fail, fs, raised = fault_run(directory, template, ops, config, kind, n, sticky, base_expect)
        fired_runs += bool(fs.fired)
        raised_runs += bool(raised)
        if fail:
            call = fs.fired[0][1] if fs.fired else "?"
            failures.append((f"{kind}{' sticky' if sticky else ''} at call {n}/{total} ({call}); raised: {raised}", fail))
    return failures, {"fault_points_total": total, "fault_points_tried": len(chosen), "fired": fired_runs, "raised": raised_runs}
