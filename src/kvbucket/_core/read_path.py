"""The read path: read descriptors, pins, and reading one object.

Reads take neither of the store's locks during I/O: the store looks their
keys up and the read path *pins* their buckets, both under the store's index
lock; the read goes through the pinned buckets' descriptors; then the read
path unpins them. A bucket taken out of the index meanwhile is *retired*:
its files may be unlinked at once, but its descriptor stays open until its
last pin goes, so a read that has started completes with the right bytes
(POSIX keeps an unlinked file readable). The load queue
(:mod:`kvbucket._core.loads`) schedules the reads and pins per object.
A prefetch hint (:meth:`ReadPath.advise`) pins each of its buckets once and
asks the kernel, on a helper thread, to read byte ranges ahead into the page
cache; the pin keeps the descriptor valid while the hint is given.

Lock: :attr:`ReadPath._lock` guards the descriptor cache, the reads in
flight, the helper threads and, of every :class:`~kvbucket._core.index.Bucket`,
``pins``, ``fd`` and ``retired``. Lock order: the store's index lock, then
this one; nothing here calls out while holding it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from ..errors import CorruptionError, KeyNotFound, KvBucketError, StorageIOError
from .checksum import crc32c_of
from .datafile import open_for_read, read_value
from .format import data_name
from .fs import FileSystem, io_failure
from .index import Bucket, ObjectMeta

log = logging.getLogger(__name__)

__all__ = ["MAX_OPEN_DESCRIPTORS", "ReadPath", "Read", "Hint", "byte_ranges"]

MAX_OPEN_DESCRIPTORS = 256
"""Read descriptors kept open across calls; older unpinned ones are closed."""

Read = tuple[Bucket, str, ObjectMeta, list[memoryview]]
"""One object to read: its pinned bucket, key, location and destination pieces."""

Hint = tuple[Bucket, list[tuple[int, int]]]
"""The byte ranges ``(offset, length)`` of one pinned bucket to read ahead."""


class ReadPath:
    """Reads objects of committed buckets into the caller's buffers.

    ``on_corrupt(truncated)`` is told of every object that fails its checksum
    (``truncated=False``) or whose data file ends early (``truncated=True``).
    """

    def __init__(
        self, fs: FileSystem, directory: str, *, io_threads: int, direct_reads: bool, verify: bool, on_corrupt: Callable[[bool], None]
    ) -> None:
        self._fs = fs
        self._dir = directory
        self._io_threads = io_threads
        self._direct_reads = direct_reads
        self._verify = verify
        self._on_corrupt = on_corrupt
        self._lock = threading.Lock()
        # Guarded by _lock: buckets with an open descriptor, least recently used
        # first. Keyed by the Bucket itself, not its id: after a refresh the
        # retired bucket and its replacement share an id, and each closes only
        # its own descriptor.
        self._descriptors: OrderedDict[Bucket, None] = OrderedDict()
        # Guarded by _lock: objects being read, counted from their pin to their
        # unpin (the sum of every bucket's pins). The store stops pinning
        # before close() waits for this to reach 0.
        self._in_flight = 0
        self._reads_done = threading.Condition(self._lock)
        self._pool: ThreadPoolExecutor | None = None  # guarded by _lock; started on first use

    def executor(self) -> ThreadPoolExecutor:
        """Helper threads (started on first use): the store computes a written bucket's checksums on them."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._io_threads, thread_name_prefix="kvbucket-io")
            return self._pool

    # -- pins -----------------------------------------------------------------
    def pin(self, buckets: Iterable[Bucket]) -> list[KvBucketError | None]:
        """Open each bucket's descriptor and pin it once per occurrence (one
        object to read, in flight until its :meth:`unpin`). Per occurrence:
        None, or the error opening the descriptor (then nothing is pinned for it).

        Requires: the store's index lock held, and ``buckets`` in its index.
        """
        outcomes: list[KvBucketError | None] = []
        with self._lock:
            for bucket in buckets:
                try:
                    self._open_descriptor_locked(bucket)
                except KvBucketError as exc:
                    outcomes.append(exc)
                    continue
                bucket.pins += 1
                self._in_flight += 1
                outcomes.append(None)
        return outcomes

    def unpin(self, buckets: Iterable[Bucket]) -> None:
        """Unpin one occurrence of each of ``buckets`` that :meth:`pin` pinned: those reads are over."""
        with self._lock:
            for bucket in buckets:
                bucket.pins -= 1
                self._in_flight -= 1
                if bucket.retired and bucket.pins == 0:
                    self._close_descriptor_locked(bucket)
            if not self._in_flight:
                self._reads_done.notify_all()

    def retire(self, bucket: Bucket) -> None:
        """``bucket`` left the index: close its descriptor once no read pins it."""
        with self._lock:
            bucket.retired = True
            if bucket.pins == 0:
                self._close_descriptor_locked(bucket)

    def close(self) -> None:
        """Wait until every pinned read has unpinned, then stop the I/O threads.

        Requires: the store pins nothing more (it is marked closed).
        """
        with self._lock:
            if self._in_flight:
                log.debug("closing %s waits for %d read(s) in flight", self._dir, self._in_flight)
            while self._in_flight:
                self._reads_done.wait()
            pool = self._pool
        if pool is not None:  # kept: a submit after close() raises, never starts threads again
            pool.shutdown(wait=True)

    def advise(self, hints: Sequence[Hint]) -> None:
        """Have a helper thread ask the kernel to read each hint's ranges into
        the page cache, then unpin its bucket; returns at once.

        A hint that fails is logged and dropped: it changes no content.

        Requires: each bucket of ``hints`` pinned once by :meth:`pin`.
        """
        # The pool outlives every pin (close() waits for the pins before it
        # shuts the pool down), so the job runs and releases these pins.
        self.executor().submit(self._advise, hints)

    def _advise(self, hints: Sequence[Hint]) -> None:
        """Give every hint, each bucket unpinned once its ranges are given."""
        for bucket, ranges in hints:
            try:
                for offset, length in ranges:
                    self._fs.advise_willneed(bucket.fd, offset, length)
            except OSError as exc:
                log.debug("prefetch hint for bucket %d failed: %s", bucket.bucket_id, exc)
            finally:
                self.unpin([bucket])

    def _open_descriptor_locked(self, bucket: Bucket) -> None:
        """Ensure ``bucket.fd`` is open; bound the cache.

        Requires: ``_lock`` held.
        """
        if bucket.fd >= 0:
            self._descriptors.move_to_end(bucket)
            return
        path = os.path.join(self._dir, data_name(bucket.bucket_id))
        try:
            bucket.fd = open_for_read(self._fs, path, self._direct_reads)
        except FileNotFoundError as exc:
            raise KeyNotFound(f"bucket {bucket.bucket_id} was deleted by its writer; refresh() the store") from exc
        except OSError as exc:
            raise StorageIOError(f"opening bucket {bucket.bucket_id} failed: {exc.strerror}", exc) from exc
        self._descriptors[bucket] = None
        while len(self._descriptors) > MAX_OPEN_DESCRIPTORS:
            oldest = next((b for b in self._descriptors if b.pins == 0), None)
            if oldest is None:
                break
            self._close_descriptor_locked(oldest)

    def _close_descriptor_locked(self, bucket: Bucket) -> None:
        """Requires: ``_lock`` held."""
        self._descriptors.pop(bucket, None)
        if bucket.fd >= 0:
            fd, bucket.fd = bucket.fd, -1
            try:
                self._fs.close(fd)
            except OSError as exc:
                log.warning("closing bucket %d's descriptor failed: %s", bucket.bucket_id, exc)

    # -- I/O ------------------------------------------------------------------
    def read(self, bucket: Bucket, key: str, meta: ObjectMeta, view: list[memoryview]) -> None:
        """Read one object of pinned ``bucket``: the right bytes, or a typed error naming key and bucket."""
        try:
            got = read_value(self._fs, bucket.fd, meta.offset, view, self._direct_reads)
        except StorageIOError:
            raise
        except OSError as exc:  # the message is composed only on failure: reads are the hot path
            raise io_failure(f"reading key {key!r} from bucket {meta.bucket_id}", self._dir, exc) from exc
        if got != meta.size:
            self._on_corrupt(True)
            raise CorruptionError(f"key {key!r}: bucket {meta.bucket_id}'s data file ends {meta.size - got} bytes early")
        if self._verify and crc32c_of(view) != meta.checksum:
            self._on_corrupt(False)
            raise CorruptionError(f"key {key!r} in bucket {meta.bucket_id} fails its checksum; the bytes were not returned")


def byte_ranges(metas: Iterable[ObjectMeta]) -> list[tuple[int, int]]:
    """The byte ranges ``(offset, length)`` of the objects ``metas`` (of one
    bucket), ascending, with touching or overlapping ranges merged into one;
    an empty object has none (a length of 0 would mean "to the end of the file")."""
    ranges: list[tuple[int, int]] = []
    for meta in sorted(metas, key=lambda m: m.offset):
        if not meta.size:
            continue
        if ranges and meta.offset <= ranges[-1][0] + ranges[-1][1]:
            start, length = ranges[-1]
            ranges[-1] = (start, max(length, meta.offset + meta.size - start))
        else:
            ranges.append((meta.offset, meta.size))
    return ranges
