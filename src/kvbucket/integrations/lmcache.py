"""kvbucket as an LMCache L2 adapter (the LMCache multiprocess server's disk tier).

Turn it on with::

    lmcache server ... --l2-adapter '{"type": "plugin",
        "module_path": "kvbucket.integrations.lmcache",
        "class_name": "KvBucketL2Adapter",
        "adapter_params": {"storage_path": "/nvme/lmcache-kv",
                           "max_size_gb": 500, "eviction_policy": "lru"}}'

LMCache's plugin loader finds :class:`KvBucketL2AdapterConfig` by name
(``class_name + "Config"``) and calls ``KvBucketL2Adapter(config)``; a raw
``adapter_params`` dict works as well.

What it does, in LMCache's terms:

* **store** tasks are staged on an :class:`~kvbucket.OffloadQueue` (zero
  copy: LMCache keeps the objects until the task completes), whose writer
  commits each task's objects into buckets of their own; the store event fd
  fires once a task is durable.
* **lookup-and-lock** tasks run on a small pool, **load** tasks on the
  store's asynchronous load queue (straight into LMCache's buffers); their
  results are one-shot bitmaps, signalled on their own event fds. A lock
  keeps a key from LMCache-driven :meth:`~KvBucketL2Adapter.delete` until
  unlocked, and leases it in kvbucket (``lookup_lease_s``): kvbucket's own
  eviction (foreground or background) skips its bucket until the key is
  loaded, unlocked or the lease ends. A load after that may still miss
  (loads may fail by contract).
* **usage**: every object on disk is counted, also after a restart; the
  object index is rebuilt from the store at start-up, seeds the byte
  accounting of ``get_usage()`` and is replayed to each registered listener
  (LMCache's L2 eviction policy), so nothing on disk is invisible to it.

The module imports without LMCache: the adapter subclasses the real
``L2AdapterInterface`` when LMCache is importable (the plugin loader checks
that), else kvbucket's stand-in (:mod:`~kvbucket.integrations._standins`).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..config import Setting
from ..errors import InvalidArgument, KvBucketError, StoreClosed
from ..pipeline import OffloadQueue
from . import _standins
from ._common import (
    METRICS_KEYS,
    AllDone,
    hint_loads,
    import_engine,
    loaded_keys,
    metrics_endpoint,
    open_store,
    option,
    shut_down,
    start_metrics,
    store_options,
)

__all__ = ["KvBucketL2Adapter", "KvBucketL2AdapterConfig", "encode_key", "decode_key"]

log = logging.getLogger(__name__)

_lmcache = (
    import_engine(
        {
            "Bitmap": "lmcache.lmcache_native:Bitmap",
            "ObjectKey": "lmcache.v1.distributed.api:ObjectKey",
            "L2StoreResult": "lmcache.v1.distributed.internal_api:L2StoreResult",
            "L2AdapterInterface": "lmcache.v1.distributed.l2_adapters.base:L2AdapterInterface",
            "L2AdapterConfigBase": "lmcache.v1.distributed.l2_adapters.config:L2AdapterConfigBase",
        }
    )
    or _standins.LMCACHE
)
_listing = (  # key listing arrived after lmcache 0.5.6
    import_engine({name: f"lmcache.v1.distributed.api:{name}" for name in ("EncodedObjectKey", "KeyEntry", "KeyListPage")})
    or _standins.LMCACHE_LISTING
)
Bitmap, ObjectKey, L2StoreResult = _lmcache.Bitmap, _lmcache.ObjectKey, _lmcache.L2StoreResult
_AdapterBase: Any = _lmcache.L2AdapterInterface  # LMCache's plugin loader checks issubclass against its own
_ConfigBase: Any = _lmcache.L2AdapterConfigBase

ROOT_ENV = "KVBUCKET_PATH"
ADAPTER_KEYS = frozenset({"storage_path", "base_path", "max_size_gb", "num_io_threads"}) | METRICS_KEYS
"""``adapter_params`` keys of this adapter beside the BucketConfig fields."""
_SOURCE = "kvbucket L2 adapter_params"
_GIB = 1 << 30
_SEP = "@"
_ERRORS = (KvBucketError, OSError, ValueError)
_UNBOUNDED = sys.maxsize  # staged objects are LMCache's own memory, referenced: the queue refuses no task


# ----------------------------------------------------------------------- keys


def encode_key(key: Any) -> str:
    """The kvbucket key of an LMCache ``ObjectKey`` (reversible, see :func:`decode_key`).

    ``<model>@0x<kv_rank, 8 hex>@<object_group_id hex>@<chunk_hash hex>[@<cache_salt>]``
    -- LMCache guarantees that neither the model name nor the salt holds ``@``.
    """
    text = f"{key.model_name}{_SEP}{key.kv_rank:#010x}{_SEP}{key.object_group_id:x}{_SEP}{key.chunk_hash.hex()}"
    return f"{text}{_SEP}{key.cache_salt}" if key.cache_salt else text


def decode_key(text: str) -> Any | None:
    """The ``ObjectKey`` of a kvbucket key written by :func:`encode_key`, or None."""
    parts = text.split(_SEP)
    if len(parts) not in (4, 5):
        return None
    try:
        return ObjectKey(
            chunk_hash=bytes.fromhex(parts[3]),
            model_name=parts[0],
            kv_rank=int(parts[1], 16),
            object_group_id=int(parts[2], 16),
            cache_salt=parts[4] if len(parts) == 5 else "",
        )
    except ValueError:
        return None


# --------------------------------------------------------------------- config


class KvBucketL2AdapterConfig(_ConfigBase):
    """``adapter_params`` of the kvbucket L2 adapter.

    * ``storage_path`` (or ``base_path``, as the ``fs`` adapter names it; else
      ``$KVBUCKET_PATH``): the store directory of this server instance. One
      directory has one writer: give each LMCache server its own.
    * ``max_size_gb``: capacity in GiB (float), kvbucket's ``max_total_size``;
      it is also the capacity LMCache's eviction controller sees.
    * any :class:`~kvbucket.BucketConfig` field: ``max_total_size``,
      ``max_physical_bytes``, ``total_keys_limit``, ``eviction_policy``
      (``lru``/``fifo``/``none``), ``durability``, ``bucket_size_limit``, ...
    * ``num_io_threads`` (default 4): threads for lookup-and-lock tasks
      (loads run on the store's ``io_threads`` load threads).
    * ``metrics_port`` (default: off; 0: any free port) and ``metrics_addr``
      (default ``127.0.0.1``): serve the store's Prometheus metrics at
      ``http://metrics_addr:metrics_port/metrics``.
    """

    def __init__(
        self,
        storage_path: str,
        store: Mapping[str, Any] | None = None,
        num_io_threads: int = 4,
        metrics: tuple[int, str] | None = None,
    ) -> None:
        self.storage_path = storage_path
        self.store = dict(store or {})
        self.num_io_threads = num_io_threads
        self.metrics = metrics
        """``(port, addr)`` of the metrics endpoint, None when off."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KvBucketL2AdapterConfig:
        """Parse ``adapter_params``; raises ``InvalidArgument`` (a ``ValueError``) on an
        unknown key or a bad value (values are parsed as ``KVBUCKET_*`` variables are)."""
        path = d.get("storage_path") or d.get("base_path") or os.environ.get(ROOT_ENV)
        if not isinstance(path, str) or not path:
            raise InvalidArgument(f'kvbucket L2 adapter needs "storage_path" in adapter_params or ${ROOT_ENV}')
        options = store_options(d, _SOURCE, own=ADAPTER_KEYS)
        size_gb = option(d, "max_size_gb", Setting("number"), None, _SOURCE)
        if size_gb is not None:
            options.setdefault("max_total_size", int(size_gb * _GIB))
        threads = option(d, "num_io_threads", Setting("count", minimum=1), 4, _SOURCE)
        return cls(os.path.expanduser(path), options, threads, metrics_endpoint(d, _SOURCE))

    @classmethod
    def help(cls) -> str:
        """What ``adapter_params`` accepts."""
        return (
            "kvbucket L2 adapter fields:\n"
            "- storage_path (str): store directory, one per server instance (or $KVBUCKET_PATH)\n"
            "- max_size_gb (float): capacity in GiB (kvbucket max_total_size)\n"
            "- max_total_size / max_physical_bytes / total_keys_limit: sizes as 1048576 or '200G'\n"
            "- eviction_policy (2q|lru|fifo|none), durability (strict|relaxed), bucket_size_limit, ...\n"
            "- num_io_threads (int): threads for lookups (default 4); loads use io_threads (default 8)\n"
            "- metrics_port (int), metrics_addr (str): serve Prometheus metrics (default off, 127.0.0.1)"
        )

    @property
    def capacity_bytes(self) -> int:
        """The capacity reported to LMCache (0: unknown, no global eviction)."""
        return int(self.store.get("max_total_size") or self.store.get("max_physical_bytes") or 0)


# ----------------------------------------------------------------- adapter


class _EventFd:
    """A non-blocking Linux eventfd (a pipe elsewhere) that the caller polls."""

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self._read = self._write = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - non-Linux
            self._read, self._write = os.pipe()
            os.set_blocking(self._read, False)
            os.set_blocking(self._write, False)

    def fileno(self) -> int:
        return self._read

    def notify(self) -> None:
        try:
            if hasattr(os, "eventfd_write") and self._read == self._write:
                os.eventfd_write(self._write, 1)
            else:  # pragma: no cover
                os.write(self._write, b"\x01")
        except (BlockingIOError, OSError):
            pass  # already signalled (or closed during shutdown)

    def close(self) -> None:
        for fd in {self._read, self._write}:
            with contextlib.suppress(OSError):
                os.close(fd)


class KvBucketL2Adapter(_AdapterBase):
    """LMCache ``L2AdapterInterface`` over a crash-safe kvbucket store."""

    config_class_name = "KvBucketL2AdapterConfig"

    def __init__(self, config: KvBucketL2AdapterConfig | Mapping[str, Any], l1_memory_desc: Any = None, **_: Any) -> None:
        cfg = config if isinstance(config, KvBucketL2AdapterConfig) else KvBucketL2AdapterConfig.from_dict(dict(config))
        super().__init__(max_capacity_bytes=cfg.capacity_bytes)
        self._config = cfg
        self._store = open_store(cfg.storage_path, cfg.store)
        self._queue = OffloadQueue(self._store, max_staged_bytes=_UNBOUNDED, backpressure="reject")
        self.metrics_server = start_metrics(cfg.metrics, self._store, self._queue)
        self._lock = threading.Lock()
        # Guarded by self._lock: each key is in at most one of _objects (stored)
        # and _staging (staged by the task that owns its bytes).
        self._objects: dict[str, tuple[Any, int]] = {}
        self._staging: set[str] = set()
        self._locks: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._pending_stores = 0
        self._done_stores: dict[int, Any] = {}
        self._done_lookups: dict[int, Any] = {}
        self._done_loads: dict[int, Any] = {}
        self._closed = False
        self._store.add_eviction_listener(self._on_evicted)  # background evictions too
        self._restore()
        self._store_fd, self._lookup_fd, self._load_fd = _EventFd(), _EventFd(), _EventFd()
        self._readers = ThreadPoolExecutor(cfg.num_io_threads, thread_name_prefix="kvbucket-l2-io")
        log.info("kvbucket L2 adapter at %s: %d objects, %d bytes", cfg.storage_path, len(self._objects), self.get_usage().total_bytes_used)

    def _restore(self) -> None:
        """Index what the store already holds and seed the byte accounting."""
        found: dict[str, tuple[Any, int]] = {}
        for batch in self._store.scan_meta():
            for text, meta in batch:
                key = decode_key(text)
                if key is None:
                    log.warning("kvbucket L2: ignoring key %r, not written by this adapter", text)
                    continue
                found[text] = (key, meta.size)
        # An eviction listener runs after its keys left the store's index and
        # takes self._lock: a key still stored here is forgotten after this.
        with self._lock:
            texts = list(found)
            for text, stored in zip(texts, self._store.batch_exists(texts) if texts else ()):
                if stored:
                    self._objects[text] = found[text]
            keys = [key for key, _ in self._objects.values()]
            sizes = [size for _, size in self._objects.values()]
        if keys:
            self._notify_keys_stored(keys, sizes)

    # ------------------------------------------------------------ event fds

    def get_store_event_fd(self) -> int:
        """Fires when store tasks complete."""
        return self._store_fd.fileno()

    def get_lookup_and_lock_event_fd(self) -> int:
        """Fires when lookup-and-lock tasks complete."""
        return self._lookup_fd.fileno()

    def get_load_event_fd(self) -> int:
        """Fires when load tasks complete."""
        return self._load_fd.fileno()

    # ----------------------------------------------------------------- store

    def submit_store_task(self, keys: list[Any], objects: list[Any]) -> int:
        """Stage ``objects`` (caller-owned until the task completes) for storing.

        Objects already stored are skipped (0 bytes); one another task is
        storing joins that write (its bytes count for that task). The task
        succeeds when every one of its objects is durable.
        """
        if len(keys) != len(objects):
            raise InvalidArgument(f"store task has {len(keys)} keys but {len(objects)} objects")
        task_id = self._next_id()
        views, owned, valid = self._claim(keys, objects)
        with self._lock:
            self._pending_stores += 1
        try:
            futures = self._queue.put_batch(views) if views else {}
        except KvBucketError as exc:  # the queue is closing
            log.warning("kvbucket L2: store task %d not accepted: %s", task_id, exc)
            self._store_done(task_id, owned, False, set(owned))
            return task_id
        AllDone(futures, lambda failed: self._store_done(task_id, owned, valid, failed))
        return task_id

    def pop_completed_store_tasks(self) -> dict[int, Any]:
        """All store results since the last call: ``{task_id: L2StoreResult}``."""
        with self._lock:
            done, self._done_stores = self._done_stores, {}
        return done

    def _claim(self, keys: list[Any], objects: list[Any]) -> tuple[dict[str, memoryview], dict[str, tuple[Any, int]], bool]:
        """``(views to stage, objects this task owns, whether every key was usable)``.

        A task owns the keys it is the first to stage: their bytes count for
        it, and it records them as stored. Keys already stored are left out.
        """
        views: dict[str, memoryview] = {}
        owned: dict[str, tuple[Any, int]] = {}
        valid = True
        with self._lock:
            for key, obj in zip(keys, objects):
                try:
                    text = encode_key(key)
                    if text in views or text in self._objects:
                        continue
                    views[text] = _byte_view(obj)
                except (AttributeError, TypeError, ValueError) as exc:
                    log.warning("kvbucket L2: cannot store key %r: %s", key, exc)
                    valid = False
                    continue
                if text not in self._staging:
                    self._staging.add(text)
                    owned[text] = (key, views[text].nbytes)
        return views, owned, valid

    def _store_done(self, task_id: int, owned: dict[str, tuple[Any, int]], valid: bool, failed: set[str]) -> None:
        """Record the owned objects now stored and the task's result; fire the store fd."""
        stored = [(key, text, size) for text, (key, size) in owned.items() if text not in failed]
        ok = valid and not failed
        try:
            self._stored(owned, stored)
        except Exception:  # a listener failed: the task still completes, as failed
            log.exception("kvbucket L2: recording store task %d failed", task_id)
            ok = False
        with self._lock:
            self._pending_stores -= 1
            self._done_stores[task_id] = L2StoreResult(ok, sum(size for _, _, size in stored))
        self._store_fd.notify()

    def _stored(self, owned: Iterable[str], stored: list[tuple[Any, str, int]]) -> None:
        """Unstage ``owned``; index and announce the ``(key, text, size)`` now stored."""
        with self._lock:
            self._staging.difference_update(owned)
            for key, text, size in stored:
                self._objects[text] = (key, size)
        if stored:
            self._notify_keys_stored([e[0] for e in stored], [e[2] for e in stored])

    def _on_evicted(self, texts: list[str]) -> None:
        """kvbucket evicted these keys' buckets (to make room, or in the background): account for them."""
        self._forget(texts)

    def _forget(self, texts: Iterable[str]) -> None:
        gone = []
        with self._lock:
            for text in texts:
                entry = self._objects.pop(text, None)
                if entry is not None:
                    gone.append(entry)
        if gone:
            self._notify_keys_deleted([k for k, _ in gone], [n for _, n in gone])

    # -------------------------------------------------------- lookup & lock

    def submit_lookup_and_lock_task(self, keys: list[Any], group_layout_descs: Any = None) -> int:
        """Look ``keys`` up and lock the hits against LMCache-driven deletes."""
        task_id = self._next_id()
        self._submit(task_id, len(keys), self._done_lookups, self._lookup_fd, self._lookup, list(keys))
        return task_id

    def _lookup(self, keys: list[Any]) -> Any:
        bitmap = Bitmap(len(keys))
        texts = [encode_key(k) for k in keys]
        flags = self._store.lookup(texts)  # hits are leased against kvbucket's own eviction too
        hint_loads(self._store, [text for text, hit in zip(texts, flags) if hit], "kvbucket L2")
        with self._lock:
            for i, (text, hit) in enumerate(zip(texts, flags)):
                if hit:
                    bitmap.set(i)
                    self._locks[text] += 1
        return bitmap

    def query_lookup_and_lock_result(self, task_id: int) -> Any | None:
        """The task's hit bitmap once, then None."""
        with self._lock:
            return self._done_lookups.pop(task_id, None)

    def submit_unlock(self, keys: list[Any]) -> None:
        """Release one lock per key (never fails); a key's last lock ends its lease."""
        unlocked = []
        with self._lock:
            for key in keys:
                try:
                    text = encode_key(key)
                except (AttributeError, TypeError, ValueError):
                    continue
                if self._locks[text] <= 1:
                    self._locks.pop(text, None)
                    unlocked.append(text)
                else:
                    self._locks[text] -= 1
        if unlocked:
            try:
                self._store.release(unlocked)
            except _ERRORS as exc:
                log.warning("kvbucket L2: releasing the leases of %d keys failed: %s", len(unlocked), exc)

    # ------------------------------------------------------------------ load

    def submit_load_task(self, keys: list[Any], objects: list[Any]) -> int:
        """Start reading ``keys`` into the caller's ``objects`` (one bitmap bit per key).

        The store's load queue reads them (:meth:`BucketStore.submit_load`);
        the load event fd fires once every key has loaded or failed.
        """
        if len(keys) != len(objects):
            raise InvalidArgument(f"load task has {len(keys)} keys but {len(objects)} objects")
        task_id = self._next_id()
        keys = list(keys)
        dests, positions = _load_destinations(keys, objects)
        if not dests:
            self._load_done(task_id, keys, set())
            return task_id
        try:
            handle = self._store.submit_load(dests)
        except _ERRORS as exc:
            log.warning("kvbucket L2: load task %d not started: %s", task_id, exc)
            self._load_done(task_id, keys, set())
            return task_id
        handle.add_done_callback(lambda done: self._load_done(task_id, keys, {positions[t] for t in loaded_keys(done, "kvbucket L2")}))
        return task_id

    def _load_done(self, task_id: int, keys: list[Any], loaded: set[int]) -> None:
        """Record the load task's bitmap (the positions ``loaded``); fire the load fd."""
        bitmap = Bitmap(len(keys))
        for i in loaded:
            bitmap.set(i)
        if loaded:
            try:
                self._notify_keys_accessed([keys[i] for i in sorted(loaded)])
            except Exception:  # a listener failed: the keys are loaded all the same
                log.exception("kvbucket L2: telling the listeners of load task %d failed", task_id)
        with self._lock:
            self._done_loads[task_id] = bitmap
        self._load_fd.notify()

    def query_load_result(self, task_id: int) -> Any | None:
        """The task's loaded bitmap once, then None."""
        with self._lock:
            return self._done_loads.pop(task_id, None)

    # ------------------------------------------------------------ management

    def delete(self, keys: list[Any]) -> None:
        """Remove ``keys`` (LMCache eviction); locked keys are kept."""
        with self._lock:
            texts = [t for t in (encode_key(k) for k in keys) if t in self._objects and not self._locks.get(t)]
        if not texts:
            return
        try:
            removed = self._store.batch_remove(texts)
        except _ERRORS as exc:
            log.warning("kvbucket L2: deleting %d keys failed: %s", len(texts), exc)
            return
        self._forget(t for t, ok in zip(texts, removed) if ok)

    def list_l2_keys(self, model_name: str | None = None, page_size: int = 500, cursor: str | None = None) -> Any:
        """One page of the keys this adapter holds, as a ``KeyListPage``.

        Keys come in the order of their kvbucket encoding; ``cursor`` is the
        ``next_page_token`` of the previous page (the last key it listed), so
        keys stored or deleted between pages neither shift nor repeat the
        others. ``model_name`` keeps only that model's keys. Raises
        :class:`InvalidArgument` (a ``ValueError``) for a ``page_size`` below
        1 or a ``cursor`` that is not a page token. Each page costs one pass
        over the adapter's key index (no disk I/O).
        """
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise InvalidArgument(f"list_l2_keys: page_size must be a positive integer; got {page_size!r}")
        if cursor is not None and (not isinstance(cursor, str) or decode_key(cursor) is None):
            raise InvalidArgument(f"list_l2_keys: cursor {cursor!r} is not a page token of this adapter; pass None to start over")
        with self._lock:
            listed = heapq.nsmallest(
                page_size + 1,
                (
                    (text, key, size)
                    for text, (key, size) in self._objects.items()
                    if (cursor is None or text > cursor) and (model_name is None or key.model_name == model_name)
                ),
                key=lambda item: item[0],
            )
        page = listed[:page_size]
        token = page[-1][0] if len(listed) > page_size else None
        entries = tuple(_listing.KeyEntry(key=_encoded(key), size_bytes=size) for _, key, size in page)
        return _listing.KeyListPage(entries=entries, next_page_token=token)

    def report_status(self) -> dict[str, Any]:
        """Health and store statistics."""
        status: dict[str, Any] = {"is_healthy": not self._closed and not self._queue.closed, "type": type(self).__name__}
        try:
            stats = self._store.stats()
            status.update(keys=stats.keys, buckets=stats.buckets, logical_bytes=stats.logical_bytes, physical_bytes=stats.physical_bytes)
        except _ERRORS as exc:
            status.update(is_healthy=False, error=str(exc))
        with self._lock:
            status.update(locked_keys=len(self._locks), pending_store_tasks=self._pending_stores)
        return status

    def register_listener(self, listener: Any) -> None:
        """Register ``listener`` and tell it about every object already stored."""
        super().register_listener(listener)
        with self._lock:
            entries = list(self._objects.values())
        if entries:
            listener.on_l2_keys_stored([k for k, _ in entries], [n for _, n in entries])

    def close(self) -> None:
        """Finish staged stores, stop the threads, close the store and the event fds."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # Every staged store task completes (its result recorded) before the store closes.
        shut_down(self._store, queue=self._queue, pool=self._readers, metrics_server=self.metrics_server)
        for fd in (self._store_fd, self._lookup_fd, self._load_fd):
            fd.close()

    # --------------------------------------------------------------- helpers

    def _next_id(self) -> int:
        if self._closed:
            raise StoreClosed(f"kvbucket L2 adapter at {self._config.storage_path!r} is closed")
        return next(self._ids)

    def _submit(self, task_id: int, count: int, results: dict[int, Any], fd: _EventFd, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args) -> Bitmap`` on the reader pool; a failure records an empty bitmap."""

        def run() -> None:
            try:
                bitmap = fn(*args)
            except Exception as exc:  # noqa: BLE001 - the task must complete, as a miss
                log.warning("kvbucket L2: task %d (%s) failed: %s", task_id, fn.__name__.strip("_"), exc)
                bitmap = Bitmap(count)
            with self._lock:
                results[task_id] = bitmap
            fd.notify()

        self._readers.submit(run)


def _load_destinations(keys: list[Any], objects: list[Any]) -> tuple[dict[str, memoryview], dict[str, int]]:
    """``({kvbucket key: buffer}, {kvbucket key: its position})`` of a load
    task; a key that cannot be encoded, or repeats, is left out (not loaded)."""
    dests: dict[str, memoryview] = {}
    positions: dict[str, int] = {}
    for i, (key, obj) in enumerate(zip(keys, objects)):
        try:
            text = encode_key(key)
            if text in dests:
                continue
            dests[text] = _byte_view(obj)
        except (AttributeError, TypeError, ValueError) as exc:
            log.warning("kvbucket L2: cannot load key %r: %s", key, exc)
            continue
        positions[text] = i
    return dests, positions


def _encoded(key: Any) -> Any:
    """LMCache's JSON-safe ``EncodedObjectKey`` of an ``ObjectKey``."""
    return _listing.EncodedObjectKey(
        chunk_hash_hex=key.chunk_hash.hex(),
        model_name=key.model_name,
        kv_rank=key.kv_rank,
        object_group_id=key.object_group_id,
        cache_salt=key.cache_salt,
    )


def _byte_view(obj: Any) -> memoryview:
    """The bytes of an LMCache ``MemoryObj`` (its logical size) as a flat view."""
    view = memoryview(obj.byte_array)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")

