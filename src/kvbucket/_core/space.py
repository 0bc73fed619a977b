"""Space accounting: the limits, what counts against them, and why a write does not fit.

Usage counted against ``max_physical_bytes`` is the buckets' allocated bytes
(the index's sum) plus two amounts kept here: the bytes of buckets out of the
index whose files are not deleted yet, and "other" bytes (``LOCK``,
quarantine, the directory file itself and, with ``physical_scope="directory"``,
foreign entries). "Other" is re-measured by :meth:`Space.reconcile` (a
``du``-style walk, :mod:`kvbucket._core.du`) and grows in between by the
directory file's own growth (:meth:`Space.track_directory_growth`).

Lock: :attr:`Space._lock` guards every mutable field; it is a leaf (nothing
is called out while holding it), so callers may hold the store's index lock
when they call in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .du import PhysicalUsage, measure_store
from .fs import FileSystem
from .lockfile import read_writer_limits

log = logging.getLogger(__name__)

__all__ = ["Usage", "Limits", "SizedBucket", "Space"]


class SizedBucket(Protocol):
    """What :meth:`Usage.of` reads of a bucket."""

    @property
    def logical(self) -> int: ...
    @property
    def physical(self) -> int: ...
    @property
    def keys(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class Usage:
    """Amounts counted against the limits."""

    logical: int = 0
    physical: int = 0
    keys: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.logical + other.logical, self.physical + other.physical, self.keys + other.keys)

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.logical - other.logical, self.physical - other.physical, self.keys - other.keys)

    @classmethod
    def of(cls, bucket: SizedBucket) -> Usage:
        """What ``bucket`` counts against the limits."""
        return cls(bucket.logical, bucket.physical, len(bucket.keys))


@dataclass(frozen=True)
class Limits:
    """The configured limits; 0 means unlimited."""

    logical: int = 0
    physical: int = 0
    keys: int = 0

    def admit(self, usage: Usage) -> bool:
        """Whether ``usage`` is within every limit."""
        return all(limit == 0 or used <= limit for used, limit in self._pairs(usage))

    def ratio(self, usage: Usage) -> float:
        """The highest usage relative to its limit (0.0 when unlimited)."""
        return max((used / limit for used, limit in self._pairs(usage) if limit), default=0.0)

    def scaled(self, factor: float) -> Limits:
        """These limits times ``factor`` (for watermarks)."""
        return Limits(int(self.logical * factor), int(self.physical * factor), int(self.keys * factor))

    def _pairs(self, usage: Usage) -> tuple[tuple[int, int], ...]:
        return ((usage.logical, self.logical), (usage.physical, self.physical), (usage.keys, self.keys))


class Space:
    """The limits of one store and the part of its usage the index does not hold."""

    def __init__(self, fs: FileSystem, directory: str, limits: Limits, buckets: Callable[[], Usage], *, count_foreign: bool) -> None:
        self._fs = fs
        self._buckets = buckets  # what the indexed buckets use (called without _lock held)
        self._dir = directory
        self._count_foreign = count_foreign
        self._lock = threading.Lock()
        self._limits = limits  # guarded by _lock (replaced by a readonly store's recorded limits)
        self._limits_known = True  # guarded by _lock
        self._other = 0  # guarded by _lock: allocated bytes that are not buckets
        self._dir_physical = 0  # guarded by _lock: the directory file's size at the last measure
        self._measured = PhysicalUsage()  # guarded by _lock: the last successful measure
        self._scan_error: OSError | None = None  # guarded by _lock: the last measure failed
        self._undeleted: dict[int, int] = {}  # guarded by _lock: bucket id -> allocated bytes, out of the index, files not yet deleted
        self._warned: set[str] = set()  # guarded by _lock: unmeasurable paths already logged
        self._warned_foreign = False  # guarded by _lock

    # -- limits ---------------------------------------------------------------
    @property
    def limits(self) -> Limits:
        """The limits in force (a readonly store's: those its writer recorded)."""
        with self._lock:
            return self._limits

    @property
    def limits_known(self) -> bool:
        """False for a readonly store whose writer recorded no limits (they read 0)."""
        with self._lock:
            return self._limits_known

    def adopt_recorded(self) -> None:
        """Take the limits the store's writer last recorded in ``LOCK`` (a
        readonly store enforces none: ``kvbucket stats`` shows what the writer
        runs with). Raises :class:`OSError` when ``LOCK`` cannot be read."""
        recorded = read_writer_limits(self._fs, self._dir)
        with self._lock:
            self._limits_known = recorded is not None
            self._limits = Limits(*(recorded or (0, 0, 0)))

    # -- usage ----------------------------------------------------------------
    def usage(self) -> Usage:
        """Everything counted against the limits."""
        buckets = self._buckets()
        with self._lock:
            extra = sum(self._undeleted.values()) + self._other
        return Usage(buckets.logical, buckets.physical + extra, buckets.keys)

    def await_deletion(self, bucket_ids: Iterable[int], physical: Iterable[int]) -> None:
        """Buckets out of the index whose files are still to be deleted: their
        allocated bytes count as usage until :meth:`deleted`."""
        with self._lock:
            self._undeleted.update(zip(bucket_ids, physical))

    def awaiting_deletion(self) -> list[int]:
        """Ids of the buckets whose files are still to be deleted, ascending."""
        with self._lock:
            return sorted(self._undeleted)

    def deleted(self, bucket_ids: Iterable[int]) -> None:
        """The files of ``bucket_ids`` are gone."""
        with self._lock:
            for bucket_id in bucket_ids:
                del self._undeleted[bucket_id]

    def track_directory_growth(self) -> None:
        """Count the directory file's own growth (it gains blocks as entries
        are added) at once, not at the next measure. A write's estimate has a
        block of slack for it."""
        limits = self.limits
        if not limits.physical:
            return
        try:
            size = self._fs.stat(self._dir).st_blocks * 512
        except OSError as exc:  # the bucket is committed: count the directory as full, don't fail the write
            log.warning("measuring %s failed (%s); counting the directory as full", self._dir, exc)
            with self._lock:
                size = self._dir_physical + limits.physical
        with self._lock:
            self._other += max(0, size - self._dir_physical)
            self._dir_physical = size

    def reconcile(self) -> None:
        """Re-measure the directory; what buckets (indexed, or awaiting
        deletion) do not account for is "other". A failed measure of the
        directory itself counts as full; a foreign path that cannot be read
        is reported and left out.

        Requires: the store's writer lock held (the buckets do not change meanwhile).
        """
        try:
            measured = measure_store(self._fs, self._dir, foreign=self._count_foreign)
            directory = self._fs.stat(self._dir).st_blocks * 512
        except OSError as exc:
            log.warning("measuring %s failed (%s); counting the directory as full", self._dir, exc)
            with self._lock:
                self._scan_error = exc
                self._other = max(self._limits.physical, self._other)
            return
        bucket_physical = self._buckets().physical
        with self._lock:
            self._warn_once_locked(measured)
            self._measured, self._scan_error = measured, None
            self._other = max(0, measured.total - bucket_physical - sum(self._undeleted.values()))
            self._dir_physical = directory

    def _warn_once_locked(self, measured: PhysicalUsage) -> None:
        """Log each unmeasurable path, and foreign bytes counted against a
        physical limit, the first time they are seen.

        Requires: ``_lock`` held.
        """
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

    # -- reporting ------------------------------------------------------------
    def measured(self) -> PhysicalUsage:
        """What the last successful measure found (foreign and unmeasurable paths)."""
        with self._lock:
            return self._measured

    def pending_deletions(self) -> int:
        """How many buckets' files are still to be deleted."""
        with self._lock:
            return len(self._undeleted)

    def shortfall(self, need: Usage, usage: Usage, eviction_policy: str) -> str:
        """Why a write needing ``need`` does not fit at ``usage``."""
        limits = self.limits
        return (
            f"a write of {need.logical} bytes ({need.physical} allocated, {need.keys} keys) does not fit: "
            f"usage is {usage.logical}/{limits.logical or 'unlimited'} logical bytes, "
            f"{usage.physical}/{limits.physical or 'unlimited'} physical bytes, "
            f"{usage.keys}/{limits.keys or 'unlimited'} keys with eviction_policy={eviction_policy!r}" + self.unevictable_note()
        )

    def unreachable(self, low: float, usage: Usage) -> str:
        """Why evicting every bucket would not bring ``usage`` to ``low`` of the limits."""
        limits = self.limits
        return (
            f"evicting every bucket would not bring usage to {low} of the limits, so nothing was evicted: "
            f"usage is {usage.logical}/{limits.logical or 'unlimited'} logical bytes, "
            f"{usage.physical}/{limits.physical or 'unlimited'} physical bytes" + self.unevictable_note()
        )

    def unevictable_note(self) -> str:
        """What of the physical usage no eviction can free, and what to do
        about it; empty when there is no physical limit."""
        with self._lock:
            physical, other, measured, error = self._limits.physical, self._other, self._measured, self._scan_error
        if not physical:
            return ""
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
