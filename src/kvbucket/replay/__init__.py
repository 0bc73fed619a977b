"""Trace replay: how good a cache a kvbucket tier is, and how big it must be.

``kvbucket replay`` (and :func:`replay`) replays a KV-cache access trace
under an engine model (prefix lookup, load, write-back; optionally behind a
host-memory LRU) through a kvbucket store and through two references of the
same capacity: an ideal per-object LRU and the offline optimum (Belady).
docs/CAPACITY_PLANNING.md defines every number it reports.
"""

from .engine_model import TierCounts, TierRequest, replay_tier, tier_requests
from .reference import BeladyTier, LruTier
from .run import CapacityResult, ReplayOptions, ReplayReport, parse_capacity, replay
from .store_tier import KvBucketTier
from .trace import Request, Trace, default_trace_path, read_trace

__all__ = [
    "BeladyTier",
    "CapacityResult",
    "KvBucketTier",
    "LruTier",
    "ReplayOptions",
    "ReplayReport",
    "Request",
    "TierCounts",
    "TierRequest",
    "Trace",
    "default_trace_path",
    "parse_capacity",
    "read_trace",
    "replay",
    "replay_tier",
    "tier_requests",
]
