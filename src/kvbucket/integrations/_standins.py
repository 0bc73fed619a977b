"""kvbucket's stand-ins for the engine names the adapters build on, used when the engine is absent.

Each adapter asks :func:`~kvbucket.integrations._common.import_engine` for
its engine's names; when any of them cannot be imported it takes this
module's namespace of the same names instead (:data:`SGLANG`, :data:`VLLM`,
:data:`LMCACHE`, :data:`LMCACHE_LISTING`). Inside an engine the real classes
are used and nothing here is touched: the engines' plugin loaders check
``issubclass`` against their own base classes. The stand-ins follow SGLang
0.5.23, vLLM 0.33 and LMCache 0.5.6 and hold only what the adapters use.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from abc import ABC
from collections.abc import Collection, Mapping
from types import MappingProxyType, SimpleNamespace
from typing import Any, ClassVar

__all__ = ["SGLANG", "VLLM", "LMCACHE", "LMCACHE_LISTING"]


# -- SGLang (sglang.srt.mem_cache.hicache_storage) ---------------------------------
class HiCacheStorage:
    """``HiCacheStorage``'s pool registration (the adapter implements the rest)."""

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Remember the host pool the zero-copy calls read and write."""
        self.mem_pool_host = mem_pool_host

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        """Remember one named host pool (hybrid models register several)."""
        if not hasattr(self, "registered_pools"):
            self.registered_pools = {}
        self.registered_pools[host_pool_name] = host_pool

    def on_host_pools_registered(self) -> None:
        """Nothing to finalise."""


class PoolName(str, enum.Enum):
    """``PoolName``: the host pools a hybrid model registers (v2 calls)."""

    KV = "kv"
    MAMBA = "mamba"
    SWA = "swa"
    AUXILIARY_SWA = "auxiliary_swa"
    INDEXER = "indexer"
    DEEPSEEK_V4_C1 = "deepseek_v4_c1"
    DEEPSEEK_V4_C1_INDEXER = "deepseek_v4_c1_indexer"
    DEEPSEEK_V4_C1_INDEXER_SCALE = "deepseek_v4_c1_indexer_scale"
    DEEPSEEK_V4_C2 = "deepseek_v4_c2"
    DEEPSEEK_V4_C2_INDEXER = "deepseek_v4_c2_indexer"
    DEEPSEEK_V4_C2_INDEXER_SCALE = "deepseek_v4_c2_indexer_scale"
    DEEPSEEK_V4_C4 = "deepseek_v4_c4"
    DEEPSEEK_V4_C4_INDEXER = "deepseek_v4_c4_indexer"
    DEEPSEEK_V4_C4_INDEXER_SCALE = "deepseek_v4_c4_indexer_scale"
    DEEPSEEK_V4_C128 = "deepseek_v4_c128"
    DEEPSEEK_V4_C4_ROPE = "deepseek_v4_c4_rope"
    DEEPSEEK_V4_C128_ROPE = "deepseek_v4_c128_rope"
    DEEPSEEK_V4_C4_STATE = "deepseek_v4_c4_state"
    DEEPSEEK_V4_C4_INDEXER_STATE = "deepseek_v4_c4_indexer_state"
    DEEPSEEK_V4_C128_STATE = "deepseek_v4_c128_state"
    DRAFT = "draft"
    DRAFT_INDEXER = "draft_indexer"
    DRAFT_SWA = "draft_swa"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass
class PoolTransferResult:
    """``PoolTransferResult`` of ``batch_exists_v2``: the usable prefix and each pool's own hit."""

    kv_hit_pages: int
    extra_pool_hit_pages: dict[Any, int]
    restorable_prefix_pages: list[int] | None = None


SGLANG = SimpleNamespace(HiCacheStorage=HiCacheStorage, PoolName=PoolName, PoolTransferResult=PoolTransferResult)
"""The SGLang names :mod:`kvbucket.integrations.sglang` builds on."""


# -- vLLM (vllm.v1.kv_offload.base, vllm.v1.kv_offload.tiering.base) -------------------
class LookupResult(enum.Enum):
    """``LookupResult`` of a secondary tier."""

    HIT = 1
    HIT_PENDING = 2
    RETRY = 3
    MISS = 4


@dataclasses.dataclass
class JobResult:
    """``JobResult`` of a store or load job."""

    job_id: int
    success: bool
    successful_keys: Collection[bytes] | None = None
    transfer_time: float | None = None
    transfer_bytes: int | None = None


