"""Grouping objects into buckets for an offload pipeline.

Mooncake's ``AllocateOffloadingBuckets``, fixed: the partial remainder is
carried to the next call (never dropped), duplicates and stored keys are
filtered, an object larger than a bucket gets a bucket of its own, and a
remainder older than ``max_delay_s`` is emitted even by a call that adds
nothing.

:func:`cut_batches` (and :func:`split_batches`, which keeps the partial
rest as a last batch) is the one cutter of objects into batches within a
bucket's byte and key limits: the grouper, compaction, the Mooncake importer
and the engine adapters all cut with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

__all__ = ["OffloadGrouper", "cut_batches", "split_batches"]

T = TypeVar("T")


def _one_key(item: object) -> int:
    """The key count of an item that is one object."""
    return 1


def cut_batches(
    items: Iterable[T], *, max_bytes: int, max_keys: int, size: Callable[[T], int], keys: Callable[[T], int] = _one_key
) -> tuple[list[list[T]], list[T]]:
    """Full batches cut off the front of ``items`` in order, and the partial rest.

    An item weighs ``size(item)`` bytes and ``keys(item)`` keys (one by
    default). A batch is full at ``max_bytes`` bytes or ``max_keys`` keys; an
    item that would push a non-empty batch past either limit starts the next
    one, so only a batch of one item is ever over a limit.
    """
    full: list[list[T]] = []
    batch: list[T] = []
    batch_bytes = batch_keys = 0
    for item in items:
        item_bytes, item_keys = size(item), keys(item)
        if batch and (batch_bytes + item_bytes > max_bytes or batch_keys + item_keys > max_keys):
            full.append(batch)
            batch, batch_bytes, batch_keys = [], 0, 0
        batch.append(item)
        batch_bytes += item_bytes
        batch_keys += item_keys
        if batch_bytes >= max_bytes or batch_keys >= max_keys:
            full.append(batch)
            batch, batch_bytes, batch_keys = [], 0, 0
    return full, batch


def split_batches(
    items: Iterable[T], *, max_bytes: int, max_keys: int, size: Callable[[T], int], keys: Callable[[T], int] = _one_key
) -> list[list[T]]:
    """Every batch of :func:`cut_batches`, the partial rest last (when there is one)."""
    full, rest = cut_batches(items, max_bytes=max_bytes, max_keys=max_keys, size=size, keys=keys)
    return [*full, rest] if rest else full


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
        fresh = {k: s for k, s in sizes.items() if not is_stored(k)}
        return split_batches(fresh, max_bytes=self._size_limit, max_keys=self._keys_limit, size=fresh.__getitem__)

    def _fill(self) -> list[list[str]]:
        """Cut full buckets off the front of the pool; keep the partial rest."""
        groups, rest = cut_batches(self._pending, max_bytes=self._size_limit, max_keys=self._keys_limit, size=self._pending.__getitem__)
        self._pending = {key: self._pending[key] for key in rest}
        return groups
