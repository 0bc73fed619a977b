"""kvbucket as the tier of the engine model: a store behind an OffloadQueue.

This is the path the engine adapters take: lookups and loads go through the
queue (staged objects first, then the store), write-back stages the blocks
the tier does not hold with :meth:`OffloadQueue.put_batch`, and the queue's
worker groups them into buckets with the store's grouper and writes them.

Replays must be deterministic, but the queue writes in the background. So
the tier holds the queue's bucket writes at a gate: :meth:`KvBucketTier.stage`
stages a write-back and waits until the queue is *quiet* (its worker waits at
the gate with the bucket(s) grouped, or nothing is ready to write), and
:meth:`KvBucketTier.land` opens the gate and waits until the queue has
*settled*: every staged key is either written (its bucket committed, any
eviction done) or held by the store's grouper waiting to fill a bucket.
Lookups between the two see the staged keys (from the queue) and the store
before the eviction, whatever the thread timing. Time-based flushes of
partial buckets are disabled (they depend on the wall clock): buckets are
cut by ``bucket_keys_limit`` / ``bucket_size_limit``, as under sustained load.

Lookups lease what they find (:meth:`OffloadQueue.lookup`), as the engine
adapters do, so a write-back landing between a lookup and its load evicts
around the found prefix. A write-back that cannot fit because leased buckets
fill the store is declined (:class:`~kvbucket.errors.CapacityExceeded`), as
a full tier declines a write in an engine: it is not an error of the replay.

The store's background evictor runs on its own clock, so a replay does its
work in step instead: with ``background_eviction``, each landed write-back
is followed by :meth:`BucketStore.evict_to_watermark`, which is what the
evictor does once woken above the high watermark (it too evicts nothing
when leases keep the low watermark out of reach).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import CapacityExceeded
from ..pipeline import OffloadQueue
from ..store import BucketStore

__all__ = ["KvBucketTier"]

UNBOUNDED_STAGING = 1 << 62
"""Every staged value is the same shared zero buffer, so staging costs no
memory: the queue never applies backpressure during a replay."""


class KvBucketTier:
    """A :class:`~kvbucket.BucketStore` behind an :class:`~kvbucket.OffloadQueue`,
    as a :class:`~.engine_model.Tier`. Objects are ``object_size`` zero bytes."""

    def __init__(self, store: BucketStore, object_size: int, bucket_per_batch: bool = True, background_eviction: bool = False) -> None:
        self._store = store
        self._background_eviction = background_eviction
        self._changed = threading.Condition()
        self._errors: list[BaseException] = []
        self._gate = _Gate(self._changed)
        self._queue = OffloadQueue(
            _ObservedStore(store, self._changed, self._gate), max_staged_bytes=UNBOUNDED_STAGING, max_delay_s=0, bucket_per_batch=bucket_per_batch
        )
        self._value = memoryview(bytes(object_size))
        # Every load reads into this one buffer: all values are zeros, so
        # concurrent reads into it only ever write zeros and each checksum
        # verifies whatever the interleaving.
        self._scratch = bytearray(object_size)

    def lookup(self, keys: Sequence[str]) -> int:
        """See :class:`~.engine_model.Tier`."""
        if not keys:
            return 0
        return _leading(self._queue.lookup(keys, prefix=True))

    def load(self, keys: Sequence[str]) -> int:
        """See :class:`~.engine_model.Tier`."""
        found = self._queue.batch_get_into({key: self._scratch for key in keys})
        return _leading(found[key] for key in keys)

    def stage(self, keys: Sequence[str]) -> int:
        """Stage the keys the tier lacks (engines check before writing, as the
        adapters do), then wait until the queue is quiet; see the module doc."""
        new = [key for key, held in zip(keys, self._queue.batch_exists(keys)) if not held]
        if new:
            self._queue.put_batch({key: self._value for key in new}, callback=self._resolved)
            with self._changed:
                while not (self._gate.waiting or self._settled()):
                    self._changed.wait()
        return len(new)

    def land(self) -> None:
        """Let the staged writes through and wait until the queue has settled."""
        with self._changed:
            self._gate.open = True
            self._changed.notify_all()
            while not self._settled():
                self._changed.wait()
            self._gate.open = False
        self._raise_errors()
        if self._background_eviction:
            # Leased buckets can keep the low watermark out of reach: the evictor evicts nothing either.
            with contextlib.suppress(CapacityExceeded):
                self._store.evict_to_watermark()

    def close(self) -> None:
        """Write what the grouper still holds, stop the queue, close the store."""
        with self._changed:
            self._gate.open = True
            self._changed.notify_all()
        self._queue.close()
        self._raise_errors()
        self._store.close()

    def _settled(self) -> bool:
        """Whether every staged key is written or pending in the grouper
        (caller holds ``_changed``).

        The staged keys include the pending ones, and nothing else adds keys
        meanwhile, so equal counts mean the queue has no work in flight. Each
        change that can make the counts equal is followed by a notification:
        the grouper returning (:class:`_ObservedStore`) or a key resolving
        (its callback runs after it leaves the staging area).
        """
        return self._queue.stats().staged_keys == len(self._store.pending_group())

    def _resolved(self, key: str, error: BaseException | None) -> None:
        if error is not None and not isinstance(error, CapacityExceeded):
            self._errors.append(error)
        with self._changed:
            self._changed.notify_all()

    def _raise_errors(self) -> None:
        if self._errors:
            raise self._errors[0]


class _Gate:
    """Holds bucket writes until opened (fields guarded by the tier's condition)."""

    def __init__(self, changed: threading.Condition) -> None:
        self.open = False
        self.waiting = 0
        self._changed = changed

    def pass_through(self) -> None:
        """Wait (as a writer) until the gate is open."""
        with self._changed:
            self.waiting += 1
            self._changed.notify_all()
            while not self.open:
                self._changed.wait()
            self.waiting -= 1


class _ObservedStore:
    """The store as the queue sees it: each return of its grouper is
    reported, and each bucket write first passes the gate."""

    def __init__(self, store: BucketStore, changed: threading.Condition, gate: _Gate) -> None:
        self._store = store
        self._changed = changed
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def group_for_offload(self, sizes: Mapping[str, int], flush: bool = False) -> list[list[str]]:
        try:
            return self._store.group_for_offload(sizes, flush=flush)
        finally:
            with self._changed:
                self._changed.notify_all()

    def batch_offload(self, objects: Any, **options: Any) -> int | None:
        self._gate.pass_through()
        return self._store.batch_offload(objects, **options)


def _leading(flags: Any) -> int:
    """How many leading flags are true."""
    count = 0
    for flag in flags:
        if not flag:
            break
        count += 1
    return count
