"""The engine model: what a serving engine with prefix caching asks of a disk tier.

Per request, the engine looks up the longest prefix of the request's block
chain that the tier stores (stopping at the first missing block), loads that
prefix (the hits), and hands every block after the loaded prefix to the tier
(write-back). A block that the lookup found but that is gone when loaded ends
the loaded prefix: it and the rest of the found prefix count as misses
(*found-then-gone*).

A write-back is *staged* (visible to lookups at once, as an engine's
write-behind queue is) and then *lands* (written, with whatever eviction that
takes). Sequentially, each request's write-back lands before the next request
arrives. With ``overlap``, it lands after the next request's lookup and
before that request's load, as when write-back runs in the background while
the engine serves the next request: blocks the next lookup found can then be
evicted before they are loaded.

Optionally a host-memory LRU cache of ``l2_blocks`` blocks (L2) sits in
front: the tier sees only the part of each chain after L2's own longest
prefix, and is handed only blocks that were new to L2 (L2 is write-through,
so a block already in L2 was handed to the tier when it entered L2). L2's
content depends on the trace alone, never on the tier, so
:func:`tier_requests` computes the tier's view once and every tier (kvbucket
and the reference simulators) replays the same requests.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Protocol

from .trace import Trace

__all__ = ["Tier", "TierRequest", "TierCounts", "tier_requests", "replay_tier", "held_prefix"]


class Tier(Protocol):
    """A disk tier as the engine model uses it."""

    def lookup(self, keys: Sequence[str]) -> int:
        """Length of the longest prefix of ``keys`` that the tier holds."""

    def load(self, keys: Sequence[str]) -> int:
        """Load ``keys`` (a prefix :meth:`lookup` reported); return how many
        leading ones were loaded (fewer when one is gone meanwhile)."""

    def stage(self, keys: Sequence[str]) -> int:
        """Hand ``keys`` to the tier (visible to lookups from now on); return
        how many it neither held nor had staged."""

    def land(self) -> None:
        """Write what is staged, evicting as needed."""


@dataclass(frozen=True)
class TierRequest:
    """One request as the tier sees it."""

    keys: tuple[str, ...]
    """The chain after L2's longest prefix (the whole chain without L2)."""
    new_to_l2: tuple[bool, ...] | None
    """Per key, whether L2 lacked it before this request; None without L2."""
    l2_hits: int
    """Leading blocks of the chain that L2 served."""

    def write_back_keys(self, loaded: int) -> list[str]:
        """The blocks handed to the tier once ``loaded`` leading keys were loaded."""
        if self.new_to_l2 is None:
            return list(self.keys[loaded:])
        return [key for key, new in zip(self.keys[loaded:], self.new_to_l2[loaded:]) if new]


@dataclass
class TierCounts:
    """What one tier did over a replay (counts of blocks)."""

    requests: int = 0
    chain_blocks: int = 0
    """Block references of the whole trace (L2 included)."""
    l2_hits: int = 0
    """References served by L2."""
    references: int = 0
    """References that reached the tier (``chain_blocks - l2_hits``)."""
    found: int = 0
    """Blocks the tier's lookups reported."""
    hits: int = 0
    """Blocks loaded from the tier."""
    found_then_gone: int = 0
    """Blocks found by a lookup but not loaded."""
    handed: int = 0
    """Blocks handed to the tier by write-back."""
    admitted: int = 0
    """Blocks handed that the tier did not hold yet."""

    @property
    def hit_rate(self) -> float:
        """Blocks loaded from the tier / block references that reached the tier."""
        return self.hits / self.references if self.references else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        """End to end: blocks served by L2 or the tier / all block references."""
        return (self.l2_hits + self.hits) / self.chain_blocks if self.chain_blocks else 0.0


def tier_requests(trace: Trace, l2_blocks: int) -> list[TierRequest]:
    """The trace's requests as the tier sees them behind an L2 of
    ``l2_blocks`` blocks (0: no L2)."""
    if l2_blocks <= 0:
        return [TierRequest(tuple(map(str, r.hash_ids)), None, 0) for r in trace.requests]
    l2: OrderedDict[str, None] = OrderedDict()
    views = []
    for request in trace.requests:
        keys = [str(block) for block in request.hash_ids]
        served = held_prefix(keys, l2)
        rest = keys[served:]
        views.append(TierRequest(tuple(rest), tuple(key not in l2 for key in rest), served))
        _admit_lru(l2, keys, l2_blocks)
    return views


def held_prefix(keys: Sequence[str], held: Container[str]) -> int:
    """Length of the longest prefix of ``keys`` whose every key is in ``held``."""
    count = 0
    for key in keys:
        if key not in held:
            break
        count += 1
    return count


def _admit_lru(cache: OrderedDict[str, None], keys: Sequence[str], capacity: int) -> None:
    """Every block of a served request is in host memory: make each the most
    recent in chain order, then drop the least recent beyond ``capacity``."""
    for key in keys:
        cache[key] = None
        cache.move_to_end(key)
    while len(cache) > capacity:
        cache.popitem(last=False)


def replay_tier(tier: Tier, requests: Sequence[TierRequest], overlap: bool = False) -> TierCounts:
    """Serve every request from ``tier`` under the engine model; with
    ``overlap``, each write-back lands after the next request's lookup."""
    counts = TierCounts()
    for request in requests:
        counts.requests += 1
        counts.l2_hits += request.l2_hits
        counts.chain_blocks += request.l2_hits + len(request.keys)
        counts.references += len(request.keys)
        found = tier.lookup(request.keys)
        if overlap:
            tier.land()
        loaded = tier.load(request.keys[:found]) if found else 0
        counts.found += found
        counts.hits += loaded
        counts.found_then_gone += found - loaded
        handed = request.write_back_keys(loaded)
        if handed:
            counts.handed += len(handed)
            counts.admitted += tier.stage(handed)
        if not overlap:
            tier.land()
    tier.land()
    return counts
