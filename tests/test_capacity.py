"""Capacity (issue 3): limits, eviction policies, two-phase eviction, watermarks,
stats and the capacity environment names.

Physical usage is always checked against our own ``du``-style scan
(:func:`du`: ``st_blocks * 512`` of the directory and everything below it,
``os.lstat``, links not followed), never against the store's own numbers.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from kvbucket import BucketConfig, BucketStore
from kvbucket._core.fs import FileSystem
from kvbucket.errors import CapacityExceeded, InvalidArgument
from storeutil import du, snapshot, value_for

# Foreground eviction, step by step; the background evictor is tested on its own.
pytestmark = pytest.mark.usefixtures("foreground_eviction")

KiB = 1024

# -- helpers -------------------------------------------------------------------
def live(store: BucketStore) -> dict[str, Any]:
    """Every live key with its location, in bucket order."""
    return {key: meta for page in store.scan_meta() for key, meta in page}


def state(store: BucketStore) -> tuple[dict[str, str], Any, dict[str, Any]]:
    """What must not change when an operation is refused: the files (names and
    bytes), the stats and the index."""
    return snapshot(store.path), store.stats(), live(store)


def put(store: BucketStore, name: str, nkeys: int, size: int, **kwargs: Any) -> list[str]:
    """Write one bucket of ``nkeys`` objects of ``size`` bytes; return its keys."""
    keys = [f"{name}/{i}" for i in range(nkeys)]
    store.batch_offload({key: value_for(key, size) for key in keys}, **kwargs)
    return keys


def assert_readable(store: BucketStore, keys: list[str], size: int | None = None) -> None:
    """Every key reads back exactly (size taken from the index when not given)."""
    if not keys:
        return
    sizes = {key: store.batch_query([key])[key].size if size is None else size for key in keys}
    got = store.batch_get(keys)
    for key in keys:
        assert got[key] == value_for(key, sizes[key]), key


class Recorder:
    """An ``on_evict`` that records each call."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, keys: list[str]) -> None:
        self.calls.append(list(keys))
        if self.fail is not None:
            raise self.fail

    @property
    def keys(self) -> list[str]:
        return [key for call in self.calls for key in call]


LIMIT_KINDS = ("logical", "physical", "keys")


def limit_fields(kind: str, amount: int) -> dict[str, int]:
    return {"logical": {"max_total_size": amount}, "physical": {"max_physical_bytes": amount}, "keys": {"total_keys_limit": amount}}[kind]


def usage_of(store: BucketStore, kind: str) -> int:
    """The usage a limit of ``kind`` bounds, measured independently where possible."""
    if kind == "physical":
        return du(store.path)
    stats = store.stats()
    return stats.logical_bytes if kind == "logical" else stats.keys


# -- policy strings --------------------------------------------------------------
@pytest.mark.parametrize(
    "text, policy", [("none", "none"), ("NONE", "none"), ("Fifo", "fifo"), ("FIFO", "fifo"), ("lru", "lru"), ("LrU", "lru"), ("2Q", "2q")]
)
def test_policy_is_parsed_case_insensitively(store_dir: Path, text: str, policy: str) -> None:
    assert BucketConfig(path=store_dir, eviction_policy=text).validated().eviction_policy == policy  # type: ignore[arg-type]
    with BucketStore.open(store_dir, eviction_policy=text, max_total_size=2000) as store:
        assert store.config.eviction_policy == policy
        put(store, "a", 1, 2000)
        if policy == "none":
            with pytest.raises(CapacityExceeded):
                put(store, "b", 1, 1000)
        else:  # the parsed policy really evicts
            put(store, "b", 1, 1000)
            assert not store.exists("a/0")


@pytest.mark.parametrize("text", ["random", "lfu", "", "no", "fifo-lru", "disabled"])
def test_unknown_policy_raises_invalid_argument(store_dir: Path, text: str) -> None:
    with pytest.raises(InvalidArgument, match="eviction_policy"):
        BucketStore.open(store_dir, eviction_policy=text, max_total_size=1000)
    with pytest.raises(InvalidArgument, match="eviction_policy"):
        BucketConfig.from_env({"MOONCAKE_OFFLOAD_BUCKET_EVICTION_POLICY": text}, path=store_dir).validated()
    assert not (store_dir / "LOCK").exists(), "a rejected config must not open (or create) the store"


# -- victim order ----------------------------------------------------------------
def test_fifo_evicts_oldest_written_bucket_first_and_ignores_reads(store_dir: Path) -> None:
    with BucketStore.open(store_dir, eviction_policy="fifo", max_total_size=4000) as store:
        b = [put(store, f"b{i}", 2, 500) for i in range(4)]
        store.batch_get(b[0])  # reads do not matter to FIFO
        store.batch_load({b[0][1]: bytearray(500)})
        evicted = Recorder()
        n0 = put(store, "n0", 2, 500, on_evict=evicted)
        assert evicted.calls == [b[0]]
        evicted = Recorder()
        n1 = put(store, "n1", 2, 1000, on_evict=evicted)  # needs two buckets' room
        assert len(evicted.calls) == 1 and sorted(evicted.calls[0]) == sorted(b[1] + b[2])
        assert store.batch_exists(b[0] + b[1] + b[2]) == [False] * 6
        assert_readable(store, b[3] + n0, 500)
        assert_readable(store, n1, 1000)


def test_fifo_order_survives_reopen(store_dir: Path) -> None:
    with BucketStore.open(store_dir, eviction_policy="fifo", max_total_size=3000) as store:
        b = [put(store, f"b{i}", 1, 1000) for i in range(3)]
    with BucketStore.open(store_dir, eviction_policy="fifo", max_total_size=3000) as store:
        order = []
        for i in range(4):
            evicted = Recorder()
            put(store, f"n{i}", 1, 1000, on_evict=evicted)
            order.append(evicted.keys)
        assert order == [b[0], b[1], b[2], ["n0/0"]]


