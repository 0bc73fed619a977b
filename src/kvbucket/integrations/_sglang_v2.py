"""The host pools of hybrid models behind SGLang's v2 HiCache calls.

Hybrid models (Mamba/SWA state, DeepSeek's indexer and compressed pools,
draft pools) register more host pools with ``register_mem_host_pool_v2``
and move them with ``batch_set_v2``/``batch_get_v2``/``batch_exists_v2``,
zero-copy. :class:`HostPools` holds the registered pools and answers those
calls for :class:`~kvbucket.integrations.sglang.KvBucketHiCacheStorage`,
which keeps the stores, the KV pool's keys and the page I/O (:class:`Adapter`).

Keys: pool ``name``'s page ``h`` is stored as ``{h}.{name}{suffix}@{pool
format}``; the KV pool's pages keep the v1 key, so v1 and v2 share them.
State that is TP-sharded even in an MLA model (Mamba state, MHA-shaped side
pools) is each rank's own: it is keyed per rank and, where the TP ranks
share ``store_dir``, kept in the rank's ``state_dir`` (the state store,
opened when the first such pool registers).

Hit policies: ``all_pages`` (every page of the prefix), ``trailing_pages``
(its last pages: a state that summarises the rest), ``block_groups`` (the
leading complete key groups; it never shortens the prefix).
"""

from __future__ import annotations

import builtins
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import InvalidArgument, KvBucketError
from ._common import hint_loads, open_store

if TYPE_CHECKING:
    from ..store import BucketStore
    from .sglang import StoragePaths

__all__ = ["Adapter", "HostPool", "HostPools", "READ_ERRORS", "page_nbytes"]

log = logging.getLogger("kvbucket.integrations.sglang")  # the adapter's logger: one name for all its messages

READ_ERRORS = (KvBucketError, OSError, ValueError)
"""What a failed store call raises: the engine sees a miss (or a page not stored), and it is logged."""

_KV = "kv"
_MAMBA = "mamba"
_ALL_PAGES, _TRAILING_PAGES, _BLOCK_GROUPS = "all_pages", "trailing_pages", "block_groups"


class Adapter(Protocol):
    """What the v2 calls use of the v1 adapter: its paths and stores, the KV
    pool's keys, and its page I/O."""

    paths: StoragePaths
    storage_config: Any
    _options: dict[str, Any]
    _store: BucketStore | None

    def _keys(self, keys: Iterable[str]) -> list[str]:
        """The store keys of KV pages (the v1 keys)."""

    def _read_store(self) -> BucketStore | None:
        """The store to read KV pages from (None: not there yet)."""

    def _page_size(self, pool: Any) -> int:
        """Tokens per page of the KV pool ``pool``."""

    def _host_buffers(self, pool: Any, page_size: int, keys: Sequence[str], host_indices: Any) -> list[list[memoryview]] | None:
        """Each page's buffers in ``pool``; None if unusable (logged)."""

    def _write_pages(self, store: BucketStore, skeys: Sequence[str], values: Sequence[list[Any]]) -> list[bool]:
        """Write the pages of ``skeys`` not yet in ``store``; one result per key."""

    def _load_into(self, store: BucketStore, dests: dict[str, Any]) -> builtins.set[str]:
        """Load each key into its buffers; the keys loaded."""


@dataclass(frozen=True)
class HostPool:
    """A host pool registered for the v2 calls."""

    host: Any
    """SGLang's host pool (``get_page_buffer_meta`` gives each page's buffers)."""
    tag: str
    """``@`` + digest of the pool's page format, ending every key of its pages."""
    sharded: bool
    """TP-sharded state (Mamba, MHA-shaped pools of an MLA model): keyed per
    rank and, where the TP ranks share ``store_dir``, kept in ``state_dir``."""


