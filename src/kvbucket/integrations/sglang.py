"""kvbucket as SGLang's HiCache L3 storage (``--hicache-storage-backend dynamic``).

Turn it on with::

    --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvbucket",
        "module_path": "kvbucket.integrations.sglang",
        "class_name": "KvBucketHiCacheStorage",
        "interface_v1": 1, "storage_path": "/nvme/kvbucket",
        "max_physical_bytes": "200G", "eviction_policy": "lru"}'

SGLang's factory calls ``KvBucketHiCacheStorage(storage_config, kwargs)``,
then ``register_mem_pool_host(host_pool)``. With ``"interface_v1": 1`` the
controller uses the zero-copy pair :meth:`~KvBucketHiCacheStorage.batch_set_v1`
/ :meth:`~KvBucketHiCacheStorage.batch_get_v1`: a page is written straight from
the host pool's buffers (``get_page_buffer_meta``) and read straight back into
them. Without it the generic ``batch_set``/``batch_get`` calls move flat page
tensors. Hybrid models (Mamba/SWA state, DeepSeek's indexer and compressed
pools, draft pools) register more host pools with ``register_mem_host_pool_v2``
and move them with the v2 calls (:meth:`~KvBucketHiCacheStorage.batch_set_v2`,
:meth:`~KvBucketHiCacheStorage.batch_get_v2`,
:meth:`~KvBucketHiCacheStorage.batch_exists_v2`), zero-copy as well; the
adapter hands them to its :class:`~kvbucket.integrations._sglang_v2.HostPools`.

Layout on disk: ``<storage_path>/<model>/<rank dir>/`` is one kvbucket store per
rank (one writer per directory). Keys carry HiCacheFile's namespace suffix
(``{hash}_{model}_{tp_rank}_{tp_size}[...]``; MLA models drop the TP rank) plus
a short tag of the host-pool layout, so a change of layout, dtype or page size
never reads old pages as new ones. For MLA models the KV is identical on all
TP ranks and SGLang lets only the storage writer rank back pages up; every
other rank reads the writer's directory read-only (re-opening it when it has
changed, at most every ``mla_refresh_interval_s`` seconds). State that is
TP-sharded even in an MLA model (Mamba state, MHA-shaped side pools) is each
rank's own and goes to the rank's own directory.

The module imports without SGLang: the class subclasses the real
``HiCacheStorage`` when SGLang is importable (the factory checks that), else
kvbucket's stand-in (:mod:`~kvbucket.integrations._standins`).
"""

from __future__ import annotations

import builtins  # annotations inside the class, where ``set`` is the HiCacheStorage method
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Setting
from ..errors import InvalidArgument
from ..policy.grouping import split_batches
from . import _standins
from ._common import (
    METRICS_KEYS,
    hint_loads,
    import_engine,
    load_each,
    metrics_endpoint,
    open_store,
    option,
    pointer_view,
    safe_component,
    shut_down,
    start_metrics,
    store_options,
)
from ._sglang_v2 import READ_ERRORS, HostPools, page_nbytes

if TYPE_CHECKING:
    from ..metrics import MetricsServer
    from ..store import BucketStore, StoreStats

__all__ = ["KvBucketHiCacheStorage", "StoragePaths", "resolve_paths"]

log = logging.getLogger(__name__)

_sglang = import_engine({"HiCacheStorage": "sglang.srt.mem_cache.hicache_storage:HiCacheStorage"}) or _standins.SGLANG
_Base: Any = _sglang.HiCacheStorage  # SGLang's factory checks issubclass against its own
# Imported apart from the base class: an SGLang without the v2 names still gets the real base.
_v2 = (
    import_engine({name: f"sglang.srt.mem_cache.hicache_storage:{name}" for name in ("PoolName", "PoolTransferResult")})
    or _standins.SGLANG
)

ROOT_ENV = "KVBUCKET_PATH"
"""Environment variable naming the store root when the config has none."""

