"""kvbucket as a secondary (disk) tier of vLLM's ``TieringOffloadingSpec``.

Turn it on with::

    --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"spec_name": "TieringOffloadingSpec",
        "cpu_bytes_to_use": 10737418240,
        "secondary_tiers": [{"type": "kvbucket", "module_path": "kvbucket.integrations.vllm",
                             "root_dir": "/nvme/kv", "max_physical_bytes": "200G"}]}}'

vLLM resolves ``type`` as an attribute of ``module_path``, so this module
exports the class under both ``kvbucket`` and ``KvBucketTierManager``.

The tier moves *chunks* (rows of the primary tier's pinned CPU memory, a
``memoryview`` whose ``strides[0]`` is the chunk size) between that memory and
a :class:`~kvbucket.BucketStore`. Every tier method returns at once; stores
go through an :class:`~kvbucket.pipeline.OffloadQueue` (zero copy: vLLM pins
the chunk's primary slot until the job is reported finished, so the queue
references it instead of copying), loads through the store's asynchronous
load queue (:meth:`~kvbucket.BucketStore.submit_load`, straight into the
primary slots), and results are handed back by :meth:`get_finished_jobs`.

One store directory per rank, ``<root_dir>/<model>_<digest>_r<rank>``: a
directory has one writer, and the digest separates models, dtypes, parallel
layouts and chunk sizes that must not share pages. Objects survive a restart:
a new tier on the same ``root_dir`` and rank finds everything committed before.

With ``"enable_kv_events": true`` (and vLLM's KV cache events on), the tier
publishes vLLM ``OffloadingEvent`` s through :meth:`take_events`, as vLLM's
file-system tier does: blocks stored (once durable) and removed (evicted),
tagged ``Medium.STORAGE`` and ``Locality.LOCAL``, so a KV-aware router knows
which blocks this node's disk holds.

The module imports without vLLM: the class subclasses vLLM's
``SecondaryTierManager`` when vLLM is importable, else kvbucket's stand-in
(:mod:`~kvbucket.integrations._standins`), which has no storage medium, no
vLLM metrics and no KV events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

from .._core.buffers import Buffer, byte_view
from .._core.interfaces import EvictionListener, OffloadTarget
from ..config import Setting
from ..errors import InvalidArgument, KvBucketError
from ..pipeline import OffloadQueue
from . import _standins
from ._common import (
    AllDone,
    hint_loads,
    import_engine,
    load_each,
    loaded_keys,
    metrics_endpoint,
    open_store,
    option,
    safe_component,
    shut_down,
    start_metrics,
    store_options,
)

if TYPE_CHECKING:
    from ..config import BucketConfig
    from ..store import BucketStore, StoreStats

__all__ = ["KvBucketTierManager", "kvbucket", "TIER_OPTIONS"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

STATS_INTERVAL_S = 5.0
"""Most seconds between two refreshes of the usage gauges :meth:`get_stats` reports."""

_VLLM_COUNTERS: dict[str, tuple[str, Callable[[Any], int]]] = {
    "vllm:kvbucket_read_bytes": ("Bytes the kvbucket tier read from disk", lambda c: c.read_bytes),
    "vllm:kvbucket_written_bytes": ("Bytes the kvbucket tier committed to disk", lambda c: c.written_bytes),
    "vllm:kvbucket_read_chunks": ("Chunks the kvbucket tier read from disk", lambda c: c.read_objects),
    "vllm:kvbucket_written_chunks": ("Chunks the kvbucket tier committed to disk", lambda c: c.written_objects),
    "vllm:kvbucket_checksum_failures": ("Chunks whose bytes failed their checksum", lambda c: c.checksum_failures),
}
"""vLLM counter name -> (documentation, its running total in a :class:`~kvbucket._core.counters.CounterSnapshot`)."""

_VLLM_GAUGES: dict[str, tuple[str, Callable[[Any], int]]] = {
    "vllm:kvbucket_logical_bytes": ("Value bytes the kvbucket tier holds", lambda s: s.logical_bytes),
    "vllm:kvbucket_physical_bytes": ("Allocated bytes of the kvbucket tier's directory", lambda s: s.physical_bytes),
    "vllm:kvbucket_chunks": ("Chunks the kvbucket tier holds", lambda s: s.keys),
    "vllm:kvbucket_max_physical_bytes": ("The tier's max_physical_bytes (0: unlimited)", lambda s: s.max_physical_bytes),
    "vllm:kvbucket_max_logical_bytes": ("The tier's max_total_size (0: unlimited)", lambda s: s.max_total_size),
    "vllm:kvbucket_usage_ratio": ("Highest usage relative to its limit", lambda s: s.usage_ratio),
    "vllm:kvbucket_evicted_chunks": ("Chunks evicted since the tier opened", lambda s: s.evicted_keys),
}
"""vLLM gauge name -> (documentation, its value in a :class:`~kvbucket.StoreStats`)."""

TIER_DEFAULTS: dict[str, Any] = {
    "eviction_policy": "2q",  # vLLM's fs tier never evicts; a bounded disk needs a policy
    "group_max_delay_s": 0.05,  # a store job holds primary slots pinned until its bucket is written
}
"""Store settings whose default differs for vLLM (``KVBUCKET_*`` and the tier config override them)."""

TIER_OPTIONS: dict[str, str] = {
    "n_write_threads": "threads writing buckets (default 2)",
    "n_read_threads": "threads reading load jobs: sets the store's io_threads (default: io_threads, 8)",
    "max_staged_bytes": "most bytes of store jobs in flight (default: the whole primary view)",
    "rank": "overrides the rank taken from the offloading spec",
    "max_size": "alias of max_physical_bytes (bytes or '200G')",
    "name": "vLLM's tier name (metrics); accepted and ignored",
    "locality": "LOCAL or REMOTE: where the tier's storage is, as KV events tag it (default LOCAL)",
    "enable_kv_events": "publish KV events of blocks stored and removed (default false; needs vLLM's KV cache events on)",
    "max_kv_event_keys": "most block keys of KV events held until vLLM takes them; the oldest are dropped (default 100000)",
    "metrics_port": "serve Prometheus metrics on metrics_port + rank (0: any free port; default off)",
    "metrics_addr": "the metrics endpoint's address (default 127.0.0.1)",
}
"""Tier config keys beside ``type``, ``module_path``, ``root_dir`` and the BucketConfig fields."""

_ALIASES = {"max_size": "max_physical_bytes"}
_LOCALITIES = ("LOCAL", "REMOTE")
_EVENT_FIELDS = frozenset({"keys", "medium", "removed"})
"""The ``OffloadingEvent`` fields the tier fills (``locality`` too, where the event has it)."""
_EVENTS_DROPPED = "vllm:kvbucket_kv_event_keys_dropped"
_SOURCE = "kvbucket vLLM tier config"
_THREADS = Setting("count", minimum=1)


# -- the vLLM names, real or stand-in -------------------------------------------
_VLLM_NAMES: dict[str, str | tuple[str, ...]] = {
    "SecondaryTierManager": "vllm.v1.kv_offload.tiering.base:SecondaryTierManager",
    "JobResult": "vllm.v1.kv_offload.tiering.base:JobResult",
    "LookupResult": "vllm.v1.kv_offload.base:LookupResult",
    "RequestOffloadingContext": (
        "vllm.v1.kv_offload.tiering.base:RequestOffloadingContext",
        "vllm.v1.kv_offload.base:RequestOffloadingContext",
    ),
}
"""The vLLM names the tier needs (all from vLLM, or all stand-ins)."""

_VLLM_OPTIONAL: dict[str, str] = {
    "Medium": "vllm.v1.kv_offload.base:Medium",
    "Locality": "vllm.v1.kv_offload.base:Locality",
    "OffloadingEvent": "vllm.v1.kv_offload.base:OffloadingEvent",
    "CounterMetadata": "vllm.v1.kv_offload.base:OffloadingCounterMetadata",
    "GaugeMetadata": "vllm.v1.kv_offload.base:OffloadingGaugeMetadata",
    "Stats": "vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics:OffloadingConnectorStats",
}
"""vLLM names only some versions have (None where missing); without the
metric ones the tier reports no vLLM metrics, without ``OffloadingEvent`` no KV events."""

_NOT_IMPORTABLE = (Exception,)  # ImportError, or vLLM failing to import on this host


def _load_vllm() -> SimpleNamespace:
    """vLLM's tiering names when vLLM is importable, else kvbucket's stand-ins."""
    vllm = import_engine(_VLLM_NAMES, catch=_NOT_IMPORTABLE)
    if vllm is None:
        return _standins.VLLM
    for name, path in _VLLM_OPTIONAL.items():
        found = import_engine({name: path}, catch=_NOT_IMPORTABLE)
        setattr(vllm, name, None if found is None else getattr(found, name))
    if not (hasattr(vllm.Stats, "increase_counter") and hasattr(vllm.Stats, "set_gauge")):
        vllm.Stats = None  # an older vLLM, without flat offloading metrics
    return vllm


_vllm = _load_vllm()
_Base: Any = _vllm.SecondaryTierManager  # vLLM's tier factory checks issubclass against its own


# -- per-job bookkeeping ---------------------------------------------------------
class _Jobs:
    """Jobs in flight and finished results; safe across the scheduler and I/O threads.

    Invariant: every job passed to :meth:`begin` is reported exactly once by
    :meth:`take_finished`, and :meth:`wait_idle` returns only when none is in flight.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_flight = 0
        self._finished: deque[Any] = deque()

    def begin(self) -> None:
        with self._cond:
            self._in_flight += 1

    def end(self, result: Any) -> None:
        with self._cond:
            self._finished.append(result)
            self._in_flight -= 1
            self._cond.notify_all()

    def take_finished(self) -> list[Any]:
        with self._cond:
            results = list(self._finished)
            self._finished.clear()
        return results

    def busy(self) -> bool:
        with self._cond:
            return self._in_flight > 0

    def wait_idle(self) -> None:
        with self._cond:
            while self._in_flight:
                self._cond.wait()


