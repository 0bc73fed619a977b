"""BucketStore: the public face of kvbucket.

Concurrency: ``_mutex`` guards the index and bucket descriptors and is held
only for in-memory work (and opening a read descriptor). ``_writer``
serialises everything that changes the directory: offload, removal,
deletion, eviction, compaction. Reads take neither during I/O: they *pin*
their buckets under ``_mutex``, read through the pinned descriptor, and
unpin. A bucket deleted meanwhile is unlinked at once, but its descriptor
stays open until the last pin goes, so a read that has started completes
with the right bytes (POSIX keeps an unlinked file readable). ``close()``
waits for the reads in flight before it stops the I/O threads.

Background eviction: a writer with an eviction policy and a limit owns one
:class:`~kvbucket._core.evictor.BackgroundEvictor` thread, woken by each commit
that leaves usage above the high watermark.
Each of its passes takes ``_writer`` like a foreground eviction does, for a
bounded number of buckets, and deletes them through the same path, so the
crash-safety argument is the foreground one. ``close()`` stops and joins it
before anything else.

Leases: :meth:`BucketStore.lookup` leases the keys it finds
(:mod:`kvbucket._core.lease`); every eviction chooses its victims among the
buckets holding no leased key.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from ._core.arguments import check_lookup_key, key_list, key_mapping, key_value_pairs, lookup_keys
from ._core.buffers import Buffer, value_views, writable_views
from ._core.checksum import crc32c_of
from ._core.commit import delete_bucket_files, publish_meta, write_bucket
from ._core.counters import CounterSnapshot, StoreCounters
from ._core.datafile import open_for_read, read_value
from ._core.evictor import BackgroundEvictor
from ._core.format import (
    ALIGNMENT,
    HEADER_SIZE,
    MAX_BUCKET_ID,
    RECORD_SIZE,
    BucketMeta,
    MetaRecord,
    aligned_layout,
    check_key,
    data_name,
    packed_layout,
)
from ._core.fs import FileSystem
from ._core.index import Bucket, Index, ObjectMeta
from ._core.lease import Clock, LeaseTable
from ._core.lockfile import StoreLock, WriterLimits, read_writer_limits
from ._core.recovery import RecoveryReport, build_index, check_ownership, repair, scan_directory
from ._core.usage import PhysicalUsage, measure_store
from .config import BucketConfig
from .errors import (
    CapacityExceeded,
    CorruptionError,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    ReadOnlyStore,
    SizeMismatch,
    StorageIOError,
    StoreClosed,
)
from .policy.eviction import Limits, Usage, make_policy
from .policy.grouping import OffloadGrouper, split_batches

log = logging.getLogger(__name__)

__all__ = ["BucketStore", "StoreStats"]

BACKGROUND_EVICTION_BATCH = 8
"""Most buckets one background eviction pass deletes while holding the writer lock."""

MAX_OPEN_DESCRIPTORS = 256
"""Read descriptors kept open across calls; older unpinned ones are closed."""

_T = TypeVar("_T")
Value = Buffer | Sequence[Buffer]
Objects = Mapping[str, Value] | Iterable[tuple[str, Value]]
Callback = Callable[[list[str]], object]
_Read = tuple[Bucket, str, ObjectMeta, list[memoryview]]
"""One object to read: its pinned bucket, key, location and destination pieces."""


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


@dataclass
class _Object:
    """One object of a batch being written."""

    key: str
    views: list[memoryview]
    size: int


class BucketStore:
    """A directory of buckets of KV-cache objects. Create with :meth:`open`."""

    def __init__(self, config: BucketConfig, fs: FileSystem, lock: StoreLock | None, clock: Clock | None = None) -> None:
        self._config = config
        self._fs = fs
        self._lock = lock
        self._dir = os.fspath(config.path)
        self._index = Index()
        self._mutex = threading.Lock()
        self._writer = threading.RLock()
        # Reads counted from their lookup (under _mutex) to their unpin. close()
        # shuts the I/O pool down only once this is 0 with _closed set, so no read
        # submits to a shut-down pool and none starts after close().
        self._reads_in_flight = 0
        self._reads_done = threading.Condition(self._mutex)
        # Buckets with an open read descriptor, least recently used first. Keyed
        # by the Bucket itself, not its id: after a refresh the retired bucket
        # and its replacement share an id, and each closes only its own descriptor.
        self._descriptors: OrderedDict[Bucket, None] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._clock = 0
        self._next_id = 1
        self._other_physical = 0
        self._dir_physical = 0
        self._measured = PhysicalUsage()
        self._scan_error: OSError | None = None
        self._warned: set[str] = set()
        self._warned_foreign = False
        self._undeleted: dict[int, int] = {}  # out of the index, files not yet deleted -> allocated bytes
        self._evicted = [0, 0]
        self._counters = StoreCounters()  # bumped under _mutex
        self._limits = Limits(config.max_total_size, config.max_physical_bytes, config.total_keys_limit)
        self._limits_known = True
        self._policy = make_policy(config.eviction_policy, self._limits)
        self._grouper = OffloadGrouper(config.bucket_size_limit, config.bucket_keys_limit, config.group_max_delay_s)
        self._leases = LeaseTable(clock or time.monotonic)  # guarded by _mutex
        self._eviction_listeners: list[Callback] = []
        self._evictor: BackgroundEvictor | None = None
        self._evictor_errors = 0
        self._evictor_error: str | None = None
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
        _prepare_directory(fs, directory, config.readonly)
        try:
            lock = None if config.readonly else _acquire_lock(fs, directory, config.durability == "strict")
        except OSError as exc:
            if isinstance(exc, StorageIOError):
                raise
            raise StorageIOError(f"taking the writer lock of {directory} failed: {exc.strerror or exc}", exc) from exc
        store = cls(config, fs, lock, clock)
        try:
            store._recover()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        store._start_background_eviction()
        return store

    def _recover(self) -> None:
        scan = self._io("scanning", lambda: scan_directory(self._dir, self._fs))
        index = build_index(scan)
        if self._lock is not None:
            lock, durable = self._lock, self._durable
            check_ownership(scan, lock)
            self._io("claiming the store", lock.claim)
            limits = WriterLimits(self._limits.logical, self._limits.physical, self._limits.keys)
            self._io("recording the limits", lambda: lock.record_limits(limits))
            self.recovery_report = self._io(
                "recovering", lambda: repair(self._fs, scan, index, lock, quarantine=self._config.quarantine, durable=durable)
            )
            self._next_id = max(lock.high_water_mark, scan.max_id) + 1
        else:
            self.recovery_report = RecoveryReport(buckets=len(index.buckets), keys=len(index), foreign_files=list(scan.foreign))
            self._read_writer_limits()
        self._install(index)
        self._reconcile_physical()

    def _read_writer_limits(self) -> None:
        """A readonly store reports the limits its writer last recorded (none
        enforced here): ``kvbucket stats`` shows what the writer runs with."""
        recorded = self._io("reading LOCK", lambda: read_writer_limits(self._fs, self._dir))
        self._limits_known = recorded is not None
        self._limits = Limits(*(recorded or (0, 0, 0)))

    def _install(self, index: Index) -> None:
        """Replace the index (on open and refresh)."""
        with self._mutex:
            old, self._index = self._index, index
            self._clock = len(index.buckets)
            for bucket in old.buckets.values():
                self._retire(bucket)

    def refresh(self) -> None:
        """Re-read the directory (readonly stores: see buckets committed since open)."""
        self._check_open()
        scan = self._io("scanning", lambda: scan_directory(self._dir, self._fs))
        with self._writer:
            if self._config.readonly:
                self._read_writer_limits()
            self._install(build_index(scan))
            self._reconcile_physical()

    def close(self) -> None:
        """Release the directory. Reads in flight finish first; later calls raise :class:`StoreClosed`.

        The background evictor is stopped and joined first (a pass in
        progress completes), before the I/O threads stop.
        """
        if self._evictor is not None:
            self._evictor.stop()
        with self._writer:
            with self._mutex:
                if self._closed:
                    return
                self._closed = True
                for bucket in list(self._index.buckets.values()):
                    self._retire(bucket)
                self._wait_for_reads_locked()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._close_quietly("finishing deletions", self._finish_deletions)
            if self._lock is not None:
                self._close_quietly("releasing the writer lock", self._lock.release)

    def _wait_for_reads_locked(self) -> None:
        """Wait (releasing ``_mutex``) until every read in flight has unpinned."""
        if self._reads_in_flight:
            log.debug("closing %s waits for %d read(s) in flight", self._dir, self._reads_in_flight)
        while self._reads_in_flight:
            self._reads_done.wait()

    def _close_quietly(self, what: str, step: Callable[[], None]) -> None:
        """A close step that fails is logged: what it leaves, the next open repairs."""
        try:
            step()
        except OSError as exc:
            log.warning("%s of %s failed while closing: %s", what, self._dir, exc)

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
        return self._closed

    def __len__(self) -> int:
        """The number of stored keys."""
        with self._mutex:
            self._check_open()
            return len(self._index)

    def __bool__(self) -> bool:
        """Always true, even when empty: ``if store:`` keeps meaning "is not None"."""
        return True

    def __contains__(self, key: object) -> bool:
        """``key in store``: :meth:`exists`."""
        return self.exists(key)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        # No lock and no I/O: safe while _mutex or _writer is held (logging,
        # a debugger); the counts are a snapshot of one index.
        mode = "readonly" if self._config.readonly else "writer"
        if self._closed:
            return f"<BucketStore {self._dir!r} {mode}, closed>"
        index = self._index
        return f"<BucketStore {self._dir!r} {mode}, {len(index)} keys in {len(index.buckets)} buckets>"

    # -- writing --------------------------------------------------------------
    def batch_offload(
        self,
        objects: Objects,
        on_complete: Callable[[list[str], list[ObjectMeta]], object] | None = None,
        on_evict: Callback | None = None,
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
        if on_duplicate not in ("error", "skip"):
            raise InvalidArgument(f"on_duplicate must be 'error' or 'skip'; got {on_duplicate!r}")
        started = time.perf_counter()
        batch = _prepare_batch(objects)
        with self._writer:
            self._check_writable()
            batch = self._without_stored(batch, skip=on_duplicate == "skip")
            if not batch:
                return None
            self._check_bucket_limits(batch)
            aligned = self._config.io_mode == "direct"
            offsets, length = (aligned_layout if aligned else packed_layout)([o.size for o in batch])
            need = Usage(sum(o.size for o in batch), _physical_estimate(batch, length), len(batch))
            self._make_room(need, on_evict)
            bucket_id = self._allocate_id()
            meta = BucketMeta.from_columns(
                bucket_id, length, aligned, [o.key for o in batch], array("Q", offsets), array("Q", [o.size for o in batch]), array("I")
            )
            # The checksums are needed only for the meta: compute them while the data is written.
            checksums = self._executor().submit(lambda: array("I", [crc32c_of(o.views) for o in batch]))
            physical = self._io(
                f"writing bucket {bucket_id}",
                lambda: write_bucket(
                    self._fs, self._dir, meta, [o.views for o in batch], direct=aligned, durable=self._durable, checksums=checksums.result
                ),
            )
            bucket = self._commit(meta, physical, started)
            self._track_directory_growth()
            if on_complete is not None:
                self._notify_complete(bucket, meta, on_complete)
            return bucket_id

    def _commit(self, meta: BucketMeta, physical: int, started: float | None = None) -> Bucket:
        bucket = Bucket(meta.bucket_id, meta.data_length, meta.aligned, physical)
        with self._mutex:
            self._index.add_bucket(bucket, meta)
            self._touch(bucket)
            self._counters.wrote(len(bucket.keys), bucket.logical, None if started is None else time.perf_counter() - started)
            self._policy.committed(bucket)
            above_high = self._limits.ratio(self._usage_locked()) > self._config.eviction_high_watermark
        if self._evictor is not None and (above_high or self._evictor_error is not None):
            self._evictor.wake()  # after a failed run, the next commit retries (and clears the error)
        return bucket

    def _notify_complete(self, bucket: Bucket, meta: BucketMeta, on_complete: Callable[..., object]) -> None:
        keys = list(meta.keys)
        metas = [ObjectMeta(meta.bucket_id, *fields) for fields in zip(meta.offsets, meta.sizes, meta.crcs)]
        try:
            on_complete(keys, metas)
        except BaseException:
            log.warning("on_complete failed for bucket %d; rolling it back", bucket.bucket_id)
            try:
                self._delete_buckets([bucket])
            except StorageIOError as exc:  # the callback's error is the one to report
                log.error("rolling back bucket %d failed (%s); the next open removes it only if it is damaged", bucket.bucket_id, exc)
            raise

    def _without_stored(self, batch: list[_Object], skip: bool) -> list[_Object]:
        with self._mutex:
            stored = [o.key for o in batch if o.key in self._index]
        if stored and not skip:
            raise KeyExists(f"key {stored[0]!r} is already stored" + (f" (and {len(stored) - 1} more)" if len(stored) > 1 else ""))
        if not stored:
            return batch
        skipped = set(stored)
        return [o for o in batch if o.key not in skipped]

    def _check_bucket_limits(self, batch: list[_Object]) -> None:
        if len(batch) == 1:
            return
        size = sum(o.size for o in batch)
        if len(batch) > self._config.bucket_keys_limit:
            raise InvalidArgument(f"batch of {len(batch)} objects exceeds bucket_keys_limit={self._config.bucket_keys_limit}")
        if size > self._config.bucket_size_limit:
            raise InvalidArgument(
                f"batch of {size} value bytes exceeds bucket_size_limit={self._config.bucket_size_limit}; "
                "split it (group_for_offload does)"
            )

    def _allocate_id(self) -> int:
        if self._next_id > MAX_BUCKET_ID:
            raise CapacityExceeded(
                f"bucket ids of {self._dir} are used up to the limit {MAX_BUCKET_ID}: files with huge ids "
                "were put in the directory. Copy the objects into a new store (or, with no writer "
                "running, remove the files with the highest ids and LOCK, which records them)."
            )
        bucket_id = self._next_id
        self._next_id += 1
        return bucket_id

    # -- reading --------------------------------------------------------------
    def batch_load(self, destinations: Mapping[str, Buffer]) -> None:
        """Read each object into the caller's buffer (exactly the object's size),
        or into a list of buffers filled back to back (sizes summing to the
        object's size), without copying.

        Unknown keys raise :class:`KeyNotFound`, wrong sizes
        :class:`SizeMismatch`, a failed checksum :class:`CorruptionError`; on
        error the buffers' content is unspecified.
        """
        destinations = key_mapping(destinations, "batch_load")
        if not destinations:
            raise InvalidArgument("batch_load needs at least one key")
        views = {key: writable_views(buf, f"buffer for key {key!r}") for key, buf in destinations.items()}
        self._read(views, "load")

    def batch_get(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The values of ``keys`` as ``bytes`` (a copy; :meth:`batch_load` avoids it)."""
        keys = key_list(keys, "batch_get")
        if not keys:
            raise InvalidArgument("batch_get needs at least one key")
        with self._mutex:
            self._check_open()
            try:
                sizes = {key: self._meta_locked(key).size for key in keys}
            except KeyNotFound:
                self._counters.looked_up("get", 0, 1)
                raise
        buffers = {key: bytearray(size) for key, size in sizes.items()}
        self._read({key: [memoryview(buf)] for key, buf in buffers.items()}, "get")
        return {key: bytes(buf) for key, buf in buffers.items()}

    def _read(self, views: dict[str, list[memoryview]], op: str) -> None:
        started = time.perf_counter()
        plan = self._pin(views, op)
        done: tuple[int, int, float] | None = None  # objects, bytes, start of a read that succeeded
        try:
            self._run_reads(plan)
            done = (len(plan), sum(meta.size for _, _, meta, _ in plan), started)
        finally:
            self._unpin({id(bucket): bucket for bucket, _, _, _ in plan}.values(), views, done)

    def _pin(self, views: dict[str, list[memoryview]], op: str) -> list[_Read]:
        """Look up every key (counting hits and misses of ``op``) and pin its
        bucket, all under one lock hold; the read is in flight until :meth:`_unpin`."""
        plan: list[_Read] = []
        with self._mutex:
            self._check_open()
            nbytes = 0
            for key, view in views.items():
                size = sum(len(piece) for piece in view)
                try:
                    meta = self._meta_locked(key)
                except KeyNotFound:
                    self._counters.looked_up(op, len(plan), 1, nbytes, size if op == "load" else 0)
                    raise
                if size != meta.size:
                    raise SizeMismatch(f"buffer for key {key!r} is {size} bytes; the object is {meta.size}")
                plan.append((self._index.buckets[meta.bucket_id], key, meta, view))
                nbytes += size
            self._counters.looked_up(op, len(plan), 0, nbytes)
            pinned: list[Bucket] = []
            try:
                for bucket in {id(b): b for b, _, _, _ in plan}.values():
                    self._open_descriptor(bucket)
                    bucket.pins += 1
                    pinned.append(bucket)
                    self._touch(bucket)
                    self._policy.read(bucket)
            except BaseException:
                self._unpin_locked(pinned)
                raise
            self._reads_in_flight += 1
        return plan

    def _run_reads(self, plan: list[_Read]) -> None:
        if len(plan) == 1 or self._config.io_threads == 1:
            for item in plan:
                self._read_one(*item)
            return
        plan = sorted(plan, key=lambda item: (item[2].bucket_id, item[2].offset))
        lanes = min(self._config.io_threads, len(plan))
        futures = [self._executor().submit(self._read_lane, plan[lane::lanes]) for lane in range(lanes)]
        errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error

    def _read_lane(self, items: list[_Read]) -> None:
        for item in items:
            self._read_one(*item)

    def _read_one(self, bucket: Bucket, key: str, meta: ObjectMeta, view: list[memoryview]) -> None:
        direct = self._config.io_mode == "direct"
        got = self._io(f"reading key {key!r} from bucket {meta.bucket_id}", lambda: read_value(self._fs, bucket.fd, meta.offset, view, direct))
        if got != meta.size:
            self._count_corrupt(truncated=True)
            raise CorruptionError(f"key {key!r}: bucket {meta.bucket_id}'s data file ends {meta.size - got} bytes early")
        if self._config.verify_checksums and crc32c_of(view) != meta.checksum:
            self._count_corrupt(truncated=False)
            raise CorruptionError(f"key {key!r} in bucket {meta.bucket_id} fails its checksum; the bytes were not returned")

    def _count_corrupt(self, truncated: bool) -> None:
        with self._mutex:
            self._counters.corrupt(truncated)

    def _executor(self) -> ThreadPoolExecutor:
        with self._mutex:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._config.io_threads, thread_name_prefix="kvbucket-io")
            return self._pool

    def _open_descriptor(self, bucket: Bucket) -> None:
        """Ensure ``bucket.fd`` is open (under ``_mutex``); bound the cache."""
        if bucket.fd >= 0:
            self._descriptors.move_to_end(bucket)
            return
        path = os.path.join(self._dir, data_name(bucket.bucket_id))
        try:
            bucket.fd = open_for_read(self._fs, path, self._config.io_mode == "direct")
        except FileNotFoundError as exc:
            raise KeyNotFound(f"bucket {bucket.bucket_id} was deleted by its writer; refresh() the store") from exc
        except OSError as exc:
            raise StorageIOError(f"opening bucket {bucket.bucket_id} failed: {exc.strerror}", exc) from exc
        self._descriptors[bucket] = None
        while len(self._descriptors) > MAX_OPEN_DESCRIPTORS:
            oldest = next((b for b in self._descriptors if b.pins == 0), None)
            if oldest is None:
                break
            self._close_descriptor(oldest)

    def _close_descriptor(self, bucket: Bucket) -> None:
        self._descriptors.pop(bucket, None)
        if bucket.fd >= 0:
            fd, bucket.fd = bucket.fd, -1
            try:
                self._fs.close(fd)
            except OSError as exc:
                log.warning("closing bucket %d's descriptor failed: %s", bucket.bucket_id, exc)

    def _unpin(self, buckets: Iterable[Bucket], keys: Iterable[str], done: tuple[int, int, float] | None) -> None:
        """Unpin the buckets of a read that :meth:`_pin` started; the read is
        over, the leases of its ``keys`` end, and ``done`` (objects, bytes,
        start time) counts one that succeeded."""
        with self._mutex:
            self._leases.release(keys)
            if done is not None:
                self._counters.read(done[0], done[1], time.perf_counter() - done[2])
            self._unpin_locked(buckets)
            self._reads_in_flight -= 1
            if not self._reads_in_flight:
                self._reads_done.notify_all()

    def _unpin_locked(self, buckets: Iterable[Bucket]) -> None:
        for bucket in buckets:
            bucket.pins -= 1
            if bucket.retired and bucket.pins == 0:
                self._close_descriptor(bucket)

    def _retire(self, bucket: Bucket) -> None:
        """Mark a bucket gone from the index (under ``_mutex``)."""
        bucket.retired = True
        if bucket.pins == 0:
            self._close_descriptor(bucket)

    def _touch(self, bucket: Bucket) -> None:
        self._clock += 1
        bucket.access = self._clock

    # -- metadata -------------------------------------------------------------
    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        check_lookup_key(key)
        with self._mutex:
            self._check_open()
            found = key in self._index
            self._counters.exists(found, 1)
            return found

    def batch_exists(self, keys: Iterable[str]) -> list[bool]:
        """For each key, whether it is stored."""
        keys = lookup_keys(keys, "batch_exists")
        with self._mutex:
            self._check_open()
            slots = self._index.slots
            flags = [key in slots for key in keys]
            self._counters.exists(flags.count(True), len(flags))
            return flags

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
        seconds = self._lease_seconds(lease_s)
        with self._mutex:
            self._check_open()
            slots = self._index.slots
            found = [key in slots for key in keys]
            if prefix and not all(found):
                first_missing = found.index(False)
                found[first_missing:] = [False] * (len(found) - first_missing)
            if seconds and not self._config.readonly:
                self._leases.grant((key for key, hit in zip(keys, found) if hit), seconds)
        return found

    def lease(self, keys: Iterable[str], *, lease_s: float | None = None) -> None:
        """Lease ``keys`` whether or not they are stored yet (see :meth:`lookup`).

        For a write-behind queue that reports staged keys as found: a key
        committed while its lease lasts is protected like a looked-up one.
        """
        keys = lookup_keys(keys, "lease")
        seconds = self._lease_seconds(lease_s)
        with self._mutex:
            self._check_open()
            if seconds and not self._config.readonly:
                self._leases.grant(keys, seconds)

    def release(self, keys: Iterable[str]) -> None:
        """End the leases of ``keys`` (an engine that will not load them after all)."""
        keys = lookup_keys(keys, "release")
        with self._mutex:
            self._leases.release(keys)

    def _lease_seconds(self, lease_s: float | None) -> float:
        if lease_s is None:
            return self._config.lookup_lease_s
        if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or not 0 <= lease_s < float("inf"):
            raise InvalidArgument(f"lease_s must be a finite number of seconds >= 0; got {lease_s!r}")
        return float(lease_s)

    def batch_query(self, keys: Iterable[str]) -> dict[str, ObjectMeta]:
        """Locations of the stored keys among ``keys`` (unknown keys are left out)."""
        keys = lookup_keys(keys, "batch_query")
        with self._mutex:
            self._check_open()
            return self._index.query(keys)

    def scan_meta(self, batch_size: int = 20000) -> Iterator[list[tuple[str, ObjectMeta]]]:
        """Pages of ``(key, meta)`` in bucket order; a page never splits a bucket
        unless that bucket alone has more than ``batch_size`` objects."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgument(f"batch_size must be a positive integer; got {batch_size!r}")
        page: list[tuple[str, ObjectMeta]] = []
        for bucket_id in self.bucket_ids():
            with self._mutex:
                self._check_open()
                bucket = self._index.buckets.get(bucket_id)
                records = self._index.records(bucket) if bucket is not None else []
            if page and len(page) + len(records) > batch_size:
                yield page
                page = []
            while len(records) > batch_size:
                yield records[:batch_size]
                records = records[batch_size:]
            page.extend(records)
        if page:
            yield page

    def bucket_ids(self) -> list[int]:
        """Ids of all buckets, ascending."""
        with self._mutex:
            self._check_open()
            return sorted(self._index.buckets)

    def bucket_keys(self, bucket_id: int) -> list[str]:
        """Live keys of one bucket."""
        with self._mutex:
            self._check_open()
            return list(self._bucket_locked(bucket_id).keys)

    # -- removal --------------------------------------------------------------
    def delete_bucket(self, bucket_id: int) -> None:
        """Delete a bucket and all its objects, durably."""
        with self._writer:
            self._check_writable()
            with self._mutex:
                bucket = self._bucket_locked(bucket_id)
            self._delete_buckets([bucket])

    def remove_all(self) -> None:
        """Delete every bucket, durably."""
        with self._writer:
            self._check_writable()
            with self._mutex:
                buckets = list(self._index.buckets.values())
            self._delete_buckets(buckets)

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
        with self._writer:
            self._check_writable()
            by_bucket: dict[int, set[str]] = {}
            with self._mutex:
                found = []
                for key in keys:
                    meta = self._index.get(key)
                    found.append(meta is not None)
                    if meta is not None:
                        by_bucket.setdefault(meta.bucket_id, set()).add(key)
            for bucket_id, removed in by_bucket.items():
                self._remove_from_bucket(bucket_id, removed)
            return found

    def _remove_from_bucket(self, bucket_id: int, removed: set[str]) -> None:
        with self._mutex:
            bucket = self._index.buckets[bucket_id]
            kept = [(key, meta) for key, meta in self._index.records(bucket) if key not in removed]
        if not kept:
            self._delete_buckets([bucket])
            return
        meta = BucketMeta(bucket_id, bucket.data_length, bucket.aligned, [MetaRecord(k, m.offset, m.size, m.checksum) for k, m in kept])
        old_meta_physical = self._io("stat", lambda: self._fs.stat(os.path.join(self._dir, f"{bucket_id}.meta")).st_blocks * 512)
        meta_physical = self._io(f"rewriting the meta of bucket {bucket_id}", lambda: publish_meta(self._fs, self._dir, meta, durable=self._durable))
        with self._mutex:
            self._index.drop_keys(removed)
            self._index.set_physical(bucket, bucket.physical - old_meta_physical + meta_physical)

    def _delete_buckets(self, buckets: Sequence[Bucket]) -> None:
        """Take buckets out of the index, then delete their files."""
        if not buckets:
            return
        with self._mutex:
            for bucket in buckets:
                if not bucket.retired:
                    self._index.drop_bucket(bucket.bucket_id)
                self._retire(bucket)
        self._delete_files([b.bucket_id for b in buckets], [b.physical for b in buckets])

    def _delete_files(self, bucket_ids: list[int], physical: list[int]) -> None:
        """Delete the files of buckets already out of the index (their
        allocated bytes count as usage until the files are gone)."""
        with self._mutex:
            self._undeleted.update(zip(bucket_ids, physical))
        self._finish_deletions()

    def _finish_deletions(self) -> None:
        """Delete the files of every bucket taken out of the index whose
        deletion has not completed (an earlier I/O error).

        Invariant: every mutation starts here and proceeds only once nothing
        is left, so no later change (a removal, a compaction's meta rewrite)
        can be undone at the next open by an old bucket's files coming back.
        """
        if not self._undeleted:
            return
        bucket_ids = sorted(self._undeleted)

        def delete() -> None:
            if self._lock is not None and bucket_ids[-1] > self._lock.high_water_mark:
                self._lock.raise_high_water_mark(self._next_id - 1)
            for bucket_id in bucket_ids:
                delete_bucket_files(self._fs, self._dir, bucket_id, durable=False)
            if self._durable:
                self._fs.fsync_dir(self._dir)

        self._io(f"deleting bucket(s) {_ids(bucket_ids)}", delete)
        with self._mutex:
            for bucket_id in bucket_ids:
                del self._undeleted[bucket_id]

    # -- capacity -------------------------------------------------------------
    def _make_room(self, need: Usage, on_evict: Callback | None) -> None:
        """Evict so that ``need`` fits, or raise :class:`CapacityExceeded` having changed nothing."""
        if self._limits.physical and not self._limits.admit(self._usage() + need):
            self._reconcile_physical()
        usage = self._usage() + need
        if self._limits.admit(usage):
            return
        if not self._policy.evicts or not self._limits.admit(need):
            raise CapacityExceeded(self._capacity_message(need))
        with self._mutex:
            victims = self._policy.victims(self._evictable_locked(), usage, self._limits)
        if victims is None:
            raise CapacityExceeded(self._capacity_message(need))
        self._evict(victims, on_evict)

    def _evictable_locked(self) -> Iterable[Bucket]:
        """The buckets eviction may choose (under ``_mutex``): those holding no
        leased key. Expired leases are dropped here."""
        leased = self._leases.live()
        if not leased:
            return self._index.buckets.values()
        index = self._index
        protected = {meta.bucket_id for meta in map(index.get, leased) if meta is not None}
        return [bucket for bucket in index.buckets.values() if bucket.bucket_id not in protected]

    def _capacity_message(self, need: Usage) -> str:
        usage = self._usage()
        return (
            f"a write of {need.logical} bytes ({need.physical} allocated, {need.keys} keys) does not fit: "
            f"usage is {usage.logical}/{self._limits.logical or 'unlimited'} logical bytes, "
            f"{usage.physical}/{self._limits.physical or 'unlimited'} physical bytes, "
            f"{usage.keys}/{self._limits.keys or 'unlimited'} keys with eviction_policy={self._config.eviction_policy!r}"
            + self._unevictable_note()
            + self._leased_note()
        )

    def _leased_note(self) -> str:
        """How many keys lookups hold leased (their buckets cannot be evicted)."""
        with self._mutex:
            leased = len(self._leases.live())
        if not leased:
            return ""
        return (
            f"; {leased} key(s) are leased by lookups and their buckets are not evicted until they are loaded, "
            f"released or their lease ends (lookup_lease_s={self._config.lookup_lease_s})"
        )

    def _unevictable_note(self) -> str:
        """What of the physical usage no eviction can free, and what to do
        about it; empty when there is no physical limit."""
        if not self._limits.physical:
            return ""
        with self._mutex:
            other, measured, error = self._other_physical, self._measured, self._scan_error
        if error is not None:
            return f"; measuring {self._dir} failed ({error}), so it counts as full until it can be measured again"
        note = f"; {other} of the physical bytes are not buckets and no eviction frees them"
        if measured.foreign:
            note += (
                f", {measured.foreign} of them in entries that are not the store's (remove them, raise "
                "max_physical_bytes, or open with physical_scope='store' to count only the store's own files)"
            )
        if measured.unmeasurable:
            note += f"; not measurable: {', '.join(measured.unmeasurable[:3])}" + (" ..." if len(measured.unmeasurable) > 3 else "")
        return note

    def _evict(self, victims: list[Bucket], on_evict: Callback | None) -> list[str]:
        """Two-phase eviction: out of the index, ``on_evict``, then the files."""
        keys = [key for bucket in victims for key in bucket.keys]
        with self._mutex:
            records = {b.bucket_id: self._index.records(b) for b in victims}
            for bucket in victims:
                self._index.drop_bucket(bucket.bucket_id)
        if on_evict is not None and keys:
            try:
                on_evict(list(keys))
            except BaseException:
                self._restore(victims, records)
                raise
        self._notify_listeners(keys)
        with self._mutex:
            for bucket in victims:
                self._policy.evicted(bucket)
                self._retire(bucket)
        self._delete_files([b.bucket_id for b in victims], [b.physical for b in victims])
        self._evicted[0] += len(victims)
        self._evicted[1] += len(keys)
        log.info("evicted %d bucket(s), %d key(s)", len(victims), len(keys))
        return keys

    def add_eviction_listener(self, listener: Callback) -> None:
        """Call ``listener(keys)`` with the keys of every eviction, foreground
        or background, once they are out of the index and before their files
        are deleted (the eviction is decided: an exception from the listener
        is logged and changes nothing). It runs holding the writer lock, on
        the thread that evicts: it must not call back into the store's writes."""
        self._eviction_listeners.append(listener)

    def _notify_listeners(self, keys: list[str]) -> None:
        for listener in self._eviction_listeners:
            try:
                listener(list(keys))
            except Exception:
                log.exception("an eviction listener of %s failed; the eviction goes on", self._dir)

    def _restore(self, victims: list[Bucket], records: dict[int, list[tuple[str, ObjectMeta]]]) -> None:
        """Undo phase one of an eviction whose callback failed."""
        with self._mutex:
            for bucket in victims:
                bucket.retired = False
                bucket.keys, bucket.logical, bucket.used = [], 0, 0
                rows = (MetaRecord(k, m.offset, m.size, m.checksum) for k, m in records[bucket.bucket_id])
                self._index.add_bucket(bucket, BucketMeta(bucket.bucket_id, bucket.data_length, bucket.aligned, rows))

    def evict_to_watermark(
        self, high: float | None = None, low: float | None = None, on_evict: Callback | None = None
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
        with self._writer:
            self._check_writable()
            if not self._policy.evicts:
                return []
            self._reconcile_physical()
            usage = self._usage()
            if self._limits.ratio(usage) <= high:
                return []
            with self._mutex:
                victims = self._policy.victims(self._evictable_locked(), usage, self._limits.scaled(low))
            if victims is None:
                raise CapacityExceeded(
                    f"evicting every bucket would not bring usage to {low} of the limits, so nothing was evicted: "
                    f"usage is {usage.logical}/{self._limits.logical or 'unlimited'} logical bytes, "
                    f"{usage.physical}/{self._limits.physical or 'unlimited'} physical bytes"
                    + self._unevictable_note()
                    + self._leased_note()
                )
            return self._evict(victims, on_evict)

    # -- background eviction ------------------------------------------------
    def _start_background_eviction(self) -> None:
        """Start the evictor of a writer that has a policy, a limit and
        ``background_eviction`` on (at the end of :meth:`open`)."""
        config = self._config
        if config.readonly or not config.background_eviction or not self._policy.evicts or self._limits == Limits():
            return
        self._evictor = BackgroundEvictor(self._background_pass, self._background_failed, name=f"kvbucket-evict {self._dir}")
        self._evictor.start()
        self._evictor.wake()  # a store opened above its high watermark comes down at once

    def _background_pass(self, first: bool) -> bool:
        """One pass of the background evictor: evict up to
        :data:`BACKGROUND_EVICTION_BATCH` of the buckets that bring usage to
        ``eviction_low_watermark``; return whether more remain to evict. A
        run starts only when usage is above ``eviction_high_watermark`` of a
        limit (the ``first`` pass checks), and its later passes go on to low.

        The first pass of a run that finds usage above the high watermark
        re-measures the directory first (as :meth:`evict_to_watermark`
        does). When even evicting every bucket that is not leased would not
        reach the low watermark (leases, or bytes that are not buckets), the
        pass evicts nothing: a write that does not fit still evicts (or
        fails) in the foreground.
        """
        high, low = self._config.eviction_high_watermark, self._config.eviction_low_watermark
        with self._writer:
            if self._closed:
                return False
            self._check_writable()
            usage = self._usage()
            if first and self._limits.physical and self._limits.ratio(usage) > high:
                self._reconcile_physical()
                usage = self._usage()
            if first and self._limits.ratio(usage) <= high:  # later passes of a run go on down to low
                self._evictor_error = None
                return False
            with self._mutex:
                victims = self._policy.victims(self._evictable_locked(), usage, self._limits.scaled(low))
            if victims is None:
                log.debug("background eviction of %s cannot reach the low watermark: nothing evicted", self._dir)
                return False
            if not victims:
                self._evictor_error = None
                return False
            self._evict(victims[:BACKGROUND_EVICTION_BATCH], None)
            self._evictor_error = None
            return len(victims) > BACKGROUND_EVICTION_BATCH

    def _background_failed(self, error: Exception) -> None:
        """A background run failed: log it, count it, keep it for :meth:`stats`.
        Buckets whose deletion failed stay counted as usage and the next write
        retries their deletion first (failing while it cannot), as after a
        failed foreground eviction."""
        self._evictor_errors += 1
        self._evictor_error = f"{type(error).__name__}: {error}"
        log.error("background eviction in %s failed: %s", self._dir, error, exc_info=error)

    def wait_for_eviction(self, timeout: float | None = None) -> bool:
        """Wait until the background evictor is idle: no pass running and no
        commit left unhandled. True at once without an evictor; False when
        ``timeout`` seconds passed first. Once it returns True, usage is at or
        below ``eviction_high_watermark`` unless leases or bytes that are not
        buckets hold it up (or a run failed: see :meth:`stats`)."""
        evictor = self._evictor
        return True if evictor is None else evictor.wait_idle(timeout)

    def compact(self, min_dead_ratio: float = 0.5) -> int:
        """Rewrite the live objects of buckets at least ``min_dead_ratio`` dead
        into new buckets, then delete the old ones; return the allocated bytes freed.

        Crash-safe: an old bucket is deleted only after its objects' new
        bucket is committed (recovery drops the older copies if a crash
        comes in between).
        """
        if isinstance(min_dead_ratio, bool) or not isinstance(min_dead_ratio, (int, float)) or not 0 <= min_dead_ratio <= 1:
            raise InvalidArgument(f"min_dead_ratio must be in [0, 1]; got {min_dead_ratio!r}")
        with self._writer:
            self._check_writable()
            with self._mutex:
                candidates = [b for b in self._index.buckets.values() if b.dead > 0 and b.dead >= min_dead_ratio * b.data_length]
            freed = 0
            groups = split_batches(
                candidates,
                max_bytes=self._config.bucket_size_limit,
                max_keys=self._config.bucket_keys_limit,
                size=lambda bucket: bucket.logical,
                keys=lambda bucket: len(bucket.keys),
            )
            for group in groups:
                freed += self._compact_group(group)
            return freed

    def _compact_group(self, group: list[Bucket]) -> int:
        keys = [key for bucket in group for key in bucket.keys]
        values = self.batch_get(keys)
        aligned = self._config.io_mode == "direct"
        offsets, length = (aligned_layout if aligned else packed_layout)([len(values[k]) for k in keys])
        with self._mutex:
            crcs = [self._index.get(k).checksum for k in keys]  # type: ignore[union-attr]
        bucket_id = self._allocate_id()
        meta = BucketMeta(bucket_id, length, aligned, [MetaRecord(k, off, len(values[k]), c) for k, off, c in zip(keys, offsets, crcs)])
        views = [[memoryview(values[k])] for k in keys]
        physical = self._io(
            f"writing bucket {bucket_id}", lambda: write_bucket(self._fs, self._dir, meta, views, direct=aligned, durable=self._durable)
        )
        before = sum(b.physical for b in group)
        self._commit(meta, physical)
        self._delete_buckets(group)
        return before - physical

    def group_for_offload(self, sizes: Mapping[str, int], flush: bool = False) -> list[list[str]]:
        """Group ``{key: size}`` into full buckets; carry the partial rest to the next call.

        ``flush=True``, or a remainder older than ``group_max_delay_s``, emits
        the rest too. Keys already stored or already pending are dropped; an
        object larger than ``bucket_size_limit`` gets a bucket of its own.
        """
        sizes = _checked_sizes(sizes, "group_for_offload")
        with self._mutex:  # grouping is memory-only: never wait behind a bucket write
            self._check_open()
            return self._grouper.add(sizes, self._index.slots.__contains__, flush)

    def group_batch(self, sizes: Mapping[str, int]) -> list[list[str]]:
        """Cut one batch ``{key: size}`` into buckets of its own (full ones and
        the partial rest), pooling nothing with :meth:`group_for_offload`.

        Keys already stored are dropped; an object larger than
        ``bucket_size_limit`` gets a bucket of its own.
        """
        sizes = _checked_sizes(sizes, "group_batch")
        with self._mutex:
            self._check_open()
            return self._grouper.split(sizes, self._index.slots.__contains__)

    def pending_group(self) -> list[str]:
        """Keys carried over by :meth:`group_for_offload`, waiting to fill a bucket."""
        with self._mutex:
            return self._grouper.pending()

    def stats(self) -> StoreStats:
        """Counts, sizes and limits; ``physical_bytes`` comes from a fresh directory scan."""
        self._check_open()
        with self._writer:
            self._reconcile_physical()
            with self._mutex:
                usage = self._usage_locked()
                index = self._index
                return StoreStats(
                    keys=len(index),
                    buckets=len(index.buckets),
                    logical_bytes=index.logical_bytes,
                    physical_bytes=usage.physical,
                    dead_bytes=index.dead_bytes,
                    max_total_size=self._limits.logical,
                    max_physical_bytes=self._limits.physical,
                    total_keys_limit=self._limits.keys,
                    usage_ratio=self._limits.ratio(usage),
                    evicted_buckets=self._evicted[0],
                    evicted_keys=self._evicted[1],
                    pending_deletions=len(self._undeleted),
                    foreign_bytes=self._measured.foreign,
                    unmeasurable=tuple(self._measured.unmeasurable),
                    limits_known=self._limits_known,
                    leased_keys=len(self._leases.live()),
                    background_eviction_errors=self._evictor_errors,
                    background_eviction_error=self._evictor_error,
                )

    def counters(self) -> CounterSnapshot:
        """The operation counters since open: hits and misses, bytes read and
        written, latency histograms, checksum failures (no I/O)."""
        with self._mutex:
            return self._counters.snapshot()

    def _usage(self) -> Usage:
        with self._mutex:
            return self._usage_locked()

    def _usage_locked(self) -> Usage:
        index = self._index
        undeleted = sum(self._undeleted.values())
        return Usage(index.logical_bytes, index.physical_bytes + undeleted + self._other_physical, len(index))

    def _track_directory_growth(self) -> None:
        """Count the directory file's own growth (it gains blocks as entries
        are added) at once, not at the next scan. A write's estimate has a
        block of slack for it."""
        if not self._limits.physical:
            return
        try:
            size = self._fs.stat(self._dir).st_blocks * 512
        except OSError as exc:  # the bucket is committed: count the directory as full, don't fail the write
            log.warning("measuring %s failed (%s); counting the directory as full", self._dir, exc)
            size = self._dir_physical + self._limits.physical
        with self._mutex:
            self._other_physical += max(0, size - self._dir_physical)
            self._dir_physical = size

    def _reconcile_physical(self) -> None:
        """Re-measure the directory; what buckets do not account for is "other"
        (LOCK, quarantine, the directory itself and, with
        ``physical_scope="directory"``, foreign entries). A failed scan of the
        directory itself counts as full; a foreign path that cannot be read is
        reported and left out."""
        try:
            measured = measure_store(self._fs, self._dir, foreign=self._config.physical_scope == "directory")
            directory = self._fs.stat(self._dir).st_blocks * 512
        except OSError as exc:
            log.warning("measuring %s failed (%s); counting the directory as full", self._dir, exc)
            with self._mutex:
                self._scan_error = exc
                self._other_physical = max(self._limits.physical, self._other_physical)
            return
        self._warn_once(measured)
        with self._mutex:
            self._measured, self._scan_error = measured, None
            self._other_physical = max(0, measured.total - self._index.physical_bytes - sum(self._undeleted.values()))
            self._dir_physical = directory

    def _warn_once(self, measured: PhysicalUsage) -> None:
        """Log each unmeasurable path, and foreign bytes counted against a
        physical limit, the first time they are seen."""
        for path in measured.unmeasurable:
            if path not in self._warned:
                self._warned.add(path)
                log.warning("cannot measure %s (not readable); its content is not counted in physical usage", path)
        if measured.foreign and self._limits.physical and not self._warned_foreign:
            self._warned_foreign = True
            log.warning(
                "%d bytes of entries that are not the store's count towards max_physical_bytes in %s "
                "(physical_scope='store' counts only the store's own files)",
                measured.foreign,
                self._dir,
            )

    # -- helpers --------------------------------------------------------------
    @property
    def _durable(self) -> bool:
        return self._config.durability == "strict"

    def _io(self, what: str, operation: Callable[[], _T]) -> _T:
        """Run ``operation``, turning an OSError into :class:`StorageIOError`."""
        try:
            return operation()
        except OSError as exc:
            if isinstance(exc, StorageIOError):
                raise
            raise StorageIOError(f"{what} in {self._dir} failed: {exc.strerror or exc}", exc) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"the store at {self._dir} is closed; open it again")

    def _check_writable(self) -> None:
        """Every mutation starts here (holding ``_writer``)."""
        self._check_open()
        if self._config.readonly:
            raise ReadOnlyStore(f"the store at {self._dir} was opened readonly; open it without readonly=True to write")
        self._finish_deletions()

    def _meta_locked(self, key: str) -> ObjectMeta:
        meta = self._index.get(key)
        if meta is None:
            raise KeyNotFound(f"key {key!r} is not stored")
        return meta

    def _bucket_locked(self, bucket_id: int) -> Bucket:
        bucket = self._index.buckets.get(bucket_id)
        if bucket is None:
            raise KeyNotFound(f"bucket {bucket_id!r} does not exist")
        return bucket


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
    if os.path.isdir(directory):
        return
    if os.path.exists(directory):
        raise InvalidArgument(f"{directory} exists and is not a directory")
    if readonly:
        raise InvalidArgument(f"{directory} does not exist (readonly=True never creates it)")
    try:
        fs.mkdir(directory)
    except OSError as exc:
        raise StorageIOError(f"creating {directory} failed: {exc.strerror}", exc) from exc


def _prepare_batch(objects: Objects) -> list[_Object]:
    """Validate a batch and turn its values into views; nothing is written yet."""
    batch: list[_Object] = []
    seen: set[str] = set()
    for key, value in key_value_pairs(objects, "batch_offload"):
        check_key(key)
        if key in seen:
            raise KeyExists(f"key {key!r} appears twice in the batch")
        seen.add(key)
        views = value_views(value, f"value of key {key!r}")
        batch.append(_Object(key, views, sum(len(v) for v in views)))
    if not batch:
        raise InvalidArgument("batch_offload needs at least one object")
    return batch


def _checked_sizes(sizes: Mapping[str, int], method: str) -> Mapping[str, int]:
    """``{key: size}`` given to ``method``, checked: valid keys, sizes non-negative integers."""
    sizes = key_mapping(sizes, method)
    for key, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"size of key {key!r} must be a non-negative integer; got {size!r}")
    return sizes


def _physical_estimate(batch: list[_Object], data_length: int) -> int:
    """Upper bound of the allocated bytes a new bucket adds: whole blocks for
    the data and the meta, a block for the directory's growth, plus a block of
    extent-tree slack per 128 MiB of data."""
    meta_length = HEADER_SIZE + RECORD_SIZE * len(batch) + sum(len(o.key.encode()) for o in batch) + 4
    blocks = -(-data_length // ALIGNMENT) + -(-meta_length // ALIGNMENT) + 1 + data_length // (128 << 20)
    return blocks * ALIGNMENT


def _ids(bucket_ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in bucket_ids[:5])
    return shown + (f" and {len(bucket_ids) - 5} more" if len(bucket_ids) > 5 else "")