def test_lru_evicts_least_recently_read_or_written_first(store_dir: Path) -> None:
    with BucketStore.open(store_dir, eviction_policy="lru", max_total_size=4000) as store:
        b = [put(store, f"b{i}", 2, 500) for i in range(4)]
        store.batch_get([b[1][0]])  # batch_get counts as a read
        store.batch_load({b[0][1]: bytearray(500)})  # and so does batch_load
        # recency now, oldest first: b2, b3 (writes), b1, b0 (reads)
        order = []
        for i in range(5):
            evicted = Recorder()
            put(store, f"n{i}", 2, 500, on_evict=evicted)
            assert len(evicted.calls) == 1
            order.append(evicted.calls[0])
        assert order == [b[2], b[3], b[1], b[0], ["n0/0", "n0/1"]]


@pytest.mark.parametrize("probe", ["exists", "batch_exists", "batch_query"])
def test_lru_metadata_lookups_are_not_reads(store_dir: Path, probe: str) -> None:
    with BucketStore.open(store_dir, eviction_policy="lru", max_total_size=3000) as store:
        b = [put(store, f"b{i}", 1, 1000) for i in range(3)]
        for _ in range(3):
            if probe == "exists":
                assert store.exists(b[0][0])
            elif probe == "batch_exists":
                assert store.batch_exists(b[0]) == [True]
            else:
                assert set(store.batch_query(b[0])) == set(b[0])
        evicted = Recorder()
        put(store, "n", 1, 1000, on_evict=evicted)
        assert evicted.calls == [b[0]]


def test_lru_recovered_buckets_are_ordered_by_data_mtime_then_id(store_dir: Path) -> None:
    with BucketStore.open(store_dir, eviction_policy="lru", max_total_size=4000) as store:
        ids = []
        keys = {}
        for i in range(4):
            keys[i] = [f"b{i}/0"]
            ids.append(store.batch_offload({keys[i][0]: value_for(keys[i][0], 1000)}))
        store.batch_get(keys[0])  # recency before the restart must not matter: mtimes rule
    base = 1_700_000_000
    mtimes = {0: base + 400, 1: base + 100, 2: base + 300, 3: base + 100}  # 1 and 3 tie: lower id first
    for i, bucket_id in enumerate(ids):
        os.utime(store_dir / f"{bucket_id}.bucket", (base, mtimes[i]))
    with BucketStore.open(store_dir, eviction_policy="lru", max_total_size=4000) as store:
        order = []
        for i in range(5):
            evicted = Recorder()
            put(store, f"n{i}", 1, 1000, on_evict=evicted)
            order.append(evicted.keys)
        assert order == [keys[1], keys[3], keys[2], keys[0], ["n0/0"]]


def test_lru_recovered_buckets_are_older_than_any_read_after_open(store_dir: Path) -> None:
    with BucketStore.open(store_dir, eviction_policy="lru", max_total_size=3000) as store:
        b = [put(store, f"b{i}", 1, 1000) for i in range(3)]
    with BucketStore.open(store_dir, eviction_policy="lru", max_total_size=3000) as store:
        store.batch_get(b[0])  # the oldest by mtime becomes the most recent
        order = []
        for i in range(3):
            evicted = Recorder()
            put(store, f"n{i}", 1, 1000, on_evict=evicted)
            order.append(evicted.keys)
        assert order == [b[1], b[2], b[0]]


# -- two-phase eviction ------------------------------------------------------------
@pytest.mark.parametrize("policy", ["fifo", "lru", "2q"])
def test_on_evict_sees_the_files_and_is_called_once_with_all_keys(store_dir: Path, policy: str) -> None:
    with BucketStore.open(store_dir, eviction_policy=policy, max_total_size=4000) as store:
        b = [put(store, f"b{i}", 2, 500) for i in range(4)]
        where = store.batch_query(b[0] + b[1] + b[2])
        seen: list[dict[str, Any]] = []

        def on_evict(keys: list[str]) -> None:
            names = set(os.listdir(store_dir))
            bucket_ids = {where[key].bucket_id for key in keys}
            contents = {}
            for key in keys:  # the victims' bytes are still on disk, intact
                meta = where[key]
                with open(store_dir / f"{meta.bucket_id}.bucket", "rb") as f:
                    f.seek(meta.offset)
                    contents[key] = f.read(meta.size)
            seen.append(
                {
                    "keys": list(keys),
                    "files": all(f"{i}.bucket" in names and f"{i}.meta" in names for i in bucket_ids),
                    "indexed": [store.exists(key) for key in keys],
                    "contents_ok": all(contents[k] == value_for(k, 500) for k in keys),
                }
            )

        put(store, "big", 1, 3000, on_evict=on_evict)  # needs three buckets' room
        assert len(seen) == 1, "on_evict must be called exactly once per eviction"
        call = seen[0]
        assert sorted(call["keys"]) == sorted(b[0] + b[1] + b[2])
        assert call["files"], "on_evict must run before any victim file is deleted"
        assert call["indexed"] == [False] * 6, "victims leave the index before on_evict"
        assert call["contents_ok"]
        names = set(os.listdir(store_dir))
        for bucket_id in {m.bucket_id for m in where.values()}:
            assert f"{bucket_id}.bucket" not in names and f"{bucket_id}.meta" not in names
        assert_readable(store, b[3], 500)
        assert store.stats().evicted_buckets == 3 and store.stats().evicted_keys == 6


class CallbackError(Exception):
    pass


