"""Small stand-ins for the SGLang 0.5.23 names a HiCache storage backend meets.

They follow SGLang's documented signatures (``sglang/srt/mem_cache/hicache_storage.py``,
``storage/backend_factory.py``, the host pools' ``get_page_buffer_meta``)
and the call sequence of ``managers/cache_controller.py``: the factory builds
a ``dynamic`` backend as ``cls(storage_config, kwargs)`` after an
``issubclass(cls, HiCacheStorage)`` check, then ``register_mem_pool_host``
and ``on_host_pools_registered``; for hybrid models
(``hybrid_cache/hybrid_cache_controller.py``) ``register_mem_host_pool_v2``
of every host pool group entry comes between the two. The v2 types
(``PoolName``, ``PoolHitPolicy``, ``PoolTransfer``, ``PoolTransferResult``)
have 0.5.23's fields. Written for the tests; no SGLang code is
copied. :func:`installed` puts them into ``sys.modules`` under SGLang's module
names so that ``kvbucket.integrations.sglang`` subclasses the stand-in ABC.

:class:`FakeHostPool` is a torch-free host KV pool in numpy with the two
layouts that matter for storage: ``page_first`` MHA (two buffers per page, K
and V, far apart) and MLA (one buffer per page). :class:`FakeStatePool` is
a Mamba state pool (one slot a page, a temporal and two conv buffers per
slot); :class:`LogicalAnchor` an anchor pool that owns indices and no KV.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import types
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from standins.modules import imported_against, module

MODULE = "kvbucket.integrations.sglang"


@dataclass
class HiCacheStorageConfig:
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    attn_cp_rank: int
    attn_cp_size: int
    is_mla_model: bool
    enable_storage_metrics: bool
    is_page_first_layout: bool
    model_name: str | None
    tp_lcm_size: int | None = None
    should_split_heads: bool = False
    dp_rank: int = 0
    extra_config: dict | None = None
    dcp_size: int = 1
    dcp_rank: int = 0
    logical_page_size: int | None = None

    @property
    def is_storage_writer(self) -> bool:
        return not self.is_mla_model or self.tp_rank == self.dcp_rank


@dataclass
class HiCacheStorageExtraInfo:
    prefix_keys: list[str] | None = None
    extra_info: dict | None = None


class PoolName(str, enum.Enum):
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


class PoolHitPolicy(str, enum.Enum):
    ALL_PAGES = "all_pages"
    TRAILING_PAGES = "trailing_pages"
    BLOCK_GROUPS = "block_groups"


@dataclass
class PoolTransfer:
    name: PoolName
    host_indices: Any | None = None
    device_indices: Any | None = None
    keys: list[str] | None = None
    hit_policy: PoolHitPolicy = PoolHitPolicy.ALL_PAGES
    nodes_to_load: list[Any] | None = None
    indices_from_pool: PoolName | None = None
    block_pages: int = 0
    group_pages: int = 0


@dataclass
class PoolTransferResult:
    kv_hit_pages: int
    extra_pool_hit_pages: dict[str, int]
    restorable_prefix_pages: list[int] | None = None


class HiCacheStorage(ABC):
    """The abstract L3 storage interface (generic and v1 calls)."""

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        self.mem_pool_host = mem_pool_host

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        if not hasattr(self, "registered_pools"):
            self.registered_pools = {}
        self.registered_pools[host_pool_name] = host_pool

    def on_host_pools_registered(self) -> None:
        pass

    def batch_get_v1(self, keys: list[str], host_indices: Any, extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        pass

    def batch_set_v1(self, keys: list[str], host_indices: Any, extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        pass

    @abstractmethod
    def get(self, key: str, target_location: Any | None = None, target_sizes: Any | None = None) -> Any:
        pass

    @abstractmethod
    def batch_get(self, keys: list[str], target_locations: Any | None = None, target_sizes: Any | None = None) -> Any:
        pass

    @abstractmethod
    def set(self, key: str, value: Any | None = None, target_location: Any | None = None, target_sizes: Any | None = None) -> bool:
        pass

    @abstractmethod
    def batch_set(self, keys: list[str], values: Any | None = None, target_locations: Any | None = None, target_sizes: Any | None = None) -> bool:
        pass

    @abstractmethod
    def exists(self, key: str) -> bool:
        pass

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        for i, key in enumerate(keys):
            if not self.exists(key):
                return i
        return len(keys)

    def clear(self) -> None:
        pass

    def get_stats(self) -> Any:
        return None


class StorageBackendFactory:
    """The ``dynamic`` path of SGLang's backend factory."""

    @staticmethod
    def _load_backend_class(module_path: str, class_name: str, backend_name: str) -> type:
        backend_module = importlib.import_module(module_path)
        backend_class = getattr(backend_module, class_name)
        if not issubclass(backend_class, HiCacheStorage):
            raise TypeError(f"Backend class {class_name} must inherit from HiCacheStorage")
        return backend_class

    @classmethod
    def create_backend(cls, backend_name: str, storage_config: HiCacheStorageConfig, mem_pool_host: Any, **kwargs: Any) -> Any:
        if backend_name != "dynamic" or storage_config.extra_config is None:
            raise ValueError(f"Unknown storage backend '{backend_name}'")
        extra = storage_config.extra_config
        for field_name in ("backend_name", "module_path", "class_name"):
            if field_name not in extra:
                raise ValueError(f"Missing required field '{field_name}'")
        backend_class = cls._load_backend_class(extra["module_path"], extra["class_name"], extra["backend_name"])
        return backend_class(storage_config, kwargs)


