"""Smoke tests of the benchmark library and suite: structure only, never speed."""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import json
import os
import sys
import threading
import typing
from pathlib import Path

import pytest

from kvbucket import BucketConfig
from kvbucket.config import IOMode
from kvbucket.tools import bench

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


def _check_summary(summary: dict) -> None:
    assert summary["unit"] == "MiB/s"
    assert summary["min"] <= summary["median"] <= summary["max"]
    assert len(summary["runs"]) >= 1


@pytest.mark.parametrize("engine", ["python", "auto"])
def test_run_small_workload_has_every_measurement(tmp_path: Path, engine: str) -> None:
    result = bench.run(str(tmp_path), object_size=64 << 10, total_bytes=2 * MiB, threads=2, batch=4,
                       progress=False, repeats=2, engine=engine)
    json.dumps(result)  # JSON-able
    fio = bench.fio_version()
    # "auto" measures the raw disk with fio where it is installed, else with the Python loop
    assert result["raw_engine"] == (fio if engine == "auto" and fio else "python os.pwritev/os.preadv loop")
    modes = result["workload"]["io_modes"]
    assert modes[:2] == ["buffered", "direct"]
    assert set(modes) == set(typing.get_args(IOMode))  # every mode the configuration offers
    default = BucketConfig().io_mode
    assert result["workload"]["default_io_mode"] == default and default in modes
    assert result["workload"]["raw_io_modes"] == ["buffered", "direct"]
    for op in ("write", "read"):
        for mode in modes:
            if mode in ("buffered", "direct"):
                _check_summary(result["measurements"][f"raw_{op}_{mode}"])
            _check_summary(result["measurements"][f"kv_{op}_{mode}"])
            assert result["ratios"][f"{op}_{mode}"] > 0
        assert result["ratios"][f"{op}_best"] > 0
        assert result["ratios"][f"{op}_default"] > 0
    for mode in modes:  # the async phase: submit_load against the pipelined raw read
        if mode in ("buffered", "direct"):
            _check_summary(result["measurements"][f"raw_read_pipelined_{mode}"])
        _check_summary(result["measurements"][f"kv_read_async_{mode}"])
        assert result["ratios"][f"async_read_{mode}"] > 0
    assert result["ratios"]["async_read_best"] > 0 and result["ratios"]["async_read_default"] > 0
    assert result["workload"]["n_objects"] == 32
    assert result["workload"]["depth"] == 4
    # every object of every kvbucket pass's async read (8 batches of 4, 4 in flight: the last 4) checked
    assert result["verified_objects"] == 2 * len(modes) * 4 * 4
    assert result["cold_cache"] in ("drop_caches", "fadvise")
    assert os.listdir(tmp_path) == []  # scratch removed
    report = bench.format_report(result)
    assert "durable write (buffered)" in report and "cold random read (direct)" in report
    assert "async cold random read (buffered)" in report and "async cold random read (direct)" in report
    assert f"default configuration (io_mode={default}) / best raw mode" in report


def test_run_uses_the_store_default_bucket_geometry(tmp_path: Path) -> None:
    result = bench.run(str(tmp_path), object_size=64 << 10, total_bytes=MiB, threads=2, batch=4, progress=False,
                       repeats=1, io_modes=["buffered"])
    defaults = BucketConfig()
    assert result["workload"]["bucket_size"] == defaults.bucket_size_limit
    assert result["workload"]["bucket_keys"] == defaults.bucket_keys_limit
    wl = bench.Workload(object_size=64 << 10, total_bytes=64 * MiB, bucket_keys=defaults.bucket_keys_limit)
    assert wl.per_bucket == defaults.bucket_keys_limit  # 64 KiB objects: the keys limit cuts buckets first
    assert bench.store_settings(wl, "strict", "buffered")["bucket_keys_limit"] == defaults.bucket_keys_limit
    assert bench.kv_io_modes(bench.Workload(object_size=1000)) == [m for m in bench.kv_io_modes(wl) if m != "direct"]


