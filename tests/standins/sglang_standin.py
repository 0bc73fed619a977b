"""Small stand-ins for the SGLang 0.5.23 names a HiCache storage backend meets.

They follow SGLang's documented signatures (``sglang/srt/mem_cache/hicache_storage.py``,
``storage/backend_factory.py``, the host pools' ``get_page_buffer_meta``)
and the call sequence of ``managers/cache_controller.py``: the factory builds
a ``dynamic`` backend as ``cls(storage_config, kwargs)`` after an
``issubclass(cls, HiCacheStorage)`` check, then ``register_mem_pool_host``
and ``on_host_pools_registered``. Written for the tests; no SGLang code is
copied. :func:`installed` puts them into ``sys.modules`` under SGLang's module
names so that ``kvbucket.integrations.sglang`` subclasses the stand-in ABC.

:class:`FakeHostPool` is a torch-free host KV pool in numpy with the two
layouts that matter for storage: ``page_first`` MHA (two buffers per page, K
and V, far apart) and MLA (one buffer per page).
"""

from __future__ import annotations

import contextlib
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
        ),
        "sglang.srt.mem_cache.storage": module("sglang.srt.mem_cache.storage", StorageBackendFactory=StorageBackendFactory),
        "sglang.srt.mem_cache.storage.backend_factory": module(
            "sglang.srt.mem_cache.storage.backend_factory", StorageBackendFactory=StorageBackendFactory
        ),
    }
    with imported_against(modules, MODULE) as adapter_module:
        yield adapter_module