@pytest.mark.parametrize("policy", ["fifo", "lru", "2q"])
@pytest.mark.parametrize("kind", LIMIT_KINDS)
def test_failing_on_evict_leaves_the_store_exactly_as_before(store_dir: Path, policy: str, kind: str) -> None:
    amount = {"logical": 4000, "keys": 8, "physical": 48 * KiB}[kind]
    with BucketStore.open(store_dir, eviction_policy=policy, **limit_fields(kind, amount)) as store:
        written: list[str] = []
        failing = Recorder(fail=CallbackError("downstream tier refused"))
        for i in range(50):  # fill until a write needs an eviction; that write's on_evict fails
            if written:
                store.batch_get(written[:2])  # give LRU a non-trivial order
            before = state(store)
            try:
                written += put(store, f"b{i}", 2, 500, on_evict=failing)
            except CallbackError as exc:
                assert str(exc) == "downstream tier refused"
                break
        else:
            pytest.fail("no write ever needed an eviction")
        assert len(failing.calls) == 1 and failing.keys
        assert state(store) == before, "a failed on_evict must leave files, stats and index unchanged"
        assert not store.exists(f"b{i}/0")
        assert sorted(live(store)) == sorted(written)
        assert store.stats().evicted_buckets == 0
        # the store still works, and picks the same victims the second time
        # (the failed attempt did not disturb the LRU order)
        ok = Recorder()
        put(store, f"b{i}", 2, 500, on_evict=ok)
        assert ok.calls == failing.calls
        assert store.batch_exists(ok.keys) == [False] * len(ok.keys)
        assert_readable(store, [k for k in written if k not in ok.keys] + [f"b{i}/0", f"b{i}/1"], 500)


@pytest.mark.parametrize("kind", LIMIT_KINDS)
def test_policy_none_refuses_without_changing_anything(store_dir: Path, kind: str) -> None:
    amount = {"logical": 5000, "keys": 9, "physical": 160 * KiB}[kind]
    with BucketStore.open(store_dir, eviction_policy="none", **limit_fields(kind, amount)) as store:
        written: list[str] = []
        for i in range(100):
            before = state(store)
            evicted = Recorder()
            try:
                written += put(store, f"b{i}", 2, 1100, on_evict=evicted)
            except CapacityExceeded:
                assert state(store) == before, "a refused write must change nothing"
                break
            finally:
                assert evicted.calls == []
            assert usage_of(store, kind) <= amount
        else:
            pytest.fail("policy none never refused a write")
        assert len(written) >= 4
        assert_readable(store, written, 1100)
        assert store.stats().evicted_buckets == 0
    with BucketStore.open(store_dir) as store:
        assert sorted(live(store)) == sorted(written)


@pytest.mark.parametrize("policy", ["none", "fifo", "lru", "2q"])
@pytest.mark.parametrize("kind", LIMIT_KINDS)
def test_object_larger_than_the_whole_quota_is_rejected_without_loss(store_dir: Path, policy: str, kind: str) -> None:
    amount = {"logical": 6000, "keys": 6, "physical": 96 * KiB}[kind]
    with BucketStore.open(store_dir, eviction_policy=policy, **limit_fields(kind, amount)) as store:
        small = put(store, "small", 2, 1000)
        before = state(store)
        evicted = Recorder()
        with pytest.raises(CapacityExceeded):
            if kind == "keys":
                put(store, "many", amount + 1, 10, on_evict=evicted)
            else:
                put(store, "huge", 1, amount + 1, on_evict=evicted)
        assert evicted.calls == [], "on_evict must not run for a write that can never fit"
        assert state(store) == before
        assert_readable(store, small, 1000)


@pytest.mark.parametrize("policy", ["fifo", "lru", "2q"])
def test_write_that_cannot_fit_even_after_evicting_everything(store_dir: Path, policy: str) -> None:
    """Foreign files count towards physical usage but cannot be evicted: a
    write that fits the quota alone but not next to them is refused up front."""
    store_dir.mkdir()
    (store_dir / "operator-notes.bin").write_bytes(os.urandom(64 * KiB))
    limit = 128 * KiB
    with BucketStore.open(store_dir, eviction_policy=policy, max_physical_bytes=limit) as store:
        small = put(store, "small", 2, 4096)
        before = state(store)
        evicted = Recorder()
        with pytest.raises(CapacityExceeded):
            put(store, "big", 1, 72 * KiB, on_evict=evicted)  # < limit, but not with 64 KiB foreign
        assert evicted.calls == []
        assert state(store) == before
        assert_readable(store, small, 4096)
        assert du(store_dir) <= limit


# -- every limit under every policy -------------------------------------------------
@pytest.mark.parametrize("durability", ["strict", "relaxed"])
@pytest.mark.parametrize("policy", ["none", "fifo", "lru", "2q"])
@pytest.mark.parametrize("kind", LIMIT_KINDS)
def test_every_limit_is_enforced_under_every_policy(store_dir: Path, kind: str, policy: str, durability: str) -> None:
    amount = {"logical": 200 * KiB, "keys": 40, "physical": 320 * KiB}[kind]
    rng = random.Random(f"{kind}-{policy}-{durability}")
    evicted = Recorder()
    written: set[str] = set()
    with BucketStore.open(store_dir, eviction_policy=policy, durability=durability, **limit_fields(kind, amount)) as store:
        for i in range(60):
            nkeys, size = rng.randint(1, 4), rng.randint(1, 12 * KiB)
            try:
                written.update(put(store, f"w{i}", nkeys, size, on_evict=evicted))
            except CapacityExceeded:
                assert policy == "none", f"{policy} must evict rather than refuse a write that fits the quota"
            assert usage_of(store, kind) <= amount, f"{kind} usage above its limit after write {i}"
            if policy == "lru" and written:
                present = [k for k in sorted(written) if store.exists(k)]
                store.batch_get(rng.sample(present, min(3, len(present))))
        present = set(live(store))
        if policy == "none":
            assert evicted.calls == []
        else:
            assert store.stats().evicted_keys == len(evicted.keys) > 0
        assert present.isdisjoint(evicted.keys), "an evicted key is still indexed"
        assert written - present == set(evicted.keys), "an acknowledged key vanished without on_evict"
        assert_readable(store, sorted(present))
    with BucketStore.open(store_dir, eviction_policy=policy, **limit_fields(kind, amount)) as store:
        assert set(live(store)) == present


