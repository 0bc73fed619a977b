"""The store calls that kvbucket's own users make, as small protocols.

:class:`~kvbucket.BucketStore` has every one of them (checked statically
at the end); a wrapper of the store (an observer, a test double) needs only the
protocol its user takes:

* :class:`ObjectStore` (:class:`ObjectReads` and :class:`ObjectWrites`):
  finding, loading and writing objects; what the Mooncake importer and the
  engine adapters call.
* :class:`OffloadTarget` (an :class:`ObjectStore` with
  :class:`BucketGrouping`): what an :class:`~kvbucket.OffloadQueue` writes to.
* :class:`StoreObservation` and :class:`QueueObservation`: what the metrics
  collector reads of a store and of its offload queue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from .buffers import Buffer

if TYPE_CHECKING:
    from ..config import BucketConfig
    from ..pipeline import OffloadQueue, PipelineStats
    from ..store import BucketStore, StoreStats
    from .counters import CounterSnapshot, QueueSnapshot
    from .recovery import RecoveryReport

__all__ = [
    "EvictionListener",
    "ObjectReads",
    "ObjectWrites",
    "ObjectStore",
    "GroupCommit",
    "BucketGrouping",
    "OffloadTarget",
    "StoreObservation",
    "QueueObservation",
]

EvictionListener = Callable[[list[str]], object]
"""``listener(keys)``: called with the keys of each bucket the store evicts."""


class ObjectReads(Protocol):
    """Finding and loading objects."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""

    def batch_exists(self, keys: Iterable[str]) -> list[bool]:
        """:meth:`exists` for each key, in order."""

    def lookup(self, keys: Iterable[str], *, lease_s: float | None = None, prefix: bool = False) -> list[bool]:
        """:meth:`batch_exists`, leasing the buckets of the keys found."""

    def lease(self, keys: Iterable[str], *, lease_s: float | None = None) -> None:
        """Protect the buckets of stored ``keys`` from eviction for a while."""

    def release(self, keys: Iterable[str]) -> None:
        """End the leases of ``keys``."""

    def batch_load(self, destinations: Mapping[str, Buffer]) -> None:
        """Fill each destination buffer with its key's bytes."""


class ObjectWrites(Protocol):
    """Writing objects, a bucket per call."""

    @property
    def config(self) -> BucketConfig:
        """The store's validated configuration (its bucket limits among it)."""

    def batch_offload(
        self,
        objects: Mapping[str, Buffer | Sequence[Buffer]],
        *,
        on_evict: EvictionListener | None = None,
        on_duplicate: str = "error",
    ) -> int | None:
        """Write ``objects`` as one bucket; its id once durable (None when every key was skipped)."""


class ObjectStore(ObjectReads, ObjectWrites, Protocol):
    """Finding, loading and writing objects."""


class GroupCommit(Protocol):
    """Committing several buckets with one directory ``fsync``."""

    def offload_group(
        self,
        batches: Sequence[Mapping[str, Buffer | Sequence[Buffer]]],
        *,
        on_evict: EvictionListener | None = None,
        on_duplicate: str = "error",
    ) -> list[int | None]:
        """Write each batch as a bucket, committed together; their ids once all are durable (all or none stored)."""


class BucketGrouping(Protocol):
    """The store's grouping of staged objects into buckets."""

    def group_batch(self, sizes: Mapping[str, int]) -> list[list[str]]:
        """Cut one batch ``{key: size}`` into buckets of its own."""

    def group_for_offload(self, sizes: Mapping[str, int], flush: bool = False) -> list[list[str]]:
        """Pool ``{key: size}`` into full buckets, carrying the partial rest."""

    def pending_group(self) -> list[str]:
        """Keys carried over, waiting to fill a bucket."""


class OffloadTarget(ObjectStore, BucketGrouping, Protocol):
    """What an :class:`~kvbucket.OffloadQueue` reads from, groups with and writes to."""


class StoreObservation(Protocol):
    """What the metrics collector reads of a store."""

    @property
    def path(self) -> str:
        """The store directory."""

    @property
    def recovery_report(self) -> RecoveryReport:
        """What recovery did at the last open."""

    def stats(self) -> StoreStats:
        """Usage against each limit, now."""

    def counters(self) -> CounterSnapshot:
        """The operation counters since open."""


class QueueObservation(Protocol):
    """What the metrics collector reads of an offload queue."""

    def stats(self) -> PipelineStats:
        """The queue's depth, now."""

    def counters(self) -> QueueSnapshot:
        """The queue's counters since it was created."""


if TYPE_CHECKING:

    def _implementations(store: BucketStore, queue: OffloadQueue) -> tuple[OffloadTarget, StoreObservation, QueueObservation]:
        """Type-checked only: a BucketStore is every store protocol above, an OffloadQueue a QueueObservation."""
        return store, store, queue
