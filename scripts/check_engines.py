"""Check kvbucket's engine adapters against the REAL engine packages, on CPU.

Run by ``scripts/check_engines.sh`` inside a venv holding pinned sglang,
lmcache and vllm (installed ``--no-deps``) and CPU torch. For each engine it
loads the adapter the way the engine does, writes pages from CPU tensors,
closes, re-opens on the same directory and loads them back, comparing bytes.
For SGLang it also checks that the adapter's v2 calls (hybrid models) have
the real ``HiCacheStorage``'s signatures and handles every ``PoolHitPolicy``,
and runs a v2 round trip of a KV and a Mamba-state pool; for vLLM it checks
the tier's KV events against vLLM's event classes.
Prints one line per step and a summary; exits non-zero if any engine failed.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import select
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS: list[tuple[str, str, str]] = []


def step(engine: str, what: str, ok: bool, detail: str = "") -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}" + (f" -- {detail}" if detail else ""), flush=True)
    if not ok:
        raise AssertionError(f"{engine}: {what} {detail}")


def run_engine(name: str, check: Callable[[Path], str], root: Path) -> None:
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        summary = check(root / name)
        RESULTS.append((name, "PASS", f"{summary} ({time.perf_counter() - start:.1f}s)"))
    except Exception as exc:  # noqa: BLE001 - report every engine
        traceback.print_exc()
        RESULTS.append((name, "FAIL", f"{type(exc).__name__}: {exc}"))


# --------------------------------------------------------------------- SGLang


class TorchHostPool:
    """A CPU-tensor MHA host pool, page_first layout, with SGLang's storage helpers."""

    def __init__(self, size: int = 256, page_size: int = 16, layer_num: int = 4, head_num: int = 4, head_dim: int = 64) -> None:
        self.size, self.page_size, self.layer_num, self.head_num, self.head_dim = size, page_size, layer_num, head_num, head_dim
        self.dtype, self.layout = torch.bfloat16, "page_first"
        self.kv_buffer = torch.zeros((2, size, layer_num, head_num, head_dim), dtype=self.dtype)
        self.token_bytes = layer_num * head_num * head_dim * self.dtype.itemsize

    def get_size_per_token(self) -> int:
        return 2 * self.token_bytes

    def get_page_buffer_meta(self, indices: torch.Tensor) -> tuple[list[int], list[int]]:
        idx = indices.tolist()
        base, ptrs = self.kv_buffer.data_ptr(), []
        for start in range(0, len(idx), self.page_size):
            k_ptr = base + idx[start] * self.token_bytes
            ptrs += [k_ptr, k_ptr + self.size * self.token_bytes]
        return ptrs, [self.page_size * self.token_bytes] * len(ptrs)

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        return self.kv_buffer[:, index : index + self.page_size].flatten().contiguous()

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(2 * self.page_size * self.layer_num * self.head_num * self.head_dim, dtype=self.dtype)

    def pages(self, pages: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(p * self.page_size, (p + 1) * self.page_size) for p in pages])


class TorchStatePool:
    """A CPU-tensor Mamba state pool, page_first: one slot a page, a temporal and two conv buffers per slot."""

    def __init__(self, size: int = 16, layers: int = 4) -> None:
        self.size, self.page_size, self.layout, self.num_mamba_layers = size, 1, "page_first", layers
        self.temporal_buffer = torch.zeros((size, layers, 256), dtype=torch.float32)
        self.conv_buffer = [torch.zeros((size, layers, 64), dtype=torch.bfloat16) for _ in range(2)]

    def buffers(self) -> list[torch.Tensor]:
        return [self.temporal_buffer, *self.conv_buffer]

    def get_page_buffer_meta(self, indices: torch.Tensor) -> tuple[list[int], list[int]]:
        ptrs, sizes = [], []
        for slot in indices.tolist():
            for buf in self.buffers():
                row = buf[slot]
                ptrs.append(row.data_ptr())
                sizes.append(row.numel() * row.element_size())
        return ptrs, sizes

    def slot_bytes(self, slot: int) -> bytes:
        return b"".join(buf[slot].contiguous().view(torch.uint8).numpy().tobytes() for buf in self.buffers())