@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
@pytest.mark.parametrize("durability", ["strict", "relaxed"])
def test_physical_usage_never_above_limit_after_batch_offload(store_dir: Path, io_mode: str, durability: str) -> None:
    """Random sizes, foreign files present at open (a file and a sub-directory):
    after every returning batch_offload, our own scan is within the limit and
    ``stats().physical_bytes`` equals it."""
    store_dir.mkdir()
    (store_dir / "README.operator").write_bytes(b"x" * 10_000)
    (store_dir / "scratch").mkdir()
    (store_dir / "scratch" / "blob").write_bytes(os.urandom(20_000))
    limit = 600 * KiB
    rng = random.Random(f"{io_mode}-{durability}")
    with BucketStore.open(store_dir, eviction_policy="fifo", max_physical_bytes=limit, io_mode=io_mode, durability=durability) as store:
        worst = 0
        for i in range(80):
            nkeys = rng.randint(1, 6)
            sizes = [rng.choice([1, 100, 4095, 4096, 4097, rng.randint(1, 60 * KiB)]) for _ in range(nkeys)]
            batch = {f"w{i}/{j}": value_for(f"w{i}/{j}", s) for j, s in enumerate(sizes)}
            store.batch_offload(batch)
            used = du(store_dir)
            worst = max(worst, used - limit)
            assert used <= limit, f"du {used} > max_physical_bytes {limit} after write {i}"
            if i % 10 == 0:
                assert store.stats().physical_bytes == du(store_dir)
        assert store.stats().evicted_buckets > 0
        assert worst <= 0


@pytest.mark.parametrize("policy", ["none", "fifo"])
def test_physical_limit_holds_while_the_directory_itself_grows(store_dir: Path, policy: str) -> None:
    """Hundreds of small buckets make the directory file grow (ext4: a block
    per ~200 entries). That growth is allocated space ``du`` counts; the limit
    must still hold after every batch_offload.

    Regression test: before the store tracked the directory's growth this
    failed at write 241 with du 2_002_944 (the directory had grown from 4 KiB
    to 20 KiB since the last scan, and a scan only ran when the tracked count
    alone said a write would not fit).
    """
    limit = 2_000_000
    with BucketStore.open(store_dir, eviction_policy=policy, max_physical_bytes=limit, durability="relaxed") as store:
        for i in range(400):
            try:
                store.batch_offload({f"k{i}": b"x" * 100})
            except CapacityExceeded:
                assert policy == "none"
                break
            used = du(store_dir)
            assert used <= limit, f"du {used} > max_physical_bytes {limit} after write {i} (directory is {os.lstat(store_dir).st_blocks * 512} bytes)"


@pytest.mark.parametrize("policy", ["none", "fifo"])
def test_physical_limit_holds_when_the_lock_file_and_the_directory_grow(store_dir: Path, policy: str) -> None:
    """The first deletion of a bucket writes the LOCK's high-water mark: the
    LOCK gains a block no write accounted for. If the next write that grows
    the directory comes before a scan, the write's one block of slack cannot
    cover both.

    Minimal reproduction (ext4, policy none):
        L = 1_979_728
        s = BucketStore.open(d, max_physical_bytes=L, eviction_policy="none", durability="relaxed")
        for i in range(240):
            s.batch_offload({f"k{i}": b"x" * 100})
            if i == 233: s.remove("k233")   # the newest bucket goes: LOCK 0 -> 4096 bytes
            assert du(d) <= L               # fails at i=239: du 1_982_464 (dir 16 -> 20 KiB)
    """
    limit = 1_979_728
    removed = False
    with BucketStore.open(store_dir, eviction_policy=policy, max_physical_bytes=limit, durability="relaxed") as store:
        for i in range(400):
            try:
                store.batch_offload({f"k{i}": b"x" * 100})
            except CapacityExceeded:
                assert policy == "none"
                break
            used = du(store_dir)
            assert used <= limit, (
                f"du {used} > max_physical_bytes {limit} after write {i} "
                f"(LOCK {os.lstat(store_dir / 'LOCK').st_blocks * 512} bytes, directory {os.lstat(store_dir).st_blocks * 512})"
            )
            if not removed and used > limit - 40_000:
                store.remove(f"k{i}")  # deletes the newest bucket: the LOCK's mark is written
                removed = True
        assert removed


def test_physical_limit_counts_lock_file_growth(store_dir: Path) -> None:
    """Deleting the newest bucket writes the LOCK's high-water mark (the LOCK
    file gains a block); physical accounting must follow."""
    limit = 160 * KiB
    with BucketStore.open(store_dir, eviction_policy="fifo", max_physical_bytes=limit) as store:
        for i in range(40):
            keys = put(store, f"b{i}", 1, 3 * KiB)
            if i % 3 == 0:
                store.remove(keys[0])  # the newest bucket goes: the mark is written
            assert du(store_dir) <= limit
        assert store.stats().physical_bytes == du(store_dir)


