"""A bounded, thread-safe write-behind pipeline on top of :class:`~kvbucket.BucketStore`.

:class:`OffloadQueue` lets a serving engine hand KV pages to the disk tier
without waiting for the disk: :meth:`~OffloadQueue.put` and
:meth:`~OffloadQueue.put_batch` *stage* objects and return at once with one
:class:`concurrent.futures.Future` per key. Background workers group staged
objects into buckets, write each bucket with :meth:`BucketStore.batch_offload`
and then resolve every key's future (and call its callback) with success or
with the error.

Grouping: the objects of one ``put_batch`` get buckets of their own
(:meth:`BucketStore.group_batch`: split only by ``bucket_keys_limit`` /
``bucket_size_limit``), written as soon as a worker is free; a batch is one
request's blocks, which are read and evicted together, so mixing several
requests in one bucket would keep cold blocks alive with hot ones and evict
hot ones with cold ones. Objects staged one by one with ``put`` are pooled
into buckets with :meth:`BucketStore.group_for_offload` (a partial bucket is
written after ``max_delay_s``, on :meth:`~OffloadQueue.flush`, or when the
staging area is full), so ``put`` does not make a bucket per object.

Guarantees
----------
* **No key is ever dropped.** Every staged key ends either *stored* (durable
  in the store) or with an error delivered to each of its futures and
  callbacks. A key that the grouping step stops tracking without emitting it
  (Mooncake issue #3006 lost such deferred keys) is re-checked against the
  store and written on its own if it is not there.
* **Callbacks run after durability.** ``callback(key, None)`` runs only after
  the bucket holding ``key`` is committed, so the key is readable from the
  store inside the callback. Callbacks run on a worker thread, before the
  key's future resolves; callbacks of one bucket run in the order the keys
  were staged (with ``workers=1``, the callbacks of ``put`` objects run in
  staging order, and so do those of ``put_batch`` batches);
  :meth:`~OffloadQueue.flush` returns only after the callbacks of every key
  it waited for have run. A callback must not call ``flush``/``close`` (it
  would wait for itself; that raises :class:`~kvbucket.errors.KvBucketError`).
* **Reads see staged objects.** :meth:`~OffloadQueue.exists`,
  :meth:`~OffloadQueue.get_into` and friends answer from the staging area
  first, then from the store, with no gap in between (an object leaves the
  staging area only after its bucket is in the store's index).
* **Zero copy.** Staged values are *referenced*, not copied: the caller must
  leave a value's memory unchanged until its future resolves. A reader
  copying out of a staged value holds it pinned, and the key's future does
  not resolve until that copy is done, so a caller that reuses the memory
  once the future resolves never races a reader.
* **Duplicates.** Staging a key that is already staged joins the existing
  write (one more future, no second copy); staging a key that is already in
  the store resolves as stored without rewriting it (``on_duplicate="skip"``).
  As everywhere in kvbucket, the same key must always carry the same bytes.

Backpressure bounds the bytes staged (``max_staged_bytes``): ``"block"``
waits for room (up to ``put_timeout`` seconds), ``"reject"`` raises
:class:`~kvbucket.errors.CapacityExceeded` at once. A ``put_batch`` is staged
all or nothing, and a call that raises stages nothing and calls no callback.
An object larger than the whole limit is accepted when nothing else is
staged, so it can never wait forever. A put that finds no room has the
partial bucket written at once (when no other bucket is queued or being
written), so a limit below ``bucket_size_limit`` never makes producers wait
for ``max_delay_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from ._core.arguments import check_int, check_lookup_key, check_number, key_mapping, key_value_pairs, lookup_keys
from ._core.buffers import Buffer, views_of_value, writable_view
from ._core.counters import QueueCounters, QueueSnapshot
from ._core.format import check_key
from ._core.interfaces import EvictionListener, GroupCommit, OffloadTarget
from .errors import (
    CapacityExceeded,
    InvalidArgument,
    KeyNotFound,
    KvBucketError,
    SizeMismatch,
    StoreClosed,
)

__all__ = ["Callback", "KeyDoneCallback", "OffloadQueue", "PipelineStats"]

log = logging.getLogger(__name__)

KeyDoneCallback = Callable[[str, "BaseException | None"], Any]
Callback = KeyDoneCallback  # the name of releases before 0.2; kvbucket.pipeline is public
"""``callback(key, error)``, called once a staged key is resolved: ``error``
is ``None`` when ``key`` is stored."""

Backpressure = Literal["block", "reject"]


@dataclass(frozen=True)
class PipelineStats:
    """A snapshot of an :class:`OffloadQueue`'s state."""

    staged_keys: int
    """Keys staged and not yet resolved (waiting, grouped or being written)."""
    staged_bytes: int
    """Value bytes those keys reference."""
    max_staged_bytes: int
    """The staging limit."""
    writes_in_flight: int
    """Buckets being written right now."""
    stored_keys: int
    """Keys resolved as stored since the queue was created."""
    failed_keys: int
    """Keys resolved with an error since the queue was created."""


