"""Minimal stand-ins for the LMCache names the L2 adapter uses, when LMCache is absent.

They let :mod:`kvbucket.integrations.lmcache` import (and be exercised) without
LMCache; inside an LMCache server the real classes are used instead. Names and
behaviour follow lmcache 0.5.6 (``lmcache.v1.distributed``).
"""

from __future__ import annotations

import threading
from abc import ABC
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "AdapterUsage",
    "Bitmap",
    "EncodedObjectKey",
    "KeyEntry",
    "KeyListPage",
    "L2AdapterConfigBase",
    "L2AdapterInterface",
    "L2StoreResult",
    "ObjectKey",
]


@dataclass(frozen=True)
class ObjectKey:
    """LMCache's object identifier (chunk hash, model, KV rank, group, salt)."""

    chunk_hash: bytes
    model_name: str
    kv_rank: int
    object_group_id: int = 0
    cache_salt: str = ""

    def __post_init__(self) -> None:
        if "@" in self.model_name or "@" in self.cache_salt:
            raise ValueError("model_name and cache_salt must not contain '@'")


@dataclass(frozen=True)
class EncodedObjectKey:
    """JSON-safe form of an :class:`ObjectKey` (``chunk_hash`` as hex), as key listings carry it."""

    chunk_hash_hex: str
    model_name: str
    kv_rank: int
    object_group_id: int = 0
    cache_salt: str = ""


@dataclass(frozen=True)
class KeyEntry:
    """One listed key and its object's size."""

    key: EncodedObjectKey
    size_bytes: int


@dataclass(frozen=True)
class KeyListPage:
    """A page of ``list_l2_keys``; ``next_page_token`` None means the listing is complete."""

    entries: tuple[KeyEntry, ...]
    next_page_token: str | None


class Bitmap:
    """Per-key success bits of a lookup or load task."""

    def __init__(self, size: int, prefix_bits: int = 0) -> None:
        self._bits = [i < prefix_bits for i in range(size)]

    def set(self, index: int) -> None:
        self._bits[index] = True

    def clear(self, index: int) -> None:
        self._bits[index] = False

    def test(self, index: int) -> bool:
        return self._bits[index]

    def size(self) -> int:
        return len(self._bits)

    def __len__(self) -> int:
        return len(self._bits)


class L2StoreResult(int):
    """Bytes written (>= 0) on success, -1 on failure."""

    def __new__(cls, success: bool, bytes_transferred: int) -> L2StoreResult:
        if bytes_transferred < 0:
            raise ValueError(f"bytes_transferred must be >= 0, got {bytes_transferred}")
        return super().__new__(cls, bytes_transferred if success else -1)

    def is_successful(self) -> bool:
        return int(self) >= 0

    def bytes_transferred(self) -> int:
        return max(int(self), 0)


@dataclass(frozen=True)
class AdapterUsage:
    """Usage snapshot of an adapter."""

    total_bytes_used: int
    total_capacity_bytes: int
    bytes_by_cache_salt: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def usage_fraction(self) -> float:
        if self.total_capacity_bytes <= 0:
            return -1.0
        return self.total_bytes_used / self.total_capacity_bytes


class L2AdapterConfigBase(ABC):  # noqa: B024 - mirrors LMCache's ABC
    """Base of adapter configs (``from_dict`` / ``help``)."""


class L2AdapterInterface(ABC):  # noqa: B024 - mirrors LMCache's ABC
    """Accounting and listener part of LMCache's ``L2AdapterInterface``."""

    def __init__(self, max_capacity_bytes: int = 0) -> None:
        self._listeners: list[Any] = []
        self._max_capacity_bytes = max_capacity_bytes
        self._total_bytes_used = 0
        self._bytes_by_cache_salt: dict[str, int] = {}
        self._usage_lock = threading.Lock()

    def register_listener(self, listener: Any) -> None:
        self._listeners.append(listener)

    def _notify_keys_stored(self, keys: list[Any], sizes: list[int]) -> None:
        self._account(keys, sizes, +1)
        for listener in self._listeners:
            listener.on_l2_keys_stored(keys, sizes)

    def _notify_keys_accessed(self, keys: list[Any]) -> None:
        for listener in self._listeners:
            listener.on_l2_keys_accessed(keys)

    def _notify_keys_deleted(self, keys: list[Any], sizes: list[int]) -> None:
        self._account(keys, sizes, -1)
        for listener in self._listeners:
            listener.on_l2_keys_deleted(keys)

    def _account(self, keys: list[Any], sizes: list[int], sign: int) -> None:
        with self._usage_lock:
            for key, size in zip(keys, sizes, strict=True):
                self._total_bytes_used = max(0, self._total_bytes_used + sign * size)
                left = self._bytes_by_cache_salt.get(key.cache_salt, 0) + sign * size
                if left > 0:
                    self._bytes_by_cache_salt[key.cache_salt] = left
                else:
                    self._bytes_by_cache_salt.pop(key.cache_salt, None)

    @property
    def supports_global_eviction(self) -> bool:
        return self._max_capacity_bytes > 0

    def get_usage(self) -> AdapterUsage:
        with self._usage_lock:
            return AdapterUsage(self._total_bytes_used, self._max_capacity_bytes, MappingProxyType(dict(self._bytes_by_cache_salt)))
