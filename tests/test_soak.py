"""Soak (issue 3): writers, verifying readers, a remover and an evictor run
together under a tight ``max_physical_bytes``.

Runs for ``KVBUCKET_SOAK_SECONDS`` (default 40, so about 45 s in CI). At the
end the directory's real usage is under the limit, every object that
``exists()`` reads back byte-exact, and every acknowledged object is either
still there or was reported evicted (by the store's eviction listener, which
sees the background evictor's evictions too) or removed. The figures (operation
counts, the largest overshoot of the limit seen right after a
``batch_offload`` returned) are printed and written to ``soak.json`` in the
test's tmp dir.

How the overshoot is measured: one writer takes a test-level lock
exclusively around ``batch_offload`` and the ``du`` scan that follows, so the
scan sees the directory exactly as that call left it. Every other mutating
call (a second writer, removal, eviction, compaction) takes the same lock
shared, so those still run concurrently with one another; readers take no
lock at all and race with everything.
"""

from __future__ import annotations

import json
import os
import random
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kvbucket import BucketStore
from kvbucket.errors import KeyNotFound
from storeutil import DeletionGate, value_for

KiB = 1024
MiB = 1 << 20

SOAK_SECONDS = float(os.environ.get("KVBUCKET_SOAK_SECONDS", "40"))
LIMIT = 24 * MiB
READERS = 3
RECENT = 400  # readers and the remover pick among the most recently written keys


def du(path: str | os.PathLike[str]) -> int:
    """Allocated bytes of ``path`` and everything below it, as ``du`` counts them."""
    total = os.lstat(path).st_blocks * 512
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # deleted while we walked (only in unlocked scans)
                continue
            total += du(entry.path) if stat.S_ISDIR(st.st_mode) else st.st_blocks * 512
    return total