class _Entry:
    """One staged key. Invariant: listed in ``OffloadQueue._entries`` from
    staging until its bucket is in the store's index (or its write failed);
    ``views`` are only read while it is listed or pinned by ``readers``."""

    __slots__ = ("key", "views", "size", "waiters", "readers", "done")

    def __init__(self, key: str, views: list[memoryview], size: int) -> None:
        self.key = key
        self.views = views
        self.size = size
        self.waiters: list[tuple[Future[None], KeyDoneCallback | None]] = []
        self.readers = 0
        self.done: Future[None] = Future()  # resolved after every waiter


@dataclass
class _Group:
    """A batch of entries a worker writes together.

    ``recheck`` marks keys that the grouping step dropped without emitting:
    each is confirmed in the store or written on its own. ``error``, when
    set, fails every entry without writing (the grouper itself failed).
    """

    entries: list[_Entry]
    recheck: bool = False
    error: BaseException | None = None
    written: threading.Event = field(default_factory=threading.Event)  # set once its entries are resolved

    @property
    def plain(self) -> bool:
        """Whether the group is a bucket to write (neither a recheck nor a failure)."""
        return not self.recheck and self.error is None


class OffloadQueue:
    """Stage objects now, write them to a :class:`~kvbucket.BucketStore` in the background.

    Args:
        store: an open, writable store (or anything with the store calls
            of :class:`~kvbucket._core.interfaces.OffloadTarget`). The queue
            does not own it: :meth:`close` leaves it open.
        max_staged_bytes: most value bytes staged at once (>= 1).
        backpressure: ``"block"`` (wait for room) or ``"reject"`` (raise
            :class:`~kvbucket.errors.CapacityExceeded`) when a put does not fit.
        put_timeout: with ``"block"``, most seconds a put waits for room;
            ``None`` waits as long as it takes.
        workers: background threads writing buckets (>= 1).
        on_evict: passed to every :meth:`BucketStore.batch_offload`; called
            with the keys of buckets the store evicts to make room for this
            queue's writes (the background evictor's evictions reach
            :meth:`BucketStore.add_eviction_listener` listeners only).
        max_delay_s: most seconds a partial bucket of ``put`` objects waits
            for more before it is written anyway; ``None`` uses the store's
            ``group_max_delay_s``; 0 writes partial buckets only on
            :meth:`flush` / :meth:`close`.
        bucket_per_batch: True (the default) gives each ``put_batch`` buckets
            of its own; False pools its objects with every other staged
            object, as ``put`` objects are (kvbucket's grouping before 2Q
            eviction became the default; it makes a poorer cache).
    """

    def __init__(
        self,
        store: OffloadTarget,
        *,
        max_staged_bytes: int = 1 << 30,
        backpressure: Backpressure = "block",
        put_timeout: float | None = None,
        workers: int = 1,
        on_evict: EvictionListener | None = None,
        max_delay_s: float | None = None,
        bucket_per_batch: bool = True,
    ) -> None:
        _validate_args(max_staged_bytes, backpressure, put_timeout, workers, max_delay_s)
        self._store = store
        self._group_commit = _group_commit_of(store)
        self._max_bytes = max_staged_bytes
        self._backpressure = backpressure
        self._put_timeout = put_timeout
        self._on_evict = on_evict
        self._delay = store.config.group_max_delay_s if max_delay_s is None else float(max_delay_s)
        self._bucket_per_batch = bool(bucket_per_batch)

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # All fields below are guarded by self._lock.
        self._entries: dict[str, _Entry] = {}  # every unresolved staged key
        self._incoming: dict[str, int] = {}  # staged by put, not yet given to the grouper
        self._batches: list[dict[str, int]] = []  # staged by put_batch, each to be grouped alone
        self._handed: dict[str, float] = {}  # held by the store's pending group -> when handed
        self._ready: deque[_Group] = deque()  # grouped, waiting for a worker
        self._joining: list[_Group] = []  # taken by workers, waiting for the next commit group
        self._staged_bytes = 0
        self._writes = 0
        self._flush_gen = 0  # flush() calls so far
        self._flushed_gen = 0  # flush() calls whose keys have all been handed out in groups
        self._grouping = False  # a worker is inside the store's grouper (lock released)
        self._starved = False  # a put found no room since the last flush or freed room
        self._state: Literal["open", "closing", "closed"] = "open"
        self._stored = 0
        self._failed = 0
        self._counters = QueueCounters()
        # Held by the worker committing a group: the others' buckets join the next group.
        self._committing = threading.Lock()

        self._threads = [
            threading.Thread(target=self._run, name=f"kvbucket-offload-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    # -- staging ------------------------------------------------------------
    def put(self, key: str, value: Buffer | list[Buffer], callback: KeyDoneCallback | None = None) -> Future[None]:
        """Stage one object; returns a future that resolves when it is stored.

        ``value`` is one buffer or a list of buffers written back to back; it
        is referenced, not copied, so leave it unchanged until the future
        resolves. Raises :class:`~kvbucket.errors.CapacityExceeded` on
        backpressure, :class:`~kvbucket.errors.StoreClosed` after
        :meth:`close`, :class:`~kvbucket.errors.InvalidArgument` for a bad
        key or value; a put that raises stages nothing.
        """
        return self._stage({key: _prepare(key, value)}, callback, batch=False)[key]

    def put_batch(
        self,
        mapping: Mapping[str, Buffer | list[Buffer]] | Iterable[tuple[str, Buffer | list[Buffer]]],
        callback: KeyDoneCallback | None = None,
    ) -> dict[str, Future[None]]:
        """Stage several objects at once (all or nothing); one future per key.

        The batch is written in buckets of its own as soon as a worker is
        free (unless ``bucket_per_batch=False``); keys already staged join
        their earlier write. ``callback(key, error)`` is called once per key.
        See :meth:`put`.
        """
        prepared: dict[str, tuple[list[memoryview], int]] = {}
        for key, value in key_value_pairs(mapping, "put_batch"):
            prepared[key] = _prepare(key, value)
        if not prepared:
            raise InvalidArgument("put_batch needs at least one object")
        return self._stage(prepared, callback, batch=self._bucket_per_batch)

    def _stage(self, prepared: dict[str, tuple[list[memoryview], int]], callback: KeyDoneCallback | None, batch: bool) -> dict[str, Future[None]]:
        """Stage ``prepared``; its new keys form one batch of their own when ``batch``."""
        with self._cond:
            self._check_open()
            self._wait_for_room(prepared)
            futures: dict[str, Future[None]] = {}
            new: dict[str, int] = {} if batch else self._incoming
            for key, (views, size) in prepared.items():
                entry = self._entries.get(key)
                if entry is None:  # a key already staged joins that write
                    entry = self._entries[key] = _Entry(key, views, size)
                    new[key] = size
                    self._staged_bytes += size
                future: Future[None] = Future()
                future.set_running_or_notify_cancel()  # a staged key cannot be cancelled
                entry.waiters.append((future, callback))
                futures[key] = future
            if batch and new:
                self._batches.append(new)
            self._cond.notify_all()
        return futures

    def _needed(self, prepared: dict[str, tuple[list[memoryview], int]]) -> int:
        """Bytes ``prepared`` adds to the staging area (staged keys add nothing)."""
        return sum(size for key, (_, size) in prepared.items() if key not in self._entries)

    def _wait_for_room(self, prepared: dict[str, tuple[list[memoryview], int]]) -> None:
        """Block (or raise) until ``prepared`` fits. Caller holds the lock.

        Invariant kept: staged bytes never exceed the limit, except by one
        batch staged into an empty staging area (so no batch waits forever).
        """
        deadline = None if self._put_timeout is None else time.monotonic() + self._put_timeout
        while (need := self._needed(prepared)) and self._staged_bytes and self._staged_bytes + need > self._max_bytes:
            first = next(iter(prepared))
            what = f"key {first!r}" if len(prepared) == 1 else f"{len(prepared)} keys (first {first!r})"
            self._starved = True  # a worker sends the partial bucket off to make room
            self._cond.notify_all()
            if self._backpressure == "reject":
                self._counters.rejected(len(prepared), need)
                raise CapacityExceeded(
                    f"offload staging is full: {what} need {need} bytes, {self._staged_bytes} "
                    f"of max_staged_bytes={self._max_bytes} are staged; retry later or raise the limit"
                )
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self._counters.rejected(len(prepared), need)
                raise CapacityExceeded(
                    f"offload staging stayed full for put_timeout={self._put_timeout}s: {what} "
                    f"need {need} bytes, {self._staged_bytes} of {self._max_bytes} are staged"
                )
            self._cond.wait(remaining)
            self._check_open()

    def _check_open(self) -> None:
        if self._state != "open":
            raise StoreClosed("the offload queue is closed; create a new OffloadQueue")

    # -- reads --------------------------------------------------------------
    def is_staged(self, key: str) -> bool:
        """Whether ``key`` is staged and not yet resolved (stored or failed)."""
        check_lookup_key(key)
        with self._lock:
            return key in self._entries

    def exists(self, key: str) -> bool:
        """Whether ``key`` is staged or stored."""
        check_lookup_key(key)
        with self._lock:
            if key in self._entries:
                self._counters.staged_hit(1)
                return True
        return bool(self._store.exists(key))

    def batch_exists(self, keys: Sequence[str]) -> list[bool]:
        """:meth:`exists` for each key, in order."""
        keys = lookup_keys(keys, "batch_exists")
        with self._lock:
            staged = [key in self._entries for key in keys]
            self._counters.staged_hit(staged.count(True))
        rest = [key for key, hit in zip(keys, staged) if not hit]
        stored = iter(self._store.batch_exists(rest) if rest else [])
        return [hit or bool(next(stored)) for hit in staged]

    def lookup(self, keys: Sequence[str], *, prefix: bool = False) -> list[bool]:
        """:meth:`batch_exists`, leasing what it finds (see :meth:`BucketStore.lookup`).

        Stored keys are leased by the store's lookup; staged keys are leased
        too, so one committed (and then up for eviction) before the engine
        loads it is still protected. Loading a key through
        :meth:`batch_get_into` ends its lease. With ``prefix=True`` the
        lookup stops at the first key neither staged nor stored.
        """
        keys = lookup_keys(keys, "lookup")
        with self._lock:
            staged = [key in self._entries for key in keys]
        rest = [key for key, hit in zip(keys, staged) if not hit]
        stored = iter(self._store.lookup(rest) if rest else [])
        found = [hit or bool(next(stored)) for hit in staged]
        if prefix and not all(found):
            cut = found.index(False)
            self._store.release([key for key, hit, was_staged in zip(keys[cut:], found[cut:], staged[cut:]) if hit and not was_staged])
            found[cut:] = [False] * (len(found) - cut)
        leased_staged = [key for key, hit, was_staged in zip(keys, found, staged) if hit and was_staged]
        if leased_staged:
            self._store.lease(leased_staged)
        return found

    def get_into(self, key: str, buffer: Buffer) -> bool:
        """Fill ``buffer`` with the object's bytes; False when ``key`` is neither staged nor stored.

        Raises :class:`~kvbucket.errors.SizeMismatch` when the buffer's size
        differs from the object's, and whatever the store raises on a read
        (for example :class:`~kvbucket.errors.CorruptionError`).
        """
        return self.batch_get_into({key: buffer})[key]

    def batch_get_into(self, mapping: Mapping[str, Buffer]) -> dict[str, bool]:
        """Fill each buffer in place; ``{key: found}`` for every key."""
        mapping = key_mapping(mapping, "batch_get_into")
        dests = {key: writable_view(buf, f"destination buffer of key {key!r}") for key, buf in mapping.items()}
        pinned = self._pin(dests)
        found: dict[str, bool] = {}
        try:
            for entry in pinned:
                _copy_out(entry, dests[entry.key])
                found[entry.key] = True
        finally:
            self._unpin(pinned)
        if found:
            self._store.release(list(found))  # served from staging: the load ends the lease
        rest = {key: mapping[key] for key in dests if key not in found}
        found.update(self._load_stored(rest))
        return {key: found[key] for key in dests}

    def _pin(self, dests: Mapping[str, memoryview]) -> list[_Entry]:
        with self._lock:
            pinned = [self._entries[key] for key in dests if key in self._entries]
            for entry in pinned:
                entry.readers += 1
            self._counters.staged_hit(len(pinned), sum(entry.size for entry in pinned))
        return pinned

    def _unpin(self, pinned: list[_Entry]) -> None:
        if not pinned:
            return
        with self._cond:
            for entry in pinned:
                entry.readers -= 1
            self._cond.notify_all()

    def _load_stored(self, rest: dict[str, Buffer]) -> dict[str, bool]:
        """Load keys that were not staged from the store; missing keys map to False."""
        if not rest:
            return {}
        keys = list(rest)
        present = [key for key, hit in zip(keys, self._store.batch_exists(keys)) if hit]
        found = dict.fromkeys(keys, False)
        if not present:
            return found
        try:
            self._store.batch_load({key: rest[key] for key in present})
            found.update(dict.fromkeys(present, True))
        except KeyNotFound:  # evicted between exists and load: go key by key
            for key in present:
                found[key] = self._load_one(key, rest[key])
        return found

    def _load_one(self, key: str, buffer: Buffer) -> bool:
        try:
            self._store.batch_load({key: buffer})
        except KeyNotFound:
            return False
        return True

    # -- completion ---------------------------------------------------------
    def flush(self, timeout: float | None = None) -> None:
        """Write every key staged before this call (partial buckets too) and
        wait until each is resolved and its callbacks have run.

        Errors are reported on the keys' futures and callbacks, not raised
        here. Raises :class:`TimeoutError` when ``timeout`` seconds pass first.
        """
        if threading.current_thread() in self._threads:
            raise KvBucketError("flush()/close() called from a completion callback would wait for itself")
        with self._cond:
            waiting = [entry.done for entry in self._entries.values()]
            if waiting:
                self._flush_gen += 1
                self._cond.notify_all()
        if waiting:
            _, pending = wait_futures(waiting, timeout=timeout)
            if pending:
                raise TimeoutError(f"flush: {len(pending)} staged key(s) not yet written after {timeout}s")

    def close(self, timeout: float | None = None) -> None:
        """Refuse new puts, write everything staged, stop the workers.

        Idempotent. The store stays open. Raises :class:`TimeoutError` (and
        keeps the workers running) when the flush takes longer than ``timeout``.
        """
        with self._cond:
            if self._state == "closed":
                return
            self._state = "closing"  # puts now raise StoreClosed; workers flush everything
            self._cond.notify_all()
        self.flush(timeout)
        with self._cond:
            self._state = "closed"
            self._cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    def stats(self) -> PipelineStats:
        """A consistent snapshot of the queue's counters."""
        with self._lock:
            return PipelineStats(
                staged_keys=len(self._entries),
                staged_bytes=self._staged_bytes,
                max_staged_bytes=self._max_bytes,
                writes_in_flight=self._writes,
                stored_keys=self._stored,
                failed_keys=self._failed,
            )

    def counters(self) -> QueueSnapshot:
        """The queue's counters since it was created: lookups answered from
        staging, puts refused by backpressure."""
        with self._lock:
            return self._counters.snapshot()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has begun."""
        return self._state != "open"

    def __enter__(self) -> OffloadQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- workers ------------------------------------------------------------
    def _run(self) -> None:
        """Worker loop: take a group, write it, resolve its keys; until closed."""
        while True:
            with self._cond:
                group = self._next_group()
            if group is None:
                return
            try:
                self._write(group)
            except BaseException as exc:  # never leave a key unresolved, even on a bug
                log.exception("offload worker failed while writing %d key(s)", len(group.entries))
                self._finish(group.entries, exc)
            finally:
                with self._cond:
                    self._writes -= 1
                    self._cond.notify_all()

    def _next_group(self) -> _Group | None:
        """Wait for a group to write; None when the queue is closed. Caller holds the lock."""
        while True:
            if self._ready:
                self._writes += 1
                return self._ready.popleft()
            if self._state == "closed":
                return None
            if not self._grouping and self._regroup():
                continue
            self._cond.wait(self._time_to_deadline())

    def _regroup(self) -> bool:
        """Group each staged batch alone, feed the keys staged by ``put`` to
        the store's pooling grouper, and queue what they emit.

        Caller holds the lock; it is released while the store groups, because
        the store's grouper waits for a bucket write in progress, and puts and
        reads must not. While released, the keys being grouped are in none of
        ``_batches``, ``_incoming`` or ``_handed`` but still in ``_entries``
        (so reads and flush see them); only one worker groups at a time
        (``_grouping``). Returns False when there was nothing to do.
        """
        flush_gen = self._flush_gen
        flush = (
            flush_gen > self._flushed_gen
            or self._state != "open"
            or self._deadline_passed()
            or self._starved_for_partial()
        )
        if flush:
            self._starved = False  # a put starved from here on asks for another flush
        pool = bool(self._incoming) or (flush and bool(self._handed))
        if not pool and not self._batches:
            if flush:  # nothing held back: every earlier flush is satisfied
                self._flushed_gen = flush_gen
            return False
        batches, self._batches = self._batches, []
        mapping: dict[str, int] = {}
        handed: dict[str, float] = {}
        if pool:
            mapping, self._incoming = self._incoming, {}
            handed = {**self._handed, **dict.fromkeys(mapping, time.monotonic())}
            self._handed = {}
        self._grouping = True
        self._lock.release()
        try:
            split = [self._call_batch_grouper(batch) for batch in batches]
            pooled = self._call_grouper(mapping, flush) if pool else ([], set(), None)
        finally:
            self._lock.acquire()
            self._grouping = False
            self._cond.notify_all()
        for batch, (groups, error) in zip(batches, split):
            self._queue_outcome("group_batch", groups, set(), error, handed=dict.fromkeys(batch, 0.0))
        if pool:
            self._queue_outcome("group_for_offload", *pooled, handed=handed)
        if flush:
            self._flushed_gen = max(self._flushed_gen, flush_gen)
        return True

    def _call_batch_grouper(self, batch: dict[str, int]) -> tuple[list[list[str]], BaseException | None]:
        """``group_batch`` of one staged batch; never raises."""
        try:
            return self._store.group_batch(batch), None
        except BaseException as exc:  # noqa: BLE001 - reported to every key it concerns
            return [], exc

    def _queue_outcome(
        self, grouper: str, groups: list[list[str]], pending: set[str], error: BaseException | None, handed: dict[str, float]
    ) -> None:
        """Queue what a grouper call on ``handed`` emitted, or fail all of
        ``handed`` when it raised (its state is unknown)."""
        if error is not None:
            log.error("%s failed; %d staged key(s) fail with it: %s", grouper, len(handed), error)
            self._ready.append(_Group(self._entries_of(handed), error=error))
        else:
            self._queue_groups(groups, handed, pending)

    def _call_grouper(self, mapping: dict[str, int], flush: bool) -> tuple[list[list[str]], set[str], BaseException | None]:
        """``group_for_offload`` plus the keys it still holds; never raises."""
        try:
            groups = self._store.group_for_offload(mapping, flush=flush)
            pending = set() if flush else set(self._store.pending_group())
        except BaseException as exc:  # noqa: BLE001 - reported to every key it concerns
            return [], set(), exc
        return groups, pending, None

    def _queue_groups(self, groups: list[list[str]], handed: dict[str, float], pending: set[str]) -> None:
        """Turn emitted groups into work; re-check keys the grouper dropped.

        After a flush nothing may stay pending (``pending`` is empty then),
        so a key the store still holds is treated as dropped too.
        """
        emitted: set[str] = set()
        for keys in groups:
            mine = [self._entries[k] for k in keys if k in handed and k in self._entries and k not in emitted]
            emitted.update(keys)
            if mine:
                self._ready.append(_Group(mine))
        self._handed.update((k, t) for k, t in handed.items() if k in pending and k not in emitted)
        dropped = self._entries_of(k for k in handed if k not in emitted and k not in self._handed)
        if dropped:  # already stored, or lost by the grouper: never drop silently
            self._ready.append(_Group(dropped, recheck=True))

    def _starved_for_partial(self) -> bool:
        """Whether a put waits for room that only the partial bucket can free.

        With no bucket queued or being written, every staged byte sits in
        the grouper (or is about to be handed to it). The partial bucket
        cannot fill while the staging area is full, so waiting for
        ``max_delay_s`` would stall every producer (it never ends when the
        delay is 0): it is written at once instead.
        """
        return self._starved and not self._ready and not self._writes

    def _entries_of(self, keys: Iterable[str]) -> list[_Entry]:
        return [self._entries[k] for k in keys if k in self._entries]

    def _deadline_passed(self) -> bool:
        wait = self._time_to_deadline()
        return wait is not None and wait <= 0

    def _time_to_deadline(self) -> float | None:
        """Seconds until the oldest key of the partial bucket is due; None when nothing is."""
        if not self._delay or not self._handed:
            return None
        return max(0.0, min(self._handed.values()) + self._delay - time.monotonic())

    def _write(self, group: _Group) -> None:
        if group.error is not None:
            self._finish(group.entries, group.error)
        elif group.recheck:
            self._write_rechecked(group.entries)
        else:
            self._commit_joined(group)

    def _commit_joined(self, group: _Group) -> None:
        """Write ``group``'s bucket in a commit group; return once its entries are resolved.

        Leader/follower: the group joins ``_joining``; whichever worker next
        holds ``_committing`` (this one, or one ahead of it) takes every
        joined group, and the plain groups at the head of ``_ready``, and
        commits them with one :meth:`BucketStore.offload_group` (one
        directory ``fsync``). Buckets thus share a sync round exactly when
        they are ready while another commit is in progress; a lone bucket
        is a plain :meth:`BucketStore.batch_offload`.
        """
        with self._cond:
            self._joining.append(group)
            self._cond.notify_all()
        groups: list[_Group] = []
        extra: list[_Group] = []
        errors: list[BaseException | None] = []
        try:
            with self._committing:
                with self._cond:
                    groups, self._joining = self._joining, []
                    extra = self._take_ready()
                groups += extra
                errors = self._commit_groups(groups)
        finally:  # resolved outside the commit lock: the next group's syncs overlap the callbacks
            errors += [_unwritten()] * (len(groups) - len(errors))
            for each, error in zip(groups, errors):
                self._finish(each.entries, error)
                each.written.set()
            with self._cond:
                self._writes -= len(extra)
                self._cond.notify_all()
        group.written.wait()

    def _take_ready(self) -> list[_Group]:
        """The plain groups at the head of ``_ready``, now being written. Caller holds the lock."""
        taken: list[_Group] = []
        while self._ready and self._ready[0].plain:
            taken.append(self._ready.popleft())
        self._writes += len(taken)
        return taken

    def _commit_groups(self, groups: list[_Group]) -> list[BaseException | None]:
        """Write each group as a bucket, all committed together; per group, its error.

        A failed group commit stores nothing, so its buckets are then written
        one by one: one bucket's error fails only that bucket's keys.
        """
        if len(groups) > 1 and self._group_commit is not None:
            try:
                self._group_commit.offload_group(
                    [{entry.key: entry.views for entry in g.entries} for g in groups], on_evict=self._on_evict, on_duplicate="skip"
                )
            except Exception as exc:  # noqa: BLE001 - each bucket is retried alone below
                log.warning("committing %d buckets together failed (%s); writing them one by one", len(groups), exc)
            else:
                return [None] * len(groups)
        return [self._store_bucket(g.entries) for g in groups]

    def _offload(self, entries: list[_Entry]) -> None:
        """Write ``entries`` as one bucket and resolve them with the outcome."""
        self._finish(entries, self._store_bucket(entries))

    def _store_bucket(self, entries: list[_Entry]) -> BaseException | None:
        """Write ``entries`` as one bucket; the error, or None once it is durable."""
        objects = {entry.key: entry.views for entry in entries}
        try:
            self._store.batch_offload(objects, on_evict=self._on_evict, on_duplicate="skip")
        except Exception as exc:  # noqa: BLE001 - reported to every entry's future
            return exc
        return None

    def _write_rechecked(self, entries: list[_Entry]) -> None:
        """Keys the grouper did not emit: stored ones succeed, others get a bucket each."""
        stored = self._store.batch_exists([entry.key for entry in entries])
        self._finish([e for e, hit in zip(entries, stored) if hit], None)
        for entry in (e for e, hit in zip(entries, stored) if not hit):
            log.warning("key %r left the offload grouping unwritten; writing it alone", entry.key)
            self._offload([entry])

    def _finish(self, entries: list[_Entry], error: BaseException | None) -> None:
        """Unstage ``entries`` and resolve their waiters, outside the lock.

        Order matters: the entry leaves ``_entries`` first (new readers go to
        the store, where the key now is), then readers still copying from its
        buffers finish, then callbacks run, then futures resolve.
        """
        with self._cond:
            # Removing an entry from _entries claims it: each is resolved once.
            claimed = [entry for entry in entries if self._entries.get(entry.key) is entry]
            for entry in claimed:
                del self._entries[entry.key]
                self._staged_bytes -= entry.size
            if claimed:  # room freed: a put still short of it says so again
                self._starved = False
            while any(entry.readers for entry in claimed):
                self._cond.wait()
            if error is None:
                self._stored += len(claimed)
            else:
                self._failed += len(claimed)
            self._cond.notify_all()  # room for blocked producers
        for entry in claimed:
            _resolve(entry, error)


def _resolve(entry: _Entry, error: BaseException | None) -> None:
    """Run each waiter's callback, then resolve its future; then ``entry.done``."""
    for future, callback in entry.waiters:
        if callback is not None:
            try:
                callback(entry.key, error)
            except Exception:
                log.exception("offload completion callback failed for key %r", entry.key)
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    entry.views = []  # drop the references to the caller's memory
    entry.done.set_result(None)


def _prepare(key: str, value: Buffer | list[Buffer]) -> tuple[list[memoryview], int]:
    """Validate ``key`` and view ``value``'s bytes without copying (an error
    message naming the key is composed only when the value is bad)."""
    check_key(key)  # the store's own rule, so a bad key fails here and not in a worker
    views = views_of_value(key, value)
    return views, sum(map(len, views))  # flat byte views: a view's length is its byte count


def _copy_out(entry: _Entry, dest: memoryview) -> None:
    """Copy a staged value into ``dest``, which must have exactly its size."""
    if dest.nbytes != entry.size:
        raise SizeMismatch(f"key {entry.key!r} has {entry.size} bytes; the destination buffer has {dest.nbytes}")
    offset = 0
    for view in entry.views:
        dest[offset : offset + view.nbytes] = view
        offset += view.nbytes


def _group_commit_of(store: OffloadTarget) -> GroupCommit | None:
    """``store`` when its class commits groups of buckets, else None.

    The class, not the instance: a wrapper that forwards unknown names to a
    store but intercepts ``batch_offload`` must keep seeing every bucket.
    """
    return cast(GroupCommit, store) if callable(getattr(type(store), "offload_group", None)) else None


def _unwritten() -> BaseException:
    """The error of a group left unwritten because its commit was interrupted."""
    return KvBucketError("the offload worker committing this key was interrupted; the key was not stored")


def _validate_args(
    max_staged_bytes: int, backpressure: str, put_timeout: float | None, workers: int, max_delay_s: float | None
) -> None:
    check_int(max_staged_bytes, "max_staged_bytes", minimum=1)
    if backpressure not in ("block", "reject"):
        raise InvalidArgument(f"backpressure must be 'block' or 'reject'; got {backpressure!r}")
    if put_timeout is not None:
        check_number(put_timeout, "put_timeout")
    check_int(workers, "workers", minimum=1)
    if max_delay_s is not None:
        check_number(max_delay_s, "max_delay_s")
