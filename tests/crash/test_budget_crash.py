"""A shared budget with real processes: members writing at once never
exceed it by ``du``, and a member killed with SIGKILL at any step of a write
leaves a budget that the next member to join reconciles to the truth.

The processes are forked (``multiprocessing``); the kill is a real SIGKILL
the member sends itself from inside the FileSystem seam at the chosen step.
``du`` of all the member directories together is measured while this test
holds the budget's ``flock``: a member changes its reservation only under
it, so the directories cannot trade space in the middle of one measure.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import random
import signal
import stat

import pytest

from kvbucket import BucketStore
from kvbucket._core.budget import Budget, BudgetSlot, decode_budget
from kvbucket._core.fs import FileSystem
from kvbucket.errors import CapacityExceeded

KiB = 1024
BUDGET = 512 * KiB
MEMBER = {"eviction_policy": "fifo", "durability": "strict", "io_threads": 1}
FORK = multiprocessing.get_context("fork")


def du_now(path: str) -> int:
    """Allocated bytes of ``path`` and below, skipping entries that vanish
    (a member renames and deletes while it is measured); 0 when it is absent."""
    try:
        total = os.lstat(path).st_blocks * 512
        names = os.listdir(path)
    except FileNotFoundError:
        return 0
    for name in names:
        child = os.path.join(path, name)
        try:
            st = os.lstat(child)
        except FileNotFoundError:
            continue
        total += du_now(child) if stat.S_ISDIR(st.st_mode) else st.st_blocks * 512
    return total


def slots(budget: str) -> dict[str, BudgetSlot]:
    with open(budget, "rb") as f:
        decoded = decode_budget(f.read())
    assert decoded is not None
    return {slot.path: slot for slot in decoded.slots if slot is not None}


def create_budget(budget: str) -> None:
    """Make the budget file (as the first member to open does)."""
    handle = Budget.open(FileSystem(), budget, BUDGET, os.path.dirname(budget))
    with handle.locked():
        handle.admit()
    handle.close()


def skip_reservations() -> None:
    """The canary: a member that writes without reserving (it still publishes)."""

    def reserve(self: Budget, need: int, usage: object, evict_to: object) -> None:
        return None

    Budget.reserve = reserve  # type: ignore[method-assign]


def member(directory: str, budget: str, writes: int, seed: int, start: multiprocessing.synchronize.Event, canary: bool) -> None:
    """A rank: joins the budget and writes ``writes`` buckets of 4-48 KiB. A
    write refused because the others hold the space (they free it at their
    next write) is dropped, as a cache tier drops it."""
    if canary:
        skip_reservations()
    rng = random.Random(seed)
    start.wait()
    with BucketStore.open(directory, budget_path=budget, **MEMBER) as store:
        for i in range(writes):
            with contextlib.suppress(CapacityExceeded):
                store.batch_offload({f"{seed}-{i}": rng.randbytes(rng.randrange(4, 48) * KiB)})


def run_members(tmp_path, count: int, canary: bool) -> tuple[list[int], int]:
    """Run ``count`` members at once; the ``du`` totals seen under the
    budget's flock while they ran (and once after), and how many were taken."""
    budget = str(tmp_path / "BUDGET")
    create_budget(budget)
    dirs = [str(tmp_path / f"rank{rank}") for rank in range(count)]
    start = FORK.Event()
    procs = [FORK.Process(target=member, args=(d, budget, 40, rank, start, canary)) for rank, d in enumerate(dirs)]
    for proc in procs:
        proc.start()
    fd = os.open(budget, os.O_RDONLY)
    seen: list[int] = []
    try:
        start.set()
        while any(proc.is_alive() for proc in procs):
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                seen.append(sum(du_now(d) for d in dirs))
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
        for proc in procs:
            proc.join()
    assert [proc.exitcode for proc in procs] == [0] * count
    seen.append(sum(du_now(d) for d in dirs))
    return seen, len(seen)


def test_members_writing_at_once_never_exceed_the_budget(tmp_path) -> None:
    seen, measures = run_members(tmp_path, 3, canary=False)
    assert measures > 3
    assert max(seen) <= BUDGET, f"du of the members reached {max(seen)} > {BUDGET}"
    assert seen[-1] > BUDGET // 2  # they did fill it (and so evicted: they wrote about 3 MiB)


def test_the_check_catches_members_that_skip_the_reservation(tmp_path) -> None:
    """The canary: the same workload without reservations is caught."""
    seen, _ = run_members(tmp_path, 3, canary=True)
    assert max(seen) > BUDGET


class KillAt(FileSystem):
    """SIGKILLs its own process at ``point`` of the first write after :attr:`armed`:

    * ``reserved``: the reservation is published, the data file not created;
    * ``data_written``: the data file is written, the meta not yet;
    * ``committed``: the bucket is committed, the usage not yet published;
    * ``published``: the usage is published.
    """

    def __init__(self, point: str) -> None:
        self.point = point
        self.armed = False
        self.committed = False

    def _kill(self, point: str) -> None:
        if self.armed and self.point == point:
            os.kill(os.getpid(), signal.SIGKILL)

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        if flags & os.O_CREAT and path.endswith(".bucket"):
            self._kill("reserved")
        if path.endswith(".meta.tmp"):
            self._kill("data_written")
        return super().open(path, flags, mode)

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        self.committed = self.committed or (self.armed and dst.endswith(".meta"))

    def lock_wait(self, fd: int) -> None:
        if self.committed:
            self._kill("committed")
        super().lock_wait(fd)

    def unlock(self, fd: int) -> None:
        super().unlock(fd)
        if self.committed:
            self._kill("published")


def killed_member(directory: str, budget: str, point: str) -> None:
    """Writes three buckets, then dies at ``point`` of the fourth."""
    fs = KillAt(point)
    store = BucketStore.open(directory, filesystem=fs, budget_path=budget, **MEMBER)
    for i in range(4):
        fs.armed = i == 3
        store.batch_offload({f"k{i}": os.urandom(20 * KiB)})
    os._exit(3)  # not reached: the kill came first


@pytest.mark.parametrize("point", ["reserved", "data_written", "committed", "published"])
def test_a_member_killed_mid_write_is_reconciled_to_its_true_usage(tmp_path, point) -> None:
    budget = str(tmp_path / "BUDGET")
    create_budget(budget)
    dead = str(tmp_path / "rank0")
    proc = FORK.Process(target=killed_member, args=(dead, budget, point))
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    left = slots(budget)[dead]
    assert left.counted >= du_now(dead), "the dead member's slot no longer bounds its directory"
    if point in ("reserved", "data_written", "committed"):
        assert left.reserved > 0  # the kill came with a reservation outstanding
    with BucketStore.open(tmp_path / "rank1", budget_path=budget, **MEMBER) as other:
        reconciled = slots(budget)[dead]
        assert (reconciled.usage, reconciled.reserved, reconciled.wanted) == (du_now(dead), 0, 0)
        assert other.stats().budget_used_bytes == du_now(dead) + du_now(str(tmp_path / "rank1"))
    with BucketStore.open(dead, budget_path=budget, **MEMBER) as again:
        assert len(again) == (4 if point in ("committed", "published") else 3)
        assert slots(budget)[dead].counted == du_now(dead)
