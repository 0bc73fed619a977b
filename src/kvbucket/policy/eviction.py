"""Choosing which buckets to evict.

Eviction works on whole buckets. Victims come in this order:

1. buckets with no live object left;
2. buckets at least half dead (removed objects), most dead first: evicting
   them reclaims mostly dead space;
3. the rest by policy.

A policy is an entry of :data:`POLICIES`: a class the store creates once per
open and drives through the four calls of
:class:`~kvbucket.policy.interface.CachePolicy`, all made under the store's
index lock, on :class:`~kvbucket.policy.interface.BucketRecord` values (no
files: a simulator drives a policy the same way with records of its own):
:meth:`EvictionPolicy.committed` (a bucket was written),
:meth:`EvictionPolicy.read` (a bucket is being read),
:meth:`EvictionPolicy.evicted` (a bucket was evicted) and
:meth:`EvictionPolicy.victims` (which buckets to evict). Policies keep state
in memory only (the bucket's ``access`` stamp and ``segment``, the 2Q ghost
list): nothing of it is on disk, and a reopened store starts every bucket in
``main`` in write order.

* ``none``: never evicts; a write that does not fit fails.
* ``fifo``: oldest written first (lowest id).
* ``lru``: least recently read or written first.
* ``2q`` (the default): 2Q of buckets. A new bucket enters ``probation``
  unless one of its keys was recently evicted from probation (a ghost list
  of keys, as many as the store holds), in which case it enters ``main``; a
  read moves a probation bucket to ``main``. Victims are the oldest
  probation buckets while probation holds more than a quarter of a limit,
  else the least recently used ``main`` buckets. Blocks written once and
  never read leave first; blocks read again, or written again soon after
  they left, stay.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import ClassVar

from .._core.space import Limits, Usage
from .interface import BucketRecord, Record

__all__ = ["EvictionPolicy", "POLICIES", "make_policy"]


class EvictionPolicy:
    """The order buckets are evicted in; subclasses are the entries of :data:`POLICIES`.

    The base class keeps no state: after the empty and half-dead buckets,
    victims go in :meth:`rank` order.
    """

    evicts: ClassVar[bool] = True
    """False for a policy that never evicts (a write that does not fit fails)."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits

    def committed(self, bucket: BucketRecord) -> None:
        """``bucket`` was written and indexed (its ``keys`` are set)."""

    def read(self, bucket: BucketRecord) -> None:
        """``bucket`` is being read (its ``access`` stamp is already updated)."""

    def evicted(self, bucket: BucketRecord) -> None:
        """``bucket`` was evicted (its ``keys`` are those it held)."""

    def rank(self, bucket: BucketRecord) -> int:
        """Order among buckets that are neither empty nor half dead: lowest goes first."""
        return bucket.bucket_id

    def order(self, buckets: Iterable[Record]) -> Iterator[Record]:
        """``buckets`` in eviction order (consumed only as far as needed)."""
        return iter(sorted(buckets, key=lambda b: _reclaim_key(b) or (2, 0.0, self.rank(b))))

    def victims(self, buckets: Iterable[Record], usage: Usage, limits: Limits) -> list[Record] | None:
        """The fewest buckets, in eviction order, whose removal brings
        ``usage`` within ``limits``; ``None`` when even evicting all of them
        is not enough."""
        victims: list[Record] = []
        for bucket in self.order(buckets):
            if limits.admit(usage):
                break
            victims.append(bucket)
            usage = usage - Usage.of(bucket)
        return victims if limits.admit(usage) else None


class NoEviction(EvictionPolicy):
    """``none``: nothing is ever evicted."""

    evicts = False

    def order(self, buckets: Iterable[Record]) -> Iterator[Record]:
        """No bucket is ever a victim."""
        return iter(())


class Fifo(EvictionPolicy):
    """``fifo``: oldest written first (ids grow with time)."""


class Lru(EvictionPolicy):
    """``lru``: least recently read or written first."""

    def rank(self, bucket: BucketRecord) -> int:
        """The bucket's ``access`` stamp."""
        return bucket.access


PROBATION = "probation"
"""2Q segment of buckets written and not read since (evicted first, oldest first)."""
MAIN = "main"
"""2Q segment of buckets read since written, or re-admitted from the ghost list (LRU)."""


