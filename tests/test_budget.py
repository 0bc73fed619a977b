"""The shared physical budget: its file format, what a member refuses, and
several members in one process (eviction of their own buckets, requests to
the others, the size rule). Multi-process and kill -9 tests are in
tests/crash/test_budget_crash.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvbucket import BucketConfig, BucketStore
from kvbucket._core.budget import (
    SECTOR,
    SLOT_SIZE,
    BudgetSlot,
    decode_budget,
    encode_header,
    encode_member,
    encode_numbers,
)
from kvbucket._core.fs import FileSystem
from kvbucket.errors import CapacityExceeded, ForeignEntry, InvalidArgument
from storeutil import du, snapshot

KiB = 1024
BUDGET = 512 * KiB
MEMBER = {"eviction_policy": "fifo", "durability": "relaxed", "io_threads": 1}


def budget_file(slots: list[BudgetSlot | None], size: int = BUDGET) -> bytes:
    raw = bytearray(encode_header(size).ljust(SECTOR, b"\0"))
    for slot in slots:
        raw += bytes(SLOT_SIZE) if slot is None else encode_member(slot).ljust(SECTOR, b"\0") + encode_numbers(slot).ljust(SECTOR, b"\0")
    return bytes(raw)


def slots_of(path: Path) -> dict[str, BudgetSlot]:
    decoded = decode_budget(path.read_bytes())
    assert decoded is not None
    return {slot.path: slot for slot in decoded.slots if slot is not None}


def fill(store: BucketStore, prefix: str, count: int, size: int = 24 * KiB) -> None:
    for i in range(count):
        store.batch_offload({f"{prefix}{i}": os.urandom(size)})


# -- the file format -------------------------------------------------------------
def test_a_budget_file_round_trips() -> None:
    a = BudgetSlot(5, 77, "/nvme/kv/rank0", usage=123456, reserved=4096, wanted=8192)
    b = BudgetSlot(5, 78, "/nvme/kv/rank1", usage=9)
    decoded = decode_budget(budget_file([a, None, b], size=3 << 40))
    assert decoded is not None
    assert decoded.size == 3 << 40
    assert decoded.slots == [a, None, b]


def test_blank_budget_files_are_new_ones() -> None:
    for raw in (b"", bytes(4096), encode_header(BUDGET)[:5]):
        assert decode_budget(raw) is None


def test_a_damaged_header_or_a_foreign_file_is_refused() -> None:
    raw = bytearray(budget_file([]))
    raw[17] ^= 1  # inside the budget size: the CRC no longer matches
    with pytest.raises(ValueError, match="damaged"):
        decode_budget(bytes(raw))
    with pytest.raises(ValueError, match="magic"):
        decode_budget(b"[kvbucket]\npath = 'x'\n")


def test_a_damaged_member_record_frees_the_slot_and_damaged_numbers_ask_for_a_measure() -> None:
    slot = BudgetSlot(1, 2, "/d/r0", usage=100)
    raw = bytearray(budget_file([slot, slot]))
    raw[SECTOR + 20] ^= 1  # first slot's membership record
    raw[SECTOR + SLOT_SIZE + SECTOR + 10] ^= 1  # second slot's numbers record
    decoded = decode_budget(bytes(raw))
    assert decoded is not None
    assert decoded.slots[0] is None
    second = decoded.slots[1]
    assert second is not None and second.path == "/d/r0" and second.usage == -1


# -- what a member refuses, changing nothing ---------------------------------------
def test_a_foreign_budget_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    budget = tmp_path / "BUDGET"
    budget.write_bytes(b"someone else's notes\n")
    before = snapshot(tmp_path)
    with pytest.raises(ForeignEntry, match="not a kvbucket budget file"):
        BucketStore.open(tmp_path / "r0", budget_path=budget, budget_bytes=BUDGET)
    assert snapshot(tmp_path) == before


def test_a_link_as_budget_file_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    with BucketStore.open(tmp_path / "r0", budget_path=real, budget_bytes=BUDGET):
        pass
    (tmp_path / "BUDGET").symlink_to(real)
    before = snapshot(tmp_path)
    with pytest.raises(ForeignEntry, match="a link"):
        BucketStore.open(tmp_path / "r1", budget_path=tmp_path / "BUDGET", budget_bytes=BUDGET)
    assert snapshot(tmp_path) == before


class OtherDevice(FileSystem):
    """Reports the budget file's folder (and the file) on another device than the stores."""

    def __init__(self, budget_dir: str) -> None:
        self.budget_dir = budget_dir

    def stat(self, path: str) -> os.stat_result:
        st = super().stat(path)
        if os.path.abspath(path).startswith(self.budget_dir):
            fields = list(st)
            fields[2] += 1  # st_dev
            return os.stat_result(fields)
        return st


def test_a_budget_file_on_another_file_system_is_refused(tmp_path: Path) -> None:
    (tmp_path / "budgets").mkdir()
    before = snapshot(tmp_path)
    fs = OtherDevice(str(tmp_path / "budgets"))
    with pytest.raises(ForeignEntry, match="another file system"):
        BucketStore.open(tmp_path / "r0", filesystem=fs, budget_path=tmp_path / "budgets" / "BUDGET", budget_bytes=BUDGET)
    assert snapshot(tmp_path) == before