# -- KV events ------------------------------------------------------------------------
class _KvEvents:
    """vLLM ``OffloadingEvent`` s of blocks stored and removed, held until vLLM takes them.

    Invariants: events are held in the order the store committed and evicted
    their blocks (both are recorded on the thread doing it, holding the
    store's writer lock); at most ``max_keys`` keys are held, the newest
    event always among them: the oldest events are dropped first, and their
    keys counted in :attr:`dropped_keys`. Safe across threads.
    """

    def __init__(self, make_event: Callable[[list[bytes], bool], Any], max_keys: int) -> None:
        self._make_event = make_event
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._events: deque[tuple[Any, int]] = deque()  # (event, its number of keys)
        self._keys = 0  # keys of the events held
        self._dropping = False  # dropped since the last take (warned once per such run)
        self.dropped_keys = 0
        """Keys of the events dropped because vLLM did not take them in time."""

    def stored(self, names: list[str], metas: Sequence[object]) -> None:
        """Record the store keys of a committed bucket (``batch_offload``'s
        ``on_complete``; the objects' ``metas`` are not needed).

        Never raises: an exception here would roll back a durable bucket.
        """
        try:
            self._add(names, removed=False)
        except Exception:  # a lost event must not undo a write
            log.exception("kvbucket tier: recording a KV event of %d stored chunks failed", len(names))

    def evicted(self, names: list[str]) -> None:
        """Record the store keys of evicted buckets (an eviction listener)."""
        self._add(names, removed=True)

    def _add(self, names: list[str], removed: bool) -> None:
        keys = _offload_keys(names)
        if not keys:
            return
        event = self._make_event(keys, removed)
        with self._lock:
            self._events.append((event, len(keys)))
            self._keys += len(keys)
            dropped = 0
            while self._keys > self._max_keys and len(self._events) > 1:
                dropped += self._events.popleft()[1]
            self._keys -= dropped
            self.dropped_keys += dropped
            warn = dropped > 0 and not self._dropping
            self._dropping = self._dropping or dropped > 0
        if warn:
            log.warning(
                "kvbucket tier: vLLM is not taking KV events; dropping the oldest to hold at most "
                "max_kv_event_keys=%d keys (a router may miss some stores and removals)",
                self._max_keys,
            )

    def take(self) -> list[Any]:
        """Every event held, oldest first; the buffer is left empty."""
        with self._lock:
            events = [event for event, _ in self._events]
            self._events.clear()
            self._keys = 0
            self._dropping = False
        return events