def attach(storage_config: HiCacheStorageConfig, pool: FakeHostPool) -> Any:
    """What the cache controller does: create via the factory, register the pool."""
    backend = StorageBackendFactory.create_backend("dynamic", storage_config, pool)
    backend.register_mem_pool_host(pool)
    backend.on_host_pools_registered()
    return backend


def attach_hybrid(storage_config: HiCacheStorageConfig, anchor: Any, pools: dict[PoolName, Any]) -> Any:
    """What the hybrid cache controller does: the anchor pool, then every host pool group entry."""
    backend = StorageBackendFactory.create_backend("dynamic", storage_config, anchor)
    backend.register_mem_pool_host(anchor)
    for name, pool in pools.items():
        backend.register_mem_host_pool_v2(pool, name)
    backend.on_host_pools_registered()
    return backend


class FakeHostPool:
    """A numpy host KV pool with SGLang's storage-facing helpers.

    ``mha`` (``page_first``): ``kv_buffer[2, size, layers, heads, head_dim]``,
    each page is two buffers (K block, then V block). ``mla``:
    ``kv_buffer[size, layers, 1, dim]``, one buffer per page.
    """

    def __init__(
        self, kind: str = "mha", size: int = 64, page_size: int = 4, layer_num: int = 2, head_num: int = 2, head_dim: int = 8, dtype: Any = np.float16
    ) -> None:
        self.kind, self.size, self.page_size = kind, size, page_size
        self.layer_num, self.head_num, self.head_dim = layer_num, head_num, head_dim
        self.dtype = np.dtype(dtype)
        self.layout = "page_first"
        shape = (2, size, layer_num, head_num, head_dim) if kind == "mha" else (size, layer_num, 1, head_dim)
        self.kv_buffer = np.zeros(shape, dtype=self.dtype)
        if kind == "mha":  # SGLang's MHA host pools expose their K and V halves
            self.k_buffer, self.v_buffer = self.kv_buffer[0], self.kv_buffer[1]

    @property
    def token_bytes(self) -> int:
        return self.layer_num * (self.head_num if self.kind == "mha" else 1) * self.head_dim * self.dtype.itemsize

    def get_size_per_token(self) -> int:
        return self.token_bytes * (2 if self.kind == "mha" else 1)

    def fill_random(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.kv_buffer.view(np.uint8)[...] = rng.integers(0, 256, self.kv_buffer.nbytes, dtype=np.uint8).reshape(self.kv_buffer.view(np.uint8).shape)

    def page_indices(self, pages: list[int]) -> np.ndarray:
        """Token indices of whole pages (what the controller passes)."""
        return np.concatenate([np.arange(p * self.page_size, (p + 1) * self.page_size) for p in pages]).astype(np.int64)

    def page_bytes(self, page: int) -> bytes:
        """The page's bytes as storage sees them (K then V for MHA)."""
        return self.get_data_page(page * self.page_size).tobytes()

    def get_page_buffer_meta(self, indices: Any) -> tuple[list[int], list[int]]:
        indices = list(np.asarray(indices).tolist())
        assert len(indices) % self.page_size == 0
        assert all(0 <= i < self.size for i in indices), "host index outside the pool"
        base = self.kv_buffer.ctypes.data
        ptrs: list[int] = []
        for start in range(0, len(indices), self.page_size):
            first = indices[start]
            k_ptr = base + first * self.token_bytes
            ptrs.append(k_ptr)
            if self.kind == "mha":
                ptrs.append(k_ptr + self.size * self.token_bytes)
        return ptrs, [self.page_size * self.token_bytes] * len(ptrs)

    def get_data_page(self, index: int, flat: bool = True) -> np.ndarray:
        index = int(index)
        page = self.kv_buffer[:, index:index + self.page_size] if self.kind == "mha" else self.kv_buffer[index:index + self.page_size]
        return page.reshape(-1).copy() if flat else page.copy()

    def get_dummy_flat_data_page(self) -> np.ndarray:
        return np.zeros(self.page_size * self.get_size_per_token() // self.dtype.itemsize, dtype=self.dtype)

    def set_from_flat_data_page(self, index: int, data_page: np.ndarray) -> None:
        index = int(index)
        if self.kind == "mha":
            self.kv_buffer[:, index : index + self.page_size] = data_page.reshape(self.kv_buffer[:, index : index + self.page_size].shape)
        else:
            self.kv_buffer[index : index + self.page_size] = data_page.reshape(self.kv_buffer[index : index + self.page_size].shape)


class FakeStatePool:
    """A numpy Mamba state host pool (``page_first``): one slot a page, its
    buffers the temporal state and two conv states, each in its own array."""

    def __init__(self, size: int = 16, layers: int = 2, temporal: int = 24, convs: tuple[int, ...] = (8, 12)) -> None:
        self.size, self.page_size, self.layout = size, 1, "page_first"
        self.num_mamba_layers, self.temporal_state_elem_size = layers, temporal
        self.temporal_dtype, self.conv_dtype = np.dtype(np.float32), np.dtype(np.float16)
        self.conv_state_shapes = [(c,) for c in convs]
        self.temporal_buffer = np.zeros((size, layers, temporal), dtype=self.temporal_dtype)
        self.conv_buffer = [np.zeros((size, layers, c), dtype=self.conv_dtype) for c in convs]

    def buffers(self) -> list[np.ndarray]:
        """The pool's arrays, in the order of a page's buffers."""
        return [self.temporal_buffer, *self.conv_buffer]

    @property
    def page_nbytes(self) -> int:
        return sum(b[0].nbytes for b in self.buffers())

    def fill_random(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for buf in self.buffers():
            raw = buf.view(np.uint8)
            raw[...] = rng.integers(0, 256, raw.shape, dtype=np.uint8)

    def zero(self) -> None:
        for buf in self.buffers():
            buf[...] = 0

    def page_indices(self, slots: list[int]) -> np.ndarray:
        return np.asarray(list(slots), dtype=np.int64)

    def page_bytes(self, slot: int) -> bytes:
        return b"".join(buf[slot].tobytes() for buf in self.buffers())

    def set_page_bytes(self, slot: int, data: bytes) -> None:
        offset = 0
        for buf in self.buffers():
            n = buf[slot].nbytes
            buf[slot].view(np.uint8).reshape(-1)[...] = np.frombuffer(data[offset : offset + n], dtype=np.uint8)
            offset += n

    def get_page_buffer_meta(self, indices: Any) -> tuple[list[int], list[int]]:
        ptrs: list[int] = []
        sizes: list[int] = []
        for slot in np.asarray(indices).tolist():
            assert 0 <= slot < self.size, "host index outside the pool"
            for buf in self.buffers():
                ptrs.append(buf.ctypes.data + slot * buf[0].nbytes)
                sizes.append(buf[0].nbytes)
        return ptrs, sizes


class LogicalAnchor:
    """An anchor pool that only hands out indices: its KV lives in the v2 pools."""

    def __init__(self, page_size: int = 1) -> None:
        self.page_size, self.layout, self.kv_buffer = page_size, "page_first", None


def make_config(
    root: Any = None, *, tp_rank: int = 0, tp_size: int = 1, mla: bool = False, metrics: bool = False, model: str = "org/model-7b", **extra: Any
) -> HiCacheStorageConfig:
    """A storage config whose extra_config selects kvbucket through the dynamic path."""
    extra_config = {"backend_name": "kvbucket", "module_path": MODULE, "class_name": "KvBucketHiCacheStorage", "interface_v1": 1}
    if root is not None:
        extra_config["storage_path"] = str(root)
    extra_config.update(extra)
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=metrics, is_page_first_layout=True,
        model_name=model, extra_config=extra_config,
    )


@contextlib.contextmanager
def installed() -> Iterator[types.ModuleType]:
    """Install the stand-ins as ``sglang.*`` and (re)import the adapter module against them."""
    modules = {
        "sglang": module("sglang"),
        "sglang.srt": module("sglang.srt"),
        "sglang.srt.mem_cache": module("sglang.srt.mem_cache"),
        "sglang.srt.mem_cache.hicache_storage": module(
            "sglang.srt.mem_cache.hicache_storage",
            HiCacheStorage=HiCacheStorage, HiCacheStorageConfig=HiCacheStorageConfig, HiCacheStorageExtraInfo=HiCacheStorageExtraInfo,
            PoolName=PoolName, PoolHitPolicy=PoolHitPolicy, PoolTransfer=PoolTransfer, PoolTransferResult=PoolTransferResult,
        ),
        "sglang.srt.mem_cache.storage": module("sglang.srt.mem_cache.storage", StorageBackendFactory=StorageBackendFactory),
        "sglang.srt.mem_cache.storage.backend_factory": module(
            "sglang.srt.mem_cache.storage.backend_factory", StorageBackendFactory=StorageBackendFactory
        ),
    }
    with imported_against(modules, MODULE) as adapter_module:
        yield adapter_module
