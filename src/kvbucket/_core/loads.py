"""The load queue: asynchronous, pipelined reads of objects into callers' buffers.

Every load of the store (:meth:`~kvbucket.BucketStore.submit_load`,
``batch_load``, ``batch_get``) is a *batch* submitted here. Submitting
looks its keys up and pins their buckets under the store's index lock (the
catalog), once per object, then queues one *read* per object, in ascending
(bucket, offset) order, on a queue that the load threads share. A thread
takes the next read, reads it through the pinned descriptor (no store lock
held) and resolves its key; the buckets of a batch are unpinned together, in
one call, once its last read has ended. A batch never waits
for another: a slow read holds one thread, and the others go on with the
reads queued after it, of the same batch or the next ones. The caller of a
synchronous load reads its own batch too, from its end, while it waits.

Invariants:

* an object's bucket stays pinned from the submit until its batch is
  complete (or, for a read cancelled before it started, until the
  cancel), so every read has ended before its bucket is unpinned: a bucket evicted,
  deleted, compacted or replaced by a refresh meanwhile keeps its
  descriptor open and the read returns the right bytes;
* a read is claimed exactly once, under :attr:`Loads._lock`, by a load
  thread, a synchronous caller or :meth:`LoadHandle.cancel`: it is read
  or cancelled, never both;
* at most ``depth`` batches are in flight (submitted and not complete);
  a batch is complete once every read of it ended, its counters are
  counted, and its future and callbacks have run.

Lock: :attr:`Loads._lock` guards the queue, the number of batches in
flight, the threads and every handle's read states, errors and key
futures. Nothing is called out while holding it. Lock order: the store's
index lock, then the read path's lock; this lock is never held with either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future
from functools import partial
from itertools import repeat
from operator import itemgetter

from ..errors import CapacityExceeded, KvBucketError, StoreClosed
from .catalog import Catalog
from .read_path import Read, ReadPath

__all__ = ["LoadHandle", "Loads"]

log = logging.getLogger(__name__)

_QUEUED, _STARTED, _ENDED, _CANCELLED = 0, 1, 2, 3
"""The states of one read of a batch (a cancelled read was unpinned by its cancel, an ended one is
unpinned with its batch)."""

_location = itemgetter(2)
"""A read's :class:`~kvbucket._core.index.ObjectMeta`: sorting by it sorts by (bucket id, offset)."""


class LoadHandle:
    """One batch of loads submitted by :meth:`~kvbucket.BucketStore.submit_load`.

    :attr:`future` resolves once every key has: to None when every key
    loaded, else with the error of the first failed key (in the order the
    keys were given). :meth:`key_future` gives one key's outcome on its own;
    :meth:`errors` lists the failed keys once the batch is done. Errors are
    typed: :class:`~kvbucket.errors.KeyNotFound`,
    :class:`~kvbucket.errors.SizeMismatch`,
    :class:`~kvbucket.errors.CorruptionError`,
    :class:`~kvbucket.errors.StorageIOError`, or
    :class:`concurrent.futures.CancelledError` for a key cancelled before
    its read started. A failed key's buffer content is unspecified.
    """

    def __init__(self, loads: Loads, keys: list[str], plan: list[Read], failed: dict[str, KvBucketError]) -> None:
        self._loads = loads
        self._keys = keys
        self._plan = plan
        # Guarded by the load queue's lock.
        self._states = [_QUEUED] * len(plan)
        self._left = len(plan)
        self._errors: dict[str, BaseException] = dict(failed)
        self._key_futures: dict[str, Future[None]] | None = None
        self._positions: dict[str, int] = {}  # key -> its read, filled with the first key future
        self._started = time.perf_counter()
        self.future: Future[None] = Future()
        """Resolves when the batch is complete (see the class)."""
        self.future.set_running_or_notify_cancel()  # cancel through :meth:`cancel`, never the future

    @property
    def keys(self) -> list[str]:
        """The batch's keys, in the order they were given."""
        return list(self._keys)

    def done(self) -> bool:
        """Whether every key of the batch has loaded or failed."""
        return self.future.done()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the batch is done; False when ``timeout`` seconds passed first."""
        try:
            self.future.exception(timeout)
        except TimeoutError:
            return False
        return True

    def result(self, timeout: float | None = None) -> None:
        """Wait for the batch; raise the first failed key's error, if any
        (:class:`TimeoutError` when ``timeout`` seconds pass first)."""
        self.future.result(timeout)

    def errors(self) -> dict[str, BaseException]:
        """The failed keys and their errors, so far (all of them once :meth:`done`)."""
        with self._loads._lock:
            return dict(self._errors)

    def loaded(self) -> list[str]:
        """The keys that loaded, in the order they were given (waits until the batch is done)."""
        self.wait()
        return [key for key in self._keys if key not in self._errors]

    def key_future(self, key: str) -> Future[None]:
        """A future resolved when ``key``'s read ends: None, or its error."""
        return self._loads.key_future(self, key)

    def cancel(self) -> int:
        """Cancel the reads that have not started; return how many.

        Their keys fail with :class:`~concurrent.futures.CancelledError` and
        their buckets are unpinned at once; reads already started finish.
        """
        return self._loads.cancel(self)

    def add_done_callback(self, callback: Callable[[LoadHandle], object]) -> None:
        """Call ``callback(handle)`` once the batch is done (at once if it is).

        It runs on the thread that completes the batch (a load thread): it
        must not wait for loads. An exception it raises is logged.
        """
        self.future.add_done_callback(lambda _: callback(self))