def _stored(tmp_path: Path, wl: bench.Workload, source: bench.Source):
    """A store holding the workload's objects, and their keys."""
    keys = bench.make_keys(wl.n_objects)
    store = bench.open_store(str(tmp_path / "kv"), wl, "strict", BucketConfig().io_mode)
    bench.kv_offload(store, wl, keys, source)
    return store, keys


def test_submit_load_pass_loads_every_object_byte_exact(tmp_path: Path) -> None:
    wl = bench.Workload(object_size=64 << 10, total_bytes=MiB, threads=2, batch=3, depth=8)  # 16 objects, 6 batches
    source = bench.Source(wl.object_size, pool_bytes=2 * MiB)
    area, sets = bench.dest_sets(wl)
    store, keys = _stored(tmp_path, wl, source)
    try:
        assert len(sets) == 6  # no more sets than batches: each batch keeps its own
        assert bench.kv_submit_load(store, wl, keys, sets) > 0
        loaded = {i: sets[k][j].tobytes() for k, batch in enumerate(bench.read_batches(wl)) for j, i in enumerate(batch)}
        assert sorted(loaded) == list(range(wl.n_objects))
        assert all(loaded[i] == source.value(i).tobytes() for i in loaded)
        assert bench.verify_loaded(wl, sets, source) == wl.n_objects
    finally:
        store.close()
        sets.clear()
        area.close()
        source.close()


def test_verify_loaded_catches_a_wrong_byte(tmp_path: Path) -> None:
    wl = bench.Workload(object_size=64 << 10, total_bytes=MiB, threads=2, batch=4, depth=2)
    source = bench.Source(wl.object_size, pool_bytes=2 * MiB)
    area, sets = bench.dest_sets(wl)
    store, keys = _stored(tmp_path, wl, source)
    try:
        bench.kv_submit_load(store, wl, keys, sets)
        assert bench.verify_loaded(wl, sets, source) == 8  # the last two batches of four
        sets[1][3][100] ^= 0xFF
        with pytest.raises(AssertionError, match="wrong bytes"):
            bench.verify_loaded(wl, sets, source)
    finally:
        store.close()
        sets.clear()
        area.close()
        source.close()


class _CountingStore:
    """A stand-in store whose submitted batches stay in flight until their handle's result() is called."""

    def __init__(self, values: dict[str, bytes]) -> None:
        self.values = values
        self.in_flight = 0
        self.most_in_flight = 0

    def submit_load(self, destinations: dict[str, memoryview]) -> _CountingStore:
        for key, dest in destinations.items():
            dest[:] = self.values[key]
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return self

    def result(self) -> None:
        self.in_flight -= 1


def test_submit_load_pass_keeps_depth_batches_in_flight() -> None:
    wl = bench.Workload(object_size=4096, total_bytes=40 * 4096, threads=2, batch=2, depth=3)  # 20 batches
    source = bench.Source(wl.object_size, pool_bytes=MiB)
    keys = bench.make_keys(wl.n_objects)
    store = _CountingStore({key: source.value(i).tobytes() for i, key in enumerate(keys)})
    area, sets = bench.dest_sets(wl)
    try:
        bench.kv_submit_load(store, wl, keys, sets)
        assert store.most_in_flight == 3 and store.in_flight == 0
        assert bench.verify_loaded(wl, sets, source) == 6
    finally:
        sets.clear()
        area.close()
        source.close()


def test_pipelined_raw_read_keeps_threads_reads_in_flight_across_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # batches of 2 over 4 threads: only a read with no barrier between batches has 4 reads in flight
    wl = bench.Workload(object_size=4096, total_bytes=32 * 4096, threads=4, batch=2, bucket_size=MiB)
    source = bench.Source(wl.object_size, pool_bytes=MiB)
    path = str(tmp_path / "raw.dat")
    bench.py_write(path, wl, source, direct=False)
    real_preadv = os.preadv
    together = threading.Barrier(wl.threads, timeout=30)
    lock = threading.Lock()
    offsets: list[int] = []

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        with lock:
            offsets.append(offset)
            first = len(offsets) <= wl.threads
        if first:
            together.wait()  # breaks (and fails the read) unless `threads` reads are in flight at once
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    try:
        with cf.ThreadPoolExecutor(wl.threads) as pool:
            assert bench.py_read_pipelined(bench.raw_locations(path, wl), wl, direct=False, pool=pool) > 0
    finally:
        source.close()
    assert sorted(offsets) == [i * wl.object_size for i in range(wl.n_objects)]  # every object once
    order = [i for batch in bench.read_batches(wl) for i in batch]
    assert sorted(offsets[: wl.threads]) == sorted(i * wl.object_size for i in order[: wl.threads])