# HiCacheFile's names for the same settings (per-rank cap, as its evictor uses it).
_ALIASES = {"max_size": "max_physical_bytes"}

ADAPTER_KEYS = frozenset({"storage_path", "file_storage_path", "per_rank_dirs", "mla_refresh_interval_s"}) | METRICS_KEYS
"""``extra_config`` keys of this adapter beside the BucketConfig fields and ``max_size``."""

SGLANG_KEYS = frozenset(
    {
        "backend_name",
        "module_path",
        "class_name",
        "interface_v1",
        "prefetch_threshold",
        "prefetch_timeout_base",
        "prefetch_timeout_per_ki_token",
        "hicache_storage_pass_prefix_keys",
    }
)
"""``extra_config`` keys that SGLang itself reads (the dynamic backend loader, prefetch tuning)."""

_SOURCE = "hicache extra_config"

@dataclass(frozen=True)
class StoragePaths:
    """Where one rank keeps its pages and how it names them."""

    store_dir: Path
    """The kvbucket store directory this rank opens."""
    suffix: str
    """Appended to every page hash (HiCacheFile's ``config_suffix``)."""
    tp_suffix: str
    """Suffix for TP-sharded state (HiCacheFile's ``tp_config_suffix``)."""
    writer: bool
    """Whether this rank writes ``store_dir`` (False: MLA reader rank)."""
    state_dir: Path | None = None
    """This rank's own directory for TP-sharded state when ``store_dir`` is
    shared by the TP ranks (MLA models); None: such state goes to ``store_dir``."""


def resolve_paths(storage_config: Any, root: str | os.PathLike[str], per_rank: bool = True) -> StoragePaths:
    """Directory and key suffixes of one rank, from a ``HiCacheStorageConfig``.

    Keys follow HiCacheFile: ``_{model}_{tp_rank}_{tp_size}`` plus
    ``_{pp_size}_{pp_rank}`` with pipeline parallelism and
    ``_cp{rank}_{size}`` with attention context parallelism; MLA models share
    one suffix across TP ranks. The directory adds the data-parallel rank,
    since with DP attention ``tp_rank`` is local to the attention group. An
    MLA rank's TP-sharded state goes to ``state_dir``, named as an MHA
    rank's directory.
    """
    cfg = storage_config
    model = "-".join((cfg.model_name or "").split("/"))
    shard = f"_{cfg.pp_size}_{cfg.pp_rank}" if cfg.pp_size > 1 else ""
    if getattr(cfg, "attn_cp_size", 1) > 1:
        shard += f"_cp{cfg.attn_cp_rank}_{cfg.attn_cp_size}"
    tp_suffix = f"_{model}_{cfg.tp_rank}_{cfg.tp_size}{shard}"
    suffix = f"_{model}{shard}" if cfg.is_mla_model else tp_suffix
    dcp_size = getattr(cfg, "dcp_size", 1)
    if dcp_size > 1:
        dcp = f"_tp{cfg.tp_size}_dcp{cfg.dcp_rank}_{dcp_size}_page{cfg.logical_page_size}"
        suffix += dcp
        tp_suffix += dcp
    writer = bool(getattr(cfg, "is_storage_writer", True))
    base = Path(root)
    if not per_rank:
        return StoragePaths(base, suffix, tp_suffix, True)
    dp = f"_dp{getattr(cfg, 'dp_rank', 0)}"
    model_dir = base / safe_component(model or "model")
    rank_dir = model_dir / f"tp{cfg.tp_rank}_{cfg.tp_size}{shard}{dp}"
    if not cfg.is_mla_model:
        return StoragePaths(rank_dir, suffix, tp_suffix, writer)
    # All TP ranks read what the writer rank of their DCP shard wrote.
    name = f"mla{shard}{dp}" + (f"_dcp{cfg.dcp_rank}_{dcp_size}" if dcp_size > 1 else "")
    return StoragePaths(model_dir / name, suffix, tp_suffix, writer, state_dir=rank_dir)


