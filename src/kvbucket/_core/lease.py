"""Lookup leases: keys pinned against eviction for a short time.

An engine looks a prefix up, then loads it; eviction running in between
(a concurrent write making room, or the background evictor) must not take
what the lookup reported. A lookup therefore *leases* the keys it found:
until the lease ends, no eviction chooses a bucket that holds a leased key.
A lease ends when its key is loaded, when it is released, or at its
deadline, whichever comes first.

Invariants:
* a lease only ever protects from *eviction*; explicit removal
  (``remove``, ``delete_bucket``, ``remove_all``) ignores leases;
* expired leases count for nothing: they are dropped lazily (on the next
  grant past a size threshold, and whenever eviction asks which keys are
  leased), so a table that is never asked stays bounded by the rate of
  lookups times the lease time;
* deadlines come from a monotonic clock (injectable, so tests advance time
  without sleeping).

Not thread-safe: the store guards a :class:`LeaseTable` with its index lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

__all__ = ["Clock", "LeaseTable"]

Clock = Callable[[], float]
"""A monotonic clock: seconds as a float, never decreasing."""

_PRUNE_MIN = 1024
"""Grants do not scan for expired leases until the table holds this many."""


class LeaseTable:
    """Key -> lease deadline (seconds on ``clock``)."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._deadlines: dict[str, float] = {}
        self._prune_at = _PRUNE_MIN

    def grant(self, keys: Iterable[str], seconds: float) -> None:
        """Lease ``keys`` for ``seconds`` from now; a key already leased keeps
        the later of its two deadlines. ``seconds <= 0`` grants nothing."""
        if seconds <= 0:
            return
        now = self._clock()
        deadline = now + seconds
        deadlines = self._deadlines
        for key in keys:
            if deadlines.get(key, now) <= deadline:
                deadlines[key] = deadline
        if len(deadlines) >= self._prune_at:
            self._prune(now)
            self._prune_at = max(_PRUNE_MIN, 2 * len(deadlines))

    def release(self, keys: Iterable[str]) -> None:
        """End the leases of ``keys`` (keys without one are ignored)."""
        deadlines = self._deadlines
        if not deadlines:
            return
        for key in keys:
            deadlines.pop(key, None)

    def live(self) -> list[str]:
        """The keys whose lease has not expired; expired ones are dropped."""
        if not self._deadlines:
            return []
        self._prune(self._clock())
        return list(self._deadlines)

    def __len__(self) -> int:
        """Leases held, expired ones not yet dropped included."""
        return len(self._deadlines)

    def _prune(self, now: float) -> None:
        """Drop every lease whose deadline has passed."""
        expired = [key for key, deadline in self._deadlines.items() if deadline <= now]
        for key in expired:
            del self._deadlines[key]