V2_CALLS = ("register_mem_host_pool_v2", "on_host_pools_registered", "batch_exists_v2", "batch_get_v2", "batch_set_v2")


def check_sglang_v2_interface(base: type, adapter: type) -> None:
    """The adapter's v2 methods take the real ABC's parameters; every hit policy is one it handles."""
    from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolTransfer

    for name in V2_CALLS:
        want = list(inspect.signature(getattr(base, name)).parameters)
        have = list(inspect.signature(getattr(adapter, name)).parameters)
        same = name in vars(adapter) and want == have
        step("sglang", f"{name}({', '.join(want[1:])}) implemented with the same parameters", same, str(have))
    policies = sorted(p.value for p in PoolHitPolicy)
    known = policies == ["all_pages", "block_groups", "trailing_pages"]
    step("sglang", "PoolHitPolicy is all_pages, trailing_pages, block_groups (the ones the adapter handles)", known, str(policies))
    fields = set(inspect.signature(PoolTransfer).parameters)
    read = {"name", "host_indices", "keys", "hit_policy", "block_pages", "group_pages"}
    step("sglang", "PoolTransfer has the fields the adapter reads", read <= fields, str(sorted(fields)))


def check_sglang_v2(config: Any, factory: Any, keys: list[str]) -> str:
    """Hybrid-model round trip: KV and Mamba-state pools through the v2 calls, across a restart."""
    from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolName, PoolTransfer, PoolTransferResult

    def attach(kv: TorchHostPool, state: TorchStatePool) -> Any:
        backend = factory.create_backend("dynamic", config, kv)
        backend.register_mem_pool_host(kv)
        backend.register_mem_host_pool_v2(kv, PoolName.KV)
        backend.register_mem_host_pool_v2(state, PoolName.MAMBA)
        backend.on_host_pools_registered()
        return backend

    def transfers(kv: TorchHostPool, state: TorchStatePool, pages: list[int], slot: int) -> list[Any]:
        return [
            PoolTransfer(name=PoolName.KV, host_indices=kv.pages(pages), keys=keys[:4]),
            PoolTransfer(name=PoolName.MAMBA, host_indices=torch.tensor([slot]), keys=keys[3:4], hit_policy=PoolHitPolicy.TRAILING_PAGES),
        ]

    kv, state = TorchHostPool(), TorchStatePool()
    kv.kv_buffer.copy_(torch.randn(kv.kv_buffer.shape).to(kv.dtype))
    for buf in state.buffers():
        buf.copy_(torch.randn(buf.shape).to(buf.dtype))
    backend = attach(kv, state)
    stored = backend.batch_set_v2(transfers(kv, state, [0, 1, 2, 3], 2))
    want = {PoolName.KV: [True] * 4, PoolName.MAMBA: [True]}
    step("sglang", "v2: batch_set_v2 of 4 KV pages and the Mamba state of the last one", stored == want, str(stored))
    expected_kv, expected_state = kv.kv_buffer[:, : 4 * kv.page_size].clone(), state.slot_bytes(2)
    backend.close()

    kv, state = TorchHostPool(), TorchStatePool()
    backend = attach(kv, state)
    trailing = PoolTransfer(name=PoolName.MAMBA, keys=keys[3:4], hit_policy=PoolHitPolicy.TRAILING_PAGES)
    hit = backend.batch_exists_v2([*keys[:4], "f" * 64], [trailing])
    ok = isinstance(hit, PoolTransferResult) and (hit.kv_hit_pages, hit.restorable_prefix_pages) == (4, [4])
    step("sglang", "v2: after close + reopen, batch_exists_v2 restores 4 pages (the state is at page 4 only)", ok, repr(hit))
    loaded = backend.batch_get_v2(transfers(kv, state, [8, 9, 10, 11], 7))
    step("sglang", "v2: batch_get_v2 into other host slots", loaded == want, str(loaded))
    same = torch.equal(kv.kv_buffer[:, 8 * kv.page_size : 12 * kv.page_size], expected_kv) and state.slot_bytes(7) == expected_state
    step("sglang", "v2: KV pages and the Mamba state byte-exact", same)
    backend.close()
    return "v2: 4 KV pages + 1 Mamba state"