def _root_from(extra: dict[str, Any]) -> str:
    """The store root: ``storage_path``, ``file_storage_path`` or ``$KVBUCKET_PATH``."""
    root = extra.get("storage_path") or extra.get("file_storage_path") or os.environ.get(ROOT_ENV)
    if not root:
        raise InvalidArgument(
            "kvbucket HiCache storage needs a directory: set \"storage_path\" in "
            f"--hicache-storage-backend-extra-config or the {ROOT_ENV} environment variable"
        )
    return os.path.expanduser(str(root))


def _as_int_list(indices: Any) -> list[int]:
    """Host indices (a torch tensor, numpy array or sequence) as Python ints."""
    return [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]


@dataclass
class _Metrics:
    """Pages and bandwidth per call, drained by :meth:`KvBucketHiCacheStorage.get_stats`."""

    prefetch_pgs: list[int] = field(default_factory=list)
    backup_pgs: list[int] = field(default_factory=list)
    prefetch_bandwidth: list[float] = field(default_factory=list)
    backup_bandwidth: list[float] = field(default_factory=list)


class _SharedReader:
    """Read-only view of another rank's store, refreshed when its directory changed."""

    def __init__(self, path: Path, options: dict[str, Any], interval: float) -> None:
        self._path, self._options, self._interval = path, options, interval
        self._store: BucketStore | None = None
        self._stamp: int | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()

    def get(self) -> BucketStore | None:
        """The current read-only store (None before the writer created it),
        refreshed when the directory changed, at most once per interval."""
        with self._lock:
            now = time.monotonic()
            if self._store is not None and now - self._checked < self._interval:
                return self._store
            self._checked = now
            try:
                stamp = os.stat(self._path).st_mtime_ns
            except FileNotFoundError:
                return self._store
            if self._store is None or stamp != self._stamp:
                self._reopen(stamp)
            return self._store

    def _reopen(self, stamp: int) -> None:
        if self._store is None:
            self._store = open_store(self._path, self._options, readonly=True)
        else:
            self._store.refresh()
        self._stamp = stamp

    def close(self) -> None:
        """Close the current view."""
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