def test_foreign_file_created_after_open_is_found_before_the_limit_is_passed(store_dir: Path) -> None:
    """The tracked count cannot see a file someone else creates; the scan the
    store runs before a write its tracked count says would not fit must (and
    from then on the limit holds)."""
    limit = 256 * KiB
    with BucketStore.open(store_dir, eviction_policy="fifo", max_physical_bytes=limit) as store:
        (store_dir / "core.12345").write_bytes(os.urandom(64 * KiB))
        evicted = Recorder()
        for i in range(30):
            put(store, f"b{i}", 1, 12 * KiB, on_evict=evicted)
            if evicted.calls:
                assert du(store_dir) <= limit, f"write {i} evicted, yet du is above the limit"
        assert evicted.calls, "the limit was never reached"
        assert store.stats().physical_bytes == du(store_dir)


class FailingScanFileSystem(FileSystem):
    """``listdir`` of the store directory fails while :attr:`broken` is set."""

    broken = False

    def listdir(self, path: str) -> list[str]:
        if self.broken:
            raise PermissionError(13, "Permission denied", path)
        return super().listdir(path)


@pytest.mark.parametrize("policy", ["none", "fifo"])
def test_a_failed_scan_counts_as_full(store_dir: Path, policy: str) -> None:
    fs = FailingScanFileSystem()
    limit = 512 * KiB
    with BucketStore.open(store_dir, filesystem=fs, eviction_policy=policy, max_physical_bytes=limit) as store:
        kept = put(store, "kept", 2, 4 * KiB)
        fs.broken = True
        assert store.stats().physical_bytes >= limit, "an unmeasurable directory must not look empty"
        assert store.stats().usage_ratio >= 1.0
        before = snapshot(store_dir)
        evicted = Recorder()
        with pytest.raises(CapacityExceeded):
            put(store, "new", 1, 4 * KiB, on_evict=evicted)
        assert evicted.calls == [] and snapshot(store_dir) == before
        fs.broken = False
        put(store, "new", 1, 4 * KiB)  # measurable again: room again
        assert store.stats().physical_bytes == du(store_dir) <= limit
        assert_readable(store, kept, 4 * KiB)


# -- reads in progress on a victim -----------------------------------------------------
class GatedFileSystem(FileSystem):
    """Blocks the first data read after :meth:`arm` until :meth:`release`."""

    def __init__(self) -> None:
        self._armed = False
        self.entered = threading.Event()
        self._go = threading.Event()

    def arm(self) -> None:
        self._armed = True

    def release(self) -> None:
        self._go.set()

    def preadv(self, fd: int, buffers: Any, offset: int) -> int:
        if self._armed:
            self._armed = False
            self.entered.set()
            assert self._go.wait(timeout=60), "the test never released the read"
        return super().preadv(fd, buffers, offset)


@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
def test_read_in_progress_on_a_victim_completes_with_correct_bytes(store_dir: Path, io_mode: str) -> None:
    fs = GatedFileSystem()
    with BucketStore.open(store_dir, filesystem=fs, eviction_policy="fifo", max_total_size=2 * 64 * KiB, io_mode=io_mode) as store:
        victim = put(store, "victim", 1, 64 * KiB)
        other = put(store, "other", 1, 64 * KiB)
        victim_id = store.batch_query(victim)[victim[0]].bucket_id
        result: dict[str, Any] = {}

        def reader() -> None:
            try:
                result["value"] = store.batch_get(victim)[victim[0]]
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                result["error"] = exc

        fs.arm()
        thread = threading.Thread(target=reader)
        thread.start()
        try:
            assert fs.entered.wait(timeout=60)
            evicted = Recorder()
            put(store, "new", 1, 64 * KiB, on_evict=evicted)  # evicts the bucket being read
            assert evicted.calls == [victim]
            assert not (store_dir / f"{victim_id}.bucket").exists(), "the victim's files are deleted at once"
        finally:
            fs.release()
            thread.join(timeout=60)
        assert not thread.is_alive()
        assert "error" not in result, result.get("error")
        assert result["value"] == value_for(victim[0], 64 * KiB)
        assert_readable(store, [*other, "new/0"], 64 * KiB)


# -- evict_to_watermark -------------------------------------------------------------------
def fill(store: BucketStore, count: int, size: int = 1000) -> list[list[str]]:
    return [put(store, f"b{i}", 1, size) for i in range(count)]


def test_watermark_is_a_noop_at_or_below_high(store_dir: Path) -> None:
    with BucketStore.open(store_dir, eviction_policy="fifo", max_total_size=10_000) as store:
        fill(store, 9)  # exactly 0.9
        before = state(store)
        evicted = Recorder()
        assert store.evict_to_watermark(high=0.9, low=0.5, on_evict=evicted) == []
        assert evicted.calls == [] and state(store) == before


def test_watermark_is_a_noop_with_policy_none(store_dir: Path) -> None:
    with BucketStore.open(store_dir, eviction_policy="none", max_total_size=10_000) as store:
        fill(store, 10)  # 100 %
        before = state(store)
        evicted = Recorder()
        assert store.evict_to_watermark(high=0.5, low=0.1, on_evict=evicted) == []
        assert evicted.calls == [] and state(store) == before


@pytest.mark.parametrize("policy", ["fifo", "lru", "2q"])
def test_watermark_evicts_down_to_low_and_returns_the_keys_given_to_on_evict(store_dir: Path, policy: str) -> None:
    with BucketStore.open(store_dir, eviction_policy=policy, max_total_size=10_000) as store:
        b = fill(store, 10)
        if policy == "lru":
            store.batch_get(b[0] + b[1])  # the two oldest become the most recent
        expected_order = b[2:] + b[:2] if policy == "lru" else b
        evicted = Recorder()
        returned = store.evict_to_watermark(high=0.9, low=0.55, on_evict=evicted)
        assert len(evicted.calls) == 1 and returned == evicted.calls[0]
        # 10 000 bytes down to at most 5 500: exactly the five least wanted buckets
        assert returned == [key for keys in expected_order[:5] for key in keys]
        stats = store.stats()
        assert stats.logical_bytes == 5000 and stats.usage_ratio <= 0.55
        assert stats.evicted_buckets == 5 and stats.evicted_keys == 5
        assert store.batch_exists(returned) == [False] * 5
        assert_readable(store, [k for keys in expected_order[5:] for k in keys], 1000)
        assert store.evict_to_watermark(high=0.9, low=0.55) == []  # now below high


