"""The store's components on their own: the eviction policy driven from
synthetic bucket records with no directory at all (as a simulator drives
it), the meta rebuilt from the index, the directory check through the
FileSystem seam, and the lock annotations of the components."""

from __future__ import annotations

import ast
import errno
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import kvbucket
from kvbucket import BucketStore, InvalidArgument, StorageIOError
from kvbucket._core.format import BucketMeta, MetaRecord
from kvbucket._core.fs import FileSystem, _advance
from kvbucket._core.index import Bucket, Index, rebuilt_meta
from kvbucket._core.space import Limits, Usage
from kvbucket.policy.eviction import MAIN, POLICIES, PROBATION, make_policy
from kvbucket.policy.interface import BucketRecord, CachePolicy

SIZE = 100


@dataclass(eq=False)
class Record:
    """A bucket record of a simulator: no file behind it."""

    bucket_id: int
    keys: list[str]
    logical: int
    physical: int
    data_length: int
    dead: int = 0
    access: int = 0
    segment: str = MAIN


@dataclass
class Simulator:
    """Drives a policy the way the store does: commit, read, evict to fit."""

    policy: CachePolicy
    limits: Limits
    buckets: dict[int, Record] = field(default_factory=dict)
    clock: int = 0
    evicted: list[int] = field(default_factory=list)

    def write(self, bucket_id: int, nkeys: int = 2) -> None:
        record = Record(bucket_id, [f"b{bucket_id}/{i}" for i in range(nkeys)], nkeys * SIZE, nkeys * SIZE, nkeys * SIZE)
        need = Usage.of(record)
        victims = self.policy.victims(self.buckets.values(), self.usage() + need, self.limits)
        assert victims is not None, "a bucket that fits the limits alone always finds room"
        for victim in victims:
            del self.buckets[victim.bucket_id]
            self.policy.evicted(victim)
            self.evicted.append(victim.bucket_id)
        self.buckets[bucket_id] = record
        self._stamp(record)
        self.policy.committed(record)

    def read(self, bucket_id: int) -> None:
        record = self.buckets[bucket_id]
        self._stamp(record)
        self.policy.read(record)

    def usage(self) -> Usage:
        return sum((Usage.of(r) for r in self.buckets.values()), Usage())

    def _stamp(self, record: Record) -> None:
        self.clock += 1
        record.access = self.clock


@pytest.fixture
def no_file_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any file system call fails the test: the policy must not need one."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"file system call with {args!r}")

    for name in ("open", "stat", "listdir", "scandir", "mkdir", "unlink", "rename"):
        monkeypatch.setattr(os, name, refuse)


def test_a_record_of_the_store_and_of_a_simulator_are_both_bucket_records() -> None:
    records: list[BucketRecord] = [Bucket(1, SIZE, False, SIZE), Record(2, ["k"], SIZE, SIZE, SIZE)]
    assert [r.bucket_id for r in records] == [1, 2]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_runs_from_records_with_no_directory(name: str, no_file_io: None) -> None:
    limits = Limits(keys=8)
    sim = Simulator(make_policy(name, limits), limits)
    if not sim.policy.evicts:
        for bucket_id in range(1, 5):
            sim.write(bucket_id)
        assert sim.policy.victims(sim.buckets.values(), sim.usage() + Usage(keys=2), limits) is None
        return
    for bucket_id in range(1, 21):
        sim.write(bucket_id)
        if bucket_id % 3 == 0:
            sim.read(bucket_id - 1)
        assert limits.admit(sim.usage())
    assert len(sim.evicted) == 16 and len(sim.buckets) == 4
    assert set(sim.evicted).isdisjoint(sim.buckets)


def test_fifo_and_lru_order_from_access_events(no_file_io: None) -> None:
    for name, expected in (("fifo", [1, 2]), ("lru", [2, 3])):
        limits = Limits(keys=8)
        sim = Simulator(make_policy(name, limits), limits)
        for bucket_id in range(1, 5):
            sim.write(bucket_id)
        sim.read(1)
        sim.write(5)
        sim.write(6)
        assert sim.evicted == expected, name