class KvBucketHiCacheStorage(_Base):
    """SGLang ``HiCacheStorage`` backed by one crash-safe kvbucket store per rank.

    ``extra_config`` keys (all optional but a directory):

    * ``storage_path`` (or HiCacheFile's ``file_storage_path``; else ``$KVBUCKET_PATH``)
    * ``per_rank_dirs`` (default true): one sub-directory per rank
    * any :class:`~kvbucket.BucketConfig` field: ``max_physical_bytes``,
      ``max_total_size``, ``total_keys_limit``, ``eviction_policy``
      (``lru``/``fifo``/``none``), ``durability``, ``bucket_size_limit``, ... and
      HiCacheFile's ``max_size`` (same as ``max_physical_bytes``, per rank)
    * ``mla_refresh_interval_s`` (default 1.0): how often an MLA reader rank
      looks for new buckets of the writer rank
    * ``metrics_port`` (default: off): serve the store's Prometheus metrics
      at ``http://metrics_addr:<metrics_port + rank>/metrics``, the rank
      being ``tp_rank + pp_rank * tp_size`` (0: any free port); writer ranks
      only (an MLA reader rank has no store of its own)
    * ``metrics_addr`` (default ``127.0.0.1``): the address it listens on

    Values are parsed as ``KVBUCKET_*`` variables are (``"200G"``,
    ``"false"``); a key that is neither one of these nor one SGLang reads
    (:data:`SGLANG_KEYS`) raises :class:`~kvbucket.errors.InvalidArgument`.

    Hybrid models use the v2 calls: each registered host pool's page ``h`` is
    stored as ``{h}.{pool name}{suffix}@{pool format}`` (the KV pool's pages
    keep the v1 key, so v1 and v2 share them), and
    :meth:`batch_exists_v2` answers one prefix that every pool the hit
    policies require can restore.
    """

    def __init__(self, storage_config: Any, kwargs: dict[str, Any] | None = None) -> None:
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        self.storage_config = storage_config
        self.extra_kwargs = dict(kwargs or {})
        self._options = store_options(extra, _SOURCE, _ALIASES, own=ADAPTER_KEYS | SGLANG_KEYS)
        per_rank = option(extra, "per_rank_dirs", Setting("bool"), True, _SOURCE)
        interval = option(extra, "mla_refresh_interval_s", Setting("number"), 1.0, _SOURCE)
        self.paths = resolve_paths(storage_config, _root_from(extra), per_rank)
        endpoint = metrics_endpoint(extra, _SOURCE, offset=_rank_offset(storage_config))
        self._layout_tag = ""
        self._metrics = _Metrics()
        self._metrics_on = bool(getattr(storage_config, "enable_storage_metrics", False))
        self._store: BucketStore | None = None
        self._reader: _SharedReader | None = None
        self._pools = HostPools(self, _v2)
        self.metrics_server: MetricsServer | None = None
        if self.paths.writer:
            self._store = open_store(self.paths.store_dir, self._options)
            self.metrics_server = start_metrics(endpoint, self._store)
        else:
            self._reader = _SharedReader(self.paths.store_dir, self._options, interval)
        log.info("kvbucket HiCache storage at %s (%s)", self.paths.store_dir, "writer" if self.paths.writer else "reader")

    # ------------------------------------------------------------------ keys

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Remember the host pool and derive the layout tag of the keys."""
        super().register_mem_pool_host(mem_pool_host)
        self._layout_tag = _layout_tag(mem_pool_host)

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        """Register one host pool of a hybrid model, moved by the v2 calls.

        Raises :class:`~kvbucket.errors.InvalidArgument` (failing SGLang's
        attach) for a pool without ``get_page_buffer_meta``: kvbucket moves
        pages only straight from and into the pool's memory.
        """
        self._pools.register(host_pool, host_pool_name, super().register_mem_host_pool_v2)

    def on_host_pools_registered(self) -> None:
        """Log the registered pools and the directory each one's pages go to."""
        super().on_host_pools_registered()
        self._pools.log_directories()

    def _key(self, key: str) -> str:
        """The store key of one page hash (HiCacheFile suffix + layout tag)."""
        suffix = self.paths.tp_suffix if key.endswith(".mamba") else self.paths.suffix
        return f"{key}{suffix}{self._layout_tag}"

    def _keys(self, keys: Iterable[str]) -> list[str]:
        return [self._key(k) for k in keys]

    def _read_store(self) -> BucketStore | None:
        """The store to read: our own, or the MLA writer's (read-only)."""
        if self._store is not None:
            return self._store
        assert self._reader is not None
        return self._reader.get()

    # ------------------------------------------------------------- existence

    def exists(self, key: str) -> bool:
        """Whether the page ``key`` is stored (a hit is leased, as by :meth:`batch_exists`)."""
        return self._lookup_flags([key])[0]

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """How many of ``keys``, from the first, are stored (the hit prefix).

        The prefix is leased (``lookup_lease_s``): eviction keeps its pages
        until they are loaded or the lease ends, so the prefetch that follows
        finds them."""
        flags = self._lookup_flags(keys)
        return next((i for i, ok in enumerate(flags) if not ok), len(flags))

    def _lookup_flags(self, keys: Sequence[str]) -> list[bool]:
        """:meth:`_exists_flags` for an engine lookup: the found prefix is
        leased and read ahead (``prefetch_on_lookup``)."""
        return self._flags(keys, "lookup", _lookup_prefix)

    def _exists_flags(self, keys: Sequence[str]) -> list[bool]:
        """For each page, whether it is stored (nothing leased)."""
        return self._flags(keys, "existence check", lambda store, names: store.batch_exists(names))

    def _flags(self, keys: Sequence[str], what: str, ask: Callable[[BucketStore, list[str]], list[bool]]) -> list[bool]:
        """``ask`` the store about ``keys``; all False when it cannot be read
        (a failed read is a miss to the engine, and is logged)."""
        if not keys:
            return []
        try:
            store = self._read_store()
            if store is None:
                return [False] * len(keys)
            return list(ask(store, self._keys(keys)))
        except READ_ERRORS as exc:
            log.warning("kvbucket: %s of %d pages (first %r) failed: %s", what, len(keys), keys[0], exc)
            return [False] * len(keys)

    # ----------------------------------------------------------- generic path

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        """Read page ``key`` into ``target_location`` (returned), or None on a miss.

        Without a target the bytes come back as a ``bytearray``.
        """
        return self.batch_get([key], [target_location])[0]

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None) -> list[Any]:
        """Read pages into their target tensors/buffers; None marks a page not read."""
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        start = time.perf_counter()
        results: list[Any] = [None] * len(keys)
        wanted = {i: t for i, t in enumerate(targets) if t is not None}
        loaded = self._load({i: [t] for i, t in wanted.items()}, keys)
        for i in loaded:
            results[i] = targets[i]
        bare = [i for i, t in enumerate(targets) if t is None]
        if bare:
            for i, data in self._fetch_bytes([keys[i] for i in bare]).items():
                results[bare[i]] = data
        self._record(self._metrics.prefetch_pgs, self._metrics.prefetch_bandwidth, sum(r is not None for r in results), start)
        return results

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        """Store one page (a CPU tensor or any buffer); True when stored or already there."""
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None) -> bool:
        """Store pages durably; True only when every page is stored."""
        if values is None:
            return False
        return all(self._store_pages(keys, [[v] for v in values]))

    # ------------------------------------------------------ hybrid models (v2)

    def batch_exists_v2(self, keys: list[str], pool_transfers: list[Any] | None = None, extra_info: Any = None) -> Any:
        """The usable prefix of ``keys``, as SGLang's ``PoolTransferResult``.

        A prefix of ``n`` pages is restorable when the KV pool holds pages
        ``0..n-1`` and every transfer's pool can serve it by its hit policy:
        ``all_pages`` needs all ``n`` pages, ``trailing_pages`` only the last
        ``len(transfer.keys)`` of them (a state that summarises the rest).
        ``kv_hit_pages`` is the longest restorable prefix,
        ``restorable_prefix_pages`` all of them (a trailing pool can restore
        5 pages but not 4), ``extra_pool_hit_pages`` each pool's own
        longest. A ``block_groups`` pool reports the pages its leading
        complete groups cover and never shortens the prefix. The pages of the
        answer are leased (``lookup_lease_s``) until they are loaded.
        """
        return self._pools.exists(keys, pool_transfers)

    def batch_set_v2(self, transfers: list[Any], extra_info: Any = None) -> dict[Any, list[bool]]:
        """Store each transfer's pages straight from its host pool; per pool, one result per key.

        All pages bound for one store are written together, so a span's KV
        and side-pool pages share buckets. An MLA reader rank writes only its
        TP-sharded state and reports the others as the writer rank holds them.
        """
        return self._pools.store(transfers)

    def batch_get_v2(self, transfers: list[Any], extra_info: Any = None) -> dict[Any, list[bool]]:
        """Read each transfer's pages straight into its host pool; per pool, one result per key.

        A page whose buffers are not adjacent (K and V, a Mamba state's
        components) is read into them back to back, without a bounce buffer.
        """
        start = time.perf_counter()
        results, count, nbytes = self._pools.load(transfers)
        self._record(self._metrics.prefetch_pgs, self._metrics.prefetch_bandwidth, count, start, gb=nbytes / (1 << 30))
        return results

    # --------------------------------------------------------- zero-copy path

    def batch_set_v1(self, keys: list[str], host_indices: Any, extra_info: Any = None) -> list[bool]:
        """Store pages straight from the host pool, one result per key."""
        buffers = self._page_buffers(keys, host_indices)
        if buffers is None:
            return [False] * len(keys)
        return self._store_pages(keys, buffers)

    def batch_get_v1(self, keys: list[str], host_indices: Any, extra_info: Any = None) -> list[bool]:
        """Read pages straight into the host pool, one result per key."""
        buffers = self._page_buffers(keys, host_indices)
        if buffers is None:
            return [False] * len(keys)
        start = time.perf_counter()
        loaded = self._load(dict(enumerate(buffers)), keys)
        self._record(self._metrics.prefetch_pgs, self._metrics.prefetch_bandwidth, len(loaded), start)
        return [i in loaded for i in range(len(keys))]

    def _page_buffers(self, keys: Sequence[str], host_indices: Any) -> list[list[memoryview]] | None:
        """Each page's buffers in the anchor host pool; None if unusable."""
        pool = getattr(self, "mem_pool_host", None)
        if pool is None or not keys:
            if keys:
                log.error("kvbucket: zero-copy I/O before register_mem_pool_host")
            return None
        return self._host_buffers(pool, self._page_size(pool), keys, host_indices)

    def _host_buffers(self, pool: Any, page_size: int, keys: Sequence[str], host_indices: Any) -> list[list[memoryview]] | None:
        """Each page's buffers in ``pool``, from ``get_page_buffer_meta``; None if unusable."""
        if not keys:
            return None
        indices = _as_int_list(host_indices)
        if len(indices) != len(keys) * page_size:
            log.error("kvbucket: %d host indices for %d pages of %d tokens", len(indices), len(keys), page_size)
            return None
        ptrs, sizes = pool.get_page_buffer_meta(_indices_like(host_indices, indices))
        if not ptrs or len(ptrs) != len(sizes) or len(ptrs) % len(keys):
            log.error("kvbucket: host pool gave %d buffers for %d pages", len(ptrs), len(keys))
            return None
        per_page = len(ptrs) // len(keys)
        views = [pointer_view(int(p), int(s)) for p, s in zip(ptrs, sizes)]
        return [views[i * per_page : (i + 1) * per_page] for i in range(len(keys))]

    def _page_size(self, pool: Any) -> int:
        cfg = self.storage_config
        if getattr(cfg, "dcp_size", 1) > 1 and getattr(cfg, "logical_page_size", None):
            return int(cfg.logical_page_size)
        return int(getattr(pool, "page_size", 1) or 1)

    # ------------------------------------------------------------- store I/O

    def _store_pages(self, keys: Sequence[str], values: Sequence[list[Any]]) -> list[bool]:
        """Write pages (each a list of buffers) in bucket-sized batches; one result per key."""
        if self._store is None:  # MLA reader rank: the writer rank stores the pages
            return self._exists_flags(keys)
        return self._write_pages(self._store, self._keys(keys), values)

    def _write_pages(self, store: BucketStore, skeys: Sequence[str], values: Sequence[list[Any]]) -> list[bool]:
        """Write the pages of ``skeys`` not yet in ``store``; one result per key."""
        start = time.perf_counter()
        try:
            present = store.batch_exists(skeys)
        except READ_ERRORS as exc:
            log.warning("kvbucket: cannot store %d pages (first %r): %s", len(skeys), skeys[0] if skeys else None, exc)
            return [False] * len(skeys)
        stored = {k for k, there in zip(skeys, present) if there}
        todo: dict[str, tuple[list[Any], int]] = {}
        for skey, value in zip(skeys, values):
            if skey not in stored and skey not in todo:
                todo[skey] = (value, page_nbytes(value))
        written = self._offload_batches(store, todo)
        stored |= written
        self._record(self._metrics.backup_pgs, self._metrics.backup_bandwidth, len(written), start)
        return [k in stored for k in skeys]

    def _offload_batches(self, store: BucketStore, todo: dict[str, tuple[list[Any], int]]) -> builtins.set[str]:
        """Write ``todo`` bucket by bucket; return the store keys written."""
        items = [(k, value, size) for k, (value, size) in todo.items()]
        written: builtins.set[str] = set()
        limits = store.config
        for batch in split_batches(items, max_bytes=limits.bucket_size_limit, max_keys=limits.bucket_keys_limit, size=lambda item: item[2]):
            try:
                store.batch_offload({k: v for k, v, _ in batch}, on_duplicate="skip")
            except READ_ERRORS as exc:
                log.warning("kvbucket: writing %d pages (first %r) failed: %s", len(batch), batch[0][0], exc)
                continue
            written.update(k for k, _, _ in batch)
        return written

    def _load(self, dests: dict[int, list[Any]], keys: Sequence[str]) -> builtins.set[int]:
        """Load pages ``{position: [buffers]}``; return the positions filled."""
        if not dests:
            return set()
        try:
            store = self._read_store()
            if store is None:
                return set()
            order = list(dests)
            flags = store.batch_exists([self._key(keys[i]) for i in order])
        except READ_ERRORS as exc:
            log.warning("kvbucket: lookup for a read of %d pages failed: %s", len(dests), exc)
            return set()
        present = [i for i, ok in zip(order, flags) if ok]
        return self._load_present(store, {i: dests[i] for i in present}, keys)

    def _load_present(self, store: BucketStore, dests: dict[int, list[Any]], keys: Sequence[str]) -> builtins.set[int]:
        """Load pages the index holds; fall back to one-by-one on a failed batch."""
        if not dests:
            return set()
        direct = {i: bufs[0] for i, bufs in dests.items() if len(bufs) == 1}
        scattered = {i: bufs for i, bufs in dests.items() if len(bufs) > 1}
        done: builtins.set[int] = set()
        if direct:
            done |= self._load_direct(store, direct, keys)
        for i, bufs in scattered.items():
            if self._load_scattered(store, self._key(keys[i]), bufs):
                done.add(i)
        return done

    def _load_direct(self, store: BucketStore, direct: dict[int, Any], keys: Sequence[str]) -> builtins.set[int]:
        """Load pages that are one buffer each; a failing page never fails the others."""

        loaded = self._load_into(store, {self._key(keys[i]): buf for i, buf in direct.items()})
        return {i for i in direct if self._key(keys[i]) in loaded}

    def _load_into(self, store: BucketStore, dests: dict[str, Any]) -> builtins.set[str]:
        """Load each key into its buffer (or list of buffers, back to back); a failing key never fails the others."""

        def load(batch: dict[str, Any]) -> Iterable[str]:
            store.batch_load(batch)
            return batch

        return load_each(load, dests, READ_ERRORS, "kvbucket")

    def _load_scattered(self, store: BucketStore, skey: str, bufs: list[Any]) -> bool:
        """Read one page whose host buffers are not adjacent (e.g. K and V)."""
        views = [memoryview(b).cast("B") if not isinstance(b, memoryview) else b for b in bufs]
        bounce = bytearray(sum(v.nbytes for v in views))
        try:
            store.batch_load({skey: bounce})
        except READ_ERRORS as exc:
            log.warning("kvbucket: reading page %r failed: %s", skey, exc)
            return False
        offset = 0
        for view in views:
            view[:] = bounce[offset : offset + view.nbytes]
            offset += view.nbytes
        return True

    def _fetch_bytes(self, keys: Sequence[str]) -> dict[int, bytearray]:
        """Pages without a target buffer: ``{position: bytes}`` of those found."""
        flags = self._exists_flags(keys)
        found = [i for i, ok in enumerate(flags) if ok]
        if not found:
            return {}
        store = self._read_store()
        if store is None:
            return {}
        try:
            got = store.batch_get([self._key(keys[i]) for i in found])
        except READ_ERRORS as exc:
            log.warning("kvbucket: reading %d pages failed: %s", len(found), exc)
            return {}
        return {i: bytearray(got[self._key(keys[i])]) for i in found}

    # ---------------------------------------------------------- housekeeping

    def clear(self) -> None:
        """Remove every page this rank wrote (MLA reader ranks: their TP-sharded state only)."""
        if self._store is not None:
            self._store.remove_all()
        self._pools.clear()

    def get_stats(self) -> Any:
        """SGLang ``StorageMetrics`` of the calls since the last call (None when off)."""
        if not self._metrics_on:
            return None
        drained, self._metrics = self._metrics, _Metrics()
        sglang = import_engine({"StorageMetrics": "sglang.srt.observability.metrics_collector:StorageMetrics"})
        if sglang is None:
            return drained
        return sglang.StorageMetrics(
            prefetch_pgs=drained.prefetch_pgs,
            backup_pgs=drained.backup_pgs,
            prefetch_bandwidth=drained.prefetch_bandwidth,
            backup_bandwidth=drained.backup_bandwidth,
        )

    def store_stats(self) -> StoreStats | None:
        """kvbucket's own statistics of this rank's store (keys, bytes, limits)."""
        store = self._read_store()
        return None if store is None else store.stats()

    def close(self) -> None:
        """Stop the metrics endpoint and close the store (everything acknowledged is already durable)."""
        if self._store is not None:  # a writer rank, the only kind that serves metrics
            shut_down(self._store, metrics_server=self.metrics_server)
            self._store, self.metrics_server = None, None
        if self._reader is not None:
            self._reader.close()
        self._pools.close()

    def _record(self, pages: list[int], bandwidth: list[float], count: int, start: float, gb: float | None = None) -> None:
        """Note ``count`` pages (``gb`` GiB; default: anchor pages) moved since ``start``."""
        if not self._metrics_on or count <= 0:
            return
        elapsed = max(time.perf_counter() - start, 1e-9)
        pages.append(count)
        bandwidth.append((count * self._page_gb() if gb is None else gb) / elapsed)

    def _page_gb(self) -> float:
        pool = getattr(self, "mem_pool_host", None)
        per_token = getattr(pool, "get_size_per_token", None)
        if per_token is None:
            return 0.0
        return float(per_token()) * self._page_size(pool) / (1 << 30)


