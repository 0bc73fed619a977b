"""The SGLang HiCache adapter against stand-ins of SGLang's ABC, factory and host pool."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from adapter_suite import AdapterSuite, page_bytes
from kvbucket import BucketStore
from kvbucket.errors import InvalidArgument
from standins import sglang_standin as sg
from storeutil import FailingStore

HASHES = [f"{i:064x}" for i in range(1, 9)]


@pytest.fixture
def adapter_module() -> Iterator[Any]:
    with sg.installed() as module:
        yield module


@pytest.fixture
def opened(adapter_module: Any) -> Iterator[list[Any]]:
    """Backends created by a test; closed at the end."""
    backends: list[Any] = []
    yield backends
    for backend in backends:
        backend.close()


def attach(opened: list[Any], config: sg.HiCacheStorageConfig, pool: sg.FakeHostPool) -> Any:
    backend = sg.attach(config, pool)
    opened.append(backend)
    return backend


def reopen(opened: list[Any], backend: Any, config: sg.HiCacheStorageConfig, pool: sg.FakeHostPool) -> Any:
    backend.close()
    opened.remove(backend)
    return attach(opened, config, pool)


def test_module_imports_without_sglang() -> None:
    code = (
        "import sys, kvbucket.integrations.sglang as m\n"
        "assert 'sglang' not in sys.modules\n"
        "assert m.KvBucketHiCacheStorage.__mro__[1].__module__ == 'kvbucket.integrations._standins'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_factory_builds_a_subclass_of_the_abc(adapter_module: Any, opened: list[Any], tmp_path: Path) -> None:
    backend = attach(opened, sg.make_config(tmp_path), sg.FakeHostPool())
    assert issubclass(adapter_module.KvBucketHiCacheStorage, sg.HiCacheStorage)
    assert isinstance(backend, adapter_module.KvBucketHiCacheStorage)
    assert backend.paths.store_dir.parent.parent == tmp_path


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_zero_copy_pages_round_trip_byte_exact(opened: list[Any], tmp_path: Path, kind: str) -> None:
    pool = sg.FakeHostPool(kind)
    pool.fill_random(1)
    backend = attach(opened, sg.make_config(tmp_path, mla=kind == "mla"), pool)
    expected = [pool.page_bytes(p) for p in range(4)]
    assert backend.batch_set_v1(HASHES[:4], pool.page_indices([0, 1, 2, 3])) == [True] * 4

    assert backend.batch_get_v1(HASHES[:4], pool.page_indices([10, 11, 12, 13])) == [True] * 4
    assert [pool.page_bytes(p) for p in (10, 11, 12, 13)] == expected


def test_generic_path_round_trip(opened: list[Any], tmp_path: Path) -> None:
    pool = sg.FakeHostPool()
    pool.fill_random(2)
    backend = attach(opened, sg.make_config(tmp_path), pool)
    pages = [pool.get_data_page(p * pool.page_size) for p in range(3)]
    assert backend.batch_set(HASHES[:3], pages)
    assert backend.set(HASHES[0], pages[0])  # already stored: still a success

    targets = [pool.get_dummy_flat_data_page() for _ in range(4)]
    got = backend.batch_get(HASHES[:4], targets)
    assert got[3] is None
    for page, target in zip(pages, got[:3]):
        assert target.tobytes() == page.tobytes()
    assert backend.get(HASHES[1]) == bytearray(pages[1].tobytes())
    assert backend.get(HASHES[7]) is None


def test_batch_exists_counts_the_stored_prefix(opened: list[Any], tmp_path: Path) -> None:
    pool = sg.FakeHostPool()
    backend = attach(opened, sg.make_config(tmp_path), pool)
    stored = [HASHES[0], HASHES[1], HASHES[3]]
    assert backend.batch_set_v1(stored, pool.page_indices([0, 1, 3])) == [True] * 3
    assert backend.batch_exists(HASHES[:4]) == 2
    assert backend.batch_exists([HASHES[2], HASHES[0]]) == 0
    assert backend.batch_exists(stored) == 3
    assert backend.batch_exists([]) == 0
    assert backend.exists(HASHES[3]) and not backend.exists(HASHES[2])


def test_pages_survive_a_restart(opened: list[Any], tmp_path: Path) -> None:
    pool = sg.FakeHostPool()
    pool.fill_random(3)
    config = sg.make_config(tmp_path)
    backend = attach(opened, config, pool)
    expected = [pool.page_bytes(p) for p in range(5)]
    assert all(backend.batch_set_v1(HASHES[:5], pool.page_indices(range(5))))

    fresh = sg.FakeHostPool()
    backend = reopen(opened, backend, config, fresh)
    assert backend.batch_exists(HASHES) == 5
    assert backend.batch_get_v1(HASHES[:5], fresh.page_indices(range(10, 15))) == [True] * 5
    assert [fresh.page_bytes(p) for p in range(10, 15)] == expected


def test_two_ranks_side_by_side(opened: list[Any], tmp_path: Path) -> None:
    pools = [sg.FakeHostPool(), sg.FakeHostPool()]
    for seed, pool in enumerate(pools):
        pool.fill_random(10 + seed)
    ranks = [attach(opened, sg.make_config(tmp_path, tp_rank=r, tp_size=2), pools[r]) for r in range(2)]
    assert ranks[0].paths.store_dir != ranks[1].paths.store_dir
    for rank, pool in zip(ranks, pools):
        assert all(rank.batch_set_v1(HASHES[:2], pool.page_indices([0, 1])))
    # the same page hash holds each rank's own shard
    for rank, pool in zip(ranks, pools):
        want = pool.page_bytes(0)
        assert rank.batch_get_v1(HASHES[:1], pool.page_indices([12])) == [True]
        assert pool.page_bytes(12) == want
    assert pools[0].page_bytes(12) != pools[1].page_bytes(12)
    assert sorted(p.name for p in (tmp_path / "org-model-7b").iterdir()) == ["tp0_2_dp0", "tp1_2_dp0"]


def test_mla_reader_rank_reads_the_writer_rank(opened: list[Any], tmp_path: Path) -> None:
    pools = [sg.FakeHostPool("mla"), sg.FakeHostPool("mla")]
    pools[0].fill_random(4)
    configs = [sg.make_config(tmp_path, tp_rank=r, tp_size=2, mla=True, mla_refresh_interval_s=0) for r in range(2)]
    reader = attach(opened, configs[1], pools[1])  # may start before the writer
    writer = attach(opened, configs[0], pools[0])
    assert writer.paths.store_dir == reader.paths.store_dir and not reader.paths.writer
    assert reader.batch_exists(HASHES[:2]) == 0

    assert all(writer.batch_set_v1(HASHES[:2], pools[0].page_indices([0, 1])))
    assert reader.batch_exists(HASHES[:3]) == 2
    assert reader.batch_get_v1(HASHES[:2], pools[1].page_indices([5, 6])) == [True, True]
    assert [pools[1].page_bytes(p) for p in (5, 6)] == [pools[0].page_bytes(p) for p in (0, 1)]
    # a reader rank never writes; it reports what the writer holds
    assert reader.batch_set_v1(HASHES[1:3], pools[1].page_indices([1, 2])) == [True, False]


def test_a_changed_pool_layout_does_not_read_old_pages(opened: list[Any], tmp_path: Path) -> None:
    config = sg.make_config(tmp_path)
    backend = attach(opened, config, sg.FakeHostPool(dtype=np.float16))
    assert all(backend.batch_set_v1(HASHES[:1], backend.mem_pool_host.page_indices([0])))
    backend = reopen(opened, backend, config, sg.FakeHostPool(dtype=np.int16))  # same page size, other dtype
    assert backend.batch_exists(HASHES[:1]) == 0


def test_a_failed_write_reports_false_and_the_store_stays_usable(opened: list[Any], tmp_path: Path) -> None:
    pool = sg.FakeHostPool()
    pool.fill_random(5)
    backend = attach(opened, sg.make_config(tmp_path), pool)
    backend._store = FailingStore(backend._store, failures=1)
    assert backend.batch_set_v1(HASHES[:2], pool.page_indices([0, 1])) == [False, False]
    assert backend.batch_exists(HASHES[:2]) == 0
    assert backend.batch_set_v1(HASHES[:2], pool.page_indices([0, 1])) == [True, True]
    assert backend.batch_get_v1(HASHES[:2], pool.page_indices([8, 9])) == [True, True]
    assert pool.page_bytes(8) == pool.page_bytes(0)


def test_corrupt_pages_are_misses_never_bytes(opened: list[Any], tmp_path: Path) -> None:
    pool = sg.FakeHostPool()
    pool.fill_random(6)
    backend = attach(opened, sg.make_config(tmp_path), pool)
    assert all(backend.batch_set_v1(HASHES[:2], pool.page_indices([0, 1])))
    (data_file,) = backend.paths.store_dir.glob("*.bucket")
    with open(data_file, "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert backend.batch_get_v1(HASHES[:2], pool.page_indices([12, 13])) == [False, True]
    assert pool.page_bytes(13) == pool.page_bytes(1)
    assert backend.get(HASHES[0], pool.get_dummy_flat_data_page()) is None


def test_capacity_settings_reach_the_store(opened: list[Any], tmp_path: Path) -> None:
    config = sg.make_config(tmp_path, max_size="3M", eviction_policy="fifo", total_keys_limit=100, bucket_size_limit="1M")
    backend = attach(opened, config, sg.FakeHostPool())
    store_config = backend._store.config
    assert (store_config.max_physical_bytes, store_config.eviction_policy) == (3 << 20, "fifo")
    assert (store_config.total_keys_limit, store_config.bucket_size_limit) == (100, 1 << 20)


def test_large_batches_are_split_into_buckets(opened: list[Any], tmp_path: Path) -> None:
    pool = sg.FakeHostPool(size=512)
    pool.fill_random(7)
    backend = attach(opened, sg.make_config(tmp_path, bucket_keys_limit=16), pool)
    keys = [f"{i:064x}" for i in range(100, 150)]
    assert all(backend.batch_set_v1(keys, pool.page_indices(range(50))))
    stats = backend.store_stats()
    assert (stats.keys, stats.buckets) == (50, 4)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"max_physcal_bytes": "1G"}, "'max_physcal_bytes' \\(did you mean 'max_physical_bytes'\\?\\)"),
        ({"verify_checksums": "ture"}, "hicache extra_config: verify_checksums must be True or False"),
        ({"per_rank_dirs": "nope"}, "per_rank_dirs must be True or False"),
        ({"mla_refresh_interval_s": "soon"}, "mla_refresh_interval_s must be a number"),
        ({"max_size": "lots"}, "key 'max_size': max_physical_bytes must be a size"),
    ],
)
def test_unknown_keys_and_bad_values_are_refused(adapter_module: Any, tmp_path: Path, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        sg.attach(sg.make_config(tmp_path, **extra), sg.FakeHostPool())
    assert not any(tmp_path.iterdir())  # refused before a directory was made


def test_text_values_are_parsed_as_everywhere(opened: list[Any], tmp_path: Path) -> None:
    config = sg.make_config(tmp_path, verify_checksums="false", per_rank_dirs="off", bucket_keys_limit="16", prefetch_threshold=256)
    backend = attach(opened, config, sg.FakeHostPool())
    assert backend.paths.store_dir == tmp_path  # no per-rank sub-directory
    assert (backend._store.config.verify_checksums, backend._store.config.bucket_keys_limit) == (False, 16)


def test_store_root_comes_from_config_or_environment(adapter_module: Any, opened: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = attach(opened, sg.make_config(None, file_storage_path=str(tmp_path / "legacy")), sg.FakeHostPool())
    assert backend.paths.store_dir.is_relative_to(tmp_path / "legacy")
    monkeypatch.setenv("KVBUCKET_PATH", str(tmp_path / "env"))
    backend = attach(opened, sg.make_config(None, tp_rank=1, tp_size=2), sg.FakeHostPool())
    assert backend.paths.store_dir.is_relative_to(tmp_path / "env")
    monkeypatch.delenv("KVBUCKET_PATH")
    with pytest.raises(InvalidArgument, match="storage_path"):
        sg.attach(sg.make_config(None), sg.FakeHostPool())


def test_stats_and_clear(opened: list[Any], tmp_path: Path) -> None:
    pool = sg.FakeHostPool()
    backend = attach(opened, sg.make_config(tmp_path, metrics=True), pool)
    assert all(backend.batch_set_v1(HASHES[:3], pool.page_indices([0, 1, 2])))
    assert backend.batch_get_v1(HASHES[:3], pool.page_indices([4, 5, 6])) == [True] * 3
    metrics = backend.get_stats()
    assert (metrics.backup_pgs, metrics.prefetch_pgs) == ([3], [3])
    assert backend.get_stats().backup_pgs == []
    backend.clear()
    assert backend.batch_exists(HASHES[:3]) == 0
    assert backend.store_stats().keys == 0


def test_bad_host_indices_fail_cleanly(opened: list[Any], tmp_path: Path) -> None:
    pool = sg.FakeHostPool()
    backend = attach(opened, sg.make_config(tmp_path), pool)
    assert backend.batch_set_v1(HASHES[:2], pool.page_indices([0])) == [False, False]
    assert backend.batch_get_v1(HASHES[:2], pool.page_indices([0])) == [False, False]


def test_batch_exists_leases_the_found_prefix_until_it_is_loaded(opened: list[Any], tmp_path: Path) -> None:
    pool = sg.FakeHostPool()
    backend = attach(opened, sg.make_config(tmp_path), pool)
    stored = [HASHES[0], HASHES[1], HASHES[3]]
    assert backend.batch_set_v1(stored, pool.page_indices([0, 1, 3])) == [True] * 3
    assert backend.batch_exists(HASHES[:4]) == 2
    assert backend._store.stats().leased_keys == 2  # the prefix, not the page after the gap
    assert backend.batch_get_v1(HASHES[:2], pool.page_indices([4, 5])) == [True, True]
    assert backend._store.stats().leased_keys == 0


def test_watermark_settings_reach_the_store(opened: list[Any], tmp_path: Path) -> None:
    config = sg.make_config(
        tmp_path, max_size="3M", eviction_high_watermark="0.7", eviction_low_watermark=0.4, background_eviction="off", lookup_lease_s=2
    )
    backend = attach(opened, config, sg.FakeHostPool())
    store_config = backend._store.config
    assert (store_config.eviction_high_watermark, store_config.eviction_low_watermark) == (0.7, 0.4)
    assert (store_config.background_eviction, store_config.lookup_lease_s) == (False, 2.0)


def page_hash(page: int) -> str:
    """The page hash SGLang would give page ``page``."""
    return f"{page:064x}"


class TestSuite(AdapterSuite):
    """The shared adapter tests, through SGLang's factory and the zero-copy calls on an MHA host pool."""

    module_name, adapter_class, engine_name = sg.MODULE, "KvBucketHiCacheStorage", "sglang"
    page_size = len(sg.FakeHostPool().page_bytes(0))
    load_slot = 8
    """Loads go to host pages from here on (stores come from pages 0, 1, ...)."""

    def engine(self) -> contextlib.AbstractContextManager[ModuleType]:
        return sg.installed()

    def open(self, module: ModuleType, root: Path, **settings: Any) -> Any:
        return sg.attach(sg.make_config(root, **settings), sg.FakeHostPool())

    def store(self, adapter: Any, pages: list[int]) -> list[bool]:
        pool = adapter.mem_pool_host
        for slot, page in enumerate(pages):
            pool.set_from_flat_data_page(slot * pool.page_size, np.frombuffer(page_bytes(page, self.page_size), dtype=pool.dtype))
        return list(adapter.batch_set_v1([page_hash(p) for p in pages], pool.page_indices(range(len(pages)))))

    def load(self, adapter: Any, pages: list[int]) -> list[bytes | None]:
        pool = adapter.mem_pool_host
        pool.kv_buffer[...] = 0
        slots = range(self.load_slot, self.load_slot + len(pages))
        loaded = adapter.batch_get_v1([page_hash(p) for p in pages], pool.page_indices(slots))
        return [pool.page_bytes(slot) if ok else None for slot, ok in zip(slots, loaded)]

    def lookup(self, adapter: Any, pages: list[int]) -> list[bool]:
        return [adapter.exists(page_hash(p)) for p in pages]

    def bucket_store(self, adapter: Any) -> BucketStore:
        return adapter._store

    def close(self, adapter: Any) -> None:
        adapter.close()
