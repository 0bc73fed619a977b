"""kvbucket as the tier of the engine model: a store behind an OffloadQueue.

This is the path the engine adapters take: lookups and loads go through the
queue (staged objects first, then the store), write-back stages the blocks
the tier does not hold with :meth:`OffloadQueue.put_batch`, and the queue's
worker groups them into buckets with the store's grouper and writes them.

Replays must be deterministic, but the queue writes in the background. So
after each write-back the tier waits until the queue has *settled*: every
staged key is either written (its bucket committed, any eviction done) or
held by the store's grouper waiting to fill a bucket. Then the next request
sees exactly the state that a request arriving after the previous one's
writes sees, whatever the thread timing. Time-based flushes of partial
buckets are disabled (they depend on the wall clock): buckets are cut by
``bucket_keys_limit`` / ``bucket_size_limit``, as under sustained load.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..pipeline import OffloadQueue
from ..store import BucketStore

__all__ = ["KvBucketTier"]

UNBOUNDED_STAGING = 1 << 62
"""Every staged value is the same shared zero buffer, so staging costs no
memory: the queue never applies backpressure during a replay."""


class KvBucketTier:
    """A :class:`~kvbucket.BucketStore` behind an :class:`~kvbucket.OffloadQueue`,
    as a :class:`~.engine_model.Tier`. Objects are ``object_size`` zero bytes."""

    def __init__(self, store: BucketStore, object_size: int) -> None:
        self._store = store
        self._changed = threading.Condition()
        self._errors: list[BaseException] = []
        self._queue = OffloadQueue(_ObservedStore(store, self._notify), max_staged_bytes=UNBOUNDED_STAGING, max_delay_s=0)
        self._value = memoryview(bytes(object_size))
        # Every load reads into this one buffer: all values are zeros, so
        # concurrent reads into it only ever write zeros and each checksum
        # verifies whatever the interleaving.
        self._scratch = bytearray(object_size)

    def lookup(self, keys: Sequence[str]) -> int:
        """See :class:`~.engine_model.Tier`."""
        if not keys:
            return 0
        return _leading(self._queue.batch_exists(keys))

    def load(self, keys: Sequence[str]) -> int:
        """See :class:`~.engine_model.Tier`."""
        found = self._queue.batch_get_into({key: self._scratch for key in keys})
        return _leading(found[key] for key in keys)

    def write_back(self, keys: Sequence[str]) -> int:
        """Stage the keys the tier lacks (engines check before writing, as the
        adapters do), then wait for the queue to settle; see the module doc."""
        new = [key for key, held in zip(keys, self._queue.batch_exists(keys)) if not held]
        if new:
            self._queue.put_batch({key: self._value for key in new}, callback=self._resolved)
            self._settle()
        return len(new)

    def close(self) -> None:
        """Write what the grouper still holds, stop the queue, close the store."""
        self._queue.close()
        self._raise_errors()
        self._store.close()

    def _settle(self) -> None:
        """Wait until every staged key is written or pending in the grouper.

        The staged keys include the pending ones, and nothing else adds keys
        meanwhile, so equal counts mean the queue has no work in flight. Each
        change that can make the counts equal is followed by a notification:
        the grouper returning (:class:`_ObservedStore`) or a key resolving
        (its callback runs after it leaves the staging area).
        """
        with self._changed:
            while self._queue.stats().staged_keys != len(self._store.pending_group()):
                self._changed.wait()
        self._raise_errors()

    def _resolved(self, key: str, error: BaseException | None) -> None:
        if error is not None:
            self._errors.append(error)
        self._notify()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _raise_errors(self) -> None:
        if self._errors:
            raise self._errors[0]


class _ObservedStore:
    """The store as the queue sees it, reporting each return of its grouper."""

    def __init__(self, store: BucketStore, notify: Any) -> None:
        self._store = store
        self._notify = notify

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def group_for_offload(self, sizes: Mapping[str, int], flush: bool = False) -> list[list[str]]:
        try:
            return self._store.group_for_offload(sizes, flush=flush)
        finally:
            self._notify()


def _leading(flags: Any) -> int:
    """How many leading flags are true."""
    count = 0
    for flag in flags:
        if not flag:
            break
        count += 1
    return count
