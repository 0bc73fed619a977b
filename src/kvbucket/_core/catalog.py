"""The catalog: a store's in-memory state under its index lock.

It holds the index (key -> location, bucket id -> bucket), the access clock
and the eviction policy's view of the buckets, the lookup leases, the offload
grouper, the operation counters and whether the store is closed. Everything
here is memory only; the store does the I/O and calls in before and after.

Lock: :attr:`Catalog._mutex` (the store's index lock) guards every field; it
is held only for in-memory work and for opening a read descriptor. Lock
order: ``_mutex``, then the read path's lock, then the space account's lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from itertools import compress

from ..errors import KeyNotFound, KvBucketError, SizeMismatch, StoreClosed
from ..policy.grouping import OffloadGrouper
from ..policy.interface import CachePolicy
from .counters import CounterSnapshot, StoreCounters
from .format import BucketMeta
from .index import Bucket, Index, ObjectMeta, rebuilt_meta
from .lease import Clock, LeaseTable
from .read_path import Hint, Read, ReadPath, byte_ranges
from .space import Limits, Usage

__all__ = ["Catalog", "Records"]

Records = dict[int, list[tuple[str, ObjectMeta]]]
"""The live objects of buckets taken out of the index, by bucket id (to put them back)."""


class Catalog:
    """The index of one store and the in-memory state that goes with it."""

    def __init__(self, directory: str, policy: CachePolicy, grouper: OffloadGrouper, reads: ReadPath, clock: Clock) -> None:
        self._dir = directory
        self._reads = reads
        self._mutex = threading.Lock()
        self._index = Index()  # guarded by _mutex
        self._clock = 0  # guarded by _mutex: the latest access stamp
        self._closed = False  # guarded by _mutex
        self._policy = policy  # guarded by _mutex (its state and the buckets' segments)
        self._grouper = grouper  # guarded by _mutex
        self._leases = LeaseTable(clock)  # guarded by _mutex
        self.counters = StoreCounters()  # guarded by _mutex

    # -- life -----------------------------------------------------------------
    def install(self, index: Index) -> None:
        """Replace the index (on open and refresh); the old buckets retire."""
        with self._mutex:
            old, self._index = self._index, index
            self._clock = len(index.buckets)
            for bucket in old.buckets.values():
                self._reads.retire(bucket)

    def close(self) -> bool:
        """Mark the store closed (no read pins a bucket from now on) and retire
        every bucket; False when it was closed already."""
        with self._mutex:
            if self._closed:
                return False
            self._closed = True
            for bucket in self._index.buckets.values():
                self._reads.retire(bucket)
            return True

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (read without the lock: one flag, set once)."""
        return self._closed

    def check_open(self) -> None:
        """Raise :class:`StoreClosed` once the store is closed."""
        with self._mutex:
            self._check_open_locked()

    def _check_open_locked(self) -> None:
        """Requires: ``_mutex`` held."""
        if self._closed:
            raise StoreClosed(f"the store at {self._dir} is closed; open it again")

    def shape(self) -> tuple[int, int]:
        """``(keys, buckets)`` of one index, without the lock (safe anywhere: a snapshot)."""
        index = self._index
        return len(index), len(index.buckets)

    # -- lookups --------------------------------------------------------------
    def count(self) -> int:
        """The number of stored keys."""
        with self._mutex:
            self._check_open_locked()
            return len(self._index)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """For each key, whether it is stored (counted as existence lookups)."""
        with self._mutex:
            self._check_open_locked()
            flags = list(map(self._index.slots.__contains__, keys))
            self.counters.exists(flags.count(True), len(flags))
            return flags

    def lookup(self, keys: Sequence[str], lease_s: float, prefix: bool) -> list[bool]:
        """For each key, whether it is stored (with ``prefix``, only up to the
        first missing one); lease the stored ones for ``lease_s`` seconds."""
        with self._mutex:
            self._check_open_locked()
            found = list(map(self._index.slots.__contains__, keys))
            if prefix and not all(found):
                first_missing = found.index(False)
                found[first_missing:] = [False] * (len(found) - first_missing)
            if lease_s:
                self._leases.grant((key for key, hit in zip(keys, found) if hit), lease_s)
        return found

    def lease(self, keys: Sequence[str], lease_s: float) -> None:
        """Lease ``keys`` for ``lease_s`` seconds, stored or not."""
        with self._mutex:
            self._check_open_locked()
            if lease_s:
                self._leases.grant(keys, lease_s)

    def release(self, keys: Iterable[str]) -> None:
        """End the leases of ``keys``."""
        with self._mutex:
            self._leases.release(keys)

    def query(self, keys: Sequence[str]) -> dict[str, ObjectMeta]:
        """Locations of the stored keys among ``keys``."""
        with self._mutex:
            self._check_open_locked()
            return self._index.query(keys)

    def records(self, bucket_id: int) -> list[tuple[str, ObjectMeta]]:
        """The live objects of a bucket (none when it is gone)."""
        with self._mutex:
            self._check_open_locked()
            bucket = self._index.buckets.get(bucket_id)
            return self._index.records(bucket) if bucket is not None else []

    def bucket_ids(self) -> list[int]:
        """Ids of all buckets, ascending."""
        with self._mutex:
            self._check_open_locked()
            return sorted(self._index.buckets)

    def bucket(self, bucket_id: int) -> Bucket:
        """The bucket ``bucket_id``; :class:`KeyNotFound` when there is none."""
        with self._mutex:
            self._check_open_locked()
            return self._bucket_locked(bucket_id)

    def bucket_keys(self, bucket_id: int) -> list[str]:
        """Live keys of one bucket; :class:`KeyNotFound` when there is none."""
        with self._mutex:
            self._check_open_locked()
            return list(self._bucket_locked(bucket_id).keys)

    def buckets(self) -> list[Bucket]:
        """Every bucket."""
        with self._mutex:
            return list(self._index.buckets.values())

    def stored(self, keys: Iterable[str]) -> list[str]:
        """Those of ``keys`` that are stored."""
        keys = list(keys)
        with self._mutex:
            return list(compress(keys, map(self._index.slots.__contains__, keys)))

    def locate(self, keys: Sequence[str]) -> tuple[list[bool], dict[int, set[str]]]:
        """Per key, whether it is stored; and the stored ones by bucket id."""
        by_bucket: dict[int, set[str]] = {}
        with self._mutex:
            found = []
            for key in keys:
                meta = self._index.get(key)
                found.append(meta is not None)
                if meta is not None:
                    by_bucket.setdefault(meta.bucket_id, set()).add(key)
        return found, by_bucket

    def usage(self) -> Usage:
        """What the indexed buckets count against the limits."""
        with self._mutex:
            index = self._index
            return Usage(index.logical_bytes, index.physical_bytes, len(index))

    # -- reads ----------------------------------------------------------------
    def sizes(self, keys: Sequence[str], op: str) -> dict[str, int]:
        """The size of each key (a miss counted for ``op`` raises :class:`KeyNotFound`)."""
        with self._mutex:
            self._check_open_locked()
            try:
                return {key: self._meta_locked(key).size for key in keys}
            except KeyNotFound:
                self.counters.looked_up(op, 0, 1)
                raise

    def pin(self, views: Mapping[str, list[memoryview]], op: str, partial: bool) -> tuple[list[Read], dict[str, KvBucketError]]:
        """Look up every key (counting hits and misses of ``op``), pin its
        bucket once per object and stamp the access, all under one lock hold;
        each object's read is in flight until the read path unpins it.

        A key not stored (:class:`KeyNotFound`), a buffer of the wrong size
        (:class:`SizeMismatch`) or a bucket that cannot be opened: with
        ``partial``, that key is left out of the plan and returned among the
        failures (each missing key counts a miss); without, the first one
        raises and nothing stays pinned (the lookup stops at it).
        """
        plan: list[Read] = []
        failed: dict[str, KvBucketError] = {}
        with self._mutex:
            self._check_open_locked()
            nbytes = missed = missed_bytes = 0
            for key, view in views.items():
                size = sum(map(len, view))
                meta = self._index.get(key)
                if meta is None:
                    missed, missed_bytes = missed + 1, missed_bytes + size
                    failed[key] = KeyNotFound(f"key {key!r} is not stored")
                elif size != meta.size:
                    failed[key] = SizeMismatch(f"buffer for key {key!r} is {size} bytes; the object is {meta.size}")
                else:
                    plan.append((self._index.buckets[meta.bucket_id], key, meta, view))
                    nbytes += size
                    continue
                if not partial:
                    if missed:
                        self.counters.looked_up(op, len(plan), missed, nbytes, missed_bytes if op == "load" else 0)
                    raise failed[key]
            self.counters.looked_up(op, len(plan), missed, nbytes, missed_bytes if op == "load" else 0)
            plan = self._pin_locked(plan, failed, partial)
        return plan, failed

    def _pin_locked(self, plan: list[Read], failed: dict[str, KvBucketError], partial: bool) -> list[Read]:
        """Pin the buckets of ``plan`` and stamp their access; the reads whose
        bucket cannot be opened move to ``failed`` (without ``partial``, the
        first such error raises and nothing stays pinned).

        Requires: ``_mutex`` held.
        """
        outcomes = self._reads.pin([bucket for bucket, _, _, _ in plan])
        pinned = [read for read, error in zip(plan, outcomes) if error is None]
        errors = [(read[1], error) for read, error in zip(plan, outcomes) if error is not None]
        if errors and not partial:
            self._reads.unpin([bucket for bucket, _, _, _ in pinned])
            raise errors[0][1]
        failed.update(errors)
        for bucket in {id(b): b for b, _, _, _ in pinned}.values():
            self._touch_locked(bucket)
            self._policy.read(bucket)
        return pinned

    def pin_hints(self, keys: Iterable[str]) -> tuple[list[Hint], int]:
        """The stored keys among ``keys`` as the merged byte ranges of their
        buckets, each bucket pinned once (a bucket that cannot be opened is
        left out), and how many distinct keys those buckets hold. Unknown
        keys are ignored; nothing is counted or stamped (a hint is no read).
        """
        by_bucket: dict[int, dict[str, ObjectMeta]] = {}
        with self._mutex:
            self._check_open_locked()
            for key in keys:
                meta = self._index.get(key)
                if meta is not None:
                    by_bucket.setdefault(meta.bucket_id, {})[key] = meta
            buckets = [self._index.buckets[bucket_id] for bucket_id in by_bucket]
            outcomes = self._reads.pin(buckets)
        pinned = [bucket for bucket, error in zip(buckets, outcomes) if error is None]
        hints = [(bucket, byte_ranges(by_bucket[bucket.bucket_id].values())) for bucket in pinned]
        return hints, sum(len(by_bucket[bucket.bucket_id]) for bucket in pinned)

    def finished(self, keys: Iterable[str], objects: int, nbytes: int, seconds: float | None) -> None:
        """A load or get of ``keys`` ended: their leases end; ``objects`` objects
        (``nbytes`` bytes) were read, in ``seconds`` (None: not every key loaded)."""
        with self._mutex:
            self._leases.release(keys)
            self.counters.read(objects, nbytes, seconds)

    def corrupt(self, truncated: bool) -> None:
        """Count an object that failed its checksum or whose file ended early."""
        with self._mutex:
            self.counters.corrupt(truncated)

    def counter_snapshot(self) -> CounterSnapshot:
        """The operation counters since open."""
        with self._mutex:
            return self.counters.snapshot()

    # -- changes --------------------------------------------------------------
    def commit(self, bucket: Bucket, meta: BucketMeta, started: float | None) -> None:
        """Index a bucket just written (``started``: when its write began, to count it)."""
        with self._mutex:
            self._index.add_bucket(bucket, meta)
            self._touch_locked(bucket)
            self.counters.wrote(len(bucket.keys), bucket.logical, None if started is None else time.perf_counter() - started)
            self._policy.committed(bucket)

    def checksums(self, keys: Iterable[str]) -> list[int]:
        """The checksum of each stored key."""
        with self._mutex:
            return [self._meta_locked(key).checksum for key in keys]

    def without(self, bucket_id: int, removed: set[str]) -> tuple[Bucket, list[tuple[str, ObjectMeta]]]:
        """A bucket and its live objects other than ``removed``."""
        with self._mutex:
            bucket = self._index.buckets[bucket_id]
            return bucket, [(key, meta) for key, meta in self._index.records(bucket) if key not in removed]

    def drop_keys(self, bucket: Bucket, removed: set[str], meta_growth: int) -> None:
        """``removed`` left ``bucket``, whose rewritten meta grew by ``meta_growth`` allocated bytes."""
        with self._mutex:
            self._index.drop_keys(removed)
            self._index.set_physical(bucket, bucket.physical + meta_growth)

    def drop_buckets(self, buckets: Sequence[Bucket]) -> None:
        """Take ``buckets`` out of the index (those still in it) and retire them."""
        with self._mutex:
            for bucket in buckets:
                if self._index.buckets.get(bucket.bucket_id) is bucket:
                    self._index.drop_bucket(bucket.bucket_id)
                self._reads.retire(bucket)

    # -- eviction -------------------------------------------------------------
    def victims(self, usage: Usage, limits: Limits) -> list[Bucket] | None:
        """The policy's victims that bring ``usage`` within ``limits``, among
        the buckets holding no leased key (expired leases are dropped here)."""
        with self._mutex:
            return self._policy.victims(self._evictable_locked(), usage, limits)

    def _evictable_locked(self) -> Iterable[Bucket]:
        """Requires: ``_mutex`` held."""
        leased = self._leases.live()
        if not leased:
            return self._index.buckets.values()
        index = self._index
        protected = {meta.bucket_id for meta in map(index.get, leased) if meta is not None}
        return [bucket for bucket in index.buckets.values() if bucket.bucket_id not in protected]

    def take_out(self, victims: Sequence[Bucket]) -> Records:
        """Phase one of an eviction: ``victims`` leave the index (not yet
        retired); returns what :meth:`put_back` needs to undo it."""
        with self._mutex:
            records = {b.bucket_id: self._index.records(b) for b in victims}
            for bucket in victims:
                self._index.drop_bucket(bucket.bucket_id)
            return records

    def put_back(self, victims: Sequence[Bucket], records: Records) -> None:
        """Undo :meth:`take_out` (the eviction's callback failed)."""
        with self._mutex:
            for bucket in victims:
                bucket.keys, bucket.logical, bucket.used = [], 0, 0
                self._index.add_bucket(bucket, rebuilt_meta(bucket, records[bucket.bucket_id]))

    def evicted(self, victims: Sequence[Bucket]) -> None:
        """Phase two: the policy learns of the eviction (:meth:`drop_buckets` then retires the victims)."""
        with self._mutex:
            for bucket in victims:
                self._policy.evicted(bucket)

    def leased(self) -> int:
        """Keys under an unexpired lease."""
        with self._mutex:
            return len(self._leases.live())

    # -- grouping -------------------------------------------------------------
    def group(self, sizes: Mapping[str, int], flush: bool) -> list[list[str]]:
        """The offload grouper's full buckets (see ``BucketStore.group_for_offload``)."""
        with self._mutex:  # grouping is memory-only: never wait behind a bucket write
            self._check_open_locked()
            return self._grouper.add(sizes, self._index.slots.__contains__, flush)

    def split(self, sizes: Mapping[str, int]) -> list[list[str]]:
        """One batch cut into buckets of its own (see ``BucketStore.group_batch``)."""
        with self._mutex:
            self._check_open_locked()
            return self._grouper.split(sizes, self._index.slots.__contains__)

    def pending(self) -> list[str]:
        """Keys the grouper carries over."""
        with self._mutex:
            return self._grouper.pending()

    def totals(self) -> tuple[int, int, int, int, int]:
        """``(keys, buckets, logical bytes, dead bytes, leased keys)`` of one index."""
        with self._mutex:
            index = self._index
            return len(index), len(index.buckets), index.logical_bytes, index.dead_bytes, len(self._leases.live())

    # -- helpers --------------------------------------------------------------
    def _meta_locked(self, key: str) -> ObjectMeta:
        """Requires: ``_mutex`` held."""
        meta = self._index.get(key)
        if meta is None:
            raise KeyNotFound(f"key {key!r} is not stored")
        return meta

    def _bucket_locked(self, bucket_id: int) -> Bucket:
        """Requires: ``_mutex`` held."""
        bucket = self._index.buckets.get(bucket_id)
        if bucket is None:
            raise KeyNotFound(f"bucket {bucket_id!r} does not exist")
        return bucket

    def _touch_locked(self, bucket: Bucket) -> None:
        """Stamp an access of ``bucket``, later than every earlier one.

        Requires: ``_mutex`` held.
        """
        self._clock += 1
        bucket.access = self._clock
