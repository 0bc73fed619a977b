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


# -- hybrid models: the v2 calls ---------------------------------------------------------

KV, MAMBA, INDEXER, SWA = sg.PoolName.KV, sg.PoolName.MAMBA, sg.PoolName.INDEXER, sg.PoolName.SWA


def hybrid(opened: list[Any], config: sg.HiCacheStorageConfig, anchor: Any, pools: dict[Any, Any]) -> Any:
    backend = sg.attach_hybrid(config, anchor, pools)
    opened.append(backend)
    return backend


def mha_pools(seed: int = 1) -> tuple[sg.FakeHostPool, dict[Any, Any]]:
    """An MHA anchor with a Mamba state pool and an indexer pool (one buffer a page), all filled."""
    kv = sg.FakeHostPool()
    pools = {KV: kv, INDEXER: sg.FakeHostPool("mla", head_dim=4), MAMBA: sg.FakeStatePool()}
    for offset, pool in enumerate(pools.values()):
        pool.fill_random(seed + offset)
    return kv, pools


def transfer(name: Any, pool: Any, keys: list[str], slots: list[int], policy: Any = sg.PoolHitPolicy.ALL_PAGES, **geometry: int) -> sg.PoolTransfer:
    return sg.PoolTransfer(name=name, host_indices=pool.page_indices(slots), keys=keys, hit_policy=policy, **geometry)


def zeroed(pool: Any) -> None:
    if isinstance(pool, sg.FakeStatePool):
        pool.zero()
    else:
        pool.kv_buffer[...] = 0


def test_v2_pages_round_trip_byte_exact_per_pool(opened: list[Any], tmp_path: Path) -> None:
    kv, pools = mha_pools()
    backend = hybrid(opened, sg.make_config(tmp_path), kv, pools)
    state = pools[MAMBA]
    expected = {
        KV: [kv.page_bytes(p) for p in range(4)],
        INDEXER: [pools[INDEXER].page_bytes(p) for p in range(4)],
        MAMBA: [state.page_bytes(5)],
    }
    stores = [
        transfer(KV, kv, HASHES[:4], [0, 1, 2, 3]),
        transfer(INDEXER, pools[INDEXER], HASHES[:4], [0, 1, 2, 3]),
        transfer(MAMBA, state, HASHES[3:4], [5], sg.PoolHitPolicy.TRAILING_PAGES),
    ]
    assert backend.batch_set_v2(stores) == {KV: [True] * 4, INDEXER: [True] * 4, MAMBA: [True]}
    assert backend.store_stats().keys == 9  # one object per page per pool: the same hash never collides

    for pool in pools.values():
        zeroed(pool)
    loads = [
        transfer(KV, kv, HASHES[:4], [10, 11, 12, 13]),
        transfer(INDEXER, pools[INDEXER], HASHES[:4], [12, 13, 14, 15]),
        transfer(MAMBA, state, HASHES[3:4], [9], sg.PoolHitPolicy.TRAILING_PAGES),
    ]
    assert backend.batch_get_v2(loads) == {KV: [True] * 4, INDEXER: [True] * 4, MAMBA: [True]}
    assert [kv.page_bytes(p) for p in (10, 11, 12, 13)] == expected[KV]
    assert [pools[INDEXER].page_bytes(p) for p in (12, 13, 14, 15)] == expected[INDEXER]
    assert state.page_bytes(9) == expected[MAMBA][0]


def test_v2_a_pool_never_reads_another_pools_page(opened: list[Any], tmp_path: Path) -> None:
    kv, pools = mha_pools()
    backend = hybrid(opened, sg.make_config(tmp_path), kv, pools)
    assert backend.batch_set_v2([transfer(INDEXER, pools[INDEXER], HASHES[:2], [0, 1])]) == {INDEXER: [True, True]}
    assert backend.batch_get_v2([transfer(KV, kv, HASHES[:2], [4, 5])]) == {KV: [False, False]}
    assert backend.batch_exists(HASHES[:2]) == 0  # v1 sees the KV pool only
    assert backend.batch_get_v2([transfer(SWA, kv, HASHES[:1], [6])]) == {SWA: [False]}  # never registered


