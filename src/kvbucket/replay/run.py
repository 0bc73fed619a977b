"""Replaying a trace, capacity by capacity: kvbucket against the references.

For each capacity, one run replays the trace through a fresh store (real, in
a temporary directory, or simulated in memory) behind an OffloadQueue, and
through the ideal per-object LRU and Belady's MIN of the same capacity, all
under the same engine model (and the same L2, if any). The numbers are
defined in docs/CAPACITY_PLANNING.md.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import BucketConfig, parse_size
from ..errors import InvalidArgument
from ..store import BucketStore
from .engine_model import TierCounts, TierRequest, replay_tier, tier_requests
from .iocount import CountingFileSystem, CountingSimulatedFileSystem, WriteCounts
from .reference import BeladyTier, LruTier
from .store_tier import KvBucketTier
from .trace import Trace

__all__ = ["ReplayOptions", "CapacityResult", "ReplayReport", "replay", "parse_capacity", "SIMULATED_ROOT"]

SIMULATED_ROOT = "/kvbucket-simulated"
"""Where a simulated store lives (in memory only)."""

_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True)
class ReplayOptions:
    """How to replay."""

    object_size: int = 4096
    """Bytes per block (a KV-cache page)."""
    l2_blocks: int = 0
    """Blocks of the host-memory LRU in front of the tier (0: none)."""
    overlap: bool = False
    """Land each write-back after the next request's lookup (background
    write-back), not before the next request arrives."""
    simulate: bool = False
    """Run the store on :class:`~kvbucket.replay.simfs.SimulatedFileSystem` instead of a directory."""
    directory: str | None = None
    """Where real stores are created (a temporary sub-directory each,
    removed afterwards); None uses the system's temporary directory."""
    store_fields: Mapping[str, Any] = field(default_factory=dict)
    """Configuration fields for the store besides its capacity (defaults otherwise)."""
    bucket_per_batch: bool = True
    """The OffloadQueue's grouping: a request's write-back in buckets of its
    own (the default), or pooled with other requests' (``False``)."""

    @property
    def eviction_policy(self) -> str:
        """The store's eviction policy under :attr:`store_fields`."""
        return BucketConfig(path=SIMULATED_ROOT, **self.store_fields).validated().eviction_policy


@dataclass
class CapacityResult:
    """One capacity's replay."""

    capacity_blocks: int
    kvbucket: TierCounts
    lru: TierCounts
    belady: TierCounts
    written: WriteCounts
    """Bytes kvbucket wrote to its files (data, metas, LOCK)."""
    object_size: int
    evicted_buckets: int
    wall_s: float
    """Seconds the kvbucket replay took."""

    @property
    def write_amplification(self) -> float:
        """Bytes written to the files / bytes of the blocks the tier accepted."""
        accepted = self.kvbucket.admitted * self.object_size
        return self.written.total / accepted if accepted else 0.0

    @property
    def ratio_to_lru(self) -> float:
        """kvbucket's tier hit rate over the per-object LRU's (0.0 when LRU hits nothing)."""
        return self.kvbucket.hits / self.lru.hits if self.lru.hits else 0.0


@dataclass
class ReplayReport:
    """A trace replayed at several capacities."""

    trace: Trace
    options: ReplayOptions
    results: list[CapacityResult]

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        duration = self.trace.duration_s
        return {
            "trace": self.trace.name,
            "requests": len(self.trace.requests),
            "block_references": self.trace.block_references,
            "distinct_blocks": self.trace.distinct_blocks,
            "duration_s": duration,
            "object_size": self.options.object_size,
            "l2_blocks": self.options.l2_blocks,
            "simulated": self.options.simulate,
            "overlap": self.options.overlap,
            "eviction_policy": self.options.eviction_policy,
            "bucket_per_batch": self.options.bucket_per_batch,
            "capacities": [_result_json(r, duration) for r in self.results],
        }


def parse_capacity(text: str, object_size: int, distinct_blocks: int) -> int:
    """Blocks of capacity from ``"200G"`` (bytes), ``"10%"`` (of the trace's
    distinct blocks) or a plain byte count; at least one block."""
    match = _PERCENT_RE.match(text)
    if match is not None:
        blocks = round(distinct_blocks * float(match.group(1)) / 100)
    else:
        try:
            blocks = parse_size(text) // object_size
        except ValueError as exc:
            raise InvalidArgument(f"capacity {text!r}: {exc}, or a percentage of the trace's distinct blocks like 10%") from exc
    if blocks < 1:
        raise InvalidArgument(f"capacity {text!r} holds no {object_size}-byte block; give a larger capacity")
    return blocks