class HostPools:
    """The v2 host pools of one adapter, by name, and the rank's state store.

    ``engine`` holds SGLang's ``PoolName`` and ``PoolTransferResult`` (or
    kvbucket's stand-ins). Called on SGLang's threads as the adapter is;
    pools are registered before any transfer.
    """

    def __init__(self, adapter: Adapter, engine: Any) -> None:
        self._adapter = adapter
        self._engine = engine
        self._pools: dict[str, HostPool] = {}
        self._state_store: BucketStore | None = None

    def __getitem__(self, name: str) -> HostPool:
        """The registered pool ``name``."""
        return self._pools[name]

    def register(self, host_pool: Any, host_pool_name: Any, register_base: Callable[[Any, Any], None]) -> None:
        """Register one host pool (``register_base``: the engine's own
        registration, run once the pool is known to be usable), opening the
        state store for the first TP-sharded one where the ranks share ``store_dir``.

        Raises :class:`~kvbucket.errors.InvalidArgument` (failing SGLang's
        attach) for a pool without ``get_page_buffer_meta``: kvbucket moves
        pages only straight from and into the pool's memory.
        """
        name = _name(host_pool_name)
        if not callable(getattr(host_pool, "get_page_buffer_meta", None)):
            raise InvalidArgument(
                f"kvbucket HiCache storage: host pool {name!r} ({type(host_pool).__name__}) has no "
                "get_page_buffer_meta, so its pages cannot be moved zero-copy; use a page_first host "
                "memory layout (--hicache-mem-layout page_first) or another storage backend"
            )
        register_base(host_pool, host_pool_name)
        paths = self._adapter.paths
        mla = bool(getattr(self._adapter.storage_config, "is_mla_model", False))
        sharded = name == _MAMBA or (mla and name != _KV and hasattr(host_pool, "v_buffer"))
        self._pools[name] = HostPool(host_pool, _pool_tag(host_pool), sharded)
        if sharded and paths.state_dir is not None and self._state_store is None:
            self._state_store = open_store(paths.state_dir, self._adapter._options)

    def log_directories(self) -> None:
        """Log the registered pools and the directory each one's pages go to."""
        if self._pools:
            where = ", ".join(f"{name} -> {self._pool_dir(name)}" for name in self._pools)
            log.info("kvbucket HiCache host pools: %s", where)

    def _pool_dir(self, name: str) -> Path:
        """The directory holding pool ``name``'s pages."""
        paths = self._adapter.paths
        if self._pools[name].sharded and paths.state_dir is not None:
            return paths.state_dir
        return paths.store_dir

    def clear(self) -> None:
        """Remove every page of the state store."""
        if self._state_store is not None:
            self._state_store.remove_all()

    def close(self) -> None:
        """Close the state store."""
        if self._state_store is not None:
            self._state_store.close()
            self._state_store = None

    # ------------------------------------------------------------- the v2 calls

    def exists(self, keys: list[str], pool_transfers: list[Any] | None) -> Any:
        """The usable prefix of ``keys``, as SGLang's ``PoolTransferResult``
        (see ``KvBucketHiCacheStorage.batch_exists_v2``); its pages are leased."""
        keys = list(keys)
        logical = self._logical_anchor()
        kv = len(keys) if logical else _leading(self._pool_flags(_KV, keys))
        hits: dict[Any, int] = {self._engine.PoolName.KV: kv} if kv else {}
        stops = set(range(1, kv + 1))
        needed: list[tuple[str, int]] = [] if logical else [(_KV, 0)]
        for transfer in pool_transfers or ():
            name, policy = _name(transfer.name), _name(transfer.hit_policy)
            flags = self._pool_flags(name, keys)
            if policy == _BLOCK_GROUPS:
                covered = _block_group_pages(flags, int(transfer.block_pages), int(transfer.group_pages))
            else:
                window = max(1, len(transfer.keys or ())) if policy == _TRAILING_PAGES else 0
                pool_stops = _restorable(flags[:kv], policy, window)
                stops &= pool_stops
                covered = max(pool_stops, default=0)
                needed.append((name, window))
            if covered:
                hits[transfer.name] = covered
        final = max(stops, default=0)
        self._lease_pages(keys[:final], needed)
        return self._engine.PoolTransferResult(final, hits, sorted(stops))

    def store(self, transfers: list[Any]) -> dict[Any, list[bool]]:
        """Store each transfer's pages straight from its host pool; per pool,
        one result per key (see ``KvBucketHiCacheStorage.batch_set_v2``)."""
        results: dict[Any, list[bool]] = {}
        groups: dict[int, tuple[BucketStore, list[tuple[Any, list[str]]], list[str], list[list[memoryview]]]] = {}
        for transfer in transfers:
            name, keys = _name(transfer.name), list(transfer.keys or ())
            pages = self._transfer_pages(transfer, name, keys)
            store = self._writes_to(name)
            if pages is None:
                results[transfer.name] = [False] * len(keys)
            elif store is None:
                results[transfer.name] = self._pool_flags(name, keys)
            else:
                _, members, skeys, values = groups.setdefault(id(store), (store, [], [], []))
                members.append((transfer.name, pages[0]))
                skeys.extend(pages[0])
                values.extend(pages[1])
        for store, members, skeys, values in groups.values():
            stored = {k for k, ok in zip(skeys, self._adapter._write_pages(store, skeys, values)) if ok}
            for pool_name, names in members:
                results[pool_name] = [k in stored for k in names]
        return results

    def load(self, transfers: list[Any]) -> tuple[dict[Any, list[bool]], int, int]:
        """Read each transfer's pages straight into its host pool: per pool,
        one result per key; and the pages and bytes loaded."""
        results: dict[Any, list[bool]] = {}
        count, nbytes = 0, 0
        for transfer in transfers:
            name, keys = _name(transfer.name), list(transfer.keys or ())
            pages = self._transfer_pages(transfer, name, keys)
            if pages is None:
                results[transfer.name] = [False] * len(keys)
                continue
            dests = dict(zip(*pages))
            loaded = self._load_pages(name, dests)
            results[transfer.name] = [k in loaded for k in pages[0]]
            count += len(loaded)
            nbytes += sum(page_nbytes(dests[k]) for k in loaded)
        return results, count, nbytes

    # ------------------------------------------------------------------ helpers

    def _logical_anchor(self) -> bool:
        """Whether the anchor pool only hands out indices (its KV lives in v2 pools)."""
        pool = getattr(self._adapter, "mem_pool_host", None)
        return pool is not None and hasattr(pool, "kv_buffer") and pool.kv_buffer is None

    def _pool_keys(self, name: str, keys: Sequence[str]) -> list[str] | None:
        """Store keys of pool ``name``'s pages ``keys``; None for a pool never registered."""
        if name == _KV:
            return self._adapter._keys(keys)
        pool = self._pools.get(name)
        if pool is None:
            return None
        suffix = self._adapter.paths.tp_suffix if pool.sharded else self._adapter.paths.suffix
        return [f"{key}.{name}{suffix}{pool.tag}" for key in keys]

    def _writes_to(self, name: str) -> BucketStore | None:
        """The store that pool ``name``'s pages are written to (None: the MLA writer rank's)."""
        pool = self._pools.get(name)
        if pool is not None and pool.sharded and self._state_store is not None:
            return self._state_store
        return self._adapter._store

    def _reads_from(self, name: str) -> BucketStore | None:
        """The store that pool ``name``'s pages are read from (None: not there yet)."""
        pool = self._pools.get(name)
        if pool is not None and pool.sharded and self._state_store is not None:
            return self._state_store
        return self._adapter._read_store()

    def _pool_flags(self, name: str, keys: Sequence[str]) -> list[bool]:
        """For each page, whether pool ``name`` holds it (all False when it cannot be read)."""
        skeys = self._pool_keys(name, keys)
        if not skeys:
            return [False] * len(keys)
        try:
            store = self._reads_from(name)
            return [False] * len(keys) if store is None else list(store.batch_exists(skeys))
        except READ_ERRORS as exc:
            log.warning("kvbucket: existence check of %d %s pages failed: %s", len(keys), name, exc)
            return [False] * len(keys)

    def _lease_pages(self, keys: Sequence[str], needed: Sequence[tuple[str, int]]) -> None:
        """Lease the pages of prefix ``keys`` that each ``(pool, window)`` needs (window 0: all)."""
        if not keys:
            return
        for name, window in needed:
            skeys = self._pool_keys(name, keys[-window:] if window else keys)
            try:
                store = self._reads_from(name)
                if store is not None and skeys:
                    store.lease(skeys)
                    hint_loads(store, skeys, "kvbucket HiCache")
            except READ_ERRORS as exc:
                log.warning("kvbucket: leasing %d %s pages failed: %s", len(keys), name, exc)

    def _transfer_pages(self, transfer: Any, name: str, keys: list[str]) -> tuple[list[str], list[list[memoryview]]] | None:
        """A transfer's store keys and each page's host buffers; None if unusable (logged)."""
        pool = self._pools.get(name)
        host = pool.host if pool is not None else getattr(self._adapter, "mem_pool_host", None) if name == _KV else None
        if host is None or transfer.host_indices is None:
            if keys:
                log.error("kvbucket: v2 transfer of %d %s pages without a registered host pool or host indices", len(keys), name)
            return None
        page_size = self._adapter._page_size(host) if name == _KV else int(getattr(host, "page_size", 1) or 1)
        try:
            buffers = self._adapter._host_buffers(host, page_size, keys, transfer.host_indices)
        except (NotImplementedError, ValueError) as exc:  # what SGLang's pools raise for layouts without zero copy
            log.error("kvbucket: host pool %s gives no page buffers: %s", name, exc)
            return None
        skeys = self._pool_keys(name, keys)
        return None if buffers is None or skeys is None else (skeys, buffers)

    def _load_pages(self, name: str, dests: dict[str, list[memoryview]]) -> builtins.set[str]:
        """Load the stored ones of ``dests`` (store key -> the page's buffers) from pool ``name``'s store."""
        if not dests:
            return set()
        try:
            store = self._reads_from(name)
            if store is None:
                return set()
            present = [k for k, ok in zip(dests, store.batch_exists(list(dests))) if ok]
        except READ_ERRORS as exc:
            log.warning("kvbucket: lookup for a read of %d %s pages failed: %s", len(dests), name, exc)
            return set()
        return self._adapter._load_into(store, {k: dests[k] for k in present})