def test_v2_kv_pages_are_v1_pages(opened: list[Any], tmp_path: Path) -> None:
    kv, pools = mha_pools()
    backend = hybrid(opened, sg.make_config(tmp_path), kv, pools)
    assert backend.batch_set_v1(HASHES[:2], kv.page_indices([0, 1])) == [True, True]
    assert backend.batch_set_v2([transfer(KV, kv, HASHES[2:4], [2, 3])]) == {KV: [True, True]}
    assert backend.batch_exists_v2(HASHES[:5]).kv_hit_pages == 4
    assert backend.batch_get_v1(HASHES[2:4], kv.page_indices([12, 13])) == [True, True]
    assert backend.batch_get_v2([transfer(KV, kv, HASHES[:2], [10, 11])]) == {KV: [True, True]}
    assert [kv.page_bytes(p) for p in (10, 11, 12, 13)] == [kv.page_bytes(p) for p in range(4)]


def test_v1_store_keys_are_unchanged(opened: list[Any], tmp_path: Path) -> None:
    """Pages written before the v2 calls existed keep their keys (and so stay readable)."""
    mha = attach(opened, sg.make_config(tmp_path / "mha", tp_size=2), sg.FakeHostPool())
    mla = attach(opened, sg.make_config(tmp_path / "mla", tp_size=2, mla=True), sg.FakeHostPool("mla"))
    assert (mha._key("ab"), mha._key("ab.mamba")) == ("ab_org-model-7b_0_2@95312741", "ab.mamba_org-model-7b_0_2@95312741")
    assert (mla._key("ab"), mla._key("ab.mamba")) == ("ab_org-model-7b@95312741", "ab.mamba_org-model-7b_0_2@95312741")


def stored_pages(backend: Any, pools: dict[Any, Any], layout: dict[Any, list[int]]) -> None:
    """Store page ``i`` (hash ``HASHES[i]``) of each pool in ``layout`` from host slot ``i``."""
    for name, pages in layout.items():
        if pages:
            keys = [HASHES[p] for p in pages]
            assert backend.batch_set_v2([transfer(name, pools[name], keys, pages)]) == {name: [True] * len(pages)}


@pytest.mark.parametrize(
    "layout, policy, window, final, restorable, hits",
    [
        # every pool holds every page
        ({KV: [0, 1, 2, 3], INDEXER: [0, 1, 2, 3]}, "all_pages", 0, 4, [1, 2, 3, 4], {KV: 4, INDEXER: 4}),
        # an all-pages pool missing a middle page cuts the prefix there
        ({KV: [0, 1, 2, 3], INDEXER: [0, 2, 3]}, "all_pages", 0, 1, [1], {KV: 4, INDEXER: 1}),
        # a KV page missing in the middle: the KV prefix ends there whatever the pools hold
        ({KV: [0, 2, 3], INDEXER: [0, 1, 2, 3]}, "all_pages", 0, 1, [1], {KV: 1, INDEXER: 1}),
        # a trailing pool needs only the last page of a prefix: 2 and 4 are restorable, 3 is not
        ({KV: [0, 1, 2, 3], MAMBA: [1, 3]}, "trailing_pages", 1, 4, [2, 4], {KV: 4, MAMBA: 4}),
        # the trailing pages of the longest prefix are missing: the answer falls back to an older state
        ({KV: [0, 1, 2, 3], MAMBA: [1]}, "trailing_pages", 1, 2, [2], {KV: 4, MAMBA: 2}),
        # a window of two trailing pages (SWA)
        ({KV: [0, 1, 2, 3], MAMBA: [0, 2, 3]}, "trailing_pages", 2, 4, [1, 4], {KV: 4, MAMBA: 4}),
        # no trailing page at all: nothing is restorable
        ({KV: [0, 1, 2, 3], MAMBA: []}, "trailing_pages", 1, 0, [], {KV: 4}),
    ],
)
def test_v2_exists_answers_one_prefix_for_all_pools(
    opened: list[Any], tmp_path: Path, layout: dict[Any, list[int]], policy: str, window: int, final: int, restorable: list[int], hits: dict[Any, int]
) -> None:
    kv, pools = mha_pools()
    backend = hybrid(opened, sg.make_config(tmp_path), kv, pools)
    stored_pages(backend, pools, layout)
    side = next(name for name in layout if name != KV)
    query = transfer(side, pools[side], HASHES[4 - window : 4] if window else HASHES[:4], [0] * (window or 4), sg.PoolHitPolicy(policy))
    result = backend.batch_exists_v2(HASHES[:4], [query])
    assert isinstance(result, sg.PoolTransferResult)
    assert (result.kv_hit_pages, result.restorable_prefix_pages, result.extra_pool_hit_pages) == (final, restorable, hits)