def test_2q_from_records_evicts_the_written_once_first_and_readmits_ghosts(no_file_io: None) -> None:
    limits = Limits(keys=8)
    sim = Simulator(make_policy("2q", limits), limits)
    for bucket_id in range(1, 5):
        sim.write(bucket_id)
    sim.read(1)
    sim.read(2)
    assert [sim.buckets[i].segment for i in range(1, 5)] == [MAIN, MAIN, PROBATION, PROBATION]
    sim.write(5)
    assert sim.evicted == [3]  # probation, oldest first; the read buckets stay
    ghost = Record(6, ["b3/0"], SIZE, SIZE, SIZE)  # a key evicted from probation, written again
    sim.policy.committed(ghost)
    assert ghost.segment == MAIN


def test_rebuilt_meta_lists_exactly_the_records_given() -> None:
    index = Index()
    rows = [MetaRecord(f"k{i}", i * SIZE, SIZE, 1000 + i) for i in range(3)]
    bucket = Bucket(7, 3 * SIZE, False, 8192)
    index.add_bucket(bucket, BucketMeta(7, 3 * SIZE, False, rows))
    assert rebuilt_meta(bucket, index.records(bucket)).records == rows
    kept = [(key, meta) for key, meta in index.records(bucket) if key != "k1"]
    assert rebuilt_meta(bucket, kept).records == [rows[0], rows[2]]


class _DirectoryCheck(FileSystem):
    """Records (or fails) the calls on the store directory itself."""

    def __init__(self, directory: Path, fail: bool = False) -> None:
        self.directory = os.fspath(directory)
        self.calls: list[str] = []
        self.fail = fail

    def stat(self, path: str) -> os.stat_result:
        if os.path.normpath(path) == self.directory:
            self.calls.append("stat")
            if self.fail:
                raise OSError(errno.EIO, "injected")
        return super().stat(path)

    def mkdir(self, path: str) -> None:
        if os.path.normpath(path) == self.directory:
            self.calls.append("mkdir")
        super().mkdir(path)