def test_a_missing_budget_file_needs_a_size(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="give budget_bytes"):
        BucketStore.open(tmp_path / "r0", budget_path=tmp_path / "BUDGET")
    assert list(tmp_path.iterdir()) == []


# -- the setting --------------------------------------------------------------------
def test_the_setting_comes_from_every_source(tmp_path: Path) -> None:
    env = BucketConfig.from_env({"KVBUCKET_PATH": "kv/r0", "KVBUCKET_BUDGET_PATH": "kv/BUDGET", "KVBUCKET_BUDGET_BYTES": "3500G"}).validated()
    assert env.budget_path == Path("kv/BUDGET") and env.budget_bytes == 3500 << 30
    toml = tmp_path / "kvbucket.toml"
    toml.write_text('path = "kv/r1"\nbudget_path = "kv/BUDGET"\nbudget_bytes = "1T"\n')
    assert BucketConfig.from_file(toml).validated().budget_bytes == 1 << 40
    assert BucketConfig(path="kv/r2").validated().budget_path == ""
    with pytest.raises(InvalidArgument, match="budget_bytes needs budget_path"):
        BucketConfig(path="kv/r3", budget_bytes="1G").validated()
    with pytest.raises(InvalidArgument, match="budget_bytes"):
        BucketConfig(path="kv/r3", budget_path="B", budget_bytes="lots").validated()


# -- members in one process ----------------------------------------------------------
def test_members_stay_within_the_budget_by_evicting_their_own_buckets(tmp_path: Path) -> None:
    budget = tmp_path / "BUDGET"
    with (
        BucketStore.open(tmp_path / "r0", budget_path=budget, budget_bytes=BUDGET, **MEMBER) as r0,
        BucketStore.open(tmp_path / "r1", budget_path=budget, **MEMBER) as r1,
    ):
        for i in range(30):
            fill(r0, f"a{i}-", 1)
            fill(r1, f"b{i}-", 1, size=16 * KiB)
            assert du(tmp_path / "r0") + du(tmp_path / "r1") <= BUDGET
        assert r0.stats().evicted_buckets > 0 and r1.stats().evicted_buckets > 0
        stats = r0.stats()
        assert stats.budget_bytes == BUDGET
        assert stats.budget_used_bytes == r0.stats().physical_bytes + r1.stats().physical_bytes


def test_a_member_whose_own_buckets_are_not_enough_asks_the_holder(tmp_path: Path) -> None:
    """r0 fills the budget; r1, empty, cannot make room by itself: it is
    refused, naming r0, and r0's next write frees room for it too."""
    budget = tmp_path / "BUDGET"
    with (
        BucketStore.open(tmp_path / "r0", budget_path=budget, budget_bytes=BUDGET, **MEMBER) as r0,
        BucketStore.open(tmp_path / "r1", budget_path=budget, **MEMBER) as r1,
    ):
        fill(r0, "a", 40)
        with pytest.raises(CapacityExceeded, match=str(tmp_path / "r0")):
            r1.batch_offload({"b": os.urandom(64 * KiB)})
        assert slots_of(budget)[str(tmp_path / "r1")].wanted > 0
        evicted = r0.stats().evicted_buckets
        fill(r0, "again", 1)
        assert r0.stats().evicted_buckets > evicted + 1  # its own write alone needed one
        r1.batch_offload({"b": os.urandom(64 * KiB)})
        assert slots_of(budget)[str(tmp_path / "r1")].wanted == 0
        assert du(tmp_path / "r0") + du(tmp_path / "r1") <= BUDGET


def test_without_an_eviction_policy_a_full_budget_refuses_the_write(tmp_path: Path) -> None:
    budget = tmp_path / "BUDGET"
    with BucketStore.open(tmp_path / "r0", budget_path=budget, budget_bytes=BUDGET, eviction_policy="none") as r0:
        with pytest.raises(CapacityExceeded, match="budget"):
            fill(r0, "a", 40)
        assert du(tmp_path / "r0") <= BUDGET
        assert slots_of(budget)[str(tmp_path / "r0")].reserved == 0


def test_a_changed_size_applies_only_when_no_other_member_runs(tmp_path: Path) -> None:
    budget = tmp_path / "BUDGET"
    with BucketStore.open(tmp_path / "r0", budget_path=budget, budget_bytes=BUDGET, **MEMBER):
        with pytest.raises(InvalidArgument, match=f"budget_bytes={BUDGET}"):
            BucketStore.open(tmp_path / "r1", budget_path=budget, budget_bytes=2 * BUDGET, **MEMBER)
        assert not (tmp_path / "r1").exists()
    with BucketStore.open(tmp_path / "r1", budget_path=budget, budget_bytes=2 * BUDGET, **MEMBER) as r1:
        assert r1.stats().budget_bytes == 2 * BUDGET
        assert decode_budget(budget.read_bytes()).size == 2 * BUDGET  # type: ignore[union-attr]


