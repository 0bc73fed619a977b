"""Small stand-ins for the LMCache 0.5.6 names an L2 adapter meets.

They follow LMCache's documented interface (``lmcache/v1/distributed/l2_adapters/base.py``,
``plugin_l2_adapter.py``, ``api.ObjectKey``, ``internal_api.L2StoreResult``,
the native ``Bitmap``) and the MP server's call sequence: the plugin factory
imports ``module_path``, checks ``issubclass(cls, L2AdapterInterface)``, finds
``<class_name>Config`` (an ``L2AdapterConfigBase``) and calls
``cls(config)``; the storage manager then calls ``register_listener``; the
controllers submit tasks, poll the event fds and collect one-shot results.
Written for the tests; no LMCache code is copied. :func:`installed` puts them
into ``sys.modules`` under LMCache's module names.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import threading
import types
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from standins.modules import imported_against, module

MODULE = "kvbucket.integrations.lmcache"


@dataclass(frozen=True)
class ObjectKey:
    chunk_hash: bytes
    model_name: str
    kv_rank: int
    object_group_id: int = 0
    cache_salt: str = ""

    def __post_init__(self) -> None:
        if "@" in self.model_name or "@" in self.cache_salt:
            raise ValueError("'@' is not allowed in model_name or cache_salt")


@dataclass(frozen=True)
class EncodedObjectKey:
    chunk_hash_hex: str
    model_name: str
    kv_rank: int
    object_group_id: int = 0
    cache_salt: str = ""

    def to_object_key(self) -> ObjectKey:
        return ObjectKey(bytes.fromhex(self.chunk_hash_hex), self.model_name, self.kv_rank, self.object_group_id, self.cache_salt)


@dataclass(frozen=True)
class KeyEntry:
    key: EncodedObjectKey
    size_bytes: int


@dataclass(frozen=True)
class KeyListPage:
    entries: tuple[KeyEntry, ...]
    next_page_token: str | None


class Bitmap:
    def __init__(self, size: int) -> None:
        self._bits = bytearray(size)

    def set(self, index: int) -> None:
        self._bits[index] = 1

    def test(self, index: int) -> bool:
        return bool(self._bits[index])

    def size(self) -> int:
        return len(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def ones(self) -> list[int]:
        return [i for i, b in enumerate(self._bits) if b]


class L2StoreResult(int):
    def __new__(cls, success: bool, bytes_transferred: int) -> L2StoreResult:
        if bytes_transferred < 0:
            raise ValueError("bytes_transferred must be >= 0")
        return super().__new__(cls, bytes_transferred if success else -1)

    def is_successful(self) -> bool:
        return int(self) >= 0

    def bytes_transferred(self) -> int:
        return max(int(self), 0)


@dataclass(frozen=True)
class AdapterUsage:
    total_bytes_used: int
    total_capacity_bytes: int
    bytes_by_cache_salt: dict

    @property
    def usage_fraction(self) -> float:
        return -1.0 if self.total_capacity_bytes <= 0 else self.total_bytes_used / self.total_capacity_bytes


class L2AdapterConfigBase(ABC):
    @classmethod
    @abstractmethod
    def from_dict(cls, d: dict) -> L2AdapterConfigBase: ...

    @classmethod
    @abstractmethod
    def help(cls) -> str: ...


class L2AdapterInterface(ABC):
    """The abstract adapter with the base class's byte accounting."""

    def __init__(self, max_capacity_bytes: int = 0) -> None:
        self._listeners: list[Any] = []
        self._max_capacity_bytes = max_capacity_bytes
        self._total_bytes_used = 0
        self._bytes_by_cache_salt: dict[str, int] = {}
        self._usage_lock = threading.Lock()

    @abstractmethod
    def get_store_event_fd(self) -> int: ...
    @abstractmethod
    def get_lookup_and_lock_event_fd(self) -> int: ...
    @abstractmethod
    def get_load_event_fd(self) -> int: ...
    @abstractmethod
    def submit_store_task(self, keys: list[ObjectKey], objects: list[Any]) -> int: ...
    @abstractmethod
    def pop_completed_store_tasks(self) -> dict[int, L2StoreResult]: ...
    @abstractmethod
    def submit_lookup_and_lock_task(self, keys: list[ObjectKey], group_layout_descs: dict) -> int: ...
    @abstractmethod
    def query_lookup_and_lock_result(self, task_id: int) -> Bitmap | None: ...
    @abstractmethod
    def submit_unlock(self, keys: list[ObjectKey]) -> None: ...
    @abstractmethod
    def submit_load_task(self, keys: list[ObjectKey], objects: list[Any]) -> int: ...
    @abstractmethod
    def query_load_result(self, task_id: int) -> Bitmap | None: ...
    @abstractmethod
    def close(self) -> None: ...

    def register_listener(self, listener: Any) -> None:
        self._listeners.append(listener)

    def _notify_keys_stored(self, keys: list[ObjectKey], sizes: list[int]) -> None:
        self._account(keys, sizes, 1)
        for listener in self._listeners:
            listener.on_l2_keys_stored(keys, sizes)

    def _notify_keys_accessed(self, keys: list[ObjectKey]) -> None:
        for listener in self._listeners:
            listener.on_l2_keys_accessed(keys)

    def _notify_keys_deleted(self, keys: list[ObjectKey], sizes: list[int]) -> None:
        self._account(keys, sizes, -1)
        for listener in self._listeners:
            listener.on_l2_keys_deleted(keys)

    def _account(self, keys: list[ObjectKey], sizes: list[int], sign: int) -> None:
        with self._usage_lock:
            for key, size in zip(keys, sizes, strict=True):
                self._total_bytes_used += sign * size
                self._bytes_by_cache_salt[key.cache_salt] = self._bytes_by_cache_salt.get(key.cache_salt, 0) + sign * size
                if self._bytes_by_cache_salt[key.cache_salt] <= 0:
                    del self._bytes_by_cache_salt[key.cache_salt]
            assert self._total_bytes_used >= 0, "accounting underflow"

    @property
    def supports_global_eviction(self) -> bool:
        return self._max_capacity_bytes > 0

    def delete(self, keys: list[ObjectKey]) -> None:
        return None

    def list_l2_keys(self, model_name: str | None = None, page_size: int = 500, cursor: str | None = None) -> KeyListPage:
        raise NotImplementedError(f"{type(self).__name__} does not implement list_l2_keys")

    def get_usage(self) -> AdapterUsage:
        with self._usage_lock:
            return AdapterUsage(self._total_bytes_used, self._max_capacity_bytes, dict(self._bytes_by_cache_salt))

    def report_status(self) -> dict:
        return {"is_healthy": True}