def test_watermark_defaults_come_from_the_config(store_dir: Path) -> None:
    with BucketStore.open(store_dir, eviction_policy="fifo", max_total_size=10_000, eviction_high_watermark=0.7, eviction_low_watermark=0.3) as store:
        fill(store, 7)
        assert store.evict_to_watermark() == []  # 0.7 is not above 0.7
        put(store, "x", 1, 1000)
        returned = store.evict_to_watermark()
        assert returned == [f"b{i}/0" for i in range(5)]  # 8 000 -> 3 000
        assert store.stats().usage_ratio <= 0.3


def test_watermark_with_physical_limit_brings_du_under_low(store_dir: Path) -> None:
    limit = 400 * KiB
    with BucketStore.open(store_dir, eviction_policy="lru", max_physical_bytes=limit) as store:
        for i in range(100):
            put(store, f"b{i}", 2, 6 * KiB)
        assert du(store_dir) > 0.9 * limit
        returned = store.evict_to_watermark(high=0.9, low=0.5)
        assert returned
        assert du(store_dir) <= 0.5 * limit
        assert store.stats().physical_bytes == du(store_dir)


def test_watermark_with_keys_limit(store_dir: Path) -> None:
    with BucketStore.open(store_dir, eviction_policy="fifo", total_keys_limit=20) as store:
        for i in range(5):
            put(store, f"b{i}", 4, 10)
        returned = store.evict_to_watermark(high=0.9, low=0.5)
        assert returned == [f"b{i}/{j}" for i in range(3) for j in range(4)]
        assert store.stats().keys == 8


def test_watermark_failing_on_evict_changes_nothing(store_dir: Path) -> None:
    with BucketStore.open(store_dir, eviction_policy="lru", max_total_size=10_000) as store:
        b = fill(store, 10)
        store.batch_get(b[0])
        before = state(store)
        with pytest.raises(CallbackError):
            store.evict_to_watermark(high=0.9, low=0.5, on_evict=Recorder(fail=CallbackError()))
        assert state(store) == before
        # the LRU order is undisturbed: b0 was read last, so b1..b5 go
        assert store.evict_to_watermark(high=0.9, low=0.5) == [k for keys in b[1:6] for k in keys]
        assert_readable(store, [k for keys in [b[0], *b[6:]] for k in keys], 1000)


@pytest.mark.parametrize("high, low", [(0.5, 0.6), (0.0, 0.0), (1.5, 0.5), (0.9, -0.1)])
def test_watermark_rejects_bad_ratios(store: BucketStore, high: float, low: float) -> None:
    with pytest.raises(InvalidArgument):
        store.evict_to_watermark(high=high, low=low)


# -- stats ------------------------------------------------------------------------------------
def test_stats_report_limits_usage_ratio_and_eviction_counts(store_dir: Path) -> None:
    limits = {"max_total_size": 20_000, "max_physical_bytes": 1 << 20, "total_keys_limit": 10}
    with BucketStore.open(store_dir, eviction_policy="fifo", **limits) as store:
        stats = store.stats()
        assert (stats.max_total_size, stats.max_physical_bytes, stats.total_keys_limit) == (20_000, 1 << 20, 10)
        assert (stats.evicted_buckets, stats.evicted_keys, stats.dead_bytes) == (0, 0, 0)
        put(store, "a", 2, 3000)
        stats = store.stats()
        physical = du(store_dir)
        assert stats.physical_bytes == physical
        assert stats.usage_ratio == pytest.approx(max(6000 / 20_000, physical / (1 << 20), 2 / 10))
        put(store, "b", 6, 10)  # 8 keys of 10: the keys limit is now the highest usage
        assert store.stats().usage_ratio == pytest.approx(0.8)
        put(store, "c", 4, 10)  # 12 keys: evicts "a" (2 keys)... and "b" is next
        stats = store.stats()
        assert stats.keys <= 10
        assert (stats.evicted_buckets, stats.evicted_keys) == (1, 2)
        assert stats.usage_ratio == pytest.approx(max(stats.logical_bytes / 20_000, du(store_dir) / (1 << 20), stats.keys / 10))
    with BucketStore.open(store_dir, eviction_policy="fifo", **limits) as store:
        stats = store.stats()
        assert (stats.evicted_buckets, stats.evicted_keys) == (0, 0), "eviction counts are since open"
        assert stats.keys == 10


def test_stats_usage_ratio_is_zero_when_unlimited(store: BucketStore) -> None:
    put(store, "a", 3, 5000)
    stats = store.stats()
    assert (stats.max_total_size, stats.max_physical_bytes, stats.total_keys_limit) == (0, 0, 0)
    assert stats.usage_ratio == 0.0
    assert stats.physical_bytes == du(store.path)