def test_store_locations_point_at_the_objects_bytes(tmp_path: Path) -> None:
    wl = bench.Workload(object_size=64 << 10, total_bytes=MiB, threads=2, batch=4)
    source = bench.Source(wl.object_size, pool_bytes=2 * MiB)
    store, keys = _stored(tmp_path, wl, source)
    try:
        for i, (path, offset) in enumerate(bench.store_locations(store, keys)):
            with open(path, "rb") as f:
                f.seek(offset)
                assert f.read(wl.object_size) == source.value(i).tobytes()
    finally:
        store.close()
        source.close()


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


def test_async_load_script_measures_through_the_bench_passes(tmp_path: Path) -> None:
    async_load = _load_suite_module("async_load")
    wl = bench.Workload(object_size=64 << 10, total_bytes=MiB, threads=2, batch=4, depth=2)
    result = async_load.measure(str(tmp_path / "kv"), wl, repeats=2)
    json.dumps(result)
    assert result["io_mode"] == BucketConfig().io_mode and result["depth"] == 2
    assert result["verified_objects"] == 8  # the last two batches of four, byte for byte
    assert {name: len(runs) for name, runs in result["runs_mib_s"].items()} == {"raw": 2, "async": 2, "batch_load": 2}
    assert result["async_vs_raw"] > 0 and len(result["trial_ratios"]["async"]) == 2


def test_group_commit_script_measures_against_raw_writers(tmp_path: Path) -> None:
    group_commit = _load_suite_module("group_commit")
    result = group_commit.measure(str(tmp_path), buckets=3, repeats=1)
    assert {name: len(runs) for name, runs in result["runs_mib_s"].items()} == {"raw": 1, "raw-commit": 1, "per-bucket": 1, "grouped": 1}
    assert result["syncs"]["per-bucket"]["fdatasync"] == 3 and result["syncs"]["per-bucket"]["fsync_dir"] == 3
    assert set(result["trial_ratios"]) == {"grouped / raw-commit", "per-bucket / raw-commit", "grouped / raw", "grouped / per-bucket"}
    assert os.listdir(tmp_path) == []


def test_suite_writes_every_ratio_and_redraws_from_its_json(tmp_path: Path) -> None:
    suite = _load_suite_module("run")
    scratch, docs, again, saved = tmp_path / "scratch", tmp_path / "docs", tmp_path / "again", tmp_path / "results.json"
    args = ["--dataset", "1MiB", "--repeats", "1", "--sizes", "64KiB", "--meta-keys", "300", "--peers", "",
            "--group-buckets", "2", "--threads", "2", "--batch", "4", "--dir", str(scratch), "--out", str(docs),
            "--json", str(saved)]
    assert suite.main(args) == 0
    assert os.listdir(scratch) == []  # every data file deleted
    result = json.loads(saved.read_text())
    assert result["async_load"]["64KiB"]["verified_objects"] == 16
    groups = {row["group"].split(",")[0] for row in result["speed"]}
    assert groups == {"default configuration vs the faster raw mode", "async loads", "small objects vs raw loops", "group commit"}
    assert all(row["ratio"] > 0 for row in result["speed"])
    assert any(t["target"].startswith("cold random submit_load 64KiB") for t in result["targets"])
    assert {"benchmarks.png", "speed.png", "BENCHMARKS.md"} <= set(os.listdir(docs))
    assert suite.main(["--report-only", str(saved), "--out", str(again)]) == 0
    assert (again / "BENCHMARKS.md").read_text() == (docs / "BENCHMARKS.md").read_text()
    assert (again / "speed.png").stat().st_size > 0
    assert "## Ratios to the raw baselines" in (again / "BENCHMARKS.md").read_text()
