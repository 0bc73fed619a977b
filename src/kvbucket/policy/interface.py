"""The interface between a store (or a simulator) and an eviction policy.

A policy sees buckets only as :class:`BucketRecord` values: an id, sizes,
live keys and an access stamp. It never touches a file, so a simulator can
drive it with records of its own (no directory at all) exactly as the store
drives it with its index's buckets (:class:`kvbucket._core.index.Bucket`).

The driver makes four calls, one at a time (the store makes them under its
index lock): :meth:`CachePolicy.committed` once a bucket is written,
:meth:`CachePolicy.read` when a bucket is read (after raising its
``access`` stamp above every earlier one), :meth:`CachePolicy.evicted` once
a bucket is evicted, and :meth:`CachePolicy.victims` to choose what to evict.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

from .._core.space import Limits, Usage

__all__ = ["BucketRecord", "CachePolicy", "Record"]


class BucketRecord(Protocol):
    """One bucket as a policy sees it."""

    @property
    def bucket_id(self) -> int:
        """The bucket's id; ids grow with write order."""

    @property
    def keys(self) -> Sequence[str]:
        """The live keys."""

    @property
    def logical(self) -> int:
        """Value bytes of the live keys."""

    @property
    def physical(self) -> int:
        """Allocated bytes of the bucket's files."""

    @property
    def data_length(self) -> int:
        """Bytes of the data file, dead ones included."""

    @property
    def dead(self) -> int:
        """Bytes of the data file that no live key uses."""

    @property
    def access(self) -> int:
        """Access stamp: larger is more recently read or written."""

    segment: str
    """The policy's own mark on the bucket (2Q's segment); starts ``main``."""


Record = TypeVar("Record", bound=BucketRecord)


class CachePolicy(Protocol):
    """An eviction policy: what the store needs of an entry of
    :data:`kvbucket.policy.eviction.POLICIES`."""

    @property
    def evicts(self) -> bool:
        """False for a policy that never evicts (a write that does not fit fails)."""

    def committed(self, bucket: BucketRecord) -> None:
        """``bucket`` was written (its ``keys`` are set)."""

    def read(self, bucket: BucketRecord) -> None:
        """``bucket`` is being read (its ``access`` stamp is already raised)."""

    def evicted(self, bucket: BucketRecord) -> None:
        """``bucket`` was evicted (its ``keys`` are those it held)."""

    def victims(self, buckets: Iterable[Record], usage: Usage, limits: Limits) -> list[Record] | None:
        """The fewest of ``buckets``, in eviction order, whose removal brings
        ``usage`` within ``limits``; ``None`` when evicting all is not enough."""
