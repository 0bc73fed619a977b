"""Which bucket grouping, eviction and admission make kvbucket the best cache?

    .venv/bin/python benchmarks/policy_study.py            # ~5 min, prints Markdown tables
    .venv/bin/python benchmarks/policy_study.py --check    # also checks the model against the store

A study, not a product: each candidate is a variant of :class:`BucketModel`,
a model of the store's cache behaviour (buckets of whole objects, a logical
capacity, whole-bucket eviction by stamp, a grouper that cuts buckets of
``keys_limit`` objects out of a pool of staged keys) driven by the same
engine model and requests as ``kvbucket replay``. ``--check`` first replays
the store's own code (simulated files) configured as ``default``,
``per-request`` and ``per-request + 2Q 25%/100%`` (the store's default since
this study) and asserts the model gives the same hits, so the variants'
numbers stand for what the same changes in the store would do.

Candidates (500 keys per bucket unless named; the names in CANDIDATES):

* ``default``: the OffloadQueue before this study: requests interleave in one pool cut
  into buckets of ``keys_limit`` keys; a load stamps the buckets it reads in
  chain order; whole-bucket LRU.
* ``keys=N``: smaller buckets (the store's ``bucket_keys_limit``).
* ``per-request``: each write-back gets bucket(s) of its own (the queue cuts
  a bucket at the end of each ``put_batch``).
* ``tails-first``: a load stamps its buckets from the tail back to the head;
  ``heads-newest``: after a write-back, the buckets the request loaded are
  stamped again, heads last, so the new tail is older than its heads;
  ``orphans-first``: a bucket whose first key's predecessor in the chain is
  gone (it can never be hit) is evicted before any other.
* ``copy-forward``: when a bucket is evicted, its objects hit since the
  bucket was written are rewritten into a new bucket (costs writes).
* ``second-use``: a block is written only the second time it is handed to
  the tier (the first time is remembered).
* ``SLRU s``: a bucket read since it was written is protected; victims are
  the oldest unread buckets while protected ones hold at most ``s`` of the
  capacity.
* ``2Q in/out``: a new bucket enters a FIFO (A1in) unless one of its keys
  is in the ghost list (A1out: keys of buckets recently evicted from A1in,
  ``out`` x capacity keys), in which case it enters the main LRU (Am); a read
  of an A1in bucket moves it to Am; victims come from A1in while it holds
  more than ``in`` of the capacity, else from Am by LRU. Segments and the
  ghost list are memory only: moving a bucket rewrites nothing.
* ``TinyLFU``: in 2Q, the oldest A1in bucket moves to Am instead of leaving
  when its keys were referenced more often than those of Am's oldest bucket,
  which leaves instead.
* ``per-object ...`` (``keys=1``): the same policies on single objects: the
  ceiling of what the policy can do without buckets.

Write amplification here is modelled: objects written (copy-forward included)
plus an estimate of meta bytes, over objects accepted; ``--check`` prints the
store's own measured value for ``default`` and ``per-request``.
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import kvbucket  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(ROOT, "src"))

from kvbucket.replay import (  # noqa: E402
    BeladyTier,
    LruTier,
    ReplayOptions,
    Trace,
    default_trace_path,
    parse_capacity,
    read_trace,
    replay_tier,
    tier_requests,
)
from kvbucket.replay.engine_model import held_prefix  # noqa: E402
from kvbucket.replay.run import open_store  # noqa: E402
from kvbucket.replay.store_tier import KvBucketTier  # noqa: E402

PERCENTS = (5, 10, 15, 20, 25, 30)
L2_BLOCKS = (0, 3000)
OBJECT_SIZE = 4096
META_BYTES_PER_OBJECT = 28  # record + a short key: what a bucket's meta adds per object
META_BYTES_PER_BUCKET = 64


@dataclass(frozen=True)
class Policy:
    """One candidate's settings."""

    keys_limit: int = 500
    per_request: bool = False
    tails_first: bool = False
    copy_forward: bool = False
    second_use: bool = False
    orphans_first: bool = False
    heads_newest: bool = False
    protected_share: float = 0.0
    """> 0: segmented LRU of buckets: a bucket read since it was written is
    protected; victims come from the unread (probation) buckets, oldest
    first, unless protected buckets hold more than this share of the capacity."""
    in_share: float = 0.0
    """> 0: 2Q of buckets: a new bucket enters a FIFO (A1in) unless one of its
    keys was recently evicted from it (a ghost list, A1out, of ``out_share``
    x capacity keys), in which case it enters the main LRU (Am). Victims come
    from A1in while it holds more than ``in_share`` of the capacity."""
    out_share: float = 0.5
    promote: bool = True
    """2Q: a read of an A1in bucket moves it to Am."""
    tinylfu: bool = False
    """2Q: the oldest A1in bucket moves to Am instead of leaving when its keys
    were referenced more often (counts halved every 10 x capacity
    references) than those of Am's oldest bucket, which leaves instead."""


