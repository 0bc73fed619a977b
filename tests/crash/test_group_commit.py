"""Group commit: several buckets made durable with one directory fsync.

The power-loss and kill -9 sweeps run a workload of ``offload_group`` calls
(each between lone offloads): every acknowledged group survives whole, and
a group cut by the crash leaves each of its buckets wholly present or
cleanly dropped. The canaries (the four protocol breaks, plus a group
acknowledged before its directory fsync) are caught on the same workload.
The sync counts are checked through the FileSystem seam: for the store
call, and for an OffloadQueue whose workers join one commit group.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest

import crash_harness as H
import kvbucket._core.fs
from crash_fs import GROUP_CANARIES
from crash_sweeps import kill_sweep, powerloss_sweep
from kvbucket import BucketStore, KeyExists, OffloadQueue
from kvbucket.replay.iocount import CountingFileSystem

FULL_KW = {"point_budget": 10**9, "n_random": 24, "exhaustive_limit": 512}


def sweep_kw(n_random: int) -> dict:
    return FULL_KW if H.FULL else {"point_budget": 10**9, "n_random": n_random}


@pytest.mark.parametrize("io_mode", ["buffered", "direct", "auto"])
def test_powerloss_group_strict(tmp_path, crash_counts, small_writes, io_mode, monkeypatch):
    if io_mode == "auto":
        monkeypatch.setattr(kvbucket._core.fs, "WRITE_CHUNK", H.AUTO_WRITE_CHUNK)
    # auto: each group's second bucket is written aligned with O_DIRECT, the others packed
    ops = H.group_workload(3 if H.FULL else 2, seed=21, direct_every=2 if io_mode == "auto" else 0)
    config = {"durability": "strict", "io_mode": io_mode, "io_threads": 1}
    # auto's states hold large files: a sample of its crash points keeps the sweep's time
    kw = sweep_kw(4) if io_mode != "auto" or H.FULL else {"point_budget": 40, "n_random": 4}
    failures, stats = powerloss_sweep(tmp_path, ops, config, seed=4, **kw)
    crash_counts(**stats)
    H.check_strict_sweep(failures, stats, tmp_path, io_mode)


def test_powerloss_group_relaxed(tmp_path, crash_counts, small_writes):
    ops = H.group_workload(2, seed=22)
    failures, stats = powerloss_sweep(tmp_path, ops, {"durability": "relaxed", "io_threads": 1}, seed=5, **sweep_kw(4))
    crash_counts(**stats)
    assert not failures, H.format_failures(failures)


@pytest.mark.parametrize("canary", list(GROUP_CANARIES))
def test_group_canary_is_caught(tmp_path, crash_counts, small_writes, canary):
    ops = H.group_workload(2, seed=23)
    config = {"durability": "strict", "io_threads": 1}
    kw = sweep_kw(3)
    good, good_stats = powerloss_sweep(tmp_path / "good", ops, config, seed=6, **kw)
    assert not good, H.format_failures(good)
    bad, stats = powerloss_sweep(
        tmp_path / "canary", ops, config, seed=6, canary=GROUP_CANARIES[canary], stop_at_first=not H.FULL, **kw
    )
    crash_counts(correct_states=good_stats["states_checked"], canary_states=stats["states_checked"], canary_failures=len(bad))
    assert bad, f"the power-loss harness did not catch the {canary} canary on group commits in {stats['states_checked']} states"


@pytest.mark.parametrize("durability", ["strict", "relaxed"])
def test_kill9_group_sweep(runner, tmp_path, crash_counts, durability):
    ops = H.group_workload(3 if H.FULL else 2, seed=24)
    config = {"durability": durability, "io_threads": 1}
    failures, stats = kill_sweep(runner, tmp_path, ops, config, budget=10**6, seed=7)
    crash_counts(**stats)
    assert stats["killed"] > 0
    assert not failures, H.format_failures(failures)


class SyncCountingFS(CountingFileSystem):
    """Counts the sync calls (``syncs``); once ``armed``, holds the first data write until ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def pwritev(self, fd: int, buffers, offset: int) -> int:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait()
        return super().pwritev(fd, buffers, offset)


def batch(tag: str, n: int = 2) -> dict[str, bytes]:
    return {H.make_key(f"{tag}.{i}", 3000): H.value_for(H.make_key(f"{tag}.{i}", 3000)) for i in range(n)}


@pytest.mark.parametrize("n", [1, 2, 5])
def test_group_of_n_buckets_syncs_the_directory_once(tmp_path, n):
    fs = SyncCountingFS()
    with BucketStore.open(tmp_path / "s", filesystem=fs, durability="strict") as store:
        fs.syncs.clear()
        ids = store.offload_group([batch(f"b{i}") for i in range(n)])
        assert fs.syncs == Counter(fdatasync=n, fsync=n, fsync_dir=1)
        assert len(set(ids)) == n
        for i in range(n):
            assert store.batch_get(list(batch(f"b{i}"))) == batch(f"b{i}")
    with BucketStore.open(tmp_path / "s") as reopened:
        assert len(reopened) == 2 * n


def test_separate_offloads_sync_the_directory_each(tmp_path):
    fs = SyncCountingFS()
    with BucketStore.open(tmp_path / "s", filesystem=fs, durability="strict") as store:
        fs.syncs.clear()
        for i in range(3):
            store.batch_offload(batch(f"b{i}"))
        assert fs.syncs == Counter(fdatasync=3, fsync=3, fsync_dir=3)


def test_group_skips_and_refuses_duplicates_across_its_buckets(tmp_path):
    with BucketStore.open(tmp_path / "s", durability="strict") as store:
        first = batch("a")
        store.batch_offload(first)
        ids = store.offload_group([first, batch("b"), batch("b")], on_duplicate="skip")
        assert ids[0] is None and ids[2] is None and isinstance(ids[1], int)
        with pytest.raises(KeyExists):
            store.offload_group([batch("c"), batch("c")])
        assert not any(store.batch_exists(list(batch("c"))))


def test_queue_workers_join_one_commit_group(tmp_path):
    """While one worker commits, the buckets the other three take join the
    next commit group: 4 buckets, 2 directory fsyncs."""
    fs = SyncCountingFS()
    with BucketStore.open(tmp_path / "s", filesystem=fs, durability="strict") as store:
        with OffloadQueue(store, workers=4) as queue:
            fs.syncs.clear()
            fs.armed = True
            try:
                futures = queue.put_batch(batch("first"))
                assert fs.entered.wait(10)
                for i in range(3):
                    futures.update(queue.put_batch(batch(f"joined{i}")))
                with queue._cond:
                    assert queue._cond.wait_for(lambda: len(getattr(queue, "_joining", ())) == 3, timeout=10)
            finally:
                fs.release.set()  # a failed check must not leave the first commit blocked
            queue.flush()
            assert all(f.result(timeout=10) is None for f in futures.values())
        assert fs.syncs == Counter(fdatasync=4, fsync=4, fsync_dir=2)
        assert len(store) == 8