class PluginL2AdapterConfig(L2AdapterConfigBase):
    def __init__(self, module_path: str, class_name: str, adapter_params: dict | None = None, config_class_name: str | None = None) -> None:
        self.module_path, self.class_name = module_path, class_name
        self.adapter_params = adapter_params or {}
        self.config_class_name = config_class_name

    @classmethod
    def from_dict(cls, d: dict) -> PluginL2AdapterConfig:
        return cls(d["module_path"], d["class_name"], d.get("adapter_params", {}), d.get("config_class_name"))

    @classmethod
    def help(cls) -> str:
        return "plugin"


def create_plugin_adapter(config: PluginL2AdapterConfig, l1_memory_desc: Any = None) -> L2AdapterInterface:
    """The plugin factory: import, check the subclass, resolve the config class, construct."""
    plugin_module = importlib.import_module(config.module_path)
    adapter_cls = getattr(plugin_module, config.class_name)
    if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, L2AdapterInterface)):
        raise TypeError(f"{config.class_name} is not a subclass of L2AdapterInterface")
    for name in (config.config_class_name, config.class_name + "Config", getattr(adapter_cls, "config_class_name", None)):
        cfg_cls = getattr(plugin_module, name, None) if name else None
        if isinstance(cfg_cls, type) and issubclass(cfg_cls, L2AdapterConfigBase):
            return adapter_cls(cfg_cls.from_dict(config.adapter_params))
    return adapter_cls(config.adapter_params)