class BucketModel:
    """The store's cache behaviour under ``policy``, as a :class:`~kvbucket.replay.engine_model.Tier`."""

    def __init__(self, capacity: int, policy: Policy, parents: dict[str, str | None] | None = None) -> None:
        self._capacity = capacity
        self._policy = policy
        self._parents = parents or {}
        self._children: dict[str, set[int]] = {}  # key -> buckets whose first key follows it in a chain
        self._orphans: list[tuple[int, int]] = []  # (stamp, bucket id) of buckets whose first key's parent went
        self._loaded: list[int] = []  # buckets the last load read, in chain order
        self._protected: dict[int, int] = {}  # bucket id -> objects, for buckets read since written
        self._protected_objects = 0
        self._probation: list[tuple[int, int]] = []  # (stamp, bucket id) of unread buckets
        self._a1in: OrderedDict[int, int] = OrderedDict()  # 2Q: bucket id -> objects, oldest first
        self._a1in_objects = 0
        self._ghost: OrderedDict[str, None] = OrderedDict()
        self._counts: dict[str, int] = {}
        self._references = 0
        self._where: dict[str, int] = {}  # key -> bucket id
        self._buckets: dict[int, list[str]] = {}
        self._stamp: dict[int, int] = {}
        self._born: dict[int, int] = {}
        self._heap: list[tuple[int, int]] = []  # (stamp, bucket id); stale entries skipped
        self._hit_at: dict[str, int] = {}
        self._pending: OrderedDict[str, None] = OrderedDict()
        self._seen: set[str] = set()
        self._clock = 0
        self._next_id = 1
        self.objects_written = 0
        self.buckets_written = 0

    # -- the engine model's calls ------------------------------------------
    def lookup(self, keys: Sequence[str]) -> int:
        if self._policy.tinylfu:
            self._count(keys)
        return held_prefix(keys, _Either(self._where, self._pending))

    def load(self, keys: Sequence[str]) -> int:
        stored = [key for key in keys if key in self._where]
        order = list(dict.fromkeys(self._where[key] for key in stored))
        self._loaded = order
        if self._policy.tails_first:
            order.reverse()
        for bucket_id in order:
            self._touch(bucket_id)
            if self._policy.promote and bucket_id in self._a1in:
                self._a1in_objects -= self._a1in.pop(bucket_id)
            if bucket_id not in self._protected:
                self._protected[bucket_id] = len(self._buckets[bucket_id])
                self._protected_objects += len(self._buckets[bucket_id])
        for key in stored:
            self._hit_at[key] = self._clock
        return len(keys)

    def land(self) -> None:
        """Writes happen when staged: the study replays sequentially."""

    def stage(self, keys: Sequence[str]) -> int:
        new = [key for key in keys if key not in self._where and key not in self._pending]
        if self._policy.second_use:
            fresh = {key for key in new if key not in self._seen}
            self._seen.update(fresh)
            new = [key for key in new if key not in fresh]
        limit = self._policy.keys_limit
        if self._policy.per_request:
            for start in range(0, len(new), limit):
                self._write(new[start : start + limit])
            if self._policy.heads_newest:  # the request's new tail is older than the heads it loaded
                for bucket_id in reversed(self._loaded):
                    if bucket_id in self._stamp:
                        self._touch(bucket_id)
            return len(new)
        self._pending.update(dict.fromkeys(new))
        while len(self._pending) >= limit:
            group = [self._pending.popitem(last=False)[0] for _ in range(limit)]
            self._write(group)
        return len(new)

    # -- the store ----------------------------------------------------------
    def _write(self, keys: list[str]) -> None:
        survivors = self._make_room(len(keys))
        self._commit(keys)
        for start in range(0, len(survivors), self._policy.keys_limit):
            chunk = survivors[start : start + self._policy.keys_limit]
            self._commit_survivors(chunk)

    def _commit_survivors(self, keys: list[str]) -> None:
        more = self._make_room(len(keys), copy=False)
        assert not more
        self._commit(keys)

    def _commit(self, keys: list[str]) -> None:
        bucket_id = self._next_id
        self._next_id += 1
        self._buckets[bucket_id] = keys
        for key in keys:
            self._where[key] = bucket_id
        self._born[bucket_id] = self._clock + 1
        self._touch(bucket_id)
        heapq.heappush(self._probation, (self._stamp[bucket_id], bucket_id))
        if self._policy.in_share and not any(key in self._ghost for key in keys):
            self._a1in[bucket_id] = len(keys)
            self._a1in_objects += len(keys)
        parent = self._parents.get(keys[0])
        if parent is not None:
            self._children.setdefault(parent, set()).add(bucket_id)
            if parent not in self._where:
                heapq.heappush(self._orphans, (self._stamp[bucket_id], bucket_id))
        self.objects_written += len(keys)
        self.buckets_written += 1

    def _make_room(self, need: int, copy: bool = True) -> list[str]:
        """Evict oldest-stamped buckets until ``need`` fits; return the
        objects to copy forward (hit since their bucket was written)."""
        survivors: list[str] = []
        while len(self._where) + need > self._capacity:
            bucket_id = self._pop_oldest()
            keys = self._buckets.pop(bucket_id)
            born = self._born.pop(bucket_id)
            del self._stamp[bucket_id]
            for key in keys:
                del self._where[key]
            self._orphan_children(keys)
            if copy and self._policy.copy_forward:
                survivors += [key for key in keys if self._hit_at.get(key, -1) >= born]
        # Survivors take room too: drop the oldest until they fit (never themselves).
        while survivors and len(self._where) + need + len(survivors) > self._capacity:
            if not self._stamp:
                survivors = survivors[: max(0, self._capacity - need - len(self._where))]
                break
            bucket_id = self._pop_oldest()
            for key in self._buckets.pop(bucket_id):
                del self._where[key]
            del self._stamp[bucket_id]
            del self._born[bucket_id]
        return survivors

    def _orphan_children(self, keys: list[str]) -> None:
        """Buckets that follow an evicted key in a chain can no longer be hit."""
        if not self._policy.orphans_first:
            return
        for key in keys:
            for bucket_id in self._children.pop(key, ()):
                if bucket_id in self._stamp:
                    heapq.heappush(self._orphans, (self._stamp[bucket_id], bucket_id))

    def _is_orphan(self, bucket_id: int) -> bool:
        keys = self._buckets.get(bucket_id)
        if not keys:
            return False
        parent = self._parents.get(keys[0])
        return parent is not None and parent not in self._where

    def _pop_oldest(self) -> int:
        if self._policy.in_share:
            return self._pop_twoq()
        bucket_id = self._pop_segmented() if self._policy.protected_share else self._pop_any()
        self._protected_objects -= self._protected.pop(bucket_id, 0)
        return bucket_id

    def _count(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._counts[key] = self._counts.get(key, 0) + 1
        self._references += len(keys)
        if self._references >= 10 * self._capacity:
            self._references = 0
            self._counts = {k: c // 2 for k, c in self._counts.items() if c > 1}

    def _frequency(self, bucket_id: int) -> int:
        return max(self._counts.get(key, 0) for key in self._buckets[bucket_id])

    def _oldest_main(self) -> int | None:
        while self._heap:
            stamp, bucket_id = self._heap[0]
            if self._stamp.get(bucket_id) == stamp and bucket_id not in self._a1in:
                return bucket_id
            heapq.heappop(self._heap)
        return None

    def _pop_twoq(self) -> int:
        if self._a1in and (self._a1in_objects > self._policy.in_share * self._capacity or len(self._a1in) == len(self._stamp)):
            bucket_id, objects = self._a1in.popitem(last=False)
            self._a1in_objects -= objects
            if self._policy.tinylfu:
                main = self._oldest_main()
                if main is not None and self._frequency(bucket_id) > self._frequency(main):
                    heapq.heappop(self._heap)
                    return main
            for key in self._buckets[bucket_id]:
                self._ghost[key] = None
            while len(self._ghost) > self._policy.out_share * self._capacity:
                self._ghost.popitem(last=False)
            return bucket_id
        while True:
            stamp, bucket_id = heapq.heappop(self._heap)
            if self._stamp.get(bucket_id) == stamp and bucket_id not in self._a1in:
                return bucket_id

    def _pop_segmented(self) -> int:
        if self._protected_objects <= self._policy.protected_share * self._capacity:
            while self._probation:
                stamp, bucket_id = heapq.heappop(self._probation)
                if self._stamp.get(bucket_id) == stamp and bucket_id not in self._protected:
                    return bucket_id
        return self._pop_any()

    def _pop_any(self) -> int:
        while self._policy.orphans_first and self._orphans:
            _, bucket_id = heapq.heappop(self._orphans)
            if bucket_id in self._stamp and self._is_orphan(bucket_id):
                return bucket_id
        while True:
            stamp, bucket_id = heapq.heappop(self._heap)
            if self._stamp.get(bucket_id) == stamp:
                return bucket_id

    def _touch(self, bucket_id: int) -> None:
        self._clock += 1
        self._stamp[bucket_id] = self._clock
        heapq.heappush(self._heap, (self._clock, bucket_id))

    def write_amplification(self, admitted: int) -> float:
        """Objects (and metas) written per object the tier accepted."""
        data = self.objects_written * OBJECT_SIZE
        meta = self.objects_written * META_BYTES_PER_OBJECT + self.buckets_written * META_BYTES_PER_BUCKET
        return (data + meta) / (admitted * OBJECT_SIZE) if admitted else 0.0


class _Either:
    """Membership in either of two containers."""

    def __init__(self, first: dict[str, int], second: OrderedDict[str, None]) -> None:
        self._first, self._second = first, second

    def __contains__(self, key: object) -> bool:
        return key in self._first or key in self._second


CANDIDATES: dict[str, Policy] = {
    # today, and the knobs the store already has
    "default": Policy(),
    "keys=64": Policy(keys_limit=64),
    "keys=16": Policy(keys_limit=16),
    # (a) one bucket per write-back
    "per-request": Policy(per_request=True),
    "per-request + keys=64": Policy(per_request=True, keys_limit=64),
    # (c) prefix-aware recency
    "tails-first": Policy(tails_first=True),
    "per-request + tails-first": Policy(per_request=True, tails_first=True),
    "per-request + heads-newest": Policy(per_request=True, heads_newest=True),
    "per-request + orphans-first": Policy(per_request=True, orphans_first=True),
    # (d) copy-forward of recently hit objects
    "copy-forward": Policy(copy_forward=True),
    "per-request + copy-forward": Policy(per_request=True, copy_forward=True),
    # (e) admission on second use
    "second-use": Policy(second_use=True),
    "per-request + second-use": Policy(per_request=True, second_use=True),
    "per-request + second-use + copy-forward": Policy(per_request=True, second_use=True, copy_forward=True),
    # scan-resistant recency: segmented LRU and 2Q of buckets
    "per-request + SLRU 50%": Policy(per_request=True, protected_share=0.5),
    "per-request + SLRU 80%": Policy(per_request=True, protected_share=0.8),
    "2Q 25%/100% (interleaved)": Policy(in_share=0.25, out_share=1.0),
    "per-request + 2Q 25%/50%": Policy(per_request=True, in_share=0.25, out_share=0.5),
    "per-request + 2Q 25%/50%, no promotion": Policy(per_request=True, in_share=0.25, out_share=0.5, promote=False),
    "per-request + 2Q 10%/50%": Policy(per_request=True, in_share=0.10, out_share=0.5),
    "per-request + 2Q 20%/100%": Policy(per_request=True, in_share=0.20, out_share=1.0),
    "per-request + 2Q 25%/100%": Policy(per_request=True, in_share=0.25, out_share=1.0),
    "per-request + 2Q 33%/100%": Policy(per_request=True, in_share=0.33, out_share=1.0),
    "per-request + 2Q 25%/200%": Policy(per_request=True, in_share=0.25, out_share=2.0),
    "per-request + 2Q 25%/100% + copy-forward": Policy(per_request=True, in_share=0.25, out_share=1.0, copy_forward=True),
    "per-request + 2Q 10%/100% + TinyLFU": Policy(per_request=True, in_share=0.10, out_share=1.0, tinylfu=True),
    # ceilings: the same policies on single objects (keys=1, no buckets)
    "per-object LRU (model, keys=1)": Policy(per_request=True, keys_limit=1),
    "per-object 2Q 25%/100% (keys=1)": Policy(per_request=True, keys_limit=1, in_share=0.25, out_share=1.0),
}


def chain_parents(trace: Trace) -> dict[str, str | None]:
    """Each block's predecessor in its chains (a block id names its whole prefix,
    so it has one), None for the first block of a chain."""
    parents: dict[str, str | None] = {}
    for request in trace.requests:
        previous = None
        for block in map(str, request.hash_ids):
            parents[block] = previous
            previous = block
    return parents


Row = list[tuple[float, float]]
"""Per capacity: (hits / per-object LRU hits, write amplification)."""


def study(candidates: dict[str, Policy]) -> tuple[dict[int, list[tuple[float, float]]], dict[tuple[str, int], Row]]:
    """Per L2: (LRU hit rate, Belady hit rate) per capacity; per (candidate, L2): its row."""
    trace = read_trace(default_trace_path())
    capacities = [parse_capacity(f"{p}%", OBJECT_SIZE, trace.distinct_blocks) for p in PERCENTS]
    parents = chain_parents(trace)
    references: dict[int, list[tuple[float, float]]] = {}
    results: dict[tuple[str, int], Row] = {}
    for l2 in L2_BLOCKS:
        requests = tier_requests(trace, l2)
        lru_counts = [replay_tier(LruTier(c), requests) for c in capacities]
        lru = [c.hits for c in lru_counts]
        references[l2] = [(c.hit_rate, replay_tier(BeladyTier(cap, requests), requests).hit_rate) for c, cap in zip(lru_counts, capacities)]
        for name, policy in candidates.items():
            row = []
            for capacity, lru_hits in zip(capacities, lru):
                model = BucketModel(capacity, policy, parents)
                counts = replay_tier(model, requests)
                row.append((counts.hits / lru_hits if lru_hits else float("nan"), model.write_amplification(counts.admitted)))
            results[(name, l2)] = row
            print(f"{name} L2={l2}: " + " ".join(f"{r:.3f}" for r, _ in row), file=sys.stderr)
    return references, results


STORE_CONFIGS = {
    "default": ({"eviction_policy": "lru"}, False),
    "per-request": ({"eviction_policy": "lru"}, True),
    "per-request + 2Q 25%/100%": ({"eviction_policy": "2q"}, True),
}
"""Candidates the store itself implements: its fields and ``OffloadQueue(bucket_per_batch=...)``."""


def store_hits(name: str, requests: list, capacity: int) -> tuple[int, float]:
    """Hits and write amplification of the store's own code (simulated files) configured as candidate ``name``."""
    fields, per_batch = STORE_CONFIGS[name]
    with open_store(capacity * OBJECT_SIZE, ReplayOptions(simulate=True, store_fields=fields)) as (store, fs):
        tier = KvBucketTier(store, OBJECT_SIZE, per_batch)
        counts = replay_tier(tier, requests)
        tier.close()
    return counts.hits, fs.counts.total / (counts.admitted * OBJECT_SIZE)


def check_model() -> None:
    """The model gives the store's own hits for every candidate the store implements."""
    trace = read_trace(default_trace_path())
    for l2 in L2_BLOCKS:
        requests = tier_requests(trace, l2)
        for capacity in (5000, 10000):
            for name in STORE_CONFIGS:
                store, wa = store_hits(name, requests, capacity)
                model = replay_tier(BucketModel(capacity, CANDIDATES[name]), requests).hits
                print(f"check {name} L2={l2} capacity={capacity}: store {store} model {model} (store WA {wa:.4f})", file=sys.stderr)
                assert store == model, (name, store, model)


def markdown(references: dict[int, list[tuple[float, float]]], results: dict[tuple[str, int], Row]) -> str:
    """One table per L2 size: hits over per-object LRU's, per capacity."""
    lines: list[str] = []
    for l2, refs in references.items():
        lines += [
            f"### {'No L2' if not l2 else f'L2 of {l2:,} blocks'}: hits / per-object LRU hits",
            "",
            "| candidate | " + " | ".join(f"{p}%" for p in PERCENTS) + " | min | WA |",
            "|---|" + "---|" * len(PERCENTS) + "---|---|",
            "| *per-object LRU hit rate* | " + " | ".join(f"*{lru:.4f}*" for lru, _ in refs) + " | | |",
            "| *Belady / LRU* | " + " | ".join(f"*{b / lru:.2f}*" if lru > 0.01 else "*-*" for lru, b in refs) + " | | |",
        ]
        for (name, row_l2), row in results.items():
            if row_l2 != l2:
                continue
            # Where LRU hits almost nothing (the tier smaller than L2), a ratio means nothing.
            shown = [(r, lru) for (r, _), (lru, _) in zip(row, refs)]
            cells = " | ".join(f"{r:.3f}" if lru > 0.01 else "-" for r, lru in shown)
            low = min(r for r, lru in shown if lru > 0.01)
            lines.append(f"| {name} | {cells} | {low:.3f} | {max(w for _, w in row):.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="First check the model against the store's own code.")
    parser.add_argument("--only", nargs="*", default=None, help="Candidates to run (default: all).")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.check:
        check_model()
    chosen = {k: v for k, v in CANDIDATES.items() if args.only is None or k in args.only}
    print(markdown(*study(chosen)))
    print(f"\n{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
