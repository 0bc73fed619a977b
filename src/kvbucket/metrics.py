"""Prometheus metrics of a :class:`~kvbucket.BucketStore` and its :class:`~kvbucket.OffloadQueue`.

:class:`StoreCollector` reads the store (and optionally an offload queue) at
scrape time: the operation counters (:meth:`BucketStore.counters`), usage
against each limit (:meth:`BucketStore.stats`), evictions, the recovery
report of the last open and the queue's depth. Nothing is recorded on the hot
path beyond the store's own integer counters.

:func:`serve_metrics` starts an HTTP endpoint; :func:`exposition` renders the
text format once (``kvbucket stats --prometheus``). Every metric carries a
``store`` label (the store directory). docs/METRICS.md lists them all.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ._core.arguments import check_int
from ._core.counters import LATENCY_BOUNDS, LOOKUP_OPS, CounterSnapshot, Histogram, QueueSnapshot
from ._core.interfaces import QueueObservation, StoreObservation
from .errors import InvalidArgument, KvBucketError, StorageIOError, StoreClosed

if TYPE_CHECKING:
    from ._core.recovery import RecoveryReport
    from .pipeline import PipelineStats
    from .store import StoreStats

__all__ = ["StoreCollector", "MetricsServer", "serve_metrics", "exposition", "make_registry", "check_endpoint"]

log = logging.getLogger(__name__)

_RESOURCES = ("logical_bytes", "physical_bytes", "keys")


class StoreCollector(Collector):
    """A prometheus_client collector of one store and, optionally, its offload queue.

    ``collect`` takes the store's locks briefly and scans the directory (as
    :meth:`BucketStore.stats` does); a closed store yields only
    ``kvbucket_store_open 0``.
    """

    def __init__(self, store: StoreObservation, queue: QueueObservation | None = None) -> None:
        self._store = store
        self._queue = queue

    def collect(self) -> Iterator[Metric]:
        """The metric families, read from the store and queue now."""
        label = os.fspath(self._store.path)
        try:
            counters, stats = self._store.counters(), self._store.stats()
        except (KvBucketError, OSError) as exc:  # closed, or the directory is unreadable
            log.log(logging.DEBUG if isinstance(exc, StoreClosed) else logging.WARNING, "metrics of %s: %s", label, exc)
            yield _gauge("kvbucket_store_open", "1 while the store is open and readable, else 0.", label, 0)
            return
        yield _gauge("kvbucket_store_open", "1 while the store is open and readable, else 0.", label, 1)
        yield from _lookup_families(label, counters)
        yield from _io_families(label, counters)
        yield from _usage_families(label, stats)
        yield from _recovery_families(label, self._store.recovery_report)
        if self._queue is not None:
            yield from _queue_families(label, self._queue.stats(), self._queue.counters())


def _lookup_families(label: str, counters: CounterSnapshot) -> Iterator[Metric]:
    lookups = CounterMetricFamily(
        "kvbucket_lookups", "Objects looked up, by call (exists, load, get) and result (hit, miss).", labels=["store", "op", "result"]
    )
    looked_bytes = CounterMetricFamily(
        "kvbucket_lookup_bytes",
        "Bytes of the objects looked up by loads and gets: the found objects' size (hit), the buffer a missed load gave (miss).",
        labels=["store", "op", "result"],
    )
    for op in LOOKUP_OPS:
        lookups.add_metric([label, op, "hit"], counters.hits[op])
        lookups.add_metric([label, op, "miss"], counters.misses[op])
        if op != "exists":
            looked_bytes.add_metric([label, op, "hit"], counters.hit_bytes[op])
            looked_bytes.add_metric([label, op, "miss"], counters.miss_bytes[op])
    yield lookups
    yield looked_bytes


def _io_families(label: str, counters: CounterSnapshot) -> Iterator[Metric]:
    yield _counter("kvbucket_read_objects", "Objects read and verified by successful loads and gets.", label, counters.read_objects)
    yield _counter("kvbucket_read_bytes", "Value bytes read by successful loads and gets.", label, counters.read_bytes)
    yield _counter("kvbucket_written_objects", "Objects committed (offloads and compaction).", label, counters.written_objects)
    yield _counter("kvbucket_written_bytes", "Value bytes committed (offloads and compaction).", label, counters.written_bytes)
    yield _histogram("kvbucket_read_latency_seconds", "Seconds per successful batch_load/batch_get call.", label, counters.read_latency)
    yield _histogram(
        "kvbucket_write_latency_seconds", "Seconds per committed batch_offload call, lock wait and eviction included.", label, counters.write_latency
    )
    yield _counter("kvbucket_checksum_failures", "Objects whose bytes failed their CRC32C on read (not returned).", label, counters.checksum_failures)
    yield _counter("kvbucket_truncated_reads", "Objects whose data file ended before the object (not returned).", label, counters.truncated_reads)


def _usage_families(label: str, stats: StoreStats) -> Iterator[Metric]:
    usage = GaugeMetricFamily("kvbucket_usage", "Current usage, by resource (logical_bytes, physical_bytes, keys).", labels=["store", "resource"])
    limit = GaugeMetricFamily(
        "kvbucket_limit", "The limit of each resource; 0 means unlimited (or, for a readonly store, not recorded).", labels=["store", "resource"]
    )
    limits = (stats.max_total_size, stats.max_physical_bytes, stats.total_keys_limit)
    for resource, used, bound in zip(_RESOURCES, (stats.logical_bytes, stats.physical_bytes, stats.keys), limits):
        usage.add_metric([label, resource], used)
        limit.add_metric([label, resource], bound)
    yield usage
    yield limit
    yield _gauge("kvbucket_usage_ratio", "The highest usage relative to its limit (0 when unlimited).", label, stats.usage_ratio)
    yield _gauge("kvbucket_buckets", "Buckets in the store.", label, stats.buckets)
    yield _gauge("kvbucket_dead_bytes", "Bytes of data files no live object uses (compaction reclaims them).", label, stats.dead_bytes)
    yield _gauge(
        "kvbucket_foreign_bytes", "Allocated bytes of entries that are not the store's, counted in physical usage.", label, stats.foreign_bytes
    )
    yield _gauge("kvbucket_pending_deletions", "Buckets out of the index whose files an I/O error kept on disk.", label, stats.pending_deletions)
    yield _gauge("kvbucket_budget_bytes", "The shared budget this store belongs to (budget_path); 0 when none.", label, stats.budget_bytes)
    yield _gauge(
        "kvbucket_budget_used_bytes", "Physical bytes every member of the shared budget holds or has reserved.", label, stats.budget_used_bytes
    )
    yield _counter("kvbucket_evicted_buckets", "Buckets evicted since open.", label, stats.evicted_buckets)
    yield _counter("kvbucket_evicted_keys", "Objects evicted since open.", label, stats.evicted_keys)


def _recovery_families(label: str, report: RecoveryReport) -> Iterator[Metric]:
    actions = GaugeMetricFamily(
        "kvbucket_recovery_actions",
        "What recovery did at the last open, by action (count of buckets, files or keys).",
        labels=["store", "action"],
    )
    for action, count in (
        ("dropped_buckets", len(report.dropped_buckets)),
        ("removed_files", len(report.removed_files)),
        ("rewritten_buckets", len(report.rewritten_buckets)),
        ("salvaged_buckets", len(report.salvaged_buckets)),
        ("dropped_keys", len(report.dropped_keys)),
        ("foreign_files", len(report.foreign_files)),
    ):
        actions.add_metric([label, action], count)
    yield actions
    yield _gauge("kvbucket_recovery_freed_bytes", "Bytes recovery deleted at the last open.", label, report.freed_bytes)
    yield _gauge("kvbucket_recovery_quarantined_bytes", "Bytes recovery moved to quarantine/ at the last open.", label, report.quarantined_bytes)


def _queue_families(label: str, stats: PipelineStats, counters: QueueSnapshot) -> Iterator[Metric]:
    yield _gauge("kvbucket_queue_staged_keys", "Keys staged in the offload queue and not yet written (queue depth).", label, stats.staged_keys)
    yield _gauge("kvbucket_queue_staged_bytes", "Value bytes staged in the offload queue.", label, stats.staged_bytes)
    yield _gauge("kvbucket_queue_max_staged_bytes", "The offload queue's staging limit.", label, stats.max_staged_bytes)
    yield _gauge("kvbucket_queue_writes_in_flight", "Buckets the offload queue is writing now.", label, stats.writes_in_flight)
    yield _counter("kvbucket_queue_stored_keys", "Keys the offload queue resolved as stored.", label, stats.stored_keys)
    yield _counter("kvbucket_queue_failed_keys", "Keys the offload queue resolved with an error.", label, stats.failed_keys)
    yield _counter("kvbucket_queue_staged_hits", "Lookups and loads answered from the staging area.", label, counters.staged_hits)
    yield _counter("kvbucket_queue_staged_hit_bytes", "Bytes loads copied out of the staging area.", label, counters.staged_hit_bytes)
    yield _counter("kvbucket_queue_rejected_keys", "Keys of puts refused for lack of staging room.", label, counters.rejected_keys)
    yield _counter("kvbucket_queue_rejected_bytes", "Bytes of puts refused for lack of staging room.", label, counters.rejected_bytes)


def _counter(name: str, documentation: str, label: str, value: float) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=["store"])
    family.add_metric([label], value)
    return family


def _gauge(name: str, documentation: str, label: str, value: float) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=["store"])
    family.add_metric([label], value)
    return family


def _histogram(name: str, documentation: str, label: str, histogram: Histogram) -> Metric:
    family = HistogramMetricFamily(name, documentation, labels=["store"])
    cumulative, buckets = 0, []
    for bound, count in zip((*(repr(b) for b in LATENCY_BOUNDS), "+Inf"), histogram.counts):
        cumulative += count
        buckets.append((bound, cumulative))
    family.add_metric([label], buckets, histogram.sum)
    return family


def make_registry(store: StoreObservation, queue: QueueObservation | None = None) -> CollectorRegistry:
    """A registry holding one :class:`StoreCollector` (and nothing else)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, queue))
    return registry