class _CommitReporter:
    """The store as an :class:`~kvbucket.pipeline.OffloadQueue` writes to it,
    telling ``on_commit(keys, metas)`` the keys of every bucket it commits.

    ``on_commit`` runs inside :meth:`~kvbucket.BucketStore.batch_offload`
    after the commit, holding the store's writer lock, as eviction listeners
    do: the report of a key's store always comes before that of its eviction.
    """

    def __init__(self, store: BucketStore, on_commit: Callable[[list[str], Sequence[object]], object]) -> None:
        self._store = store
        self._on_commit = on_commit

    @property
    def config(self) -> BucketConfig:
        """The store's configuration."""
        return self._store.config

    def batch_offload(
        self, objects: Mapping[str, Buffer | Sequence[Buffer]], *, on_evict: EvictionListener | None = None, on_duplicate: str = "error"
    ) -> int | None:
        """:meth:`BucketStore.batch_offload`, reporting the keys it commits."""
        return self._store.batch_offload(objects, on_complete=self._on_commit, on_evict=on_evict, on_duplicate=on_duplicate)

    def exists(self, key: str) -> bool:
        """:meth:`BucketStore.exists`."""
        return self._store.exists(key)

    def batch_exists(self, keys: Iterable[str]) -> list[bool]:
        """:meth:`BucketStore.batch_exists`."""
        return self._store.batch_exists(keys)

    def lookup(self, keys: Iterable[str], *, lease_s: float | None = None, prefix: bool = False) -> list[bool]:
        """:meth:`BucketStore.lookup`."""
        return self._store.lookup(keys, lease_s=lease_s, prefix=prefix)

    def lease(self, keys: Iterable[str], *, lease_s: float | None = None) -> None:
        """:meth:`BucketStore.lease`."""
        self._store.lease(keys, lease_s=lease_s)

    def release(self, keys: Iterable[str]) -> None:
        """:meth:`BucketStore.release`."""
        self._store.release(keys)

    def batch_load(self, destinations: Mapping[str, Buffer]) -> None:
        """:meth:`BucketStore.batch_load`."""
        self._store.batch_load(destinations)

    def group_batch(self, sizes: Mapping[str, int]) -> list[list[str]]:
        """:meth:`BucketStore.group_batch`."""
        return self._store.group_batch(sizes)

    def group_for_offload(self, sizes: Mapping[str, int], flush: bool = False) -> list[list[str]]:
        """:meth:`BucketStore.group_for_offload`."""
        return self._store.group_for_offload(sizes, flush)

    def pending_group(self) -> list[str]:
        """:meth:`BucketStore.pending_group`."""
        return self._store.pending_group()