def check_sglang(root: Path) -> str:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    from kvbucket.integrations.sglang import KvBucketHiCacheStorage

    step("sglang", "issubclass(KvBucketHiCacheStorage, sglang HiCacheStorage)", issubclass(KvBucketHiCacheStorage, HiCacheStorage))
    check_sglang_v2_interface(HiCacheStorage, KvBucketHiCacheStorage)
    extra = {"backend_name": "kvbucket", "module_path": "kvbucket.integrations.sglang", "class_name": "KvBucketHiCacheStorage",
             "interface_v1": 1, "storage_path": str(root), "max_physical_bytes": "1G"}
    config = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
                                  enable_storage_metrics=False, is_page_first_layout=True, model_name="Qwen/Qwen3-8B", extra_config=extra)

    def attach(pool: TorchHostPool) -> Any:
        backend = StorageBackendFactory.create_backend("dynamic", config, pool)
        backend.register_mem_pool_host(pool)
        backend.on_host_pools_registered()
        return backend

    pool = TorchHostPool()
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape).to(pool.dtype))
    backend = attach(pool)
    step("sglang", "StorageBackendFactory.create_backend('dynamic', ...) built it", isinstance(backend, KvBucketHiCacheStorage), str(backend.paths.store_dir))
    keys = [f"{i:064x}" for i in range(8)]
    step("sglang", "batch_set_v1 of 6 pages (zero copy from the host pool)", backend.batch_set_v1(keys[:6], pool.pages(list(range(6)))) == [True] * 6)
    pages = [pool.get_data_page(p * pool.page_size) for p in range(6, 8)]
    step("sglang", "generic batch_set of 2 flat page tensors", backend.batch_set(keys[6:8], pages))
    expected = pool.kv_buffer[:, : 8 * pool.page_size].clone()
    backend.close()

    fresh = TorchHostPool()
    backend = attach(fresh)
    step("sglang", "after close + reopen: batch_exists prefix", backend.batch_exists(keys + ["f" * 64]) == 8)
    ok = backend.batch_get_v1(keys[:6], fresh.pages(list(range(8, 14))))
    step("sglang", "batch_get_v1 into other host slots", ok == [True] * 6)
    step("sglang", "zero-copy pages byte-exact", torch.equal(fresh.kv_buffer[:, 8 * 16 : 14 * 16], expected[:, : 6 * 16]))
    got = backend.batch_get(keys[6:8], [fresh.get_dummy_flat_data_page() for _ in range(2)])
    step("sglang", "generic batch_get byte-exact", all(torch.equal(g, p) for g, p in zip(got, pages)))
    stats = backend.store_stats()
    backend.close()
    hybrid = check_sglang_v2(config, StorageBackendFactory, [f"{i:064x}" for i in range(100, 104)])
    return f"8 pages of {2 * pool.page_size * pool.token_bytes} B, store keys={stats.keys} buckets={stats.buckets}; {hybrid}"


# -------------------------------------------------------------------- LMCache


