"""The background evictor: one daemon thread per writer store.

It sleeps on a condition until woken (the store wakes it after a commit
that leaves usage above the high watermark), then runs the store's eviction
step until the step says there is nothing left to do, and sleeps again. It
never polls: with no commits it never runs.

The step is the store's: it holds the store's writer lock for one bounded
pass (a few buckets) at a time, so writes interleave with a long eviction.
An exception from the step ends that run; it is reported to ``on_error``
and the next wake-up (the store's next commit) tries again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["BackgroundEvictor"]


class BackgroundEvictor:
    """Runs ``step`` on a daemon thread whenever woken.

    ``step(first)`` does one pass and returns whether another is needed;
    ``first`` is true for the first pass after a wake-up.
    """

    def __init__(self, step: Callable[[bool], bool], on_error: Callable[[Exception], None], name: str) -> None:
        self._step = step
        self._on_error = on_error
        self._changed = threading.Condition()
        # Guarded by _changed: a wake-up not yet taken, a run in progress, stop asked.
        self._wanted = False
        self._running = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def wake(self) -> None:
        """Ask for a run (cheap; many wake-ups before a run make one run)."""
        with self._changed:
            if not self._wanted:
                self._wanted = True
                self._changed.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no run is in progress or asked for (or the thread has
        stopped); False when ``timeout`` seconds passed first."""
        with self._changed:
            return self._changed.wait_for(self._idle, timeout)

    def stop(self) -> None:
        """Stop the thread and join it: a run in progress finishes its pass first."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _idle(self) -> bool:
        return self._stopping or not (self._wanted or self._running)

    def _run(self) -> None:
        while self._take_wake_up():
            try:
                first = True
                while not self._stopping and self._step(first):
                    first = False
            except Exception as exc:  # noqa: BLE001 - reported, not lost; the next wake-up retries
                self._on_error(exc)
            finally:
                with self._changed:
                    self._running = False
                    self._changed.notify_all()

    def _take_wake_up(self) -> bool:
        """Wait for a wake-up; True to run, False to exit."""
        with self._changed:
            self._changed.wait_for(lambda: self._wanted or self._stopping)
            if self._stopping:
                self._changed.notify_all()
                return False
            self._wanted, self._running = False, True
            return True