def exposition(store: StoreObservation, queue: QueueObservation | None = None) -> str:
    """The Prometheus text exposition of ``store`` (and ``queue``) now."""
    return generate_latest(make_registry(store, queue)).decode()


class MetricsServer:
    """A running metrics endpoint; :meth:`close` stops it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen when 0 was asked for)."""
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        host = self._server.server_address[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(store: StoreObservation, port: int, addr: str = "127.0.0.1", queue: QueueObservation | None = None) -> MetricsServer:
    """Serve ``store``'s (and ``queue``'s) metrics at ``http://addr:port/metrics``.

    ``port`` 0 picks a free port (see :attr:`MetricsServer.port`). The
    default address is loopback; give ``"0.0.0.0"`` to let a Prometheus on
    another machine scrape. Raises :class:`InvalidArgument` for a bad port or
    address, :class:`StorageIOError` when the port cannot be bound.
    """
    check_endpoint(port, addr)
    try:
        server, thread = start_http_server(port, addr=addr, registry=make_registry(store, queue))
    except OSError as exc:
        raise StorageIOError(
            f"serving metrics on {addr}:{port} failed: {exc.strerror or exc}; choose another metrics port", exc
        ) from exc
    metrics = MetricsServer(server, thread)
    log.info("kvbucket metrics of %s at %s", os.fspath(store.path), metrics.url)
    return metrics


def check_endpoint(port: object, addr: object) -> None:
    """Raise :class:`InvalidArgument` unless ``port`` is 0..65535 and ``addr`` an IP address."""
    check_int(port, "metrics port (0: any free port)", minimum=0, maximum=65535)
    try:
        ipaddress.ip_address(addr)  # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgument(f"metrics address must be an IP address such as 127.0.0.1 or 0.0.0.0; got {addr!r}") from None