# -- the tier ----------------------------------------------------------------------
class KvBucketTierManager(_Base):
    """A vLLM secondary tier storing chunks in a crash-safe kvbucket store.

    Config keys: ``root_dir`` (parent of the per-rank store directories), the
    BucketConfig fields (``max_physical_bytes``, ``max_total_size``,
    ``total_keys_limit``, ``eviction_policy``, ``durability``,
    ``bucket_size_limit``, ...), and :data:`TIER_OPTIONS`.
    """

    medium = getattr(_vllm.Medium, "STORAGE", None)
    tolerates_off_thread_polling = True  # every method is safe from any thread (queue, store and job list take their own locks)

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        root_dir: str | os.PathLike[str] | None = None,
        backpressure_detector: Any = None,
        **options: Any,
    ) -> None:
        """Called by vLLM's ``SecondaryTierFactory`` with the tier config's keys.

        ``root_dir`` (else ``KVBUCKET_PATH``) is the parent of the per-rank
        store directories. Other keys: :data:`TIER_OPTIONS` and the fields
        of :class:`~kvbucket.BucketConfig`; an unknown key raises
        :class:`~kvbucket.errors.InvalidArgument` (a typo must not silently
        leave the disk unbounded).
        """
        _init_base(super(), offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        store_settings = {**TIER_DEFAULTS, **store_options(options, _SOURCE, _ALIASES, own=TIER_OPTIONS)}
        self._view = byte_view(primary_kv_view, "primary_kv_view")
        self._chunk_bytes = _chunk_bytes(primary_kv_view)
        self._num_chunks = self._view.nbytes // self._chunk_bytes
        self.locality = _locality(options.get("locality"))
        self.rank = _resolve_rank(offloading_spec, option(options, "rank", Setting("count"), None, _SOURCE))
        self.store_path = os.path.join(_root_dir(root_dir), _namespace(offloading_spec, self._chunk_bytes) + f"_r{self.rank}")
        # Everything is validated before the store is opened (and its directory locked).
        staged = option(options, "max_staged_bytes", Setting("size", minimum=1), max(self._view.nbytes, 1), _SOURCE)
        writers = option(options, "n_write_threads", _THREADS, 2, _SOURCE)
        readers = option(options, "n_read_threads", _THREADS, None, _SOURCE)
        if readers is not None and "io_threads" not in store_settings:
            store_settings["io_threads"] = readers
        kv_events = option(options, "enable_kv_events", Setting("bool"), False, _SOURCE)
        max_event_keys = option(options, "max_kv_event_keys", Setting("count", minimum=1), 100_000, _SOURCE)
        endpoint = metrics_endpoint(options, _SOURCE, offset=self.rank)
        self._events = self._kv_events(offloading_spec, tier_type, max_event_keys) if kv_events else None
        self.store = open_store(self.store_path, store_settings)
        target: OffloadTarget = self.store
        if self._events is not None:
            target = _CommitReporter(self.store, self._events.stored)
            self.store.add_eviction_listener(self._events.evicted)
        # backpressure="reject": submit_store must never block the scheduler.
        self._queue = OffloadQueue(target, max_staged_bytes=staged, backpressure="reject", workers=writers)
        self.metrics_server = start_metrics(endpoint, self.store, self._queue)
        self._background = ThreadPoolExecutor(1, thread_name_prefix="kvbucket-vllm-stats")  # usage refreshes
        self._jobs = _Jobs()
        self._closed = False
        self._reported = self.store.counters()  # the totals get_stats last reported
        self._usage: Future[StoreStats] | None = None  # a refresh in flight
        self._usage_last: StoreStats | None = None  # the last one a refresh returned
        self._usage_at = float("-inf")
        self._reported_dropped = 0  # the dropped event keys get_stats last reported
        log.info("kvbucket tier for rank %d at %s (%d-byte chunks)", self.rank, self.store_path, self._chunk_bytes)

    # -- lookups ------------------------------------------------------------
    def lookup(self, key: bytes, req_context: Any) -> Any:
        """HIT when stored, RETRY while a store of it is in flight, else MISS (never blocks on I/O).

        A HIT leases the chunk (``lookup_lease_s``): eviction keeps it until
        it is loaded or the lease ends, so the load that follows finds it;
        with ``prefetch_on_lookup`` its bytes start into the page cache."""
        name = _store_key(key)
        if self._queue.is_staged(name):
            return _vllm.LookupResult.RETRY
        if not self.store.lookup([name])[0]:
            return _vllm.LookupResult.MISS
        hint_loads(self.store, [name], "kvbucket tier")
        return _vllm.LookupResult.HIT

    # -- jobs ----------------------------------------------------------------
    def submit_store(self, job_metadata: Any) -> None:
        """Stage the job's chunks for writing; the result comes from :meth:`get_finished_jobs`.

        Chunks already stored (or already being stored) are not written again.
        """
        job_id, started = job_metadata.job_id, time.monotonic()
        self._jobs.begin()
        try:
            chunks = self._chunks(job_metadata)
        except (InvalidArgument, IndexError) as exc:
            log.error("kvbucket tier: store job %s is malformed: %s", job_id, exc)
            self._end(job_id, False, started, 0)
            return
        if not chunks:
            self._end(job_id, True, started, 0)
            return
        nbytes = len(chunks) * self._chunk_bytes
        try:
            futures = self._queue.put_batch(chunks)
        except KvBucketError as exc:  # staging full or closed: vLLM keeps the chunks in CPU
            log.warning("kvbucket tier: store job %s not accepted: %s", job_id, exc)
            self._end(job_id, False, started, 0)
            return
        AllDone(futures, lambda failed: self._end(job_id, not failed, started, 0 if failed else nbytes))

    def submit_load(self, job_metadata: Any) -> None:
        """Start copying the job's chunks into their primary slots; returns at once.

        The chunks are read by the store's load queue
        (:meth:`BucketStore.submit_load`); the job ends when the last one
        has, with the chunks that loaded (a failing chunk never fails the others).
        """
        job_id, started = job_metadata.job_id, time.monotonic()
        self._jobs.begin()
        try:
            keys = list(job_metadata.keys)
            chunks = self._chunks(job_metadata)
        except (InvalidArgument, IndexError) as exc:
            log.error("kvbucket tier: load job %s is malformed: %s", job_id, exc)
            self._end(job_id, False, started, 0)
            return
        staged = self._load_staged(chunks)
        stored = {name: view for name, view in chunks.items() if name not in staged}
        if not stored:
            self._end_load(job_id, keys, staged, started)
            return
        try:
            handle = self.store.submit_load(stored)
        except KvBucketError as exc:  # the store is closed
            log.error("kvbucket tier: load job %s not started: %s", job_id, exc)
            self._end_load(job_id, keys, staged, started)
            return
        handle.add_done_callback(lambda done: self._end_load(job_id, keys, staged | loaded_keys(done, "kvbucket tier"), started))

    def _load_staged(self, chunks: dict[str, memoryview]) -> set[str]:
        """Copy the chunks still staged for writing (a lookup answers RETRY for
        those, so this is rare); return their keys."""
        staged = {name: view for name, view in chunks.items() if self._queue.is_staged(name)}
        if not staged:
            return set()

        def load(batch: dict[str, memoryview]) -> Iterable[str]:
            return [name for name, hit in self._queue.batch_get_into(batch).items() if hit]

        return load_each(load, staged, (KvBucketError,), "kvbucket tier")

    def _end_load(self, job_id: int, keys: list[bytes], loaded: set[str], started: float) -> None:
        """End a load job of ``keys``, of which ``loaded`` are in their slots."""
        good = [key for key in keys if _store_key(key) in loaded]
        success = len(good) == len(keys)
        partial = tuple(good) if (good and not success) else None
        self._end(job_id, success, started, len(good) * self._chunk_bytes, successful_keys=partial)

    def _chunks(self, job: Any) -> dict[str, memoryview]:
        """``{store key: primary slot view}`` for a TransferJob (``chunk_ids``) or JobMetadata (``block_ids``)."""
        keys = list(job.keys)
        ids = getattr(job, "chunk_ids", None)
        if ids is None:
            ids = job.block_ids
        ids = [int(i) for i in ids]
        if len(ids) != len(keys):
            raise InvalidArgument(f"job {job.job_id} has {len(keys)} keys but {len(ids)} chunk ids")
        chunks: dict[str, memoryview] = {}
        for key, chunk in zip(keys, ids):
            if not 0 <= chunk < self._num_chunks:
                raise IndexError(f"chunk id {chunk} outside the primary view's {self._num_chunks} chunks")
            chunks[_store_key(key)] = self._view[chunk * self._chunk_bytes : (chunk + 1) * self._chunk_bytes]
        return chunks

    def _end(self, job_id: int, success: bool, started: float, nbytes: int, successful_keys: Any = None) -> None:
        values = {
            "job_id": job_id,
            "success": success,
            "successful_keys": successful_keys,
            "transfer_time": time.monotonic() - started,
            "transfer_bytes": nbytes,
            "transfer_size": nbytes,
        }
        self._jobs.end(_vllm.JobResult(**_accepted(_vllm.JobResult, values)))

    def get_finished_jobs(self) -> Iterable[Any]:
        """Every job (store or load) finished since the last call."""
        return self._jobs.take_finished()

    def has_pending_work(self) -> bool:
        """True while jobs are in flight, so vLLM keeps polling :meth:`get_finished_jobs`."""
        return self._jobs.busy()

    def drain_jobs(self) -> None:
        """Block until every submitted job has finished (partial buckets are written now)."""
        if not self._queue.closed:
            self._queue.flush()
        self._jobs.wait_idle()

    # -- requests and lifecycle ---------------------------------------------
    def on_new_request(self, req_context: Any) -> Any:
        """No per-request preference."""
        return _vllm.RequestOffloadingContext()

    def on_request_finished(self, req_context: Any) -> None:
        """Nothing is kept per request."""

    def touch(self, keys: Collection[bytes], req_context: Any) -> None:
        """Loads already refresh the store's LRU order; nothing more to do."""

    def _kv_events(self, spec: Any, tier_type: str, max_keys: int) -> _KvEvents | None:
        """The event buffer, or None (with a warning) where vLLM would not take its events."""
        if not _spec_flag(spec, "kv_events_config.enable_kv_cache_events"):
            log.warning(
                "kvbucket tier %r: enable_kv_events is set but vLLM's KV cache events are off "
                "(kv_events_config.enable_kv_cache_events); the tier emits no events",
                tier_type,
            )
            return None
        event_class, medium = _vllm.OffloadingEvent, self.medium
        fields = _field_names(event_class) if event_class is not None else frozenset()
        if not fields >= _EVENT_FIELDS or medium is None:
            log.warning("kvbucket tier %r: this vLLM has no OffloadingEvent with keys, medium and removed; the tier emits no events", tier_type)
            return None
        tags = {name: value for name, value in (("medium", medium), ("locality", self.locality)) if name in fields}

        def make_event(keys: list[bytes], removed: bool) -> Any:
            return event_class(keys=keys, removed=removed, **tags)

        return _KvEvents(make_event, max_keys)

    def take_events(self) -> Iterable[Any]:
        """vLLM ``OffloadingEvent`` s since the last call, oldest first (none unless KV events are on).

        A stored event lists chunks once they are durable in the store; a
        removed event lists chunks evicted (in the foreground, to make room
        for a write, or by the background evictor). Each carries the chunks'
        ``OffloadKey`` s, ``medium=Medium.STORAGE`` and the tier's
        ``locality``.
        """
        return self._events.take() if self._events is not None else ()

    @property
    def kv_event_keys_dropped(self) -> int:
        """Keys of KV events dropped because vLLM did not take them (0 with events off)."""
        return self._events.dropped_keys if self._events is not None else 0

    @classmethod
    def build_metric_definitions(cls, extra_config: dict[str, Any]) -> dict[str, Any]:
        """The vLLM metrics :meth:`get_stats` reports (none without vLLM's metadata classes)."""
        counter, gauge = _vllm.CounterMetadata, _vllm.GaugeMetadata
        if counter is None or gauge is None:
            return {}
        definitions = {name: counter(documentation=doc) for name, (doc, _) in _VLLM_COUNTERS.items()}
        definitions[_EVENTS_DROPPED] = counter(documentation="Keys of KV events dropped because vLLM did not take them")
        definitions.update((name, gauge(documentation=doc)) for name, (doc, _) in _VLLM_GAUGES.items())
        return definitions

    def get_stats(self) -> Any:
        """vLLM ``OffloadingConnectorStats``: counter increments since the last
        call, and usage gauges (None when vLLM has no such stats).

        Never blocks on I/O: the usage comes from a refresh run on a loader
        thread at most every :data:`STATS_INTERVAL_S` seconds, so gauges lag
        by up to that much (and are absent until the first refresh is done).
        """
        stats_class = _vllm.Stats
        if stats_class is None or self._closed:
            return None
        stats = stats_class()
        now, previous = self.store.counters(), self._reported
        self._reported = now
        for name, (_, total) in _VLLM_COUNTERS.items():
            if total(now) > total(previous):
                stats.increase_counter(name, total(now) - total(previous))
        dropped = self.kv_event_keys_dropped
        if dropped > self._reported_dropped:
            stats.increase_counter(_EVENTS_DROPPED, dropped - self._reported_dropped)
            self._reported_dropped = dropped
        usage = self._latest_usage()
        if usage is not None:
            for name, (_, read) in _VLLM_GAUGES.items():
                stats.set_gauge(name, read(usage))
        return stats

    def _latest_usage(self) -> Any:
        """The last finished :meth:`BucketStore.stats` (or None); starts the next one when due."""
        refresh = self._usage
        if refresh is not None and refresh.done():
            self._usage = None
            if refresh.exception() is None:
                self._usage_last = refresh.result()
            else:
                log.warning("kvbucket tier: reading the store's usage failed: %s", refresh.exception())
        if self._usage is None and time.monotonic() - self._usage_at >= STATS_INTERVAL_S:
            self._usage_at = time.monotonic()
            with contextlib.suppress(RuntimeError):  # the pool is shut down
                self._usage = self._background.submit(self.store.stats)
        return self._usage_last

    def shutdown(self) -> None:
        """Finish every job, then stop the metrics endpoint, the queue, the loaders and the store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.drain_jobs()
        shut_down(self.store, queue=self._queue, pool=self._background, metrics_server=self.metrics_server)


# -- helpers -------------------------------------------------------------------------
def _init_base(base: Any, spec: Any, view: memoryview, tier_type: str, detector: Any) -> None:
    """Call the base ``__init__``, passing ``backpressure_detector`` only where it is accepted."""
    try:
        accepts = "backpressure_detector" in inspect.signature(base.__init__).parameters
    except (TypeError, ValueError):
        accepts = False
    if accepts:
        base.__init__(spec, view, tier_type, backpressure_detector=detector)
    else:
        base.__init__(spec, view, tier_type)


def _chunk_bytes(view: memoryview) -> int:
    """vLLM's chunk size: the primary view's first stride."""
    strides = view.strides
    if not strides or strides[0] <= 0 or view.nbytes % strides[0]:
        raise InvalidArgument(f"primary_kv_view must be rows of whole chunks; got shape {view.shape}, strides {strides}")
    return int(strides[0])


def _root_dir(root_dir: str | os.PathLike[str] | None) -> str:
    if root_dir:
        return os.fspath(root_dir)
    if os.environ.get("KVBUCKET_PATH"):
        return os.environ["KVBUCKET_PATH"]
    raise InvalidArgument("the kvbucket vLLM tier needs root_dir in its tier config (or KVBUCKET_PATH)")


def _spec_value(spec: Any, path: str, kind: type[_T]) -> _T | None:
    """``spec.<path>`` when it exists and is a ``kind`` (mocks yield other types)."""
    value = spec
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _resolve_rank(spec: Any, explicit: int | None) -> int:
    """The worker rank: the tier config's ``rank``, else the offloading spec's, else 0."""
    if explicit is not None:
        return explicit
    for path in ("config.parallel.rank", "vllm_config.parallel_config.rank", "rank"):
        rank = _spec_value(spec, path, int)
        if rank is not None:
            return rank
    return 0


def _namespace(spec: Any, chunk_bytes: int) -> str:
    """``<model>_<digest>``: pages of different models or layouts never share a directory."""
    fields: dict[str, Any] = {"chunk_bytes": chunk_bytes}
    for name, path, kind in (
        ("model", "config.model.name", str),
        ("dtype", "config.model.dtype", str),
        ("tokens_per_hash", "config.cache.tokens_per_hash", int),
        ("tp_size", "config.parallel.tp_size", int),
        ("pp_size", "config.parallel.pp_size", int),
        ("pcp_size", "config.parallel.pcp_size", int),
        ("dcp_size", "config.parallel.dcp_size", int),
        ("blocks_per_chunk", "blocks_per_chunk", int),
    ):
        value = _spec_value(spec, path, kind)
        if value is not None:
            fields[name] = value
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return f"{safe_component(str(fields.get('model', 'kvbucket')))}_{digest}"


def _store_key(key: bytes) -> str:
    """An OffloadKey (block hash + 4-byte group index) as a store key."""
    return bytes(key).hex()


def _offload_keys(names: Iterable[str]) -> list[bytes]:
    """The OffloadKeys of store keys (:func:`_store_key` undone); a key not
    written by the tier (not hex) is no vLLM block and is left out."""
    keys = []
    for name in names:
        try:
            keys.append(bytes.fromhex(name))
        except ValueError:
            continue
    return keys


def _locality(value: Any) -> Any:
    """vLLM's ``Locality`` for the tier config's ``locality`` (its name where vLLM has no such enum).

    The default is LOCAL: a tier's store directory has one writer, on this node.
    """
    name = "LOCAL" if value is None else value
    if name not in _LOCALITIES:
        raise InvalidArgument(f"{_SOURCE}: locality must be one of {', '.join(_LOCALITIES)}; got {value!r}")
    return name if _vllm.Locality is None else _vllm.Locality(name)


def _spec_flag(spec: Any, path: str) -> bool:
    """Whether ``spec.<path>`` is True itself (missing, or a mock's attribute, is False)."""
    value = spec
    for part in path.split("."):
        value = getattr(value, part, None)
    return value is True


def _field_names(cls: type) -> frozenset[str]:
    """The fields ``cls`` (a dataclass, else a class) takes as keyword arguments."""
    if dataclasses.is_dataclass(cls):
        return frozenset(field.name for field in dataclasses.fields(cls))
    return frozenset(inspect.signature(cls).parameters)


def _accepted(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``values`` that ``cls`` (a dataclass) takes as fields."""
    names = _field_names(cls)
    return {name: value for name, value in values.items() if name in names}


kvbucket = KvBucketTierManager
"""Alias so that ``"type": "kvbucket"`` resolves (vLLM looks ``type`` up in ``module_path``)."""