@pytest.mark.parametrize(
    "stored, block_pages, group_pages, covered",
    [
        ([0, 2, 4], 2, 1, 6),  # each block of 2 pages has its 1-key group: 3 whole blocks of 7 pages
        ([0, 4], 2, 1, 2),  # block 1's group (page 2) is missing: the count stops there
        ([0, 1, 2], 2, 2, 2),  # groups of two keys: block 1 lacks page 3
        ([0, 1, 2, 3, 4, 5, 6], 4, 4, 4),  # only whole blocks inside the span count
        ([0, 1], 0, 0, 0),  # no geometry: the pool covers nothing
    ],
)
def test_v2_block_groups_report_whole_groups_and_never_gate_the_kv_hit(
    opened: list[Any], tmp_path: Path, stored: list[int], block_pages: int, group_pages: int, covered: int
) -> None:
    kv, pools = mha_pools()
    backend = hybrid(opened, sg.make_config(tmp_path), kv, pools)
    stored_pages(backend, pools, {KV: [0, 1, 2, 3, 4, 5, 6], INDEXER: stored})
    policy = sg.PoolHitPolicy.BLOCK_GROUPS
    groups = transfer(INDEXER, pools[INDEXER], HASHES[:7], list(range(7)), policy, block_pages=block_pages, group_pages=group_pages)
    result = backend.batch_exists_v2(HASHES[:7], [groups])
    assert result.kv_hit_pages == 7 and result.restorable_prefix_pages == list(range(1, 8))
    assert result.extra_pool_hit_pages == ({KV: 7, INDEXER: covered} if covered else {KV: 7})


def test_v2_an_unregistered_required_pool_is_never_a_hit(opened: list[Any], tmp_path: Path) -> None:
    kv, pools = mha_pools()
    backend = hybrid(opened, sg.make_config(tmp_path), kv, pools)
    stored_pages(backend, pools, {KV: [0, 1]})
    result = backend.batch_exists_v2(HASHES[:2], [transfer(SWA, kv, HASHES[:2], [0, 1])])
    assert (result.kv_hit_pages, result.extra_pool_hit_pages) == (0, {KV: 2})


def test_v2_a_logical_anchor_leaves_the_prefix_to_the_pools(opened: list[Any], tmp_path: Path) -> None:
    state = sg.FakeStatePool()
    state.fill_random(3)
    backend = hybrid(opened, sg.make_config(tmp_path), sg.LogicalAnchor(), {MAMBA: state})
    stored_pages(backend, {MAMBA: state}, {MAMBA: [0, 1, 3]})
    result = backend.batch_exists_v2(HASHES[:4], [transfer(MAMBA, state, HASHES[:4], [0, 1, 2, 3])])
    assert (result.kv_hit_pages, result.extra_pool_hit_pages) == (2, {KV: 4, MAMBA: 2})