class TwoQueue(EvictionPolicy):
    """``2q``: 2Q of buckets (see the module doc).

    A bucket's segment is its ``segment`` field. Invariant: the ghost list
    holds at most :meth:`ghost_capacity` key hashes (64-bit), oldest first.
    """

    probation_share: ClassVar[float] = 0.25
    """Probation is evicted from first while it holds more than this share of a limit."""
    ghost_share: ClassVar[float] = 1.0
    """The ghost list remembers this many keys per key the store can hold."""
    unlimited_ghost_keys: ClassVar[int] = 1 << 20
    """Ghost list bound when no limit gives a capacity in keys."""

    def __init__(self, limits: Limits) -> None:
        super().__init__(limits)
        self._ghost: OrderedDict[int, None] = OrderedDict()
        self._written = Usage()  # every committed bucket's usage: the mean object's size

    def committed(self, bucket: BucketRecord) -> None:
        """Enter ``main`` when a key was recently evicted from probation, else ``probation``."""
        self._written = self._written + Usage.of(bucket)
        bucket.segment = MAIN if any(self.is_ghost(key) for key in bucket.keys) else PROBATION

    def read(self, bucket: BucketRecord) -> None:
        """A read promotes a probation bucket to ``main``."""
        bucket.segment = MAIN

    def evicted(self, bucket: BucketRecord) -> None:
        """Remember a probation bucket's keys in the ghost list."""
        if bucket.segment != PROBATION:
            return
        ghost = self._ghost
        for key in bucket.keys:
            ghost[hash(key)] = None
            ghost.move_to_end(hash(key))
        bound = self.ghost_capacity()
        while len(ghost) > bound:
            ghost.popitem(last=False)

    def is_ghost(self, key: str) -> bool:
        """Whether ``key`` is in the ghost list."""
        return hash(key) in self._ghost

    def ghost_capacity(self) -> int:
        """Keys the store holds under its tightest limit (objects of the mean
        size written so far), times :attr:`ghost_share`."""
        written = self._written
        capacities = [
            limit * written.keys // used
            for limit, used in ((self._limits.keys, written.keys), (self._limits.logical, written.logical), (self._limits.physical, written.physical))
            if limit and used
        ]
        return int(min(capacities) * self.ghost_share) if capacities else self.unlimited_ghost_keys

    def order(self, buckets: Iterable[Record]) -> Iterator[Record]:
        """Empty and half-dead buckets; then the oldest probation bucket while
        probation holds more than :attr:`probation_share` of a limit, else the
        least recently used main bucket, the share re-evaluated after each."""
        reclaim: list[tuple[tuple[int, float, int], Record]] = []
        probation: list[Record] = []
        main: list[Record] = []
        in_probation = Usage()
        for bucket in buckets:
            if bucket.segment == PROBATION:
                in_probation = in_probation + Usage.of(bucket)
            key = _reclaim_key(bucket)
            if key is not None:
                reclaim.append((key, bucket))
            else:
                (probation if bucket.segment == PROBATION else main).append(bucket)
        probation.sort(key=lambda b: b.bucket_id, reverse=True)  # oldest last: pop() takes it
        main.sort(key=lambda b: b.access, reverse=True)
        for _, bucket in sorted(reclaim, key=lambda pair: pair[0]):
            if bucket.segment == PROBATION:
                in_probation = in_probation - Usage.of(bucket)
            yield bucket
        while probation or main:
            over_share = self._limits.ratio(in_probation) > self.probation_share
            bucket = probation.pop() if probation and (over_share or not main) else main.pop()
            if bucket.segment == PROBATION:
                in_probation = in_probation - Usage.of(bucket)
            yield bucket


POLICIES: dict[str, type[EvictionPolicy]] = {"none": NoEviction, "fifo": Fifo, "lru": Lru, "2q": TwoQueue}
"""Eviction policies by the name ``eviction_policy`` takes."""


def make_policy(name: str, limits: Limits) -> EvictionPolicy:
    """A fresh policy named ``name`` (a key of :data:`POLICIES`) for a store with ``limits``."""
    return POLICIES[name](limits)


def _reclaim_key(bucket: BucketRecord) -> tuple[int, float, int] | None:
    """Sort key of an empty (first) or half-dead (next, most dead first)
    bucket; ``None`` for any other."""
    if not bucket.keys:
        return (0, 0.0, bucket.bucket_id)
    dead_ratio = bucket.dead / bucket.data_length if bucket.data_length else 0.0
    return (1, -dead_ratio, bucket.bucket_id) if dead_ratio >= 0.5 else None
