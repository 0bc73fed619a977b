"""Reference tiers: an ideal per-object LRU cache, and the offline optimum.

Both hold at most ``capacity`` blocks and follow the engine model of
:mod:`.engine_model` (prefix lookup, load, write-back of the misses), so
their hit rates compare directly with kvbucket's.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Container, Sequence

from .engine_model import TierRequest, held_prefix

__all__ = ["LruTier", "BeladyTier"]

NEVER = float("inf")


class _Staging:
    """Blocks handed to a reference tier and not yet landed, in order."""

    def __init__(self) -> None:
        self.keys: dict[str, float] = {}  # key -> its next reference (Belady) or 0

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    def take(self) -> dict[str, float]:
        taken, self.keys = self.keys, {}
        return taken


class _HeldOrStaged:
    def __init__(self, held: Container[str], staging: _Staging) -> None:
        self._held, self._staging = held, staging

    def __contains__(self, key: object) -> bool:
        return key in self._held or key in self._staging


class LruTier:
    """Per-object LRU: a load makes each block the most recent, in chain
    order; a landing write-back inserts blocks not held, evicting the least
    recent."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._cache: OrderedDict[str, None] = OrderedDict()
        self._staging = _Staging()

    def lookup(self, keys: Sequence[str]) -> int:
        """See :class:`~.engine_model.Tier`."""
        return held_prefix(keys, _HeldOrStaged(self._cache, self._staging))

    def load(self, keys: Sequence[str]) -> int:
        """See :class:`~.engine_model.Tier`."""
        loaded = held_prefix(keys, self._cache)
        for key in keys[:loaded]:
            self._cache.move_to_end(key)
        return loaded

    def stage(self, keys: Sequence[str]) -> int:
        """See :class:`~.engine_model.Tier`."""
        new = [key for key in keys if key not in self._cache and key not in self._staging]
        self._staging.keys.update(dict.fromkeys(new, 0.0))
        return len(new)

    def land(self) -> None:
        """See :class:`~.engine_model.Tier`."""
        for key in self._staging.take():
            if key in self._cache:
                continue
            self._cache[key] = None
            if len(self._cache) > self._capacity:
                self._cache.popitem(last=False)


class BeladyTier:
    """Belady's MIN, computed from the requests the tier will see: when full,
    drop the held block whose next reference is furthest away, or do not
    admit the new block when its own next reference is further still.

    It must see exactly ``requests``, in order (each :meth:`lookup` is the
    start of the next request).
    """

    def __init__(self, capacity: int, requests: Sequence[TierRequest]) -> None:
        self._capacity = capacity
        self._next_use = _next_uses(requests)
        self._request = -1
        self._held: dict[str, float] = {}  # key -> its next reference
        self._heap: list[tuple[float, str]] = []  # (-next reference, key); stale entries skipped
        self._staging = _Staging()

    def lookup(self, keys: Sequence[str]) -> int:
        """See :class:`~.engine_model.Tier`. Starts the next request: every
        block it references, hit or not, is next needed at its following
        reference."""
        self._request += 1
        upcoming = self._next_use[self._request]
        for key in keys:
            if key in self._held:
                self._set_next(key, upcoming[key])
            elif key in self._staging:
                self._staging.keys[key] = upcoming[key]
        return held_prefix(keys, _HeldOrStaged(self._held, self._staging))

    def load(self, keys: Sequence[str]) -> int:
        """See :class:`~.engine_model.Tier`."""
        return held_prefix(keys, self._held)

    def stage(self, keys: Sequence[str]) -> int:
        """See :class:`~.engine_model.Tier`."""
        upcoming = self._next_use[self._request]
        new = [key for key in keys if key not in self._held and key not in self._staging]
        self._staging.keys.update((key, upcoming[key]) for key in new)
        return len(new)

    def land(self) -> None:
        """See :class:`~.engine_model.Tier`."""
        for key, next_use in self._staging.take().items():
            if key in self._held:
                continue
            if len(self._held) >= self._capacity:
                if self._furthest() <= next_use:
                    continue  # every held block is needed sooner: do not admit this one
                self._evict_furthest()
            self._set_next(key, next_use)

    def _set_next(self, key: str, next_use: float) -> None:
        self._held[key] = next_use
        heapq.heappush(self._heap, (-next_use, key))

    def _furthest(self) -> float:
        """The furthest next reference among held blocks (drops stale heap entries)."""
        while True:
            negative, key = self._heap[0]
            if self._held.get(key) == -negative:
                return -negative
            heapq.heappop(self._heap)

    def _evict_furthest(self) -> None:
        self._furthest()
        _, key = heapq.heappop(self._heap)
        del self._held[key]


def _next_uses(requests: Sequence[TierRequest]) -> list[dict[str, float]]:
    """For each request and each of its keys, the position of the key's next
    reference in the concatenation of all requests' keys (:data:`NEVER` when
    there is none). Positions, not request numbers, break ties: of two blocks
    next needed by the same request, the one later in its chain goes first
    (without the head, a tail cannot be hit)."""
    starts = [0]
    for request in requests:
        starts.append(starts[-1] + len(request.keys))
    upcoming: dict[str, float] = {}
    result: list[dict[str, float]] = [{} for _ in requests]
    for index in range(len(requests) - 1, -1, -1):
        keys = requests[index].keys
        result[index] = {key: upcoming.get(key, NEVER) for key in keys}
        for position in range(len(keys) - 1, -1, -1):
            upcoming[keys[position]] = starts[index] + position
    return result