def replay(trace: Trace, capacities: Sequence[int], options: ReplayOptions) -> ReplayReport:
    """Replay ``trace`` at each capacity (in blocks)."""
    if options.object_size < 1:
        raise InvalidArgument(f"object size must be at least 1 byte; got {options.object_size}")
    if options.l2_blocks < 0:
        raise InvalidArgument(f"the L2 size must be >= 0 blocks; got {options.l2_blocks}")
    smallest = bucket_blocks(options)
    for capacity in capacities:
        if capacity < smallest:
            raise InvalidArgument(
                f"a capacity of {capacity} blocks is smaller than one bucket ({smallest} blocks of {options.object_size} bytes): "
                "the store could not hold a single bucket; give a larger capacity"
            )
    requests = tier_requests(trace, options.l2_blocks)
    return ReplayReport(trace, options, [replay_capacity(requests, capacity, options) for capacity in capacities])


def bucket_blocks(options: ReplayOptions) -> int:
    """Blocks of a full bucket under the store's configuration."""
    config = BucketConfig(path=SIMULATED_ROOT, **options.store_fields)
    return min(config.bucket_keys_limit, max(1, config.bucket_size_limit // options.object_size))


def replay_capacity(requests: Sequence[TierRequest], capacity: int, options: ReplayOptions) -> CapacityResult:
    """kvbucket, LRU and Belady at one capacity (in blocks)."""
    start = time.perf_counter()
    with open_store(capacity * options.object_size, options) as (store, fs):
        tier = KvBucketTier(store, options.object_size, options.bucket_per_batch, background_eviction(options))
        try:
            counts = replay_tier(tier, requests, options.overlap)
            evicted = store.stats().evicted_buckets
        finally:
            tier.close()
    wall = time.perf_counter() - start
    return CapacityResult(
        capacity_blocks=capacity,
        kvbucket=counts,
        lru=replay_tier(LruTier(capacity), requests, options.overlap),
        belady=replay_tier(BeladyTier(capacity, requests), requests, options.overlap),
        written=fs.counts,
        object_size=options.object_size,
        evicted_buckets=evicted,
        wall_s=wall,
    )


def background_eviction(options: ReplayOptions) -> bool:
    """Whether the replayed configuration evicts in the background (the
    tier then evicts to the watermarks in step; see :mod:`.store_tier`)."""
    return BucketConfig(path=SIMULATED_ROOT, **options.store_fields).validated().background_eviction


@contextlib.contextmanager
def open_store(capacity_bytes: int, options: ReplayOptions) -> Iterator[tuple[BucketStore, CountingFileSystem]]:
    """A fresh store of ``capacity_bytes`` (``max_total_size``) and its counting file system.

    Time-based flushes are off (``group_max_delay_s=0``) and lookup leases
    end only when their keys are loaded (the lease clock stands still): the
    replay does not run in trace time. The background evictor thread is
    off (its timing would make replays differ): the tier evicts to the
    watermarks in step instead. A simulated store skips checksum verification (its
    data files read as zeros).
    """
    fields: dict[str, Any] = {"max_total_size": capacity_bytes, "group_max_delay_s": 0, **options.store_fields, "background_eviction": False}
    if options.simulate:
        fs: CountingFileSystem = CountingSimulatedFileSystem(SIMULATED_ROOT)
        with BucketStore.open(os.path.join(SIMULATED_ROOT, "store"), filesystem=fs, clock=_still, verify_checksums=False, **fields) as store:
            yield store, fs
        return
    with tempfile.TemporaryDirectory(prefix="kvbucket-replay-", dir=options.directory) as scratch:
        fs = CountingFileSystem()
        with BucketStore.open(os.path.join(scratch, "store"), filesystem=fs, clock=_still, **fields) as store:
            yield store, fs


def _still() -> float:
    """The replay's lease clock: it never moves, so no lease expires."""
    return 0.0


def _result_json(result: CapacityResult, duration_s: float) -> dict[str, Any]:
    kv = result.kvbucket
    return {
        "capacity_blocks": result.capacity_blocks,
        "capacity_bytes": result.capacity_blocks * result.object_size,
        "kvbucket": {
            **_counts_json(kv),
            "ratio_to_lru": result.ratio_to_lru,
            "write_amplification": result.write_amplification,
            "bytes_written": {"data": result.written.data, "meta": result.written.meta, "other": result.written.other},
            "bytes_accepted": kv.admitted * result.object_size,
            "loads_per_s": kv.hits / duration_s,
            "writes_per_s": kv.admitted / duration_s,
            "evicted_buckets": result.evicted_buckets,
            "wall_s": result.wall_s,
        },
        "lru": _counts_json(result.lru),
        "belady": _counts_json(result.belady),
    }


def _counts_json(counts: TierCounts) -> dict[str, Any]:
    return {
        "hit_rate": counts.hit_rate,
        "prefix_hit_rate": counts.prefix_hit_rate,
        "hits": counts.hits,
        "references": counts.references,
        "l2_hits": counts.l2_hits,
        "found_then_gone": counts.found_then_gone,
        "blocks_accepted": counts.admitted,
    }