def page_nbytes(value: list[Any]) -> int:
    """Total bytes of a page given as a list of buffers or tensors."""
    total = 0
    for part in value:
        if hasattr(part, "nbytes"):
            total += int(part.nbytes)
        elif hasattr(part, "numel"):
            total += int(part.numel()) * int(part.element_size())
        else:
            total += memoryview(part).nbytes
    return total


_POOL_FORMAT = (
    "layout", "dtype", "page_size", "layer_num", "head_num", "head_dim", "kv_lora_rank", "qk_rope_head_dim",
    "num_mamba_layers", "temporal_dtype", "conv_dtype", "temporal_state_elem_size", "conv_state_shapes", "size_per_token",
)
"""Host-pool attributes that describe a v2 pool's page format (absent ones count as empty)."""


def _pool_tag(pool: Any) -> str:
    """``@`` + 8 hex digits naming a v2 pool's page format (its class and :data:`_POOL_FORMAT`)."""
    values = [getattr(pool, name, "") for name in _POOL_FORMAT]
    parts = [type(pool).__name__, *("" if callable(value) else str(value) for value in values)]
    return "@" + hashlib.blake2s("|".join(parts).encode(), digest_size=4).hexdigest()


def _name(value: Any) -> str:
    """A pool name or hit policy as its text (SGLang passes ``str`` enums)."""
    return str(getattr(value, "value", value))