class Loads:
    """The store's load queue: ``threads`` load threads, at most ``depth`` batches in flight."""

    def __init__(self, directory: str, catalog: Catalog, reads: ReadPath, *, threads: int, depth: int) -> None:
        self._dir = directory
        self._catalog = catalog
        self._reads = reads
        self._threads = threads
        self._depth = depth
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # reads queued, or the threads must stop
        self._room = threading.Condition(self._lock)  # a batch completed
        # Guarded by _lock.
        self._queue: deque[tuple[LoadHandle, int]] = deque()
        self._batches = 0
        self._closed = False  # no batch is accepted any more
        self._stopping = False  # closed and no batch in flight: the threads end
        self._workers: list[threading.Thread] = []

    # -- submitting -----------------------------------------------------------
    def submit(self, views: Mapping[str, list[memoryview]], op: str, *, timeout: float | None = None) -> LoadHandle:
        """Queue the batch ``views`` (``op`` names it in the counters); return at once.

        Each key that is not stored or whose buffers do not match its size
        fails on its own. Waits while ``depth`` batches are in flight: up to
        ``timeout`` seconds (None: as long as it takes), then raises
        :class:`CapacityExceeded`. Raises :class:`StoreClosed` once closed.
        """
        return self._admit(views, op, timeout, partial=True, helping=False)

    def run(self, views: Mapping[str, list[memoryview]], op: str) -> None:
        """Load the batch ``views`` and wait for it; raise the first failed key's error.

        A key not stored, or a buffer of the wrong size, raises before
        anything is read. The caller reads its own batch too while it waits.
        """
        handle = self._admit(views, op, None, partial=False, helping=True)
        self._help(handle)
        handle.result()

    def _admit(self, views: Mapping[str, list[memoryview]], op: str, timeout: float | None, *, partial: bool, helping: bool) -> LoadHandle:
        """Take a slot of the queue depth (see :meth:`_enter`), then :meth:`_start`
        the batch; the slot is given back if the start fails."""
        self._enter(timeout)
        try:
            return self._start(views, op, partial, helping)
        except BaseException:
            self._leave()
            raise

    def _enter(self, timeout: float | None) -> None:
        """Take a slot of the queue depth, waiting up to ``timeout`` seconds for one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._closed and self._batches >= self._depth:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CapacityExceeded(
                        f"the load queue is full: load_queue_depth={self._depth} batches are in flight "
                        f"after {timeout}s; wait for one to finish, cancel one, or raise load_queue_depth"
                    )
                self._room.wait(remaining)
            self._check_open_locked()
            self._batches += 1

    def _leave(self) -> None:
        """Give back a slot of the queue depth."""
        with self._lock:
            self._batches -= 1
            self._room.notify_all()

    def _check_open_locked(self) -> None:
        """Requires: ``_lock`` held."""
        if self._closed:
            raise StoreClosed(f"the store at {self._dir} is closed; open it again")

    def _start(self, views: Mapping[str, list[memoryview]], op: str, partial: bool, helping: bool) -> LoadHandle:
        """Pin the batch and queue its reads (a helping caller takes one share itself)."""
        plan, failed = self._catalog.pin(views, op, partial)
        plan.sort(key=_location)  # (bucket, offset) order: an ObjectMeta starts with those two fields
        handle = LoadHandle(self, list(views), plan, failed)
        if not plan:
            self._complete(handle)
            return handle
        with self._lock:
            self._start_workers_locked()
            self._queue.extend(zip(repeat(handle), range(len(plan))))
            self._work.notify(len(plan) - 1 if helping else len(plan))
        return handle

    def _start_workers_locked(self) -> None:
        """Requires: ``_lock`` held."""
        while len(self._workers) < self._threads:
            worker = threading.Thread(target=self._serve, name=f"kvbucket-load-{len(self._workers)}", daemon=True)
            worker.start()
            self._workers.append(worker)

    # -- reading --------------------------------------------------------------
    def _serve(self) -> None:
        """A load thread: read queued reads until the queue stops. The end of
        one read and the claim of the next share one hold of the lock."""
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._work.wait()
                claimed = self._take_queued_locked()
                if claimed is None and self._stopping:
                    return
            while claimed is not None:
                handle, i = claimed
                claimed = self._end(handle, i, self._read(handle, i), self._take_queued_locked)

    def _take_queued_locked(self) -> tuple[LoadHandle, int] | None:
        """Claim the next queued read that is not started yet, or None.

        Requires: ``_lock`` held.
        """
        while self._queue:
            handle, i = self._queue.popleft()
            if self._claim_locked(handle, i):
                return handle, i
        return None

    def _help(self, handle: LoadHandle) -> None:
        """Read ``handle``'s reads that no thread has started, from its end."""
        with self._lock:
            claimed = self._claim_below_locked(handle, len(handle._plan))
        while claimed is not None:
            i = claimed[1]
            claimed = self._end(handle, i, self._read(handle, i), partial(self._claim_below_locked, handle, i))

    def _claim_below_locked(self, handle: LoadHandle, stop: int) -> tuple[LoadHandle, int] | None:
        """Claim the last read of ``handle`` before ``stop`` that is not started yet, or None.

        Requires: ``_lock`` held.
        """
        for i in range(stop - 1, -1, -1):
            if self._claim_locked(handle, i):
                return handle, i
        return None

    def _claim_locked(self, handle: LoadHandle, i: int) -> bool:
        """Whether read ``i`` of ``handle`` was queued; it is started now.

        Requires: ``_lock`` held.
        """
        if handle._states[i] != _QUEUED:
            return False
        handle._states[i] = _STARTED
        return True

    def _read(self, handle: LoadHandle, i: int) -> BaseException | None:
        """Read one claimed object; its error, or None."""
        bucket, key, meta, view = handle._plan[i]
        try:
            self._reads.read(bucket, key, meta, view)
        except Exception as exc:  # noqa: BLE001 - the key fails, the thread goes on
            return exc
        return None

    def _end(
        self,
        handle: LoadHandle,
        i: int,
        error: BaseException | None,
        claim_next: Callable[[], tuple[LoadHandle, int] | None] | None = None,
        state: int = _ENDED,
    ) -> tuple[LoadHandle, int] | None:
        """End read ``i`` of ``handle`` in ``state``: resolve its key (and the batch, if it
        was the last); returns what ``claim_next`` claimed under the same hold of the lock."""
        key = handle._plan[i][1]
        with self._lock:
            handle._states[i] = state
            if error is not None:
                handle._errors[key] = error
            handle._left -= 1
            last = handle._left == 0
            future = handle._key_futures.get(key) if handle._key_futures is not None else None
            claimed = claim_next() if claim_next is not None else None
        if future is not None:
            _resolve(future, error)
        if last:
            self._complete(handle)
        return claimed

    def _complete(self, handle: LoadHandle) -> None:
        """Unpin the batch's read buckets, count the batch, resolve its future
        (its callbacks run), free its slot."""
        errors, states = handle._errors, handle._states  # no read is left to change them
        self._reads.unpin([read[0] for read, state in zip(handle._plan, states) if state == _ENDED])
        loaded = [meta.size for _, key, meta, _ in handle._plan if key not in errors]
        seconds = None if errors else time.perf_counter() - handle._started
        try:
            self._catalog.finished(handle._keys, len(loaded), sum(loaded), seconds)
        finally:
            first = next((errors[key] for key in handle._keys if key in errors), None)
            _resolve(handle.future, first)
            self._leave()

    # -- per key and cancelling -------------------------------------------------
    def key_future(self, handle: LoadHandle, key: str) -> Future[None]:
        """The future of ``key`` in ``handle`` (made on first ask)."""
        with self._lock:
            if key not in handle._keys:
                raise KeyError(f"key {key!r} is not in this batch")
            if handle._key_futures is None:
                handle._key_futures = {}
                handle._positions = {read[1]: i for i, read in enumerate(handle._plan)}
            future = handle._key_futures.get(key)
            if future is not None:
                return future
            future = handle._key_futures[key] = Future()
            future.set_running_or_notify_cancel()
            position = handle._positions.get(key)
            ended = key in handle._errors or (position is not None and handle._states[position] >= _ENDED)
        if ended:
            _resolve(future, handle._errors.get(key))
        return future

    def cancel(self, handle: LoadHandle) -> int:
        """Cancel ``handle``'s reads that have not started; return how many."""
        with self._lock:
            cancelled = [i for i in range(len(handle._plan)) if self._claim_locked(handle, i)]
        self._reads.unpin([handle._plan[i][0] for i in cancelled])
        for i in cancelled:
            error = CancelledError(f"the load of key {handle._plan[i][1]!r} was cancelled before it started")
            self._end(handle, i, error, state=_CANCELLED)
        return len(cancelled)

    # -- closing --------------------------------------------------------------
    def close(self) -> None:
        """Refuse new batches, wait until every batch in flight is complete,
        then stop the load threads.

        Requires: the store pins nothing more (it is marked closed).
        """
        with self._lock:
            self._closed = True
            self._room.notify_all()
            if self._batches:
                log.debug("closing the load queue waits for %d batch(es) in flight", self._batches)
            while self._batches:
                self._room.wait()
            self._stopping = True
            self._work.notify_all()
            workers = list(self._workers)
        for worker in workers:
            worker.join()


def _resolve(future: Future[None], error: BaseException | None) -> None:
    """Resolve ``future`` with ``error``, or None."""
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
