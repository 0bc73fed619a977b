"""Operation counters of a store and an offload queue, cheap enough for the hot path.

Each counter is a plain ``int`` attribute bumped by a method call made while
the owner already holds its own lock (the store catalog's ``_mutex``, the queue's
``_lock``): no lock, allocation or metrics library is touched per operation.
:meth:`StoreCounters.snapshot` copies them (under the same lock) into a
frozen :class:`CounterSnapshot`; :mod:`kvbucket.metrics` turns snapshots into
Prometheus metric families at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

__all__ = ["LATENCY_BOUNDS", "LOOKUP_OPS", "CounterSnapshot", "Histogram", "QueueCounters", "QueueSnapshot", "StoreCounters"]

LATENCY_BOUNDS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Upper bounds (seconds) of the latency histograms' buckets; a last bucket holds the rest."""

LOOKUP_OPS: tuple[str, ...] = ("exists", "load", "get")
"""The store calls whose lookups count hits and misses: ``exists``/``batch_exists``,
``batch_load`` and ``batch_get``."""


@dataclass(frozen=True)
class Histogram:
    """Observations per bucket of :data:`LATENCY_BOUNDS` (not cumulative; one
    more count than bounds, for the rest), and their sum in seconds."""

    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        """The number of observations."""
        return sum(self.counts)


@dataclass(frozen=True)
class CounterSnapshot:
    """The store's counters at one instant (all totals since open)."""

    hits: dict[str, int]
    """Objects found, per lookup op (:data:`LOOKUP_OPS`)."""
    misses: dict[str, int]
    """Objects asked for and not stored, per lookup op. ``batch_load`` and
    ``batch_get`` stop at the first missing key, so each such failed call
    counts one miss; ``submit_load`` counts every missing key."""
    hit_bytes: dict[str, int]
    """Value bytes of the objects found (0 for ``exists``)."""
    miss_bytes: dict[str, int]
    """Bytes of the buffers a missed ``load`` asked for (0 for ``exists`` and ``get``)."""
    read_objects: int
    """Objects read and verified by loads and gets (each object that loaded)."""
    read_bytes: int
    """Value bytes of those objects."""
    written_objects: int
    """Objects committed by ``batch_offload`` and compaction."""
    written_bytes: int
    """Value bytes of those objects."""
    read_latency: Histogram
    """Seconds per load or get whose every key loaded (lookup to the last unpin)."""
    write_latency: Histogram
    """Seconds per committed ``batch_offload`` call (from the call to its commit)."""
    checksum_failures: int
    """Objects whose bytes failed their CRC32C on read."""
    truncated_reads: int
    """Objects whose data file ended before the object did."""