def _leading(flags: Sequence[bool]) -> int:
    """How many of ``flags``, from the first, are True."""
    return next((i for i, ok in enumerate(flags) if not ok), len(flags))


def _restorable(flags: Sequence[bool], policy: str, window: int) -> builtins.set[int]:
    """The prefix lengths (pages) a pool holding the pages ``flags`` can restore under ``policy``.

    ``all_pages``: every page of the prefix; ``trailing_pages``: its last
    ``window`` pages. Any other policy restores nothing (and is logged).
    """
    if policy == _ALL_PAGES:
        return set(range(1, _leading(flags) + 1))
    if policy == _TRAILING_PAGES:
        return {end for end in range(1, len(flags) + 1) if all(flags[max(0, end - window) : end])}
    log.warning("kvbucket: unknown pool hit policy %r; the pool restores nothing", policy)
    return set()


def _block_group_pages(flags: Sequence[bool], block_pages: int, group_pages: int) -> int:
    """Pages covered by the leading complete key groups of a ``block_groups`` pool.

    Block ``b`` is pages ``[b * block_pages, (b + 1) * block_pages)`` from the
    span start; its group is the first ``group_pages`` keys of the block. A
    block counts when it lies wholly in the span and its group is stored; the
    first block that does not ends the count. Geometry outside
    ``0 < group_pages <= block_pages`` covers nothing (and is logged).
    """
    if not 0 < group_pages <= block_pages:
        log.warning("kvbucket: block_groups pool with block_pages=%d, group_pages=%d covers nothing", block_pages, group_pages)
        return 0
    covered = 0
    for start in range(0, len(flags) - block_pages + 1, block_pages):
        if not all(flags[start : start + group_pages]):
            break
        covered = start + block_pages
    return covered