# -- environment names ----------------------------------------------------------------------
def test_capacity_env_names_from_mooncake(store_dir: Path) -> None:
    env = {
        "MOONCAKE_OFFLOAD_BUCKET_MAX_TOTAL_SIZE": "8KiB",
        "MOONCAKE_OFFLOAD_BUCKET_MAX_PHYSICAL_BYTES": "1M",
        "MOONCAKE_OFFLOAD_BUCKET_EVICTION_POLICY": "FIFO",
        "MOONCAKE_OFFLOAD_TOTAL_KEYS_LIMIT": "100",
        "MOONCAKE_OFFLOAD_DISK_EVICTION_HIGH_WATERMARK_RATIO": "0.75",
        "MOONCAKE_OFFLOAD_DISK_EVICTION_LOW_WATERMARK_RATIO": "0.25",
    }
    config = BucketConfig.from_env(env, path=store_dir)
    with BucketStore.open(config) as store:
        assert store.config.eviction_policy == "fifo"
        assert (store.config.eviction_high_watermark, store.config.eviction_low_watermark) == (0.75, 0.25)
        stats = store.stats()
        assert (stats.max_total_size, stats.max_physical_bytes, stats.total_keys_limit) == (8 * KiB, 1 << 20, 100)
        for i in range(8):
            put(store, f"b{i}", 1, 1024)
        evicted = Recorder()
        put(store, "n", 1, 1024, on_evict=evicted)  # fifo really in force
        assert evicted.calls == [["b0/0"]]
        assert store.evict_to_watermark() == [f"b{i}/0" for i in range(1, 7)]  # 8 KiB -> 2 KiB


def test_capacity_env_names_kvbucket_and_precedence(store_dir: Path) -> None:
    env = {
        "KVBUCKET_MAX_TOTAL_SIZE": "4096",
        "MOONCAKE_OFFLOAD_BUCKET_MAX_TOTAL_SIZE": "1G",
        "KVBUCKET_MAX_PHYSICAL_BYTES": "2MiB",
        "KVBUCKET_TOTAL_KEYS_LIMIT": "7",
        "MOONCAKE_OFFLOAD_TOTAL_KEYS_LIMIT": "9",
        "KVBUCKET_EVICTION_POLICY": "None",
        "MOONCAKE_OFFLOAD_BUCKET_EVICTION_POLICY": "lru",
        "KVBUCKET_EVICTION_HIGH_WATERMARK": "0.6",
        "KVBUCKET_EVICTION_LOW_WATERMARK": "0.4",
        "MOONCAKE_OFFLOAD_DISK_EVICTION_LOW_WATERMARK_RATIO": "0.1",
        "KVBUCKET_GROUP_MAX_DELAY_S": "0",
    }
    config = BucketConfig.from_env(env, path=store_dir).validated()
    assert config.max_total_size == 4096
    assert config.max_physical_bytes == 2 << 20
    assert config.total_keys_limit == 7
    assert config.eviction_policy == "none"
    assert (config.eviction_high_watermark, config.eviction_low_watermark) == (0.6, 0.4)
    assert config.group_max_delay_s == 0
    with BucketStore.open(config) as store:
        put(store, "a", 1, 4096)
        with pytest.raises(CapacityExceeded):
            put(store, "b", 1, 1)


@pytest.mark.parametrize(
    "variable, text",
    [
        ("MOONCAKE_OFFLOAD_BUCKET_MAX_TOTAL_SIZE", "lots"),
        ("MOONCAKE_OFFLOAD_BUCKET_MAX_PHYSICAL_BYTES", "-1"),
        ("MOONCAKE_OFFLOAD_TOTAL_KEYS_LIMIT", "1.5"),
        ("MOONCAKE_OFFLOAD_DISK_EVICTION_HIGH_WATERMARK_RATIO", "ninety"),
        ("KVBUCKET_EVICTION_LOW_WATERMARK", "x"),
    ],
)
def test_malformed_capacity_env_names_the_variable(variable: str, text: str) -> None:
    with pytest.raises(InvalidArgument, match=variable):
        BucketConfig.from_env({variable: text}, path="/tmp/unused")