class StoreCounters:
    """The store's counters. Every method is called with the store catalog's ``_mutex`` held."""

    __slots__ = (
        "_exists_hits", "_exists_lookups", "_hits", "_misses", "_hit_bytes", "_miss_bytes", "_read_objects", "_read_bytes",
        "_written_objects", "_written_bytes", "_read_counts", "_read_sum", "_write_counts",
        "_write_sum", "_checksum_failures", "_truncated_reads",
    )  # fmt: skip

    def __init__(self) -> None:
        self._exists_hits = self._exists_lookups = 0
        self._hits = dict.fromkeys(LOOKUP_OPS, 0)
        self._misses = dict.fromkeys(LOOKUP_OPS, 0)
        self._hit_bytes = dict.fromkeys(LOOKUP_OPS, 0)
        self._miss_bytes = dict.fromkeys(LOOKUP_OPS, 0)
        self._read_objects = self._read_bytes = 0
        self._written_objects = self._written_bytes = 0
        self._read_counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self._read_sum = 0.0
        self._write_counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self._write_sum = 0.0
        self._checksum_failures = self._truncated_reads = 0

    def exists(self, hits: int, lookups: int) -> None:
        """An existence check of ``lookups`` keys found ``hits`` of them (the
        hottest call: two additions, misses are derived at snapshot)."""
        self._exists_hits += hits
        self._exists_lookups += lookups

    def looked_up(self, op: str, hits: int, misses: int, hit_bytes: int = 0, miss_bytes: int = 0) -> None:
        """A lookup of ``op`` (``load`` or ``get``) found ``hits`` objects and missed ``misses``."""
        self._hits[op] += hits
        self._misses[op] += misses
        self._hit_bytes[op] += hit_bytes
        self._miss_bytes[op] += miss_bytes

    def read(self, objects: int, nbytes: int, seconds: float | None) -> None:
        """A load or get read ``objects`` objects (``nbytes`` bytes); ``seconds``
        is its latency (None: some of its keys failed, no latency is observed)."""
        self._read_objects += objects
        self._read_bytes += nbytes
        if seconds is not None:
            self._read_counts[bisect_left(LATENCY_BOUNDS, seconds)] += 1
            self._read_sum += seconds

    def wrote(self, objects: int, nbytes: int, seconds: float | None) -> None:
        """A bucket of ``objects`` objects (``nbytes`` bytes) was committed;
        ``seconds`` is the call's latency (None: not a caller's write, e.g. compaction)."""
        self._written_objects += objects
        self._written_bytes += nbytes
        if seconds is not None:
            self._write_counts[bisect_left(LATENCY_BOUNDS, seconds)] += 1
            self._write_sum += seconds

    def corrupt(self, truncated: bool) -> None:
        """A read found an object's bytes failing its checksum (or cut short)."""
        if truncated:
            self._truncated_reads += 1
        else:
            self._checksum_failures += 1

    def snapshot(self) -> CounterSnapshot:
        """A copy of every counter."""
        return CounterSnapshot(
            hits={**self._hits, "exists": self._exists_hits},
            misses={**self._misses, "exists": self._exists_lookups - self._exists_hits},
            hit_bytes=dict(self._hit_bytes),
            miss_bytes=dict(self._miss_bytes),
            read_objects=self._read_objects,
            read_bytes=self._read_bytes,
            written_objects=self._written_objects,
            written_bytes=self._written_bytes,
            read_latency=Histogram(tuple(self._read_counts), self._read_sum),
            write_latency=Histogram(tuple(self._write_counts), self._write_sum),
            checksum_failures=self._checksum_failures,
            truncated_reads=self._truncated_reads,
        )


@dataclass(frozen=True)
class QueueSnapshot:
    """An offload queue's counters at one instant (totals since it was created)."""

    staged_hits: int
    """Lookups (``exists``, loads) answered from the staging area."""
    staged_hit_bytes: int
    """Bytes copied out of the staging area by loads."""
    rejected_keys: int
    """Keys of puts refused by backpressure (``CapacityExceeded`` or a put timeout)."""
    rejected_bytes: int
    """Bytes of those puts."""


class QueueCounters:
    """An offload queue's counters. Every method is called with the queue's ``_lock`` held."""

    __slots__ = ("_staged_hits", "_staged_hit_bytes", "_rejected_keys", "_rejected_bytes")

    def __init__(self) -> None:
        self._staged_hits = self._staged_hit_bytes = 0
        self._rejected_keys = self._rejected_bytes = 0

    def staged_hit(self, objects: int, nbytes: int = 0) -> None:
        """``objects`` lookups were answered from the staging area (``nbytes`` copied out)."""
        self._staged_hits += objects
        self._staged_hit_bytes += nbytes

    def rejected(self, keys: int, nbytes: int) -> None:
        """A put of ``keys`` keys and ``nbytes`` bytes was refused for lack of room."""
        self._rejected_keys += keys
        self._rejected_bytes += nbytes

    def snapshot(self) -> QueueSnapshot:
        """A copy of every counter."""
        return QueueSnapshot(self._staged_hits, self._staged_hit_bytes, self._rejected_keys, self._rejected_bytes)