def _lookup_prefix(store: BucketStore, names: list[str]) -> list[bool]:
    """:meth:`BucketStore.lookup` of ``names`` up to the first miss, the hits hinted for reading ahead."""
    flags = store.lookup(names, prefix=True)
    hint_loads(store, [name for name, hit in zip(names, flags) if hit], "kvbucket HiCache")
    return flags


def _rank_offset(cfg: Any) -> int:
    """This rank's offset from ``metrics_port``: distinct for every TP x PP rank of a node."""
    return int(getattr(cfg, "tp_rank", 0) or 0) + int(getattr(cfg, "pp_rank", 0) or 0) * int(getattr(cfg, "tp_size", 1) or 1)


def _indices_like(original: Any, as_list: list[int]) -> Any:
    """Hand the pool the indices in the type it was given (tensors stay tensors)."""
    return original if hasattr(original, "tolist") else as_list


def _layout_tag(pool: Any) -> str:
    """``@`` + 8 hex digits naming the pool's page format (layout, dtype, page size, ...)."""
    parts = [
        str(getattr(pool, name, ""))
        for name in ("layout", "dtype", "page_size", "layer_num", "head_num", "head_dim", "kv_lora_rank", "qk_rope_head_dim")
    ]
    return "@" + hashlib.blake2s("|".join(parts).encode(), digest_size=4).hexdigest()