def _wait(fd: int) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(60_000):
        raise TimeoutError(f"event fd {fd} not signalled")
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def check_lmcache(root: Path) -> str:
    from lmcache.v1.distributed.api import ObjectKey
    from lmcache.v1.distributed.l2_adapters import L2AdapterInterface, create_l2_adapter
    from lmcache.v1.distributed.l2_adapters.config import add_l2_adapters_args, parse_args_to_l2_adapters_config
    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

    spec = ('{"type": "plugin", "module_path": "kvbucket.integrations.lmcache", "class_name": "KvBucketL2Adapter", '
            f'"adapter_params": {{"storage_path": "{root}", "max_size_gb": 1}}}}')

    def open_adapter() -> Any:
        args = add_l2_adapters_args(argparse.ArgumentParser()).parse_args(["--l2-adapter", spec])
        (config,) = parse_args_to_l2_adapters_config(args).adapters
        return create_l2_adapter(config)

    def memory_obj(data: torch.Tensor) -> Any:
        meta = MemoryObjMetadata(shape=data.shape, dtype=data.dtype, address=0, phy_size=data.numel() * data.element_size(),
                                 ref_count=1, fmt=MemoryFormat.KV_2LTD)
        return TensorMemoryObj(data, meta, parent_allocator=None)

    adapter = open_adapter()
    step("lmcache", "--l2-adapter plugin JSON -> create_l2_adapter built it", isinstance(adapter, L2AdapterInterface), type(adapter).__name__)
    keys = [ObjectKey(chunk_hash=i.to_bytes(16, "big"), model_name="Qwen/Qwen3-8B", kv_rank=0) for i in range(4)]
    sources = [memory_obj(torch.randint(0, 255, (256 * 1024,), dtype=torch.uint8)) for _ in keys]
    task = adapter.submit_store_task(keys, sources)
    results: dict[int, Any] = {}
    while task not in results:
        _wait(adapter.get_store_event_fd())
        results.update(adapter.pop_completed_store_tasks())
    step("lmcache", "store task completed", results[task].is_successful(), f"{results[task].bytes_transferred()} bytes")
    usage = adapter.get_usage().total_bytes_used
    adapter.close()

    adapter = open_adapter()
    step("lmcache", "after close + reopen: usage restored", adapter.get_usage().total_bytes_used == usage == 4 * 256 * 1024, f"{usage} bytes")
    task = adapter.submit_lookup_and_lock_task(keys, {})
    while (bitmap := adapter.query_lookup_and_lock_result(task)) is None:
        _wait(adapter.get_lookup_and_lock_event_fd())
    step("lmcache", "lookup-and-lock hits all keys", all(bitmap.test(i) for i in range(len(keys))))
    targets = [memory_obj(torch.zeros(256 * 1024, dtype=torch.uint8)) for _ in keys]
    task = adapter.submit_load_task(keys, targets)
    while (bitmap := adapter.query_load_result(task)) is None:
        _wait(adapter.get_load_event_fd())
    step("lmcache", "load task filled all buffers", all(bitmap.test(i) for i in range(len(keys))))
    step("lmcache", "loaded bytes equal stored bytes", all(torch.equal(t.tensor, s.tensor) for t, s in zip(targets, sources)))
    adapter.submit_unlock(keys)
    adapter.close()
    return f"4 chunks of 256 KiB, usage after restart {usage} B"


# ----------------------------------------------------------------------- vLLM


def check_vllm(root: Path) -> str:
    from unittest.mock import MagicMock

    import numpy as np
    from vllm.v1.kv_offload.base import ReqContext, make_offload_key
    from vllm.v1.kv_offload.tiering.base import SecondaryTierManager, TransferJob

    from kvbucket.integrations import vllm as tier_module

    tier_cls = tier_module.KvBucketTierManager
    step("vllm", "issubclass(KvBucketTierManager, vllm SecondaryTierManager)", issubclass(tier_cls, SecondaryTierManager))
    chunk_bytes, num_chunks = 64 * 1024, 8
    memory = torch.zeros((num_chunks, chunk_bytes), dtype=torch.uint8)
    spec = MagicMock()
    spec.vllm_config.parallel_config.rank = 0

    def make_tier() -> Any:
        return tier_cls(spec, memoryview(memory.numpy()), "kvbucket", root_dir=str(root))

    ctx = ReqContext(req_id="check")
    keys = [make_offload_key(i.to_bytes(8, "big"), 0) for i in range(4)]
    memory[:4] = torch.randint(0, 255, (4, chunk_bytes), dtype=torch.uint8)
    expected = memory[:4].clone()
    tier = make_tier()
    tier.submit_store(TransferJob(1, keys, np.arange(4), False, ctx))
    tier.drain_jobs()
    stored = list(tier.get_finished_jobs())
    step("vllm", "submit_store + drain_jobs", [r.success for r in stored] == [True], repr(stored))
    tier.shutdown()

    tier = make_tier()
    hits = [tier.lookup(k, ctx) for k in keys]
    step("vllm", "after shutdown + reopen: lookup hits", all(h.name == "HIT" for h in hits), str([h.name for h in hits]))
    tier.submit_load(TransferJob(2, keys, np.arange(4, 8), True, ctx))
    tier.drain_jobs()
    loaded = list(tier.get_finished_jobs())
    step("vllm", "submit_load + drain_jobs", [r.success for r in loaded] == [True], repr(loaded))
    step("vllm", "loaded chunks byte-exact", torch.equal(memory[4:8], expected))
    tier.shutdown()
    events = check_vllm_events(tier_cls, root / "events")
    return f"4 chunks of {chunk_bytes} B, {events}"


