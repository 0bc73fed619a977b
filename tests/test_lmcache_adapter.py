"""The LMCache L2 adapter against stand-ins of LMCache's adapter ABC and plugin loader."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from adapter_suite import AdapterSuite, metric, page_bytes
from kvbucket import BucketStore
from kvbucket.errors import InvalidArgument, StoreLocked
from standins import lmcache_standin as lm
from standins.lmcache_standin import FakeMemoryObj, key
from storeutil import fail_next_writes, hold_reads, record_submits

CHUNK = 64 * 1024


@pytest.fixture
def module() -> Iterator[Any]:
    with lm.installed() as adapter_module:
        yield adapter_module


@pytest.fixture
def opened(module: Any) -> Iterator[list[Any]]:
    adapters: list[Any] = []
    yield adapters
    for adapter in adapters:
        adapter.close()


def load_plugin(root: Path, **params: Any) -> Any:
    """Load the adapter as the MP server does: ``{"type": "plugin", ...}``."""
    spec = {"module_path": lm.MODULE, "class_name": "KvBucketL2Adapter", "adapter_params": {"storage_path": str(root), **params}}
    return lm.create_plugin_adapter(lm.PluginL2AdapterConfig.from_dict(spec))


def plugin(opened: list[Any], root: Path, **params: Any) -> Any:
    """:func:`load_plugin`, closed at the end of the test."""
    adapter = load_plugin(root, **params)
    opened.append(adapter)
    return adapter


def restart(opened: list[Any], adapter: Any, root: Path, **params: Any) -> Any:
    adapter.close()
    opened.remove(adapter)
    return plugin(opened, root, **params)


def chunks(n: int, first_seed: int = 0) -> list[FakeMemoryObj]:
    return [FakeMemoryObj(CHUNK, seed=first_seed + i) for i in range(n)]


def test_module_imports_without_lmcache() -> None:
    code = (
        "import sys, kvbucket.integrations.lmcache as m\n"
        "assert 'lmcache' not in sys.modules\n"
        "assert m.KvBucketL2Adapter.__mro__[1].__module__ == 'kvbucket.integrations._standins'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_plugin_loader_builds_the_adapter_with_its_config(module: Any, opened: list[Any], tmp_path: Path) -> None:
    adapter = plugin(opened, tmp_path, max_size_gb=0.5, eviction_policy="fifo")
    assert isinstance(adapter, lm.L2AdapterInterface)
    assert issubclass(module.KvBucketL2AdapterConfig, lm.L2AdapterConfigBase)
    assert adapter.supports_global_eviction and adapter.get_usage().total_capacity_bytes == 1 << 29
    assert adapter._store.config.eviction_policy == "fifo"
    fds = {adapter.get_store_event_fd(), adapter.get_lookup_and_lock_event_fd(), adapter.get_load_event_fd()}
    assert len(fds) == 3


def test_store_lookup_load_round_trip(opened: list[Any], tmp_path: Path) -> None:
    adapter = plugin(opened, tmp_path)
    keys, objects = [key(i) for i in range(4)], chunks(4)
    result = lm.store(adapter, keys, objects)
    assert result.is_successful() and result.bytes_transferred() == 4 * CHUNK

    assert lm.lookup(adapter, [*keys[:2], key(99), keys[3]]) == [0, 1, 3]
    targets = chunks(5, first_seed=1000)
    assert lm.load(adapter, [*keys, key(99)], targets) == [0, 1, 2, 3]
    for obj, target in zip(objects, targets):
        assert target.tensor.tobytes() == obj.tensor.tobytes()
    adapter.submit_unlock(keys)


def test_objects_and_usage_survive_a_restart(opened: list[Any], tmp_path: Path) -> None:
    adapter = plugin(opened, tmp_path, max_size_gb=1)
    keys = [key(i, salt="alice" if i % 2 else "") for i in range(6)]
    objects = chunks(6)
    assert lm.store(adapter, keys, objects).is_successful()
    usage = adapter.get_usage()
    assert usage.total_bytes_used == 6 * CHUNK

    adapter = restart(opened, adapter, tmp_path, max_size_gb=1)
    listener = lm.Listener()
    adapter.register_listener(listener)  # as the storage manager does after construction
    assert adapter.get_usage() == usage
    assert usage.bytes_by_cache_salt == {"": 3 * CHUNK, "alice": 3 * CHUNK}
    assert listener.sizes == dict.fromkeys(keys, CHUNK)
    assert lm.lookup(adapter, keys) == list(range(6))
    targets = chunks(6, first_seed=500)
    assert lm.load(adapter, keys, targets) == list(range(6))
    assert [t.tensor.tobytes() for t in targets] == [o.tensor.tobytes() for o in objects]


def test_duplicates_are_stored_once(opened: list[Any], tmp_path: Path) -> None:
    adapter = plugin(opened, tmp_path)
    objects = chunks(2)
    assert lm.store(adapter, [key(1), key(2)], objects).bytes_transferred() == 2 * CHUNK
    again = lm.store(adapter, [key(2), key(3), key(3)], [objects[1], *chunks(2, 7)])
    assert again.is_successful() and again.bytes_transferred() == CHUNK
    assert adapter.get_usage().total_bytes_used == 3 * CHUNK


def test_locked_keys_survive_delete_until_unlocked(opened: list[Any], tmp_path: Path) -> None:
    adapter = plugin(opened, tmp_path)
    listener = lm.Listener()
    adapter.register_listener(listener)
    keys = [key(i) for i in range(3)]
    assert lm.store(adapter, keys, chunks(3)).is_successful()
    assert lm.lookup(adapter, keys[:1]) == [0]  # locks key 0

    adapter.delete(keys)
    assert listener.deleted == keys[1:]
    assert lm.lookup(adapter, keys) == [0]
    adapter.submit_unlock(keys[:1])
    adapter.submit_unlock(keys[:1])
    adapter.delete(keys[:1])
    assert lm.lookup(adapter, keys) == []
    assert adapter.get_usage().total_bytes_used == 0
    assert adapter._store.stats().keys == 0


def test_kvbucket_eviction_keeps_usage_right(opened: list[Any], tmp_path: Path) -> None:
    adapter = plugin(opened, tmp_path, max_total_size=4 * CHUNK, eviction_policy="fifo")
    listener = lm.Listener()
    adapter.register_listener(listener)
    for i in range(0, 8, 2):
        assert lm.store(adapter, [key(i), key(i + 1)], chunks(2, i)).is_successful()
    # Full (above the 0.9 high watermark): evictions, foreground or
    # background, bring it down to the 0.8 low watermark, one 2-chunk bucket.
    assert adapter._store.wait_for_eviction(timeout=30)
    stats = adapter._store.stats()
    assert adapter.get_usage().total_bytes_used == stats.logical_bytes == 2 * CHUNK
    assert listener.deleted == [key(i) for i in range(6)]
    assert sorted(listener.sizes, key=lambda k: k.chunk_hash) == [key(i) for i in range(6, 8)]

    adapter = restart(opened, adapter, tmp_path, max_total_size=4 * CHUNK)
    assert adapter.get_usage().total_bytes_used == 2 * CHUNK


def test_a_failed_store_task_is_reported_and_the_adapter_recovers(opened: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = plugin(opened, tmp_path)
    fail_next_writes(monkeypatch, 1)
    keys, objects = [key(1), key(2)], chunks(2)
    assert not lm.store(adapter, keys, objects).is_successful()
    assert lm.lookup(adapter, keys) == [] and adapter.get_usage().total_bytes_used == 0
    assert lm.store(adapter, keys, objects).is_successful()
    assert lm.lookup(adapter, keys) == [0, 1]


def test_store_tasks_are_written_by_an_offload_queue(opened: list[Any], tmp_path: Path) -> None:
    adapter = plugin(opened, tmp_path, metrics_port=0)
    assert lm.store(adapter, [key(1), key(2)], chunks(2)).is_successful()
    url = adapter.metrics_server.url
    assert metric(url, "kvbucket_queue_stored_keys_total") == 2
    assert metric(url, "kvbucket_queue_staged_keys") == 0


def test_a_key_another_task_is_storing_joins_that_write(opened: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = plugin(opened, tmp_path)
    writing, release = threading.Event(), threading.Event()
    real = BucketStore.batch_offload

    def held(self: BucketStore, *args: Any, **kwargs: Any) -> Any:
        writing.set()
        assert release.wait(60)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BucketStore, "batch_offload", held)
    objects = chunks(2)
    first = adapter.submit_store_task([key(1)], objects[:1])
    assert writing.wait(60)  # key 1's bucket is being written
    second = adapter.submit_store_task([key(1), key(2)], objects)
    assert adapter.pop_completed_store_tasks() == {}  # neither task is durable yet
    release.set()
    results: dict[int, Any] = {}
    while len(results) < 2:
        lm.wait_fd(adapter.get_store_event_fd())
        results.update(adapter.pop_completed_store_tasks())
    assert results[first].is_successful() and results[second].is_successful()
    assert (results[first].bytes_transferred(), results[second].bytes_transferred()) == (CHUNK, CHUNK)  # key 1 counts once
    assert adapter.get_usage().total_bytes_used == 2 * CHUNK
    assert adapter.report_status()["pending_store_tasks"] == 0


def test_loads_of_wrong_size_or_corrupt_objects_fail_per_key(opened: list[Any], tmp_path: Path) -> None:
    adapter = plugin(opened, tmp_path)
    keys, objects = [key(1), key(2), key(3)], chunks(3)
    assert lm.store(adapter, keys, objects).is_successful()
    (data_file,) = Path(adapter._store.path).glob("*.bucket")
    with open(data_file, "r+b") as f:  # corrupt the first object
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    targets = [FakeMemoryObj(CHUNK), FakeMemoryObj(CHUNK // 2), FakeMemoryObj(CHUNK)]
    assert lm.load(adapter, keys, targets) == [2]
    assert targets[2].tensor.tobytes() == objects[2].tensor.tobytes()


def test_one_directory_has_one_adapter(opened: list[Any], tmp_path: Path) -> None:
    plugin(opened, tmp_path / "a")
    with pytest.raises(StoreLocked, match="storage_path"):
        plugin(opened, tmp_path / "a")
    plugin(opened, tmp_path / "b")


def test_config_errors_name_the_setting(module: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVBUCKET_PATH", raising=False)
    with pytest.raises(InvalidArgument, match="storage_path"):
        module.KvBucketL2AdapterConfig.from_dict({})
    with pytest.raises(InvalidArgument, match="max_size_gb"):
        module.KvBucketL2AdapterConfig.from_dict({"storage_path": str(tmp_path), "max_size_gb": "lots"})
    monkeypatch.setenv("KVBUCKET_PATH", str(tmp_path))
    assert module.KvBucketL2AdapterConfig.from_dict({"max_physical_bytes": "2G"}).capacity_bytes == 2 << 30


@pytest.mark.parametrize(
    "params, message",
    [
        ({"max_size_gib": 1}, "'max_size_gib' \\(did you mean 'max_size_gb'\\?\\)"),
        ({"verify_checksums": "ture"}, "adapter_params: verify_checksums must be True or False"),
        ({"num_io_threads": "0"}, "num_io_threads must be a whole number >= 1"),
        ({"max_size_gb": -1}, "max_size_gb must be a number >= 0"),
    ],
)
def test_unknown_keys_and_bad_values_are_refused(module: Any, tmp_path: Path, params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        module.KvBucketL2AdapterConfig.from_dict({"storage_path": str(tmp_path / "s"), **params})
    assert not any(tmp_path.iterdir())


def test_text_values_are_parsed_as_everywhere(opened: list[Any], tmp_path: Path) -> None:
    adapter = plugin(opened, tmp_path, verify_checksums="no", num_io_threads="2", max_size_gb="0.5")
    config = adapter._store.config
    assert (config.verify_checksums, config.max_total_size, adapter._config.num_io_threads) == (False, 1 << 29, 2)


def test_keys_round_trip_through_their_encoding(module: Any) -> None:
    for k in (key(1), key(2, model="a/b-c", rank=0x01020304, salt="tenant-7"), lm.ObjectKey(b"\x00" * 8, "m", 3, 5)):
        assert module.decode_key(module.encode_key(k)) == k
    assert module.decode_key("not-ours") is None


def test_list_l2_keys_pages_through_every_key_once(opened: list[Any], tmp_path: Path) -> None:
    adapter = plugin(opened, tmp_path)
    mine = [key(i) for i in range(7)]
    theirs = [key(i, model="other/model", salt="bob") for i in range(3)]
    assert lm.store(adapter, [*mine, *theirs], chunks(10)).is_successful()

    def listing(**kwargs: Any) -> list[tuple[Any, int]]:
        seen, token, pages = [], None, 0
        while True:
            page = adapter.list_l2_keys(page_size=3, cursor=token, **kwargs)
            assert isinstance(page, lm.KeyListPage) and len(page.entries) <= 3
            seen += [(entry.key.to_object_key(), entry.size_bytes) for entry in page.entries]
            pages += 1
            token = page.next_page_token
            if token is None:
                return seen
            assert pages < 10

    everything = listing()
    assert len(everything) == 10 and {k for k, _ in everything} == {*mine, *theirs}  # each key exactly once
    assert {n for _, n in everything} == {CHUNK}
    assert {k for k, _ in listing(model_name="other/model")} == set(theirs)
    adapter.delete(mine[:2])
    restarted = restart(opened, adapter, tmp_path)
    assert {e.key.to_object_key() for e in restarted.list_l2_keys(model_name="org/model").entries} == set(mine[2:])


def test_list_l2_keys_refuses_bad_arguments(opened: list[Any], tmp_path: Path) -> None:
    adapter = plugin(opened, tmp_path)
    assert adapter.list_l2_keys() == lm.KeyListPage(entries=(), next_page_token=None)
    for bad in ({"page_size": 0}, {"page_size": True}, {"cursor": "not-a-token"}, {"cursor": 5}):
        with pytest.raises(ValueError):
            adapter.list_l2_keys(**bad)


def test_lookup_and_lock_leases_until_load_or_unlock(opened: list[Any], tmp_path: Path) -> None:
    adapter = plugin(opened, tmp_path, max_total_size=4 * CHUNK, eviction_policy="fifo", background_eviction=False)
    keys = [key(i) for i in range(4)]
    assert lm.store(adapter, keys[:2], chunks(2)).is_successful()
    assert lm.store(adapter, keys[2:], chunks(2, 2)).is_successful()
    assert lm.lookup(adapter, keys[:1]) == [0]
    assert lm.lookup(adapter, keys[2:3]) == [0]
    assert adapter._store.stats().leased_keys == 2
    assert not lm.store(adapter, [key(4), key(5)], chunks(2, 4)).is_successful()  # both buckets leased
    assert lm.load(adapter, keys[:1], chunks(1)) == [0]  # the load ends key 0's lease
    adapter.submit_unlock(keys[2:3])  # the unlock ends key 2's
    assert adapter._store.stats().leased_keys == 0
    assert lm.store(adapter, [key(4), key(5)], chunks(2, 4)).is_successful()


def test_watermark_settings_reach_the_store(opened: list[Any], tmp_path: Path) -> None:
    adapter = plugin(opened, tmp_path, max_size_gb=1, eviction_high_watermark=0.6, eviction_low_watermark=0.3, lookup_lease_s=0)
    config = adapter._store.config
    assert (config.eviction_high_watermark, config.eviction_low_watermark, config.lookup_lease_s) == (0.6, 0.3, 0.0)


class TestSuite(AdapterSuite):
    """The shared adapter tests, through the plugin loader and store/lookup/load tasks."""

    module_name, adapter_class, engine_name = lm.MODULE, "KvBucketL2Adapter", "lmcache"
    page_size = CHUNK

    def engine(self) -> contextlib.AbstractContextManager[ModuleType]:
        return lm.installed()

    def open(self, module: ModuleType, root: Path, **settings: Any) -> Any:
        return load_plugin(root, **settings)

    def store(self, adapter: Any, pages: list[int]) -> list[bool]:
        objects = [FakeMemoryObj(CHUNK) for _ in pages]
        for obj, page in zip(objects, pages):
            obj.tensor[:] = np.frombuffer(page_bytes(page, CHUNK), np.uint8)
        return [lm.store(adapter, [key(p) for p in pages], objects).is_successful()] * len(pages)

    def load(self, adapter: Any, pages: list[int]) -> list[bytes | None]:
        targets = [FakeMemoryObj(CHUNK) for _ in pages]
        loaded = lm.load(adapter, [key(p) for p in pages], targets)
        return [target.tensor.tobytes() if i in loaded else None for i, target in enumerate(targets)]

    def lookup(self, adapter: Any, pages: list[int]) -> list[bool]:
        keys = [key(p) for p in pages]
        hits = lm.lookup(adapter, keys)
        adapter.submit_unlock([keys[i] for i in hits])
        return [i in hits for i in range(len(keys))]

    def bucket_store(self, adapter: Any) -> BucketStore:
        return adapter._store

    def close(self, adapter: Any) -> None:
        adapter.close()


def test_a_load_task_is_read_by_the_store_load_queue(opened: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """submit_load_task hands the task to BucketStore.submit_load and returns
    while its read is held; the load fd fires from the load's completion."""
    adapter = plugin(opened, tmp_path)
    keys, objects = [key(1), key(2)], chunks(2)
    assert lm.store(adapter, keys, objects).is_successful()
    entered, release = hold_reads(monkeypatch)
    submitted = record_submits(monkeypatch, adapter._store)
    targets = [FakeMemoryObj(CHUNK), FakeMemoryObj(CHUNK)]
    try:
        task = adapter.submit_load_task([key(1), key(2), key(3)], [*targets, FakeMemoryObj(CHUNK)])
        entered.wait()
        assert submitted == [3] and adapter.query_load_result(task) is None
    finally:
        release.set()
    while (bitmap := adapter.query_load_result(task)) is None:
        lm.wait_fd(adapter.get_load_event_fd())
    assert [i for i in range(3) if bitmap.test(i)] == [0, 1]
    assert [t.tensor.tobytes() for t in targets] == [o.tensor.tobytes() for o in objects]
