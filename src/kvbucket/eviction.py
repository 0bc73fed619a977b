"""Choosing which buckets to evict.

Eviction works on whole buckets. Victims come in this order:

1. buckets with no live object left;
2. buckets at least half dead (removed objects), most dead first: evicting
   them reclaims mostly dead space;
3. the rest by policy: ``fifo`` oldest written first (lowest id), ``lru``
   least recently read or written first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .index import Bucket

__all__ = ["Usage", "Limits", "choose_victims"]


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
    def of(cls, bucket: Bucket) -> Usage:
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


def _order(policy: str):  # type: ignore[no-untyped-def]
    def key(bucket: Bucket) -> tuple[int, float, int]:
        if not bucket.keys:
            return (0, 0.0, bucket.bucket_id)
        dead_ratio = bucket.dead / bucket.data_length if bucket.data_length else 0.0
        if dead_ratio >= 0.5:
            return (1, -dead_ratio, bucket.bucket_id)
        return (2, 0.0, bucket.access if policy == "lru" else bucket.bucket_id)

    return key


def choose_victims(buckets: Iterable[Bucket], policy: str, usage: Usage, limits: Limits) -> list[Bucket] | None:
    """The fewest buckets, in eviction order, whose removal brings ``usage``
    within ``limits``; ``None`` when even evicting all of them is not enough."""
    victims: list[Bucket] = []
    for bucket in sorted(buckets, key=_order(policy)):
        if limits.admit(usage):
            break
        victims.append(bucket)
        usage = usage - Usage.of(bucket)
    return victims if limits.admit(usage) else None
