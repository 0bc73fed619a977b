"""BucketStore: the public face of kvbucket.

A store composes these components, each owning its state and its lock:

* the catalog (:mod:`kvbucket._core.catalog`): the index, leases, the access
  clock, the policy's state, the counters, under the *index lock*, held only
  for in-memory work (and opening a read descriptor);
* the read path (:mod:`kvbucket._core.read_path`): read descriptors and
  pins, under its own lock; the load queue (:mod:`kvbucket._core.loads`):
  the load threads and the batches in flight, under its own lock;
* the space account (:mod:`kvbucket._core.space`): limits and the usage the
  index does not hold, under its own lock;
* eviction (:mod:`kvbucket._core.eviction`): victims from the policy
  (:mod:`kvbucket.policy.eviction`), two-phase eviction, the background evictor;
* the bucket files (:mod:`kvbucket._core.bucket_files`): id allocation and
  writing, rewriting and deleting a bucket's files through the commit
  protocol, under ``_writer``; the group commit
  (:mod:`kvbucket._core.group_commit`): batches checked, room made, and
  written as new buckets committed together, under ``_writer``;
* the budget member (:mod:`kvbucket._core.budget_member`): the store's side
  of a shared budget (reservations before writes, usage published after
  changes), under ``_writer`` and the budget file's own lock.

Lock order: ``_writer``, then the budget's lock, then the index lock, then
the read path's lock, then the space account's lock. ``_writer``
serialises everything that changes the directory: offload, removal,
deletion, eviction, compaction.
Reads take neither ``_writer`` nor the index lock during I/O: they pin
their buckets, read through the pinned descriptors, and unpin. A bucket
deleted meanwhile is unlinked at once, but its descriptor stays open until
the last pin goes, so a read that has started completes with the right
bytes. Loads are asynchronous (:meth:`BucketStore.submit_load`), pinned per
object, with no barrier between batches; ``batch_load`` and ``batch_get``
submit a batch and wait for it. ``close()`` stops the background evictor,
then waits for the loads in flight before it stops the load threads.

Leases: :meth:`BucketStore.lookup` leases the keys it finds
(:mod:`kvbucket._core.lease`); every eviction chooses its victims among the
buckets holding no leased key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._core.arguments import check_int, check_lookup_key, check_number, key_list, key_mapping, lookup_keys
from ._core.bucket_files import BucketFiles
from ._core.budget import Budget
from ._core.budget_member import BudgetMember, admitted, join_budget, open_budget
from ._core.buffers import Buffer, destination_views
from ._core.catalog import Catalog
from ._core.counters import CounterSnapshot
from ._core.eviction import Eviction
from ._core.format import ALIGNMENT, check_key
from ._core.fs import FileSystem, run_io, stat_directory
from ._core.group_commit import GroupCommit, Objects, prepare_batch
from ._core.index import Bucket, ObjectMeta
from ._core.interfaces import EvictionListener
from ._core.lease import Clock
from ._core.loads import LoadHandle, Loads
from ._core.lockfile import StoreLock, WriterLimits
from ._core.read_path import ReadPath
from ._core.recovery import RecoveryReport, build_index, check_ownership, repair, scan_directory
from ._core.space import Limits, Space
from ._core.write_mode import WriteMode, reads_direct, writer_mode
from .config import BucketConfig
from .errors import (
    InvalidArgument,
    KeyNotFound,
    ReadOnlyStore,
    StorageIOError,
)
from .policy.eviction import make_policy
from .policy.grouping import OffloadGrouper, split_batches

log = logging.getLogger(__name__)

__all__ = ["BucketStore", "StoreStats", "EvictionListener", "LoadHandle"]

@dataclass(frozen=True)
class StoreStats:
    """A snapshot of what the store holds and how close it is to its limits."""

    keys: int
    buckets: int
    logical_bytes: int
    """Value bytes of live objects."""
    physical_bytes: int
    """Allocated bytes of everything in the directory (``st_blocks * 512``, as ``du``)."""
    dead_bytes: int
    """Bytes of data files that no live object uses (removed objects)."""
    max_total_size: int
    max_physical_bytes: int
    total_keys_limit: int
    usage_ratio: float
    """The highest of the three usages relative to its limit (0.0 when unlimited)."""
    evicted_buckets: int
    """Buckets evicted since open."""
    evicted_keys: int
    """Objects evicted since open."""
    pending_deletions: int = 0
    """Buckets out of the index whose files an I/O error kept on disk; the
    next mutation deletes them first (and fails while it cannot)."""
    foreign_bytes: int = 0
    """The part of ``physical_bytes`` under entries that are not the store's
    (``physical_scope="directory"``); eviction cannot free it."""
    unmeasurable: tuple[str, ...] = ()
    """Paths below the directory that could not be listed or stat'ed; their
    content is not in ``physical_bytes``."""
    limits_known: bool = True
    """The three limits are known. A readonly store reports the limits its
    writer last recorded in ``LOCK``; False when none is recorded (a store
    last written by an older kvbucket), and the limits then read 0."""
    leased_keys: int = 0
    """Keys under an unexpired lookup lease (:meth:`BucketStore.lookup`)."""
    background_eviction_errors: int = 0
    """Background eviction runs that failed since open (each is logged)."""
    background_eviction_error: str | None = None
    """The last background eviction failure; None once a later run succeeds."""
    budget_bytes: int = 0
    """The size of the shared budget this writer is a member of (0: none)."""
    budget_used_bytes: int = 0
    """What every member of the budget counts together (usage and reservations)."""


class BucketStore:
    """A directory of buckets of KV-cache objects. Create with :meth:`open`."""

    def __init__(
        self,
        config: BucketConfig,
        fs: FileSystem,
        lock: StoreLock | None,
        clock: Clock | None = None,
        budget: Budget | None = None,
        write_mode: WriteMode | None = None,
    ) -> None:
        # write_mode: the writer's, from writer_mode() at open; None when readonly (nothing is written).
        # Set here and never reassigned (recovery_report: once more, by open);
        # each component guards its own state with its own lock.
        self._config = config
        self._fs = fs
        self._lock = lock  # the writer's LOCK; None when readonly
        self._dir = os.fspath(config.path)
        self._durable = config.durability == "strict"
        self._writer = threading.RLock()  # serialises every change to the directory
        limits = Limits(config.max_total_size, config.max_physical_bytes, config.total_keys_limit)
        policy = make_policy(config.eviction_policy, limits)
        grouper = OffloadGrouper(config.bucket_size_limit, config.bucket_keys_limit, config.group_max_delay_s)
        # The components call back into those created after them through these lambdas.
        self._reads = ReadPath(
            fs,
            self._dir,
            io_threads=config.io_threads,
            direct_reads=reads_direct(config.io_mode),
            verify=config.verify_checksums,
            on_corrupt=lambda truncated: self._catalog.corrupt(truncated),
        )
        self._catalog = Catalog(self._dir, policy, grouper, self._reads, clock or time.monotonic)
        self._loads = Loads(self._dir, self._catalog, self._reads, threads=config.io_threads, depth=config.load_queue_depth)
        self._space = Space(fs, self._dir, limits, self._catalog.usage, count_foreign=config.physical_scope == "directory")
        self._member = BudgetMember(budget, self._dir, lambda: self._space.usage().physical)
        self._files = BucketFiles(
            fs,
            self._dir,
            lock,
            self._catalog,
            self._space,
            durable=self._durable,
            write_mode=write_mode or WriteMode(config.io_mode, direct_ok=False),
            committed=lambda: self._eviction.committed(),
            reserve=self._member.reserve,
        )
        self._eviction: Eviction = Eviction(
            self._dir, config, self._catalog, self._space, policy.evicts, self._writer, self._files.delete, self._begin_mutation, self._member
        )
        self._writes = GroupCommit(config, self._catalog, self._reads, self._space, self._files, self._eviction)
        self.recovery_report = RecoveryReport()

    # -- opening and closing ------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | BucketConfig | None = None,
        /,
        *,
        filesystem: FileSystem | None = None,
        clock: Clock | None = None,
        **fields: Any,
    ) -> BucketStore:
        """Open (creating if needed) the store at ``path``, running recovery.

        ``path`` is a directory or a :class:`BucketConfig`; keyword ``fields``
        set or override configuration fields. ``filesystem`` replaces the I/O
        layer (tests use it to inject crashes and faults); ``clock`` (monotonic
        seconds, default :func:`time.monotonic`) times lookup leases.
        """
        config = _make_config(path, fields)
        fs = filesystem or FileSystem()
        directory = os.fspath(config.path)
        budget = open_budget(fs, config, directory)
        lock: StoreLock | None = None
        try:
            # A member takes its LOCK under the budget's flock: the others probe LOCKs only under it.
            with admitted(budget, directory):
                _prepare_directory(fs, directory, config.readonly)
                lock = _take_lock(fs, directory, config)
                join_budget(fs, budget, lock, directory, config)
            write_mode = None if lock is None else writer_mode(fs, directory, config.io_mode)
            store = cls(config, fs, lock, clock, budget, write_mode)
        except BaseException:
            if lock is not None:
                lock.release()
            if budget is not None:
                budget.close()
            raise
        try:
            store._recover()
            with store._writer:
                store._member.settle()
        except BaseException:
            if lock is not None:
                lock.release()
            store._member.close()
            raise
        store._eviction.start()
        return store

    def _recover(self) -> None:
        scan = run_io("scanning", self._dir, lambda: scan_directory(self._dir, self._fs))
        index = build_index(scan)
        if self._lock is not None:
            lock, durable, limits = self._lock, self._durable, self._space.limits
            check_ownership(scan, lock)
            run_io("claiming the store", self._dir, lock.claim)
            run_io("recording the limits", self._dir, lambda: lock.record_limits(WriterLimits(limits.logical, limits.physical, limits.keys)))
            self.recovery_report = run_io(
                "recovering", self._dir, lambda: repair(self._fs, scan, index, lock, quarantine=self._config.quarantine, durable=durable)
            )
            self._files.resume_ids(max(lock.high_water_mark, scan.max_id))
        else:
            self.recovery_report = RecoveryReport(buckets=len(index.buckets), keys=len(index), foreign_files=list(scan.foreign))
            run_io("reading LOCK", self._dir, self._space.adopt_recorded)
        self._catalog.install(index)
        self._space.reconcile()

    def refresh(self) -> None:
        """Re-read the directory (readonly stores: see buckets committed since open)."""
        self._catalog.check_open()
        scan = run_io("scanning", self._dir, lambda: scan_directory(self._dir, self._fs))
        with self._writer:
            if self._config.readonly:
                run_io("reading LOCK", self._dir, self._space.adopt_recorded)
            self._catalog.install(build_index(scan))
            self._space.reconcile()

    def close(self) -> None:
        """Release the directory. Loads in flight finish first (every
        :class:`LoadHandle` submitted before is done when this returns, its
        callbacks run); later calls raise :class:`StoreClosed`.

        The background evictor is stopped and joined first (a pass in
        progress completes), before the load threads stop.
        """
        self._eviction.stop()
        with self._writer:
            if not self._catalog.close():
                return
            self._loads.close()
            self._reads.close()
            self._files.close()
            _close_quietly(self._dir, "finishing deletions", self._files.finish_deletions)
            _close_quietly(self._dir, "publishing usage in the budget", self._member.leave)
            self._member.close()
            if self._lock is not None:
                _close_quietly(self._dir, "releasing the writer lock", self._lock.release)

    def __enter__(self) -> BucketStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def config(self) -> BucketConfig:
        """The validated configuration."""
        return self._config

    @property
    def path(self) -> str:
        """The store directory."""
        return self._dir

    @property
    def closed(self) -> bool:
        return self._catalog.closed

    def __len__(self) -> int:
        """The number of stored keys."""
        return self._catalog.count()

    def __bool__(self) -> bool:
        """Always true, even when empty: ``if store:`` keeps meaning "is not None"."""
        return True

    def __contains__(self, key: object) -> bool:
        """``key in store``: :meth:`exists`."""
        return self.exists(key)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        # No lock and no I/O: safe while any lock is held (logging, a
        # debugger); the counts are a snapshot of one index.
        mode = "readonly" if self._config.readonly else "writer"
        if self._catalog.closed:
            return f"<BucketStore {self._dir!r} {mode}, closed>"
        keys, buckets = self._catalog.shape()
        return f"<BucketStore {self._dir!r} {mode}, {keys} keys in {buckets} buckets>"

    # -- writing --------------------------------------------------------------
    def batch_offload(
        self,
        objects: Objects,
        on_complete: Callable[[list[str], list[ObjectMeta]], object] | None = None,
        on_evict: EvictionListener | None = None,
        on_duplicate: str = "error",
    ) -> int | None:
        """Write ``objects`` as one new bucket; return its id once it is durable.

        ``objects`` maps keys to values (a buffer, or a list of buffers written
        back to back); an iterable of ``(key, value)`` pairs works too. A key
        already stored raises :class:`KeyExists`, unless ``on_duplicate="skip"``
        (then only new keys are written, and ``None`` is returned when there
        are none). Buckets evicted to make room are reported to ``on_evict``
        before their files are deleted. ``on_complete(keys, metas)`` runs
        after the commit; if it raises, the bucket is rolled back and the
        error propagates.
        """
        skip = _skips_duplicates(on_duplicate)
        started = time.perf_counter()
        batch = prepare_batch(objects)
        with self._mutating():
            self._begin_mutation()
            written = self._writes.commit([batch], on_evict, skip, started)[0]
            if written is None:
                return None
            bucket, meta = written
            if on_complete is not None:
                self._writes.notify_complete(bucket, meta, on_complete)
            return bucket.bucket_id

    def offload_group(
        self,
        batches: Sequence[Objects],
        on_evict: EvictionListener | None = None,
        on_duplicate: str = "error",
    ) -> list[int | None]:
        """Write each of ``batches`` as its own bucket, committed together;
        return their ids (in order) once all are durable.

        Each batch is as for :meth:`batch_offload` (``None`` for a batch whose
        keys were all skipped). The group costs one directory ``fsync``
        instead of one per bucket. It succeeds or fails as a whole: on an
        error no bucket of the group is stored.
        """
        skip = _skips_duplicates(on_duplicate)
        started = time.perf_counter()
        prepared = [prepare_batch(objects) for objects in batches]
        with self._mutating():
            self._begin_mutation()
            written = self._writes.commit(prepared, on_evict, skip, started)
            return [None if w is None else w[0].bucket_id for w in written]

    # -- reading --------------------------------------------------------------
    def submit_load(self, destinations: Mapping[str, Buffer], *, timeout: float | None = None) -> LoadHandle:
        """Start reading each object into the caller's buffer (as :meth:`batch_load`); return at once.

        The returned :class:`LoadHandle` has a future for the batch and one
        per key: each key loads or fails on its own (a missing key, a buffer
        of the wrong size, a corrupt object or an I/O error fails only that
        key). Batches run concurrently with no barrier between them; the
        buffers must stay alive and untouched until the handle is done.
        Each object's bucket stays pinned until its read ends, so eviction,
        removal, compaction or a refresh meanwhile never yields wrong bytes.

        At most ``load_queue_depth`` batches are in flight: a submit beyond
        that waits for one to complete, up to ``timeout`` seconds (None: as
        long as it takes; 0: not at all), then raises
        :class:`CapacityExceeded`. After :meth:`close`, raises :class:`StoreClosed`.
        """
        if timeout is not None:
            timeout = check_number(timeout, "timeout (seconds)")
        return self._loads.submit(self._load_views(destinations, "submit_load"), "load", timeout=timeout)

    def batch_load(self, destinations: Mapping[str, Buffer]) -> None:
        """Read each object into the caller's buffer (exactly the object's size),
        or into a list of buffers filled back to back (sizes summing to the
        object's size), without copying.

        Unknown keys raise :class:`KeyNotFound` and wrong sizes
        :class:`SizeMismatch` before anything is read; a failed checksum
        raises :class:`CorruptionError` once every read of the batch has
        ended. On error the buffers' content is unspecified. It is
        :meth:`submit_load` and a wait, reading on the calling thread too.
        """
        self._loads.run(self._load_views(destinations, "batch_load"), "load")

    def _load_views(self, destinations: Mapping[str, Buffer], method: str) -> dict[str, list[memoryview]]:
        """The destinations of a load, checked, as lists of writable views."""
        destinations = key_mapping(destinations, method)
        if not destinations:
            raise InvalidArgument(f"{method} needs at least one key")
        return {key: destination_views(key, buf) for key, buf in destinations.items()}

    def batch_get(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The values of ``keys`` as ``bytes`` (a copy; :meth:`batch_load` avoids it)."""
        keys = key_list(keys, "batch_get")
        if not keys:
            raise InvalidArgument("batch_get needs at least one key")
        buffers = {key: bytearray(size) for key, size in self._catalog.sizes(keys, "get").items()}
        self._loads.run({key: [memoryview(buf)] for key, buf in buffers.items()}, "get")
        return {key: bytes(buf) for key, buf in buffers.items()}

    def prefetch(self, keys: Iterable[str]) -> int:
        """Hint that ``keys`` will be loaded soon: their bytes are read ahead
        into the page cache in the background; return how many keys were hinted.

        Returns without waiting for any read (a helper thread gives the
        kernel each stored key's byte range, adjacent objects of a bucket in
        one range). Unknown keys are ignored, and so is a bucket deleted,
        evicted or compacted meanwhile; the hint never changes what a load
        returns. With ``io_mode="direct"`` loads bypass the page cache, so
        nothing is hinted (0). After :meth:`close`, raises :class:`StoreClosed`.
        """
        keys = lookup_keys(keys, "prefetch")
        if reads_direct(self._config.io_mode):
            self._catalog.check_open()
            return 0
        hints, count = self._catalog.pin_hints(keys)
        if hints:
            self._reads.advise(hints)
        return count

    # -- metadata -------------------------------------------------------------
    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        check_lookup_key(key)
        return self._catalog.exists([key])[0]

    def batch_exists(self, keys: Iterable[str]) -> list[bool]:
        """For each key, whether it is stored."""
        return self._catalog.exists(lookup_keys(keys, "batch_exists"))

    def lookup(self, keys: Iterable[str], *, lease_s: float | None = None, prefix: bool = False) -> list[bool]:
        """For each key, whether it is stored; the stored ones are *leased*.

        A leased key's bucket is never chosen for eviction (foreground or
        background) until the lease ends: when the key is read
        (:meth:`batch_load`, :meth:`batch_get`), released (:meth:`release`),
        or ``lease_s`` seconds (default ``lookup_lease_s``; 0: no lease) have
        passed. So a block an engine looked up is still there when it loads
        it right after. Explicit removal ignores leases. With
        ``prefix=True`` the lookup stops at the first key not stored: the
        keys after it report False and are not leased (an engine loads only
        the found prefix). A readonly store grants no leases (it never evicts).
        """
        keys = lookup_keys(keys, "lookup")
        return self._catalog.lookup(keys, _lease_seconds(lease_s, self._config), prefix)

    def lease(self, keys: Iterable[str], *, lease_s: float | None = None) -> None:
        """Lease ``keys`` whether or not they are stored yet (see :meth:`lookup`).

        For a write-behind queue that reports staged keys as found: a key
        committed while its lease lasts is protected like a looked-up one.
        """
        keys = lookup_keys(keys, "lease")
        self._catalog.lease(keys, _lease_seconds(lease_s, self._config))

    def release(self, keys: Iterable[str]) -> None:
        """End the leases of ``keys`` (an engine that will not load them after all)."""
        self._catalog.release(lookup_keys(keys, "release"))

    def batch_query(self, keys: Iterable[str]) -> dict[str, ObjectMeta]:
        """Locations of the stored keys among ``keys`` (unknown keys are left out)."""
        return self._catalog.query(lookup_keys(keys, "batch_query"))

    def scan_meta(self, batch_size: int = 20000) -> Iterator[list[tuple[str, ObjectMeta]]]:
        """Pages of ``(key, meta)`` in bucket order; a page never splits a bucket
        unless that bucket alone has more than ``batch_size`` objects."""
        check_int(batch_size, "batch_size", minimum=1)
        yield from _pages(map(self._catalog.records, self.bucket_ids()), batch_size)

    def bucket_ids(self) -> list[int]:
        """Ids of all buckets, ascending."""
        return self._catalog.bucket_ids()

    def bucket_keys(self, bucket_id: int) -> list[str]:
        """Live keys of one bucket."""
        return self._catalog.bucket_keys(bucket_id)

    # -- removal --------------------------------------------------------------
    def delete_bucket(self, bucket_id: int) -> None:
        """Delete a bucket and all its objects, durably."""
        with self._mutating():
            self._begin_mutation()
            self._files.delete([self._catalog.bucket(bucket_id)])

    def remove_all(self) -> None:
        """Delete every bucket, durably."""
        with self._mutating():
            self._begin_mutation()
            self._files.delete(self._catalog.buckets())

    def remove(self, key: str) -> None:
        """Remove one object, durably; an unknown key raises :class:`KeyNotFound`."""
        check_key(key)
        if not self.batch_remove([key])[0]:
            raise KeyNotFound(f"key {key!r} is not stored")

    def batch_remove(self, keys: Iterable[str]) -> list[bool]:
        """Remove objects, durably; returns, per key, whether it was stored.

        A bucket left without live objects is deleted; otherwise its meta is
        rewritten without the removed keys (their bytes become dead until
        :meth:`compact` or eviction reclaims them).
        """
        keys = key_list(keys, "batch_remove")
        with self._mutating():
            self._begin_mutation()
            found, by_bucket = self._catalog.locate(keys)
            for bucket_id, removed in by_bucket.items():
                self._files.remove(bucket_id, removed)
            return found

    # -- capacity -------------------------------------------------------------
    def add_eviction_listener(self, listener: EvictionListener) -> None:
        """Call ``listener(keys)`` with the keys of every eviction, foreground
        or background, once they are out of the index and before their files
        are deleted (the eviction is decided: an exception from the listener
        is logged and changes nothing). It runs holding the writer lock, on
        the thread that evicts: it must not call back into the store's writes."""
        self._eviction.add_listener(listener)

    def evict_to_watermark(
        self, high: float | None = None, low: float | None = None, on_evict: EvictionListener | None = None
    ) -> list[str]:
        """When usage is above ``high`` of a limit, evict down to ``low``; return the evicted keys.

        Evicts only what reaches ``low``: when even evicting every bucket
        would not (the bytes that are not buckets, such as foreign files,
        exceed ``low`` of ``max_physical_bytes``), nothing is evicted and
        :class:`CapacityExceeded` says what holds the space.
        """
        high = self._config.eviction_high_watermark if high is None else high
        low = self._config.eviction_low_watermark if low is None else low
        if not 0 < low <= high <= 1:
            raise InvalidArgument(f"watermarks need 0 < low <= high <= 1; got high={high!r}, low={low!r}")
        with self._mutating():
            self._begin_mutation()
            return self._eviction.to_watermark(high, low, on_evict)

    def wait_for_eviction(self, timeout: float | None = None) -> bool:
        """Wait until the background evictor is idle: no pass running and no
        commit left unhandled. True at once without an evictor; False when
        ``timeout`` seconds passed first. Once it returns True, usage is at or
        below ``eviction_high_watermark`` unless leases or bytes that are not
        buckets hold it up (or a run failed: see :meth:`stats`)."""
        return self._eviction.wait_idle(timeout)

    def compact(self, min_dead_ratio: float = 0.5) -> int:
        """Rewrite the live objects of buckets at least ``min_dead_ratio`` dead
        into new buckets, then delete the old ones; return the allocated bytes freed.

        Crash-safe: an old bucket is deleted only after its objects' new
        bucket is committed (recovery drops the older copies if a crash
        comes in between).
        """
        min_dead_ratio = check_number(min_dead_ratio, "min_dead_ratio", 0.0, 1.0)
        with self._mutating():
            self._begin_mutation()
            candidates = [b for b in self._catalog.buckets() if b.dead > 0 and b.dead >= min_dead_ratio * b.data_length]
            groups = split_batches(
                candidates,
                max_bytes=self._config.bucket_size_limit,
                max_keys=self._config.bucket_keys_limit,
                size=lambda bucket: bucket.logical,
                keys=lambda bucket: len(bucket.keys),
            )
            return sum(self._compact_group(group) for group in groups)

    def _compact_group(self, group: list[Bucket]) -> int:
        """Compact one group into a new bucket, its room reserved in the budget
        (never more than the group's buckets allocate, plus the directory's growth).

        Requires: ``_writer`` held.
        """
        self._member.reserve(sum(bucket.physical for bucket in group) + ALIGNMENT)
        freed = self._files.compact(group, self.batch_get([k for b in group for k in b.keys]))
        self._space.track_directory_growth()
        self._member.settle()
        return freed

    def group_for_offload(self, sizes: Mapping[str, int], flush: bool = False) -> list[list[str]]:
        """Group ``{key: size}`` into full buckets; carry the partial rest to the next call.

        ``flush=True``, or a remainder older than ``group_max_delay_s``, emits
        the rest too. Keys already stored or already pending are dropped; an
        object larger than ``bucket_size_limit`` gets a bucket of its own.
        """
        return self._catalog.group(_checked_sizes(sizes, "group_for_offload"), flush)

    def group_batch(self, sizes: Mapping[str, int]) -> list[list[str]]:
        """Cut one batch ``{key: size}`` into buckets of its own (full ones and
        the partial rest), pooling nothing with :meth:`group_for_offload`.

        Keys already stored are dropped; an object larger than
        ``bucket_size_limit`` gets a bucket of its own.
        """
        return self._catalog.split(_checked_sizes(sizes, "group_batch"))

    def pending_group(self) -> list[str]:
        """Keys carried over by :meth:`group_for_offload`, waiting to fill a bucket."""
        return self._catalog.pending()

    def stats(self) -> StoreStats:
        """Counts, sizes and limits; ``physical_bytes`` comes from a fresh directory scan."""
        self._catalog.check_open()
        with self._writer:  # no bucket changes meanwhile: one consistent snapshot
            self._space.reconcile()
            stats = _stats(self._catalog, self._space, self._eviction)
            share = self._member.share()
            return stats if share is None else dataclasses.replace(stats, budget_bytes=share[0], budget_used_bytes=share[1])

    def counters(self) -> CounterSnapshot:
        """The operation counters since open: hits and misses, bytes read and
        written, latency histograms, checksum failures (no I/O)."""
        return self._catalog.counter_snapshot()

    @contextlib.contextmanager
    def _mutating(self) -> Iterator[None]:
        """Hold the writer lock for a change to the directory; afterwards publish
        the usage in the shared budget (and drop any reservation), even when the
        change failed (then a failure to publish is logged, not raised)."""
        with self._writer:
            try:
                yield
            except BaseException:
                _close_quietly(self._dir, "publishing usage in the budget", self._member.settle)
                raise
            self._member.settle()

    def _begin_mutation(self) -> None:
        """Every mutation starts here: raise unless the store is open and
        writable, then finish the deletions an earlier I/O error left (I/O).

        Requires: ``_writer`` held.
        """
        self._catalog.check_open()
        if self._config.readonly:
            raise ReadOnlyStore(f"the store at {self._dir} was opened readonly; open it without readonly=True to write")
        self._files.finish_deletions()


def _make_config(path: str | os.PathLike[str] | BucketConfig | None, fields: dict[str, Any]) -> BucketConfig:
    if isinstance(path, BucketConfig):
        config = path
        if fields:
            try:
                config = BucketConfig(**{**config.__dict__, **fields})
            except TypeError as exc:
                raise InvalidArgument(str(exc)) from exc
    else:
        if path is not None:
            fields = {**fields, "path": path}
        try:
            config = BucketConfig(**fields)
        except TypeError as exc:
            raise InvalidArgument(f"unknown configuration field: {exc}") from exc
    return config.validated()


def _take_lock(fs: FileSystem, directory: str, config: BucketConfig) -> StoreLock | None:
    """The writer lock of ``directory``; None when readonly."""
    try:
        return None if config.readonly else _acquire_lock(fs, directory, config.durability == "strict")
    except OSError as exc:
        if isinstance(exc, StorageIOError):
            raise
        raise StorageIOError(f"taking the writer lock of {directory} failed: {exc.strerror or exc}", exc) from exc


def _acquire_lock(fs: FileSystem, directory: str, durable: bool) -> StoreLock:
    """Lock the store's ``LOCK``; create it only in a directory a writer may
    take (:func:`~kvbucket._core.recovery.check_ownership`), so a refused
    directory is left exactly as it was."""
    lock = StoreLock.open_existing(fs, directory, durable)
    if lock is None:
        check_ownership(scan_directory(directory, fs), None)
        lock = StoreLock.acquire(fs, directory, durable)
    return lock


def _prepare_directory(fs: FileSystem, directory: str, readonly: bool) -> None:
    """Check ``directory`` is one (a link to one is followed), or create it for a writer."""
    try:
        stat_directory(fs, directory)
        return
    except FileNotFoundError:
        pass
    except NotADirectoryError as exc:
        raise InvalidArgument(f"{directory} exists and is not a directory (or a component of its path is not one)") from exc
    except OSError as exc:
        raise StorageIOError(f"checking {directory} failed: {exc.strerror}", exc) from exc
    if readonly:
        raise InvalidArgument(f"{directory} does not exist (readonly=True never creates it)")
    try:
        fs.mkdir(directory)
    except OSError as exc:
        raise StorageIOError(f"creating {directory} failed: {exc.strerror}", exc) from exc


def _skips_duplicates(on_duplicate: str) -> bool:
    """Whether ``on_duplicate`` asks to skip stored keys (``"skip"``) rather than raise (``"error"``)."""
    if on_duplicate not in ("error", "skip"):
        raise InvalidArgument(f"on_duplicate must be 'error' or 'skip'; got {on_duplicate!r}")
    return on_duplicate == "skip"


def _lease_seconds(lease_s: float | None, config: BucketConfig) -> float:
    """The lease a lookup grants: ``lease_s``, checked, or the configured
    default; 0 in a readonly store (it never evicts)."""
    seconds = config.lookup_lease_s if lease_s is None else check_number(lease_s, "lease_s (seconds)")
    return 0.0 if config.readonly else seconds


def _close_quietly(directory: str, what: str, step: Callable[[], None]) -> None:
    """A close step that fails is logged: what it leaves, the next open repairs."""
    try:
        step()
    except OSError as exc:
        log.warning("%s of %s failed while closing: %s", what, directory, exc)


def _pages(buckets: Iterator[list[tuple[str, ObjectMeta]]], batch_size: int) -> Iterator[list[tuple[str, ObjectMeta]]]:
    """The records of ``buckets`` in pages of at most ``batch_size``; a page
    splits a bucket only when that bucket alone has more."""
    page: list[tuple[str, ObjectMeta]] = []
    for records in buckets:
        if page and len(page) + len(records) > batch_size:
            yield page
            page = []
        while len(records) > batch_size:
            yield records[:batch_size]
            records = records[batch_size:]
        page.extend(records)
    if page:
        yield page


def _stats(catalog: Catalog, space: Space, eviction: Eviction) -> StoreStats:
    """One snapshot of the components (the caller holds the writer lock: no bucket changes meanwhile)."""
    keys, buckets, logical, dead, leased = catalog.totals()
    usage, limits, measured = space.usage(), space.limits, space.measured()
    evicted_buckets, evicted_keys = eviction.evicted
    return StoreStats(
        keys=keys,
        buckets=buckets,
        logical_bytes=logical,
        physical_bytes=usage.physical,
        dead_bytes=dead,
        max_total_size=limits.logical,
        max_physical_bytes=limits.physical,
        total_keys_limit=limits.keys,
        usage_ratio=limits.ratio(usage),
        evicted_buckets=evicted_buckets,
        evicted_keys=evicted_keys,
        pending_deletions=space.pending_deletions(),
        foreign_bytes=measured.foreign,
        unmeasurable=tuple(measured.unmeasurable),
        limits_known=space.limits_known,
        leased_keys=leased,
        background_eviction_errors=eviction.background_errors,
        background_eviction_error=eviction.background_error,
    )


def _checked_sizes(sizes: Mapping[str, int], method: str) -> Mapping[str, int]:
    """``{key: size}`` given to ``method``, checked: valid keys, sizes non-negative integers."""
    sizes = key_mapping(sizes, method)
    for key, size in sizes.items():
        check_int(size, f"size of key {key!r}")
    return sizes