class SharedExclusiveLock:
    """Many shared holders, or one exclusive holder. Turns alternate: while
    the exclusive side waits, new shared holders wait too, and after an
    exclusive turn the shared side that waited goes first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_shared = 0
        self._waiting_exclusive = 0
        self._last_exclusive = False

    def _shared_may_enter(self) -> bool:
        return not self._exclusive and (self._last_exclusive or not self._waiting_exclusive)

    def _exclusive_may_enter(self) -> bool:
        return not self._exclusive and self._shared == 0 and not (self._last_exclusive and self._waiting_shared)

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._waiting_shared += 1
            self._cond.wait_for(self._shared_may_enter)
            self._waiting_shared -= 1
            self._shared += 1
            self._last_exclusive = False
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting_exclusive += 1
            self._cond.wait_for(self._exclusive_may_enter)
            self._waiting_exclusive -= 1
            self._exclusive = True
            self._last_exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def size_of(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


def test_soak(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    deletions = DeletionGate()  # the background evictor deletes nothing while the measured writer scans
    store = BucketStore.open(
        directory, filesystem=deletions, eviction_policy="lru", max_physical_bytes=LIMIT, durability="relaxed", bucket_keys_limit=16
    )
    gate = SharedExclusiveLock()
    deadline = time.monotonic() + SOAK_SECONDS
    stop = threading.Event()
    errors: list[BaseException] = []
    counts: Counter[str] = Counter()
    overshoot = {"max": 0, "checks": 0, "max_du": 0}
    book = threading.Lock()
    written: list[str] = []  # acknowledged keys, in order
    evicted: set[str] = set()
    removed: set[str] = set()

    def on_evict(keys: list[str]) -> None:
        with book:
            assert evicted.isdisjoint(keys), "a key was evicted twice"
            evicted.update(keys)
            counts["on_evict_keys"] += len(keys)
            if threading.current_thread().name.startswith("kvbucket-evict"):
                counts["background_evicted_keys"] += len(keys)

    store.add_eviction_listener(on_evict)  # every eviction: the writes', the maintainer's and the background evictor's

    def running() -> bool:
        if time.monotonic() >= deadline:
            stop.set()
        return not stop.is_set()

    def worker(body: Callable[[random.Random], None], seed: str) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(seed)
            try:
                while running():
                    body(rng)
            except BaseException as exc:  # noqa: BLE001 - surfaced by the main thread
                errors.append(exc)
                stop.set()

        return run

    def make_batch(rng: random.Random, name: str) -> dict[str, bytes]:
        nkeys = rng.randint(1, 16)
        sizes = [rng.choice([1, 4095, 4096, 4097, rng.randint(1, 64 * KiB), rng.randint(64 * KiB, 512 * KiB)]) for _ in range(nkeys)]
        with book:
            counts[f"{name}_batches"] += 1
            n = counts[f"{name}_batches"]
        keys = [f"{name}.{n}/{j}-{size}" for j, size in enumerate(sizes)]
        return {key: value_for(key, size_of(key)) for key in keys}

    def acknowledge(batch: dict[str, bytes]) -> None:
        with book:
            written.extend(batch)
            counts["writes"] += 1
            counts["written_keys"] += len(batch)
            counts["written_bytes"] += sum(len(v) for v in batch.values())

    def measured_writer(rng: random.Random) -> None:
        batch = make_batch(rng, "m")
        with gate.exclusive():
            store.batch_offload(batch)
            with deletions.held:
                used = du(directory)
        acknowledge(batch)
        with book:
            overshoot["checks"] += 1
            overshoot["max"] = max(overshoot["max"], used - LIMIT)
            overshoot["max_du"] = max(overshoot["max_du"], used)

    def free_writer(rng: random.Random) -> None:
        batch = make_batch(rng, "f")
        with gate.shared():
            store.batch_offload(batch)
        acknowledge(batch)

    def reader(rng: random.Random) -> None:
        with book:
            if not written:
                return
            recent = written[-RECENT:]
            keys = list({rng.choice(recent) for _ in range(rng.randint(1, 8))})
        try:
            if rng.random() < 0.5:
                got = store.batch_get(keys)
            else:
                buffers = {key: bytearray(size_of(key)) for key in keys}
                store.batch_load(buffers)
                got = {key: bytes(buf) for key, buf in buffers.items()}
        except KeyNotFound:
            with book:
                counts["reads_missing"] += 1
            return
        for key in keys:
            assert got[key] == value_for(key, size_of(key)), f"wrong bytes for {key}"
        with book:
            counts["reads"] += 1
            counts["read_keys"] += len(keys)

    def remover(rng: random.Random) -> None:
        with book:
            if not written:
                return
            recent = written[-RECENT:]
            keys = list({rng.choice(recent) for _ in range(rng.randint(1, 6))})
        with gate.shared():
            results = store.batch_remove(keys)
        with book:
            counts["removes"] += 1
            for key, was in zip(keys, results):
                if was:
                    assert key not in removed and key not in evicted, f"{key} removed after it was already gone"
                    removed.add(key)
                    counts["removed_keys"] += 1

    def maintainer(rng: random.Random) -> None:
        action = rng.random()
        with gate.shared():
            if action < 0.6:
                keys = store.evict_to_watermark(high=0.85, low=0.6)
                with book:
                    counts["watermark_calls"] += 1
                    counts["watermark_keys"] += len(keys)
            elif action < 0.9:
                freed = store.compact(min_dead_ratio=0.5)
                with book:
                    counts["compactions"] += 1
                    counts["compacted_bytes_freed"] += freed
            else:
                stats = store.stats()
                assert stats.max_physical_bytes == LIMIT
                with book:
                    counts["stats_calls"] += 1

    threads = [
        threading.Thread(target=worker(measured_writer, "m"), name="measured-writer"),
        threading.Thread(target=worker(free_writer, "f"), name="free-writer"),
        threading.Thread(target=worker(remover, "x"), name="remover"),
        threading.Thread(target=worker(maintainer, "e"), name="maintainer"),
    ] + [threading.Thread(target=worker(reader, f"r{i}"), name=f"reader-{i}") for i in range(READERS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=SOAK_SECONDS + 240)
    elapsed = time.monotonic() - started
    hung = [t.name for t in threads if t.is_alive()]
    stop.set()
    assert not hung, f"threads did not finish: {hung}"
    if errors:
        raise errors[0]

    # -- the end state ------------------------------------------------------------
    assert store.wait_for_eviction(timeout=60)
    final_du = du(directory)
    present = {key for page in store.scan_meta() for key, _ in page}
    stats = store.stats()
    figures = {
        "seconds": round(elapsed, 1),
        "limit_bytes": LIMIT,
        "largest_overshoot_bytes": overshoot["max"],
        "overshoot_checks": overshoot["checks"],
        "largest_du_after_measured_write": overshoot["max_du"],
        "smallest_headroom_bytes": LIMIT - overshoot["max_du"],
        "final_du_bytes": final_du,
        "final_keys": len(present),
        "final_buckets": stats.buckets,
        "final_dead_bytes": stats.dead_bytes,
        "evicted_keys": len(evicted),
        "removed_keys": len(removed),
        "store_evicted_buckets": stats.evicted_buckets,
        "store_evicted_keys": stats.evicted_keys,
        **dict(sorted(counts.items())),
    }
    report = tmp_path / "soak.json"
    report.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nsoak figures ({report}):\n{json.dumps(figures, indent=2)}")

    assert counts["writes"] > 20 and counts["reads"] > 20 and counts["removed_keys"] > 0, figures
    assert len(evicted) > 0, "the limit was never reached: the soak proves nothing"
    assert overshoot["max"] <= 0, f"du exceeded max_physical_bytes by {overshoot['max']} bytes after a batch_offload"
    assert final_du <= LIMIT
    assert stats.physical_bytes == final_du
    assert stats.evicted_keys == len(evicted)
    acknowledged = set(written)
    assert present.isdisjoint(evicted) and present.isdisjoint(removed)
    assert acknowledged - present == evicted | removed, "an acknowledged object vanished without being evicted or removed"
    keys = sorted(present)
    for start in range(0, len(keys), 64):
        chunk = keys[start : start + 64]
        assert all(store.batch_exists(chunk))
        got = store.batch_get(chunk)
        for key in chunk:
            assert got[key] == value_for(key, size_of(key)), key
    store.close()

    # -- and after reopening ---------------------------------------------------------
    with BucketStore.open(directory, eviction_policy="lru", max_physical_bytes=LIMIT) as reopened:
        assert {key for page in reopened.scan_meta() for key, _ in page} == present
        assert reopened.recovery_report.removed_files == []
        for start in range(0, len(keys), 64):
            chunk = keys[start : start + 64]
            got = reopened.batch_get(chunk)
            assert all(got[key] == value_for(key, size_of(key)) for key in chunk)
        assert du(directory) <= LIMIT
        assert reopened.stats().physical_bytes == du(directory)
