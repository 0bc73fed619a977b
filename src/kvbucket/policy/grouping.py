"""Grouping objects into buckets for an offload pipeline.

Mooncake's ``AllocateOffloadingBuckets``, fixed: the partial remainder is
carried to the next call (never dropped), duplicates and stored keys are
filtered, an object larger than a bucket gets a bucket of its own, and a
remainder older than ``max_delay_s`` is emitted even by a call that adds
nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

__all__ = ["OffloadGrouper", "cut_buckets"]


def cut_buckets(sizes: Mapping[str, int], size_limit: int, keys_limit: int) -> tuple[list[list[str]], list[str]]:
    """Full buckets cut off the front of ``{key: size}`` in order, and the partial rest.

    A bucket is full at ``keys_limit`` keys or ``size_limit`` bytes; an
    object that would push a non-empty bucket past ``size_limit`` starts the
    next one, so only a lone object is ever larger than ``size_limit``.
    """
    groups: list[list[str]] = []
    current: list[str] = []
    size = 0
    for key, object_size in sizes.items():
        if current and (size + object_size > size_limit or len(current) >= keys_limit):
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += object_size
        if size >= size_limit or len(current) >= keys_limit:
            groups.append(current)
            current, size = [], 0
    return groups, current


class OffloadGrouper:
    """The carried-over pool of objects waiting to fill a bucket."""

    def __init__(
        self, size_limit: int, keys_limit: int, max_delay_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._size_limit = size_limit
        self._keys_limit = keys_limit
        self._max_delay_s = max_delay_s
        self._clock = clock
        self._pending: dict[str, int] = {}
        self._since = 0.0

    def pending(self) -> list[str]:
        """Keys carried over, in arrival order."""
        return list(self._pending)

    def add(self, sizes: Mapping[str, int], is_stored: Callable[[str], bool], flush: bool) -> list[list[str]]:
        """Add ``{key: size}`` and return the buckets that are ready."""
        if not self._pending:
            self._since = self._clock()
        for key, size in sizes.items():
            if key not in self._pending and not is_stored(key):
                self._pending[key] = size
        self._pending = {k: s for k, s in self._pending.items() if not is_stored(k)}
        groups = self._fill()
        expired = self._max_delay_s > 0 and self._clock() - self._since >= self._max_delay_s
        if self._pending and (flush or expired):
            groups.append(list(self._pending))
            self._pending.clear()
        if groups and self._pending:
            self._since = self._clock()
        return groups

    def split(self, sizes: Mapping[str, int], is_stored: Callable[[str], bool]) -> list[list[str]]:
        """Cut ``{key: size}`` into buckets on its own, the partial rest
        included, leaving the pool alone; stored keys are dropped."""
        groups, rest = cut_buckets({k: s for k, s in sizes.items() if not is_stored(k)}, self._size_limit, self._keys_limit)
        return [*groups, rest] if rest else groups

    def _fill(self) -> list[list[str]]:
        """Cut full buckets off the front of the pool; keep the partial rest."""
        groups, rest = cut_buckets(self._pending, self._size_limit, self._keys_limit)
        self._pending = {key: self._pending[key] for key in rest}
        return groups