class Listener:
    """Records what an L2 listener (LMCache's eviction policy) is told."""

    def __init__(self) -> None:
        self.sizes: dict[ObjectKey, int] = {}
        self.accessed: list[ObjectKey] = []
        self.deleted: list[ObjectKey] = []

    def on_l2_keys_stored(self, keys: list[ObjectKey], sizes: list[int]) -> None:
        self.sizes.update(zip(keys, sizes))

    def on_l2_keys_accessed(self, keys: list[ObjectKey]) -> None:
        self.accessed.extend(keys)

    def on_l2_keys_deleted(self, keys: list[ObjectKey]) -> None:
        self.deleted.extend(keys)
        for key in keys:
            self.sizes.pop(key, None)


class FakeMemoryObj:
    """An L1 memory object: numpy bytes exposed as ``byte_array`` and ``tensor``."""

    def __init__(self, nbytes: int, seed: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.tensor = rng.integers(0, 256, nbytes, dtype=np.uint8) if seed is not None else np.zeros(nbytes, np.uint8)

    @property
    def byte_array(self) -> memoryview:
        return memoryview(self.tensor)

    def get_size(self) -> int:
        return int(self.tensor.nbytes)


def key(i: int, model: str = "org/model", rank: int = 0, salt: str = "") -> ObjectKey:
    return ObjectKey(chunk_hash=i.to_bytes(16, "big"), model_name=model, kv_rank=rank, cache_salt=salt)


def wait_fd(fd: int) -> None:
    """Block until the event fd is signalled, then consume it (a generous safety timeout)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    assert poller.poll(60_000), f"event fd {fd} was not signalled"
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 8)


def store(adapter: Any, keys: list[ObjectKey], objects: list[Any]) -> L2StoreResult:
    """Submit a store task and wait for its result, as the store controller does."""
    task = adapter.submit_store_task(keys, objects)
    results: dict[int, L2StoreResult] = {}
    while task not in results:
        wait_fd(adapter.get_store_event_fd())
        results.update(adapter.pop_completed_store_tasks())
    return results[task]


def lookup(adapter: Any, keys: list[ObjectKey]) -> list[int]:
    task = adapter.submit_lookup_and_lock_task(keys, {})
    while (bitmap := adapter.query_lookup_and_lock_result(task)) is None:
        wait_fd(adapter.get_lookup_and_lock_event_fd())
    assert adapter.query_lookup_and_lock_result(task) is None  # one-shot
    return [i for i in range(len(keys)) if bitmap.test(i)]


def load(adapter: Any, keys: list[ObjectKey], objects: list[Any]) -> list[int]:
    task = adapter.submit_load_task(keys, objects)
    while (bitmap := adapter.query_load_result(task)) is None:
        wait_fd(adapter.get_load_event_fd())
    return [i for i in range(len(keys)) if bitmap.test(i)]


@contextlib.contextmanager
def installed() -> Iterator[types.ModuleType]:
    """Install the stand-ins as ``lmcache.*`` and (re)import the adapter module against them."""
    base = "lmcache.v1.distributed"
    modules = {
        "lmcache": module("lmcache"),
        "lmcache.lmcache_native": module("lmcache.lmcache_native", Bitmap=Bitmap),
        "lmcache.v1": module("lmcache.v1"),
        base: module(base),
        f"{base}.api": module(f"{base}.api", ObjectKey=ObjectKey, EncodedObjectKey=EncodedObjectKey, KeyEntry=KeyEntry, KeyListPage=KeyListPage),
        f"{base}.internal_api": module(f"{base}.internal_api", L2StoreResult=L2StoreResult),
        f"{base}.l2_adapters": module(f"{base}.l2_adapters", L2AdapterInterface=L2AdapterInterface),
        f"{base}.l2_adapters.base": module(f"{base}.l2_adapters.base", L2AdapterInterface=L2AdapterInterface, AdapterUsage=AdapterUsage),
        f"{base}.l2_adapters.config": module(f"{base}.l2_adapters.config", L2AdapterConfigBase=L2AdapterConfigBase),
    }
    with imported_against(modules, MODULE) as adapter_module:
        yield adapter_module