@pytest.mark.parametrize(
    "fields",
    [
        {"max_total_size": -1},
        {"max_physical_bytes": -4096},
        {"total_keys_limit": -1},
        {"max_total_size": 1.5},
        {"eviction_high_watermark": 0.5, "eviction_low_watermark": 0.6},
        {"eviction_high_watermark": 1.2},
    ],
)
def test_invalid_limits_are_rejected(store_dir: Path, fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        BucketStore.open(store_dir, **fields)


# -- foreign and unmeasurable entries -----------------------------------------------------
class UnreadableDirFileSystem(FileSystem):
    """``listdir`` of one sub-directory raises ``PermissionError``, as a
    ``lost+found`` at an ext4 mount root does for a user who is not root."""

    def __init__(self, unreadable: Path) -> None:
        self.unreadable = os.fspath(unreadable)

    def listdir(self, path: str) -> list[str]:
        if path == self.unreadable:
            raise PermissionError(13, "Permission denied", path)
        return super().listdir(path)


def remove_chain(top: Path) -> None:
    """Remove a chain ``top/d/d/.../d`` without recursion (pytest's own
    clean-up recurses and would fail on it): hoist each level's child up."""
    while (top / "d").is_dir():
        if (top / "d" / "d").is_dir():
            os.rename(top / "d" / "d", top / "next")
        for name in os.listdir(top / "d"):
            os.unlink(top / "d" / name)
        os.rmdir(top / "d")
        if (top / "next").is_dir():
            os.rename(top / "next", top / "d")
    os.rmdir(top)


def test_deeply_nested_foreign_directory_is_measured(store_dir: Path) -> None:
    """A recursive walk raises RecursionError here."""
    nested = store_dir / "deep"
    depth = 1500
    store_dir.mkdir()
    level = nested
    try:
        level.mkdir()
        for _ in range(depth):  # os.makedirs recurses too
            level = level / "d"
            level.mkdir()
        (level / "leaf").write_bytes(b"x" * 5000)
        with BucketStore.open(store_dir, max_physical_bytes=64 << 20) as store:
            put(store, "b", 1, 4 * KiB)
            stats = store.stats()
            own = sum(os.lstat(store_dir / name).st_blocks * 512 for name in os.listdir(store_dir) if name != "deep")
            assert stats.foreign_bytes == (depth + 1) * os.lstat(nested).st_blocks * 512 + 8 * KiB
            assert stats.physical_bytes == own + os.lstat(store_dir).st_blocks * 512 + stats.foreign_bytes
            assert stats.unmeasurable == ()
    finally:
        remove_chain(nested)


@pytest.mark.parametrize("policy", ["none", "fifo"])
def test_unreadable_foreign_directory_does_not_make_an_empty_store_full(store_dir: Path, policy: str, caplog: pytest.LogCaptureFixture) -> None:
    lost = store_dir / "lost+found"
    lost.mkdir(parents=True)
    (lost / "inode-123").write_bytes(b"y" * 8000)
    fs = UnreadableDirFileSystem(lost)
    with BucketStore.open(store_dir, filesystem=fs, eviction_policy=policy, max_physical_bytes=256 * KiB) as store:
        keys = put(store, "first", 2, 4 * KiB)  # used to raise CapacityExceeded
        assert_readable(store, keys, 4 * KiB)
        stats = store.stats()
        assert stats.unmeasurable == (os.fspath(lost),)
        assert stats.physical_bytes == du(store_dir) - 8 * KiB  # all but the unreadable content
        assert stats.usage_ratio < 0.5
        assert store.evict_to_watermark(high=0.9, low=0.5) == []  # nothing to do
        assert store.batch_exists(keys) == [True, True]
    warnings = [r.getMessage() for r in caplog.records if os.fspath(lost) in r.getMessage()]
    assert len(warnings) == 1 and "cannot measure" in warnings[0], warnings


def test_watermark_evicts_nothing_when_foreign_bytes_keep_usage_above_low(store_dir: Path) -> None:
    """Evicting the whole cache cannot bring usage under ``low`` when a
    foreign file holds most of the limit: evict nothing, say why."""
    limit = 400 * KiB
    store_dir.mkdir()
    (store_dir / "big.core").write_bytes(os.urandom(300 * KiB))
    with BucketStore.open(store_dir, eviction_policy="lru", max_physical_bytes=limit) as store:
        keys = [k for i in range(6) for k in put(store, f"b{i}", 1, 8 * KiB)]
        assert store.stats().usage_ratio > 0.9 and store.stats().evicted_buckets == 0
        before = state(store)
        evicted = Recorder()
        with pytest.raises(CapacityExceeded) as info:
            store.evict_to_watermark(high=0.9, low=0.5, on_evict=evicted)
        message = str(info.value)
        assert "nothing was evicted" in message and "physical_scope='store'" in message
        assert f"{300 * KiB}" in message  # the foreign bytes, named
        assert evicted.calls == [] and state(store) == before
        with pytest.raises(CapacityExceeded, match="physical_scope='store'"):  # cannot fit even with every bucket gone
            put(store, "huge", 1, 100 * KiB, on_evict=evicted)
        assert evicted.calls == [] and state(store) == before
        assert_readable(store, keys, 8 * KiB)
        # a watermark that eviction can reach still evicts, only as much as needed
        returned = store.evict_to_watermark(high=0.9, low=0.85)
        assert returned and len(returned) < len(keys)
        assert du(store_dir) <= 0.85 * limit
        assert store.stats().foreign_bytes == 300 * KiB


def test_physical_scope_store_counts_only_the_store_files(store_dir: Path) -> None:
    limit = 200 * KiB
    store_dir.mkdir()
    (store_dir / "big.core").write_bytes(os.urandom(300 * KiB))
    lost = store_dir / "lost+found"
    lost.mkdir()
    fs = UnreadableDirFileSystem(lost)
    with BucketStore.open(store_dir, filesystem=fs, eviction_policy="fifo", max_physical_bytes=limit, physical_scope="store") as store:
        keys = put(store, "a", 4, 8 * KiB)
        stats = store.stats()
        foreign = os.lstat(store_dir / "big.core").st_blocks * 512 + os.lstat(lost).st_blocks * 512
        assert stats.physical_bytes == du(store_dir) - foreign
        assert stats.foreign_bytes == 0 and stats.unmeasurable == ()  # not walked at all
        assert store.evict_to_watermark(high=0.9, low=0.5) == []
        for i in range(30):
            put(store, f"n{i}", 1, 8 * KiB)
            assert du(store_dir) - foreign <= limit
        assert not store.batch_exists(keys)[0], "the oldest bucket was evicted to respect the limit"


@pytest.mark.parametrize("scope", ["directory", "store", "STORE"])
def test_physical_scope_from_every_source(store_dir: Path, tmp_path: Path, scope: str) -> None:
    assert BucketConfig(path=store_dir, physical_scope=scope).validated().physical_scope == scope.lower()  # type: ignore[arg-type]
    config = BucketConfig.from_env({"KVBUCKET_PATH": os.fspath(store_dir), "KVBUCKET_PHYSICAL_SCOPE": scope})
    assert config.validated().physical_scope == scope.lower()
    toml = tmp_path / "kv.toml"
    toml.write_text(f'path = "{store_dir}"\nphysical_scope = "{scope}"\n')
    assert BucketConfig.from_file(toml).validated().physical_scope == scope.lower()


def test_physical_scope_rejects_unknown_values(store_dir: Path) -> None:
    with pytest.raises(InvalidArgument, match="physical_scope must be one of directory, store"):
        BucketStore.open(store_dir, physical_scope="disk")
    assert not store_dir.exists()