def check_vllm_events(tier_cls: Any, root: Path) -> str:
    """KV events: the names the tier fills exist in vLLM, and a stored-then-evicted chunk is announced both ways."""
    import dataclasses
    from unittest.mock import MagicMock

    import numpy as np
    from vllm.distributed.kv_events import BlockRemoved, BlockStored
    from vllm.v1.kv_offload.base import Locality, Medium, OffloadingEvent, ReqContext, get_offload_block_hash, make_offload_key
    from vllm.v1.kv_offload.tiering.base import TransferJob

    fields = {field.name for field in dataclasses.fields(OffloadingEvent)}
    step("vllm", "OffloadingEvent has keys, medium, removed, locality", {"keys", "medium", "removed", "locality"} <= fields, str(sorted(fields)))
    step("vllm", "Medium.STORAGE and Locality.LOCAL exist", (Medium.STORAGE.value, Locality.LOCAL.value) == ("STORAGE", "LOCAL"))
    published = {cls.__name__: set(cls.__struct_fields__) for cls in (BlockStored, BlockRemoved)}
    step("vllm", "BlockStored/BlockRemoved carry block_hashes and medium", all({"block_hashes", "medium"} <= f for f in published.values()))

    chunk_bytes = 64 * 1024
    memory = torch.randint(0, 255, (6, chunk_bytes), dtype=torch.uint8)
    spec = MagicMock()
    spec.vllm_config.parallel_config.rank = 0
    spec.kv_events_config.enable_kv_cache_events = True  # vLLM's global switch (--kv-events-config)
    tier = tier_cls(spec, memoryview(memory.numpy()), "kvbucket", root_dir=str(root), enable_kv_events=True,
                    max_total_size=4 * chunk_bytes, bucket_keys_limit=2, eviction_policy="fifo", background_eviction=False)
    ctx = ReqContext(req_id="events")
    keys = [make_offload_key(i.to_bytes(8, "big"), 0) for i in range(6)]
    for job in range(3):  # the tier holds 4 chunks: the third job's bucket evicts the first one's
        tier.submit_store(TransferJob(10 + job, keys[2 * job : 2 * job + 2], np.arange(2 * job, 2 * job + 2), False, ctx))
        tier.drain_jobs()
        step("vllm", f"store job {10 + job}", [r.success for r in tier.get_finished_jobs()] == [True])
    events = list(tier.take_events())
    tier.shutdown()
    seen = [("removed" if e.removed else "stored", [get_offload_block_hash(k) for k in e.keys]) for e in events]
    hashes = [k[:-4] for k in keys]
    expected = [("stored", hashes[0:2]), ("stored", hashes[2:4]), ("removed", hashes[0:2]), ("stored", hashes[4:6])]
    step("vllm", "take_events: stored, stored, removed (the evicted bucket), stored", seen == expected, repr(seen))
    tagged = all(isinstance(e, OffloadingEvent) and e.medium is Medium.STORAGE and e.locality is Locality.LOCAL for e in events)
    step("vllm", "vLLM OffloadingEvents tagged Medium.STORAGE, Locality.LOCAL", tagged)
    return f"{len(events)} KV events"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engines", default="sglang,lmcache,vllm")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="kvbucket-engines-"))
    checks = {"sglang": check_sglang, "lmcache": check_lmcache, "vllm": check_vllm}
    versions = {}
    for dist in ("torch", "sglang", "lmcache", "vllm", "kvbucket"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:  # noqa: BLE001
            versions[dist] = "not installed"
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    for name in args.engines.split(","):
        run_engine(name, checks[name], root)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print("\n== summary")
    for name, status, detail in RESULTS:
        print(f"{name:8s} {status}  {detail}")
    return 0 if all(status == "PASS" for _, status, _ in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
