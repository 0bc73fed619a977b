"""Smoke tests of the benchmark library and suite: structure only, never speed."""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from kvbucket.tools import bench

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


def _check_summary(summary: dict) -> None:
    assert summary["unit"] == "MiB/s"
    assert summary["min"] <= summary["median"] <= summary["max"]
    assert len(summary["runs"]) >= 1


@pytest.mark.parametrize("engine", ["python", "auto"])
def test_run_small_workload_has_every_measurement(tmp_path: Path, engine: str) -> None:
    if engine == "auto" and bench.fio_version() is None:
        pytest.skip("fio is not installed")
    result = bench.run(str(tmp_path), object_size=64 << 10, total_bytes=2 * MiB, threads=2, batch=4,
                       progress=False, repeats=2, engine=engine)
    json.dumps(result)  # JSON-able
    modes = result["workload"]["io_modes"]
    assert modes == ["buffered", "direct"]
    for op in ("write", "read"):
        for mode in modes:
            _check_summary(result["measurements"][f"raw_{op}_{mode}"])
            _check_summary(result["measurements"][f"kv_{op}_{mode}"])
            assert result["ratios"][f"{op}_{mode}"] > 0
        assert result["ratios"][f"{op}_best"] > 0
    assert result["workload"]["n_objects"] == 32
    assert result["cold_cache"] in ("drop_caches", "fadvise")
    assert os.listdir(tmp_path) == []  # scratch removed
    report = bench.format_report(result)
    assert "durable write (buffered)" in report and "cold random read (direct)" in report


def test_workload_geometry() -> None:
    wl = bench.Workload(object_size=64 << 10, total_bytes=300 * MiB, bucket_size=256 * MiB)
    assert wl.per_bucket == 4096
    assert [len(r) for r in wl.buckets()] == [4096, 704]
    assert wl.write_block == MiB
    batches = bench.read_batches(wl)
    assert sorted(i for b in batches for i in b) == list(range(wl.n_objects))
    assert all(len(b) <= wl.batch for b in batches)


def test_source_values_are_distinct_aligned_views() -> None:
    source = bench.Source(64 << 10, pool_bytes=MiB)
    try:
        assert source.value(0) != source.value(1)
        assert source.value(0) == source.value(16)  # the pool wraps
        assert source.value(3).readonly and len(source.value(3)) == 64 << 10
    finally:
        source.close()


def test_python_baseline_reads_back_what_it_wrote(tmp_path: Path) -> None:
    wl = bench.Workload(object_size=64 << 10, total_bytes=MiB, threads=2, batch=4, bucket_size=512 << 10)
    source = bench.Source(wl.object_size, pool_bytes=MiB)
    area, dests = bench.dest_views(wl)
    path = str(tmp_path / "raw.dat")
    try:
        assert bench.py_write(path, wl, source, direct=False) > 0
        assert os.path.getsize(path) == wl.nbytes
        with cf.ThreadPoolExecutor(2) as pool:
            assert bench.py_read(path, wl, dests, direct=wl.direct_ok, pool=pool) > 0
        last = bench.read_batches(wl)[-1]
        assert all(dests[j] == source.value(i) for j, i in enumerate(last))
    finally:
        dests.clear()
        area.close()
        source.close()


def test_summarize_and_ratio() -> None:
    s = bench.summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    assert bench.ratio(s, bench.summarize([4.0])) == 0.5
    assert bench.ratio(s, bench.summarize([])) is None


def _load_suite_module(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_bench_suite_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("peer", ["hicache_file", "lmcache_disk", "lmdb", "rocksdb", "diskcache"])
def test_peers_round_trip(tmp_path: Path, peer: str) -> None:
    peers = _load_suite_module("peers")  # the peers' libraries come with the test extra
    source = bench.Source(64 << 10, pool_bytes=MiB)
    keys = bench.make_keys(8)
    dest = bytearray(64 << 10)
    with cf.ThreadPoolExecutor(2) as pool:
        store = peers.make_peer(peer, str(tmp_path / peer), pool, 8 * (64 << 10))
        try:
            store.write([(k, source.value(i)) for i, k in enumerate(keys)])
            store.reopen()
            store.read([(keys[5], memoryview(dest))])
            assert dest == source.value(5)
            assert store.exists([keys[0], "missing"]) == [True, False]
        finally:
            store.destroy()
            source.close()
    assert not (tmp_path / peer).exists()
