"""Eviction of whole buckets: making room for a write, evicting down to the
watermarks, and the background evictor's passes.

Every eviction holds the store's writer lock (the background evictor takes it
for one bounded pass at a time) and goes in two phases: the victims leave
the index, the caller's ``on_evict`` and the eviction listeners hear of their
keys, then their files are deleted. An ``on_evict`` that raises puts the
victims back (nothing was deleted); a listener that raises is logged (the
eviction is decided). Victims are chosen by the policy among the buckets
holding no leased key.

A writer with an eviction policy and a limit owns one
:class:`~kvbucket._core.evictor.BackgroundEvictor` thread, woken by each
commit that leaves usage above the high watermark; it deletes through the
same path, so the crash-safety argument is the foreground one.

A member of a shared budget (:mod:`kvbucket._core.budget_member`) reserves
what a write may add in the budget after its own limits admit it, evicting
its own buckets when the budget is full, and publishes its usage after every
background pass, so its slot always bounds its directory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from ..config import BucketConfig
from ..errors import CapacityExceeded
from .budget_member import BudgetMember
from .catalog import Catalog
from .evictor import BackgroundEvictor
from .index import Bucket
from .interfaces import EvictionListener
from .space import Limits, Space, Usage

log = logging.getLogger(__name__)

__all__ = ["BACKGROUND_EVICTION_BATCH", "Eviction"]

BACKGROUND_EVICTION_BATCH = 8
"""Most buckets one background eviction pass deletes while holding the writer lock."""

class Eviction:
    """The evictions of one writer store.

    ``delete(buckets)`` takes buckets out of the index (those still in it)
    and deletes their files; ``begin_mutation()`` is what every change to
    the directory starts with (it raises when the store cannot change);
    ``member`` is the store's side of the shared budget.
    """

    def __init__(
        self,
        directory: str,
        config: BucketConfig,
        catalog: Catalog,
        space: Space,
        evicts: bool,
        writer: threading.RLock,
        delete: Callable[[Sequence[Bucket]], None],
        begin_mutation: Callable[[], None],
        member: BudgetMember,
    ) -> None:
        self._dir = directory
        self._config = config
        self._catalog = catalog
        self._space = space
        self._evicts = evicts
        self._writer = writer
        self._delete = delete
        self._begin_mutation = begin_mutation
        self._member = member
        self._listeners: list[EvictionListener] = []  # appended at any time; read holding _writer
        self._evicted_buckets = 0  # guarded by _writer
        self._evicted_keys = 0  # guarded by _writer
        self._evictor: BackgroundEvictor | None = None  # set once, by start()
        # Written by the evictor thread only (read as a snapshot): failed
        # background runs, and the last failure (None once a later run succeeds).
        self.background_errors = 0
        self.background_error: str | None = None

    @property
    def evicted(self) -> tuple[int, int]:
        """``(buckets, keys)`` evicted since open."""
        with self._writer:
            return self._evicted_buckets, self._evicted_keys

    def add_listener(self, listener: EvictionListener) -> None:
        """Tell ``listener`` the keys of every eviction (see ``BucketStore.add_eviction_listener``)."""
        self._listeners.append(listener)

    # -- foreground -----------------------------------------------------------
    def make_room(self, need: Usage, on_evict: EvictionListener | None) -> None:
        """Evict so that ``need`` fits the store's limits, then reserve it in
        the shared budget (evicting more of this store's buckets when the
        budget is full), or raise :class:`CapacityExceeded`. A limit that
        cannot be met changes nothing; a budget that cannot be met evicts
        nothing more than the limits did.

        Requires: ``_writer`` held.
        """
        limits = self._space.limits
        if limits.physical and not limits.admit(self._space.usage() + need):
            self._space.reconcile()
        usage = self._space.usage() + need
        if not limits.admit(usage):
            victims = self._catalog.victims(usage, limits) if self._evicts and limits.admit(need) else None
            if victims is None:
                raise CapacityExceeded(self._space.shortfall(need, self._space.usage(), self._config.eviction_policy) + self._leased_note())
            self._evict(victims, on_evict)
        evict_to = (lambda target: self._evict_to_physical(target, on_evict)) if self._evicts else None
        self._member.reserve(need.physical, evict_to)

    def _evict_to_physical(self, target: int, on_evict: EvictionListener | None) -> bool:
        """Evict this store's buckets down to ``target`` physical bytes (after
        re-measuring); False, evicting nothing, when that cannot be reached.

        Requires: ``_writer`` held.
        """
        self._space.reconcile()
        usage = self._space.usage()
        if usage.physical <= target:
            return True
        victims = self._catalog.victims(usage, Limits(physical=target)) if target > 0 else None
        if victims is None:
            return False
        self._evict(victims, on_evict)
        return True

    def to_watermark(self, high: float, low: float, on_evict: EvictionListener | None) -> list[str]:
        """When usage is above ``high`` of a limit, evict down to ``low``; the evicted keys.

        Requires: ``_writer`` held.
        """
        if not self._evicts:
            return []
        self._space.reconcile()
        usage, limits = self._space.usage(), self._space.limits
        if limits.ratio(usage) <= high:
            return []
        victims = self._catalog.victims(usage, limits.scaled(low))
        if victims is None:
            raise CapacityExceeded(self._space.unreachable(low, usage) + self._leased_note())
        return self._evict(victims, on_evict)

    def _evict(self, victims: list[Bucket], on_evict: EvictionListener | None) -> list[str]:
        """Two-phase eviction: out of the index, ``on_evict``, then the files.

        Requires: ``_writer`` held.
        """
        keys = [key for bucket in victims for key in bucket.keys]
        records = self._catalog.take_out(victims)
        if on_evict is not None and keys:
            try:
                on_evict(list(keys))
            except BaseException:
                self._catalog.put_back(victims, records)
                raise
        for listener in self._listeners:
            try:
                listener(list(keys))
            except Exception:
                log.exception("an eviction listener of %s failed; the eviction goes on", self._dir)
        self._catalog.evicted(victims)
        self._delete(victims)
        self._evicted_buckets += len(victims)
        self._evicted_keys += len(keys)
        log.info("evicted %d bucket(s), %d key(s)", len(victims), len(keys))
        return keys

    def _leased_note(self) -> str:
        """How many keys lookups hold leased (their buckets cannot be evicted)."""
        leased = self._catalog.leased()
        if not leased:
            return ""
        return (
            f"; {leased} key(s) are leased by lookups and their buckets are not evicted until they are loaded, "
            f"released or their lease ends (lookup_lease_s={self._config.lookup_lease_s})"
        )

    # -- background -----------------------------------------------------------
    def start(self) -> None:
        """Start the background evictor of a writer that has a policy, a limit
        and ``background_eviction`` on."""
        config = self._config
        if config.readonly or not config.background_eviction or not self._evicts or self._space.limits == Limits():
            return
        self._evictor = BackgroundEvictor(self._background_pass, self._background_failed, name=f"kvbucket-evict {self._dir}")
        self._evictor.start()
        self._evictor.wake()  # a store opened above its high watermark comes down at once

    def committed(self) -> None:
        """A bucket was committed: wake the evictor when usage is above the high
        watermark, or when a run failed (the next commit retries and clears the error)."""
        if self._evictor is None:
            return
        if self.background_error is not None or self._space.limits.ratio(self._space.usage()) > self._config.eviction_high_watermark:
            self._evictor.wake()

    def wait_idle(self, timeout: float | None) -> bool:
        """True once the evictor is idle (at once without one); False after ``timeout`` seconds."""
        evictor = self._evictor
        return True if evictor is None else evictor.wait_idle(timeout)

    def stop(self) -> None:
        """Stop and join the evictor (a pass in progress completes)."""
        if self._evictor is not None:
            self._evictor.stop()

    def _background_pass(self, first: bool) -> bool:
        """One pass of the background evictor: evict up to
        :data:`BACKGROUND_EVICTION_BATCH` of the buckets that bring usage to
        ``eviction_low_watermark``; return whether more remain to evict. A
        run starts only when usage is above ``eviction_high_watermark`` of a
        limit (the ``first`` pass checks), and its later passes go on to low.

        The first pass of a run that finds usage above the high watermark
        re-measures the directory first (as :meth:`to_watermark` does). When
        even evicting every bucket that is not leased would not reach the low
        watermark (leases, or bytes that are not buckets), the pass evicts
        nothing: a write that does not fit still evicts (or fails) in the
        foreground.
        """
        high, low = self._config.eviction_high_watermark, self._config.eviction_low_watermark
        with self._writer:
            if self._catalog.closed:
                return False
            self._begin_mutation()
            limits = self._space.limits
            usage = self._space.usage()
            if first and limits.physical and limits.ratio(usage) > high:
                self._space.reconcile()
                usage = self._space.usage()
            if first and limits.ratio(usage) <= high:  # later passes of a run go on down to low
                self.background_error = None
                return False
            victims = self._catalog.victims(usage, limits.scaled(low))
            if victims is None:
                log.debug("background eviction of %s cannot reach the low watermark: nothing evicted", self._dir)
                return False
            if not victims:
                self.background_error = None
                return False
            self._evict(victims[:BACKGROUND_EVICTION_BATCH], None)
            self._member.settle()
            self.background_error = None
            return len(victims) > BACKGROUND_EVICTION_BATCH

    def _background_failed(self, error: Exception) -> None:
        """A background run failed: log it, count it, keep it for the store's
        stats. Buckets whose deletion failed stay counted as usage and the
        next write retries their deletion first (failing while it cannot),
        as after a failed foreground eviction."""
        self.background_errors += 1
        self.background_error = f"{type(error).__name__}: {error}"
        log.error("background eviction in %s failed: %s", self._dir, error, exc_info=error)