class _ShortIO(FileSystem):
    """Writes and reads at most a cycling number of bytes a call (never a
    whole call's worth), and records the file ranges each call covered."""

    LIMITS = (1, 4095, 4097, 3 * 4096 + 7, 100_003)

    def __init__(self) -> None:
        self.calls = 0
        self.ranges: list[tuple[int, int]] = []

    def _short(self, buffers: Sequence[memoryview]) -> list[memoryview]:
        left = self.LIMITS[self.calls % len(self.LIMITS)]
        self.calls += 1
        kept = []
        for buffer in buffers:
            if not left:
                break
            kept.append(buffer[:left])
            left -= len(kept[-1])
        return kept

    def pwritev(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        written = super().pwritev(fd, self._short(buffers), offset)
        self.ranges.append((offset, offset + written))
        return written

    def preadv(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        got = super().preadv(fd, self._short(buffers), offset)
        self.ranges.append((offset, offset + got))
        return got


def _pieces(count: int, size: int) -> list[memoryview]:
    return [memoryview(bytes([i % 251]) * (size - 1) + bytes([i % 256])) for i in range(count)]


def test_short_writes_of_many_pieces_land_every_byte_once_and_in_order(tmp_path: Path) -> None:
    fs, pieces = _ShortIO(), _pieces(1024, 4096)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        assert fs.write_all(fd, pieces, 0) == 1024 * 4096
    finally:
        os.close(fd)
    starts, stops = zip(*fs.ranges)
    assert starts[0] == 0 and list(starts[1:]) == list(stops[:-1]) and stops[-1] == 1024 * 4096  # each byte written once, in order
    assert fs.calls > 100  # the writes really were short: one call could have taken all 4 MiB
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


def test_short_reads_into_many_pieces_fill_every_byte_once_and_in_order(tmp_path: Path) -> None:
    fs, pieces = _ShortIO(), _pieces(1024, 4096)
    (tmp_path / "f").write_bytes(b"".join(pieces))
    dests = [memoryview(bytearray(4096)) for _ in range(1024)]
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert fs.readv_into(fd, dests, 0) == 1024 * 4096
    finally:
        os.close(fd)
    starts, stops = zip(*fs.ranges)
    assert starts[0] == 0 and list(starts[1:]) == list(stops[:-1]) and stops[-1] == 1024 * 4096
    assert [bytes(d) for d in dests] == [bytes(p) for p in pieces]


class _CountedPieces(list):  # type: ignore[type-arg]
    """A list of pieces that counts the pieces its slices copy."""

    copied = 0

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        item = super().__getitem__(index)
        if isinstance(index, slice):
            type(self).copied += len(item)
            return _CountedPieces(item)
        return item


@pytest.mark.parametrize("written", [0, 1, 4096, 512 * 4096 + 5, 1023 * 4096, 1024 * 4096])
def test_advancing_past_written_pieces_copies_each_remaining_piece_once(written: int) -> None:
    """Linear in the pieces of a call, however many a short write covered."""
    pieces = _pieces(1024, 4096)
    _CountedPieces.copied = 0
    rest = _advance(_CountedPieces(pieces), written)
    assert b"".join(rest) == b"".join(pieces)[written:]
    assert _CountedPieces.copied <= len(rest)


def test_advancing_skips_empty_pieces_at_the_cut() -> None:
    pieces = [memoryview(piece) for piece in (b"", b"ab", b"", b"cd", b"")]
    assert [bytes(p) for p in _advance(pieces, 0)] == [b"ab", b"", b"cd", b""]
    assert [bytes(p) for p in _advance(pieces, 1)] == [b"b", b"", b"cd", b""]
    assert [bytes(p) for p in _advance(pieces, 2)] == [b"cd", b""]
    assert _advance(pieces, 4) == []


def test_open_checks_the_store_directory_through_the_filesystem(tmp_path: Path) -> None:
    fs = _DirectoryCheck(tmp_path / "store")
    with BucketStore.open(tmp_path / "store", filesystem=fs):
        pass
    assert fs.calls[:2] == ["stat", "mkdir"], "open() looked for the directory behind the FileSystem's back"
    failing = _DirectoryCheck(tmp_path / "other", fail=True)
    with pytest.raises(StorageIOError, match="checking"):
        BucketStore.open(tmp_path / "other", filesystem=failing)
    assert failing.calls == ["stat"] and not (tmp_path / "other").exists()


def test_open_follows_a_link_to_the_store_directory_and_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with BucketStore.open(tmp_path / "link") as store:
        store.batch_offload({"k": b"v"})
    assert (tmp_path / "real" / "1.bucket").exists()
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="not a directory"):
        BucketStore.open(tmp_path / "file")


def test_the_eviction_listener_type_is_named_for_what_it_is() -> None:
    from kvbucket.store import EvictionListener

    assert not hasattr(kvbucket.store, "Callback")
    assert EvictionListener is kvbucket._core.interfaces.EvictionListener  # one definition


_LOCKED_MODULES = ("store.py", "_core/catalog.py", "_core/read_path.py", "_core/space.py", "_core/eviction.py", "_core/bucket_files.py")


@pytest.mark.parametrize("module", _LOCKED_MODULES)
def test_every_method_that_needs_a_lock_says_which(module: str) -> None:
    """A ``_locked`` method, and one whose docstring says it needs a lock,
    both carry a ``Requires:`` line; a ``_locked`` method's names the lock."""
    tree = ast.parse((Path(kvbucket.__file__).parent / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_locked"):
            doc = ast.get_docstring(node) or ""
            assert "Requires:" in doc, f"{module}: {node.name} has no Requires: line"
            assert "held" in doc.split("Requires:")[1], f"{module}: {node.name} does not say which lock is held"



@pytest.mark.parametrize(("module", "component"), [("_core/budget_member.py", "BudgetMember"), ("_core/group_commit.py", "GroupCommit")])
def test_the_components_without_a_lock_of_their_own_say_they_run_under_the_writer_lock(module: str, component: str) -> None:
    """The budget member and the group commit have no lock: each of their
    methods states that it runs holding the store's writer lock."""
    tree = ast.parse((Path(kvbucket.__file__).parent / module).read_text())
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == component]
    methods = [node for node in cls.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("__")]
    assert methods
    for method in methods:
        doc = ast.get_docstring(method) or ""
        assert "Requires: the writer lock held" in doc, f"{module}: {component}.{method.name} does not say it needs the writer lock"

def test_store_arguments_are_checked_by_the_shared_checker(tmp_path: Path) -> None:
    """Whole numbers and numbers given to the store's methods get the one wording of
    :mod:`kvbucket._core.arguments` (a bool is not a number)."""
    with BucketStore.open(tmp_path / "store") as store:
        with pytest.raises(InvalidArgument, match=r"^batch_size must be a whole number >= 1; got True$"):
            list(store.scan_meta(True))
        with pytest.raises(InvalidArgument, match=r"^size of key 'k' must be a whole number >= 0; got -1$"):
            store.group_batch({"k": -1})
        with pytest.raises(InvalidArgument, match=r"^min_dead_ratio must be a number from 0 to 1; got 2$"):
            store.compact(2)
        with pytest.raises(InvalidArgument, match=r"^lease_s \(seconds\) must be a number >= 0; got inf$"):
            store.lookup(["k"], lease_s=float("inf"))


def _lines_run(function: Callable[[], object], code: object) -> int:
    """How many lines of ``code`` the interpreter runs during ``function()``."""
    lines = 0

    def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
        nonlocal lines
        if frame.f_code is code and event == "line":
            lines += 1
        return tracer

    sys.settrace(tracer)
    try:
        function()
    finally:
        sys.settrace(None)
    return lines


def _index_of(keys: list[str]) -> Index:
    index = Index()
    meta = BucketMeta(1, 4 * len(keys), False, [MetaRecord(k, 4 * i, 4, i) for i, k in enumerate(keys)])
    index.add_bucket(Bucket(1, meta.data_length, False, 0), meta)
    return index


def test_a_batch_query_runs_no_python_line_per_key() -> None:
    """The cost of a batch of lookups is C work per key, not interpreted
    lines per key: a batch of 1,000 runs no more lines than a batch of 10,
    with or without misses, and the answer is the same as one get() per key."""
    keys = [f"k{i}" for i in range(2000)]
    index = _index_of(keys[:1000])
    for batch in (keys[:10], keys[:1000], keys[995:1005], keys[500:1500]):
        assert index.query(batch) == {k: index.get(k) for k in batch if k in index}
    small = _lines_run(lambda: index.query(keys[:10]), Index.query.__code__)
    large = _lines_run(lambda: index.query(keys[:1000]), Index.query.__code__)
    missing = _lines_run(lambda: index.query(keys[500:1500]), Index.query.__code__)
    assert small == large and missing <= small + 3


def test_batch_exists_runs_no_python_line_per_key(tmp_path: Path) -> None:
    with BucketStore.open(tmp_path / "s") as store:
        store.batch_offload({f"k{i}": b"v" for i in range(100)})
        few, many = [f"k{i}" for i in range(5)], [f"k{i}" for i in range(200)]
        assert store.batch_exists(many) == [i < 100 for i in range(200)]
        traced = 0

        def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
            nonlocal traced
            if event == "line" and frame.f_code.co_filename.endswith("catalog.py"):
                traced += 1
            return tracer

        counts = []
        for batch in (few, many):
            traced = 0
            sys.settrace(tracer)
            try:
                store.batch_exists(batch)
            finally:
                sys.settrace(None)
            counts.append(traced)
        assert counts[0] == counts[1]
