"""A writer store's side of a shared budget (:mod:`kvbucket._core.budget`).

At open the store takes its ``LOCK`` under the budget's ``flock``
(:func:`admitted`), after the budget admits a new member, and joins with
its directory's measured usage (:func:`join_budget`). While open, the
:class:`BudgetMember` reserves what a write may add before it writes
(evicting the store's own buckets when the budget is full, or when other
members asked for room), publishes the usage after every change, and leaves
at close. A store that is not a member (no ``budget_path``, or readonly) has
a member without a budget: every hook does nothing.

Every hook runs holding the store's writer lock, which guards
:attr:`BudgetMember._budget`. Lock order: the writer lock, then the
budget's lock (its mutex, then its ``flock``), then the index lock and the
space account's lock (a reservation evicts and measures while it holds the
budget's lock).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from ..config import BucketConfig
from .budget import Budget
from .du import measure_store
from .fs import FileSystem, run_io
from .lockfile import StoreLock

__all__ = ["BudgetMember", "open_budget", "admitted", "join_budget"]


def open_budget(fs: FileSystem, config: BucketConfig, directory: str) -> Budget | None:
    """The shared budget a writer joins (``budget_path``); None without one, or when readonly."""
    if config.readonly or not os.fspath(config.budget_path):
        return None
    budget_path = os.fspath(config.budget_path)
    return run_io("opening the budget file", budget_path, lambda: Budget.open(fs, budget_path, config.budget_bytes, directory))


@contextlib.contextmanager
def admitted(budget: Budget | None, directory: str) -> Iterator[None]:
    """Hold the budget's ``flock`` (nothing without a budget) once it admits
    ``directory`` as a member: the store takes its ``LOCK`` inside, since the
    other members probe ``LOCK`` files only under the ``flock``."""
    if budget is None:
        yield
        return
    with budget.locked():
        run_io("checking the budget", directory, budget.admit)
        yield


def join_budget(fs: FileSystem, budget: Budget | None, lock: StoreLock | None, directory: str, config: BucketConfig) -> None:
    """Join ``budget`` with the directory's measured usage (before recovery,
    which only frees space). Nothing without a budget or without a lock
    (readonly); when it fails, the caller releases ``lock``.

    Requires: inside :func:`admitted`, the writer's ``lock`` taken."""
    if budget is None or lock is None:
        return
    count_foreign = config.physical_scope == "directory"
    run_io("joining the budget", directory, lambda: budget.join(measure_store(fs, directory, foreign=count_foreign).total))


class BudgetMember:
    """The store-side hooks of a joined budget (``budget`` None: not a member).

    ``physical()`` is the store's physical usage (the space account's).
    """

    def __init__(self, budget: Budget | None, directory: str, physical: Callable[[], int]) -> None:
        self._budget = budget  # guarded by the writer lock; None once closed
        self._dir = directory
        self._physical = physical

    def reserve(self, physical: int, evict_to: Callable[[int], bool] | None = None) -> None:
        """Reserve ``physical`` bytes in the shared budget before a write;
        ``evict_to(target)`` evicts the store's own buckets down to ``target``
        physical bytes when the budget is full or other members asked for
        room (None: evict nothing). :class:`CapacityExceeded` when they do
        not fit.

        Requires: the writer lock held.
        """
        if self._budget is not None:
            budget = self._budget
            run_io("reserving room in the budget", self._dir, lambda: budget.reserve(physical, self._physical, evict_to))

    def settle(self) -> None:
        """Publish the store's usage in the shared budget and drop its
        reservation (after every change to the directory).

        Requires: the writer lock held.
        """
        if self._budget is not None:
            budget = self._budget
            run_io("publishing usage in the budget", self._dir, lambda: budget.publish(self._physical()))

    def share(self) -> tuple[int, int] | None:
        """``(size, used)`` of the budget, the store's usage published first;
        None when the store is not a member.

        Requires: the writer lock held.
        """
        if self._budget is None:
            return None
        budget = self._budget
        self.settle()
        return budget.size, run_io("reading the budget", self._dir, budget.used)

    def leave(self) -> None:
        """Publish the usage with no reservation and no request (the store
        closes; raises :class:`OSError`, which the closing store logs).

        Requires: the writer lock held.
        """
        if self._budget is not None:
            self._budget.leave(self._physical())

    def close(self) -> None:
        """Close the budget's descriptor; every later hook does nothing (the
        slot stays: the directory still occupies the disk).

        Requires: the writer lock held, or no other thread using the store.
        """
        if self._budget is not None:
            self._budget.close()
            self._budget = None
