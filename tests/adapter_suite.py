"""The behaviours every engine adapter shares, as one test class each adapter's tests run.

In the style of zarr-python's ``StoreTests``: :class:`AdapterSuite` holds the
tests; an adapter's test module subclasses it (``class TestSuite(AdapterSuite)``)
and implements its driver, a handful of small methods that do what the engine
does: install the engine (stand-ins), build the adapter the way the engine's
loader does, store, load and look up numbered pages, close. Page ``n`` always
holds :func:`page_bytes` ``(n, page_size)``, so any process can check it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvbucket import BucketStore
from kvbucket.errors import InvalidArgument
from storeutil import fail_next_writes


def page_bytes(page: int, size: int) -> bytes:
    """The bytes of page ``page`` (deterministic, distinct per page)."""
    seed = hashlib.sha256(page.to_bytes(8, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the exposition served at ``url`` (labels other than ``store`` must match)."""
    with urllib.request.urlopen(url, timeout=60) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and {k: v for k, v in sample.labels.items() if k != "store"} == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} is not served at {url}")


class AdapterSuite(ABC):
    """Tests every adapter passes; a subclass supplies the driver below."""

    page_size: ClassVar[int]
    """Bytes of one page as the adapter stores it."""
    module_name: ClassVar[str]
    """The adapter's module, as engine configurations name it."""
    adapter_class: ClassVar[str]
    """The adapter's class name in :attr:`module_name`."""
    engine_name: ClassVar[str]
    """The engine's top-level package."""

    # -- the driver -----------------------------------------------------------
    @abstractmethod
    def engine(self) -> contextlib.AbstractContextManager[ModuleType]:
        """Install the engine's stand-ins and yield the adapter module built on them."""

    @abstractmethod
    def open(self, module: ModuleType, root: Path, **settings: Any) -> Any:
        """Build an adapter storing under ``root``, as the engine's loader does."""

    @abstractmethod
    def store(self, adapter: Any, pages: list[int]) -> list[bool]:
        """Store ``pages``; for each, whether the adapter acknowledged it as stored."""

    @abstractmethod
    def load(self, adapter: Any, pages: list[int]) -> list[bytes | None]:
        """Load ``pages`` into fresh engine buffers; each one's bytes, or None when not loaded."""

    @abstractmethod
    def lookup(self, adapter: Any, pages: list[int]) -> list[bool]:
        """Whether the adapter reports each page as stored (as the engine asks before a load)."""

    @abstractmethod
    def bucket_store(self, adapter: Any) -> BucketStore:
        """The store the adapter writes."""

    @abstractmethod
    def close(self, adapter: Any) -> None:
        """Close the adapter as the engine does at shutdown."""

    # -- fixtures ---------------------------------------------------------------
    @pytest.fixture
    def module(self) -> Iterator[ModuleType]:
        with self.engine() as module:
            yield module

    @pytest.fixture
    def root(self, tmp_path: Path) -> Path:
        return tmp_path / "kv"

    @pytest.fixture
    def opened(self, module: ModuleType) -> Iterator[list[Any]]:
        """Adapters a test opened; closed at the end."""
        adapters: list[Any] = []
        yield adapters
        for adapter in adapters:
            self.close(adapter)

    def start(self, opened: list[Any], module: ModuleType, root: Path, **settings: Any) -> Any:
        adapter = self.open(module, root, **settings)
        opened.append(adapter)
        return adapter

    def expected(self, pages: list[int]) -> list[bytes]:
        return [page_bytes(page, self.page_size) for page in pages]

    # -- the tests ----------------------------------------------------------------
    def test_stored_pages_load_back_byte_exact(self, opened: list[Any], module: ModuleType, root: Path) -> None:
        adapter = self.start(opened, module, root)
        assert self.store(adapter, [1, 2, 3]) == [True] * 3
        assert self.load(adapter, [3, 1, 2]) == self.expected([3, 1, 2])

    def test_a_miss_loads_nothing(self, opened: list[Any], module: ModuleType, root: Path) -> None:
        adapter = self.start(opened, module, root)
        assert self.load(adapter, [7]) == [None]
        assert self.store(adapter, [1]) == [True]
        assert self.load(adapter, [1, 7]) == [*self.expected([1]), None]

    def test_lookup_finds_exactly_the_stored_pages(self, opened: list[Any], module: ModuleType, root: Path) -> None:
        adapter = self.start(opened, module, root)
        assert self.lookup(adapter, [1, 2, 3]) == [False] * 3
        assert self.store(adapter, [1, 2, 4]) == [True] * 3
        assert self.lookup(adapter, [1, 2, 3, 4]) == [True, True, False, True]

    def test_a_stored_page_stored_again_is_acknowledged_and_not_rewritten(self, opened: list[Any], module: ModuleType, root: Path) -> None:
        adapter = self.start(opened, module, root)
        assert self.store(adapter, [1, 2]) == [True, True]
        buckets = self.bucket_store(adapter).stats().buckets
        assert self.store(adapter, [2, 1]) == [True, True]
        assert self.bucket_store(adapter).stats().buckets == buckets

    def test_pages_acknowledged_before_a_crash_are_found_after_it(self, module: ModuleType, opened: list[Any], root: Path) -> None:
        """A writer process killed with SIGKILL right after its pages were acknowledged."""
        tests = Path(__file__).resolve().parent
        code = (
            "import importlib, json, os, signal, sys\n"
            "from pathlib import Path\n"
            f"suite = getattr(importlib.import_module({type(self).__module__!r}), {type(self).__name__!r})()\n"
            "with suite.engine() as module:\n"
            f"    adapter = suite.open(module, Path({os.fspath(root)!r}))\n"
            "    print(json.dumps(suite.store(adapter, [1, 2, 3, 4])), flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.fspath(tests), *sys.path])}
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert child.returncode == -signal.SIGKILL, child.stderr
        assert json.loads(child.stdout) == [True] * 4

        adapter = self.start(opened, module, root)
        assert self.lookup(adapter, [1, 2, 3, 4, 5]) == [True] * 4 + [False]
        assert self.load(adapter, [1, 2, 3, 4]) == self.expected([1, 2, 3, 4])

    def test_a_failed_write_is_not_acknowledged_and_the_adapter_recovers(
        self, opened: list[Any], module: ModuleType, root: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        adapter = self.start(opened, module, root)
        fail_next_writes(monkeypatch, 1)
        assert self.store(adapter, [1, 2]) == [False, False]
        assert self.lookup(adapter, [1, 2]) == [False, False]
        assert self.store(adapter, [1, 2]) == [True, True]
        assert self.load(adapter, [1, 2]) == self.expected([1, 2])

    def test_a_corrupt_page_is_a_miss_never_wrong_bytes(self, opened: list[Any], module: ModuleType, root: Path) -> None:
        adapter = self.start(opened, module, root)
        assert self.store(adapter, [1, 2]) == [True, True]
        (data_file,) = Path(self.bucket_store(adapter).path).glob("*.bucket")
        with open(data_file, "r+b") as f:  # a byte of page 1, the bucket's first object
            f.seek(10)
            byte = f.read(1)
            f.seek(10)
            f.write(bytes([byte[0] ^ 0xFF]))
        assert self.load(adapter, [1, 2]) == [None, *self.expected([2])]

    @pytest.mark.parametrize(
        "setting, message",
        [
            ({"max_physcal_bytes": "1G"}, "'max_physcal_bytes' \\(did you mean 'max_physical_bytes'\\?\\)"),
            ({"verify_checksums": "ture"}, "verify_checksums must be True or False"),
            ({"eviction_policy": "random"}, "eviction_policy"),
        ],
    )
    def test_a_bad_setting_is_refused_before_anything_is_created(
        self, module: ModuleType, root: Path, setting: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(InvalidArgument, match=message):
            self.open(module, root, **setting)
        assert not root.exists()

    def test_settings_reach_the_store(self, opened: list[Any], module: ModuleType, root: Path) -> None:
        adapter = self.start(opened, module, root, max_physical_bytes="3M", eviction_policy="fifo", bucket_keys_limit="16")
        config = self.bucket_store(adapter).config
        assert (config.max_physical_bytes, config.eviction_policy, config.bucket_keys_limit) == (3 << 20, "fifo", 16)

    @pytest.mark.parametrize("setting, hints", [("on", True), ("off", False)])
    def test_a_lookup_hints_the_pages_it_found_unless_turned_off(
        self, opened: list[Any], module: ModuleType, root: Path, monkeypatch: pytest.MonkeyPatch, setting: str, hints: bool
    ) -> None:
        adapter = self.start(opened, module, root, prefetch_on_lookup=setting)
        assert self.store(adapter, [1, 2]) == [True, True]
        store = self.bucket_store(adapter)
        hinted: list[str] = []
        prefetch = store.prefetch
        monkeypatch.setattr(store, "prefetch", lambda keys: hinted.extend(keys) or prefetch(keys))
        assert self.lookup(adapter, [1, 3, 2]) == [True, False, True]
        if hints:
            assert len(set(hinted)) == 2 and all(store.batch_exists(hinted))  # pages 1 and 2, not the miss
        else:
            assert hinted == []

    def test_metrics_are_served_until_close(self, opened: list[Any], module: ModuleType, root: Path) -> None:
        adapter = self.start(opened, module, root, metrics_port=0)
        url = adapter.metrics_server.url
        assert self.store(adapter, [1, 2, 3]) == [True] * 3
        assert metric(url, "kvbucket_written_objects_total") == 3
        assert metric(url, "kvbucket_usage", resource="keys") == 3
        self.close(adapter)
        opened.remove(adapter)
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url, timeout=60)

    def test_close_is_idempotent_and_frees_the_directory(self, opened: list[Any], module: ModuleType, root: Path) -> None:
        adapter = self.open(module, root)
        assert self.store(adapter, [1]) == [True]
        store = self.bucket_store(adapter)
        self.close(adapter)
        assert store.closed
        self.close(adapter)
        again = self.start(opened, module, root)
        assert self.lookup(again, [1]) == [True]

    def test_without_the_engine_it_builds_on_kvbuckets_stand_ins(self) -> None:
        """Engine configurations name the module; it imports (and subclasses kvbucket's stand-ins) without the engine."""
        code = (
            "import importlib, sys\n"
            f"sys.modules[{self.engine_name!r}] = None  # not installed\n"
            f"module = importlib.import_module({self.module_name!r})\n"
            f"bases = {{cls.__module__ for cls in module.{self.adapter_class}.__mro__[1:]}}\n"
            "assert 'kvbucket.integrations._standins' in bases, bases\n"
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