def test_v2_exists_leases_exactly_the_pages_of_its_answer(opened: list[Any], tmp_path: Path) -> None:
    kv, pools = mha_pools()
    backend = hybrid(opened, sg.make_config(tmp_path), kv, pools)
    stored_pages(backend, pools, {KV: [0, 1, 2, 3], INDEXER: [0, 1, 2, 3], MAMBA: [1, 2]})
    state = transfer(MAMBA, pools[MAMBA], HASHES[3:4], [0], sg.PoolHitPolicy.TRAILING_PAGES)
    result = backend.batch_exists_v2(HASHES[:4], [transfer(INDEXER, pools[INDEXER], HASHES[:4], [0, 1, 2, 3]), state])
    assert result.kv_hit_pages == 3
    assert backend._store.stats().leased_keys == 3 + 3 + 1  # KV and indexer pages 0-2, the state at page 2
    loads = [transfer(KV, kv, HASHES[:3], [8, 9, 10]), transfer(INDEXER, pools[INDEXER], HASHES[:3], [8, 9, 10])]
    assert backend.batch_get_v2([*loads, transfer(MAMBA, pools[MAMBA], HASHES[2:3], [7])]) == {KV: [True] * 3, INDEXER: [True] * 3, MAMBA: [True]}
    assert backend._store.stats().leased_keys == 0


def buffer_range(array: np.ndarray) -> range:
    return range(array.ctypes.data, array.ctypes.data + array.nbytes)