def test_a_new_member_that_does_not_fit_creates_nothing(tmp_path: Path) -> None:
    budget = tmp_path / "BUDGET"
    with BucketStore.open(tmp_path / "r0", budget_path=budget, budget_bytes=64 * KiB, eviction_policy="none") as r0:
        with pytest.raises(CapacityExceeded):
            fill(r0, "a", 10, size=12 * KiB)
        with pytest.raises(CapacityExceeded, match="budget"):
            BucketStore.open(tmp_path / "r1", budget_path=budget)
        assert not (tmp_path / "r1").exists()


def test_a_removed_member_directory_leaves_the_budget(tmp_path: Path) -> None:
    budget = tmp_path / "BUDGET"
    with BucketStore.open(tmp_path / "r0", budget_path=budget, budget_bytes=BUDGET, **MEMBER) as r0:
        fill(r0, "a", 3)
    for name in os.listdir(tmp_path / "r0"):
        os.unlink(tmp_path / "r0" / name)
    os.rmdir(tmp_path / "r0")
    with BucketStore.open(tmp_path / "r1", budget_path=budget, **MEMBER):
        assert list(slots_of(budget)) == [str(tmp_path / "r1")]


def test_a_readonly_store_ignores_the_budget(tmp_path: Path) -> None:
    budget = tmp_path / "BUDGET"
    with BucketStore.open(tmp_path / "r0", budget_path=budget, budget_bytes=BUDGET, **MEMBER) as r0:
        fill(r0, "a", 2)
    before = budget.read_bytes()
    with BucketStore.open(tmp_path / "r0", readonly=True, budget_path=budget) as reader:
        assert reader.stats().budget_bytes == 0
    assert budget.read_bytes() == before


def test_a_replaced_member_directory_is_counted_once(tmp_path: Path) -> None:
    """The slot of a directory that was removed and made again at the same
    path is dropped when the new one joins: the new measure counts it."""
    budget = tmp_path / "BUDGET"
    with BucketStore.open(tmp_path / "r0", budget_path=budget, budget_bytes=BUDGET, **MEMBER) as r0:
        fill(r0, "a", 3)
    os.rename(tmp_path / "r0", tmp_path / "old")
    with BucketStore.open(tmp_path / "r0", budget_path=budget, **MEMBER) as r0:
        fill(r0, "b", 1)
        slots = decode_budget(budget.read_bytes()).slots  # type: ignore[union-attr]
        assert [slot.path for slot in slots if slot is not None] == [str(tmp_path / "r0")]
        assert r0.stats().budget_used_bytes == du(tmp_path / "r0")


def test_engine_configs_take_the_budget_keys() -> None:
    from kvbucket.integrations._common import store_options

    options = store_options({"budget_path": "/nvme/kv/BUDGET", "budget_bytes": "3300G"}, "an engine's extra config")
    assert options == {"budget_path": Path("/nvme/kv/BUDGET"), "budget_bytes": 3300 << 30}


def test_a_refused_opener_of_a_live_members_directory_leaves_its_slot_alone(tmp_path: Path) -> None:
    """A second writer of a member's directory is refused (StoreLocked) and
    does not take the live member's slot for a dead one's (its reservation
    and numbers stay)."""
    from kvbucket.errors import StoreLocked

    budget = tmp_path / "BUDGET"
    with BucketStore.open(tmp_path / "r0", budget_path=budget, budget_bytes=BUDGET, **MEMBER) as r0:
        fill(r0, "a", 2)
        raw = bytearray(budget.read_bytes())
        slot = slots_of(budget)[str(tmp_path / "r0")]
        slot.reserved = 4096  # as while a write is in flight
        raw[2 * SECTOR : 2 * SECTOR + SECTOR] = encode_numbers(slot).ljust(SECTOR, b"\0")
        budget.write_bytes(bytes(raw))
        with pytest.raises(InvalidArgument, match="run with it"):  # re-measures the dead members first
            BucketStore.open(tmp_path / "r0", budget_path=budget, budget_bytes=2 * BUDGET, **MEMBER)
        with pytest.raises(StoreLocked):
            BucketStore.open(tmp_path / "r0", budget_path=budget, **MEMBER)
        assert slots_of(budget)[str(tmp_path / "r0")].reserved == 4096


def test_removal_compaction_and_deletion_publish_the_usage(tmp_path: Path) -> None:
    budget = tmp_path / "BUDGET"
    with BucketStore.open(tmp_path / "r0", budget_path=budget, budget_bytes=BUDGET, **MEMBER) as r0:
        r0.batch_offload({f"k{i}": os.urandom(8 * KiB) for i in range(8)})
        r0.batch_offload({f"j{i}": os.urandom(8 * KiB) for i in range(8)})
        for change in (
            lambda: r0.batch_remove([f"k{i}" for i in range(6)]),
            lambda: r0.batch_remove([f"j{i}" for i in range(6)]),
            lambda: r0.compact(0.5),
            lambda: r0.delete_bucket(r0.bucket_ids()[0]),
        ):
            change()
            slot = slots_of(budget)[str(tmp_path / "r0")]
            assert (slot.usage, slot.reserved) == (du(tmp_path / "r0"), 0)
        assert len(r0) == 0