@dataclasses.dataclass
class RequestOffloadingContext:
    """``RequestOffloadingContext`` (no preferences)."""


class SecondaryTierManager(ABC):  # noqa: B024 - mirrors vLLM's ABC
    """``SecondaryTierManager``'s constructor and ``medium``."""

    medium: ClassVar[Any] = None

    def __init__(self, offloading_spec: Any, primary_kv_view: memoryview, tier_type: str) -> None:
        self._offloading_spec = offloading_spec
        self._primary_kv_view = primary_kv_view
        self.tier_type = tier_type


VLLM = SimpleNamespace(
    SecondaryTierManager=SecondaryTierManager,
    JobResult=JobResult,
    LookupResult=LookupResult,
    RequestOffloadingContext=RequestOffloadingContext,
    Medium=None,
    Locality=None,
    OffloadingEvent=None,
    Stats=None,
    CounterMetadata=None,
    GaugeMetadata=None,
)
"""The vLLM names :mod:`kvbucket.integrations.vllm` builds on; without vLLM
there is no storage medium, no vLLM metrics and no KV events (``Medium``,
``Locality``, ``OffloadingEvent``, ``Stats``, ``CounterMetadata``,
``GaugeMetadata`` are None)."""


# -- LMCache (lmcache.v1.distributed) -----------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class _KeyFields:
    """The fields an :class:`ObjectKey` and its encoded form share."""

    model_name: str
    kv_rank: int
    object_group_id: int = 0
    cache_salt: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectKey(_KeyFields):
    """LMCache's object identifier (chunk hash, model, KV rank, group, salt)."""

    chunk_hash: bytes

    def __post_init__(self) -> None:
        if "@" in self.model_name or "@" in self.cache_salt:
            raise ValueError("model_name and cache_salt must not contain '@'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncodedObjectKey(_KeyFields):
    """JSON-safe form of an :class:`ObjectKey` (``chunk_hash`` as hex), as key listings carry it."""

    chunk_hash_hex: str


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One listed key and its object's size."""

    key: EncodedObjectKey
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class KeyListPage:
    """A page of ``list_l2_keys``; ``next_page_token`` None means the listing is complete."""

    entries: tuple[KeyEntry, ...]
    next_page_token: str | None


class Bitmap:
    """Per-key success bits of a lookup or load task."""

    def __init__(self, size: int, prefix_bits: int = 0) -> None:
        self._bits = [i < prefix_bits for i in range(size)]

    def set(self, index: int) -> None:
        """Mark key ``index`` found."""
        self._bits[index] = True

    def clear(self, index: int) -> None:
        """Mark key ``index`` not found."""
        self._bits[index] = False

    def test(self, index: int) -> bool:
        """Whether key ``index`` was found."""
        return self._bits[index]

    def size(self) -> int:
        """The number of keys."""
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
        """Whether the store task succeeded."""
        return int(self) >= 0

    def bytes_transferred(self) -> int:
        """Bytes the task wrote (0 on failure)."""
        return max(int(self), 0)


@dataclasses.dataclass(frozen=True)
class AdapterUsage:
    """Usage snapshot of an adapter."""

    total_bytes_used: int
    total_capacity_bytes: int
    bytes_by_cache_salt: Mapping[str, int] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    @property
    def usage_fraction(self) -> float:
        """Used over capacity; -1.0 when the capacity is unknown."""
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
        """Tell ``listener`` about keys stored, accessed and deleted from now on."""
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
        """Whether LMCache's eviction controller may evict from this adapter (a capacity is known)."""
        return self._max_capacity_bytes > 0

    def get_usage(self) -> AdapterUsage:
        """Bytes used, in all and per cache salt, and the capacity."""
        with self._usage_lock:
            return AdapterUsage(self._total_bytes_used, self._max_capacity_bytes, MappingProxyType(dict(self._bytes_by_cache_salt)))


LMCACHE = SimpleNamespace(
    Bitmap=Bitmap,
    ObjectKey=ObjectKey,
    L2StoreResult=L2StoreResult,
    L2AdapterInterface=L2AdapterInterface,
    L2AdapterConfigBase=L2AdapterConfigBase,
)
"""The LMCache names :mod:`kvbucket.integrations.lmcache` builds on."""

LMCACHE_LISTING = SimpleNamespace(EncodedObjectKey=EncodedObjectKey, KeyEntry=KeyEntry, KeyListPage=KeyListPage)
"""The key-listing names (LMCache added them after 0.5.6)."""