def test_v2_loads_land_in_the_host_pools_without_a_copy(opened: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kv, pools = mha_pools()
    backend = hybrid(opened, sg.make_config(tmp_path), kv, pools)
    state = pools[MAMBA]
    stored_pages(backend, pools, {KV: [0, 1], MAMBA: [0, 1]})
    expected = [kv.page_bytes(0), kv.page_bytes(1), state.page_bytes(0), state.page_bytes(1)]
    for pool in pools.values():
        zeroed(pool)

    destinations: list[Any] = []
    real_load = BucketStore.batch_load

    def spy(store: BucketStore, dests: dict[str, Any]) -> None:
        destinations.extend(dests.values())
        real_load(store, dests)

    def no_copy(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a copying read path was used")

    monkeypatch.setattr(BucketStore, "batch_load", spy)
    monkeypatch.setattr(BucketStore, "batch_get", no_copy)
    monkeypatch.setattr(backend, "_load_scattered", no_copy)
    loads = [transfer(KV, kv, HASHES[:2], [6, 7]), transfer(MAMBA, state, HASHES[:2], [4, 5])]
    assert backend.batch_get_v2(loads) == {KV: [True, True], MAMBA: [True, True]}
    assert [kv.page_bytes(6), kv.page_bytes(7), state.page_bytes(4), state.page_bytes(5)] == expected

    pool_memory = [buffer_range(kv.kv_buffer), *(buffer_range(b) for b in state.buffers())]
    pieces = [part for dest in destinations for part in (dest if isinstance(dest, list) else [dest])]
    assert len(pieces) == 2 * 2 + 2 * 3  # K and V of two KV pages, three buffers of two states
    for piece in pieces:
        address = np.frombuffer(piece, dtype=np.uint8).ctypes.data
        assert any(address in memory and address + piece.nbytes - 1 in memory for memory in pool_memory)


def test_v2_mla_ranks_share_kv_and_keep_their_own_state(opened: list[Any], tmp_path: Path) -> None:
    ranks = []
    for rank in range(2):
        kv = sg.FakeHostPool("mla")
        pools = {KV: kv, INDEXER: sg.FakeHostPool("mla", head_dim=4), MAMBA: sg.FakeStatePool()}
        for offset, pool in enumerate(pools.values()):
            pool.fill_random(10 * rank + offset)
        config = sg.make_config(tmp_path, tp_rank=rank, tp_size=2, mla=True, mla_refresh_interval_s=0)
        ranks.append((hybrid(opened, config, kv, pools), pools))
    (writer, wpools), (reader, rpools) = ranks
    assert reader.paths.store_dir == writer.paths.store_dir and not reader.paths.writer
    assert sorted(p.name for p in (tmp_path / "org-model-7b").iterdir()) == ["mla_dp0", "tp0_2_dp0", "tp1_2_dp0"]

    shared = [transfer(KV, wpools[KV], HASHES[:2], [0, 1]), transfer(INDEXER, wpools[INDEXER], HASHES[:2], [0, 1])]
    assert writer.batch_set_v2(shared) == {KV: [True, True], INDEXER: [True, True]}
    for backend, pools in ranks:  # every rank backs up its own shard of the state
        assert backend.batch_set_v2([transfer(MAMBA, pools[MAMBA], HASHES[1:2], [1], sg.PoolHitPolicy.TRAILING_PAGES)]) == {MAMBA: [True]}
    # a reader rank writes none of the replicated pages; it reports what the writer holds
    replicated = [transfer(KV, rpools[KV], HASHES[1:3], [1, 2]), transfer(INDEXER, rpools[INDEXER], HASHES[1:3], [1, 2])]
    assert reader.batch_set_v2(replicated) == {KV: [True, False], INDEXER: [True, False]}
    assert writer.store_stats().keys == 2 + 2 + 0  # the writer's state went to its own directory

    state = transfer(MAMBA, rpools[MAMBA], HASHES[1:2], [0], sg.PoolHitPolicy.TRAILING_PAGES)
    result = reader.batch_exists_v2(HASHES[:3], [transfer(INDEXER, rpools[INDEXER], HASHES[:3], [0, 1, 2]), state])
    assert (result.kv_hit_pages, result.restorable_prefix_pages) == (2, [2])
    own_state = rpools[MAMBA].page_bytes(1)
    for pool in rpools.values():
        zeroed(pool)
    loads = [transfer(KV, rpools[KV], HASHES[:2], [5, 6]), transfer(INDEXER, rpools[INDEXER], HASHES[:2], [5, 6])]
    assert reader.batch_get_v2([*loads, transfer(MAMBA, rpools[MAMBA], HASHES[1:2], [3])]) == {KV: [True] * 2, INDEXER: [True] * 2, MAMBA: [True]}
    assert [rpools[KV].page_bytes(p) for p in (5, 6)] == [wpools[KV].page_bytes(p) for p in (0, 1)]
    assert [rpools[INDEXER].page_bytes(p) for p in (5, 6)] == [wpools[INDEXER].page_bytes(p) for p in (0, 1)]
    assert rpools[MAMBA].page_bytes(3) == own_state != wpools[MAMBA].page_bytes(1)  # the reader's own state


def test_v2_mha_ranks_keep_their_own_shard_of_every_pool(opened: list[Any], tmp_path: Path) -> None:
    ranks = []
    for rank in range(2):
        kv, pools = mha_pools(seed=20 * rank)
        ranks.append((hybrid(opened, sg.make_config(tmp_path, tp_rank=rank, tp_size=2), kv, pools), pools))
    for backend, pools in ranks:
        stored_pages(backend, pools, {KV: [0], INDEXER: [0], MAMBA: [0]})
    for backend, pools in ranks:
        want = {name: pool.page_bytes(0) for name, pool in pools.items()}
        loads = [transfer(name, pool, HASHES[:1], [3]) for name, pool in pools.items()]
        assert backend.batch_get_v2(loads) == {name: [True] for name in pools}
        assert {name: pool.page_bytes(3) for name, pool in pools.items()} == want
    assert ranks[0][1][MAMBA].page_bytes(3) != ranks[1][1][MAMBA].page_bytes(3)


def test_v2_bad_transfers_fail_cleanly_and_bad_pools_are_refused(opened: list[Any], tmp_path: Path) -> None:
    kv, pools = mha_pools()
    backend = hybrid(opened, sg.make_config(tmp_path), kv, pools)
    short = sg.PoolTransfer(name=INDEXER, host_indices=pools[INDEXER].page_indices([0]), keys=HASHES[:2])
    assert backend.batch_set_v2([short]) == {INDEXER: [False, False]}
    assert backend.batch_get_v2([sg.PoolTransfer(name=MAMBA, keys=HASHES[:1])]) == {MAMBA: [False]}  # no host indices
    assert backend.store_stats().keys == 0
    with pytest.raises(InvalidArgument, match=r"host pool 'swa' .*get_page_buffer_meta"):
        backend.register_mem_host_pool_v2(object(), SWA)


class LayerFirstStatePool(sg.FakeStatePool):
    """SGLang's Mamba pool in a layer_first layout: no zero-copy page buffers."""

    def get_page_buffer_meta(self, indices: Any) -> tuple[list[int], list[int]]:
        raise ValueError("Mamba storage zero-copy requires page_first layout, got layer_first")


def test_v2_a_pool_without_page_buffers_reports_its_pages_not_moved(opened: list[Any], tmp_path: Path) -> None:
    kv, _ = mha_pools()
    state = LayerFirstStatePool()
    backend = hybrid(opened, sg.make_config(tmp_path), kv, {KV: kv, MAMBA: state})
    stores = [transfer(KV, kv, HASHES[:2], [0, 1]), transfer(MAMBA, state, HASHES[1:2], [0], sg.PoolHitPolicy.TRAILING_PAGES)]
    assert backend.batch_set_v2(stores) == {KV: [True, True], MAMBA: [False]}
    assert backend.batch_get_v2(stores) == {KV: [True, True], MAMBA: [False]}
    assert backend.store_stats().keys == 2


def test_v2_calls_are_all_implemented(adapter_module: Any) -> None:
    cls = adapter_module.KvBucketHiCacheStorage
    for name in ("register_mem_host_pool_v2", "on_host_pools_registered", "batch_exists_v2", "batch_get_v2", "batch_set_v2"):
        assert name in vars(cls), name
    assert adapter_module._v2.PoolTransferResult is sg.PoolTransferResult  # SGLang's own result type


def test_v2_stats_count_pages_of_every_pool(opened: list[Any], tmp_path: Path) -> None:
    kv, pools = mha_pools()
    backend = hybrid(opened, sg.make_config(tmp_path, metrics=True), kv, pools)
    stored_pages(backend, pools, {KV: [0, 1], MAMBA: [1]})
    backend.get_stats()
    loads = [transfer(KV, kv, HASHES[:2], [4, 5]), transfer(MAMBA, pools[MAMBA], HASHES[1:2], [6])]
    assert backend.batch_get_v2(loads) == {KV: [True, True], MAMBA: [True]}
    metrics = backend.get_stats()
    assert metrics.prefetch_pgs == [3] and metrics.prefetch_bandwidth[0] > 0
    backend.clear()
    assert backend.batch_exists_v2(HASHES[:2]).kv_hit_pages == 0


class TestSuiteV2(TestSuite):
    """The shared adapter tests through the v2 calls: pages of a Mamba state pool
    (three buffers a page) under a logical anchor, so the state pool alone decides."""

    page_size = sg.FakeStatePool().page_nbytes

    def open(self, module: ModuleType, root: Path, **settings: Any) -> Any:
        return sg.attach_hybrid(sg.make_config(root, **settings), sg.LogicalAnchor(), {MAMBA: sg.FakeStatePool()})

    def pool(self, adapter: Any) -> sg.FakeStatePool:
        return adapter._pools[MAMBA.value].host

    def store(self, adapter: Any, pages: list[int]) -> list[bool]:
        pool = self.pool(adapter)
        for slot, page in enumerate(pages):
            pool.set_page_bytes(slot, page_bytes(page, self.page_size))
        results = adapter.batch_set_v2([transfer(MAMBA, pool, [page_hash(p) for p in pages], list(range(len(pages))))])
        return list(results[MAMBA])

    def load(self, adapter: Any, pages: list[int]) -> list[bytes | None]:
        pool = self.pool(adapter)
        pool.zero()
        slots = list(range(self.load_slot, self.load_slot + len(pages)))
        loaded = adapter.batch_get_v2([transfer(MAMBA, pool, [page_hash(p) for p in pages], slots)])[MAMBA]
        return [pool.page_bytes(slot) if ok else None for slot, ok in zip(slots, loaded)]

    def lookup(self, adapter: Any, pages: list[int]) -> list[bool]:
        pool = self.pool(adapter)
        found = []
        for page in pages:
            query = transfer(MAMBA, pool, [page_hash(page)], [0])
            found.append(adapter.batch_exists_v2([page_hash(page)], [query]).kv_hit_pages == 1)
        return found
