"""Small helpers shared by the store tests."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from kvbucket import BucketStore
from kvbucket._core.fs import FileSystem
from kvbucket._core.read_path import ReadPath
from kvbucket.errors import StorageIOError


def value_for(key: str, size: int) -> bytes:
    """Deterministic bytes for ``key``, so any reader can check them."""
    seed = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return (seed * (size // len(seed) + 1))[:size]


def snapshot(directory: str | os.PathLike[str]) -> dict[str, str]:
    """Every file below ``directory`` (relative name -> sha256 of its bytes)."""
    root = Path(directory)
    if not root.exists():
        return {}
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(root.rglob("*"))
    }


def our_files(directory: str | os.PathLike[str]) -> list[str]:
    """Names in the store directory other than LOCK."""
    return sorted(name for name in os.listdir(directory) if name != "LOCK")


def du(path: str | os.PathLike[str]) -> int:
    """Allocated bytes of ``path`` and everything below it, as ``du`` counts them."""
    total = os.lstat(path).st_blocks * 512
    with os.scandir(path) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            total += du(entry.path) if stat.S_ISDIR(st.st_mode) else st.st_blocks * 512
    return total


class FailingStore:
    """Wraps a store; the first ``failures`` writes raise like a full disk."""

    def __init__(self, store: Any, failures: int) -> None:
        self._store, self.failures = store, failures

    def batch_offload(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise StorageIOError("writing bucket: No space left on device", OSError(28, "No space left on device"))
        return self._store.batch_offload(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def fail_next_writes(monkeypatch: pytest.MonkeyPatch, failures: int) -> None:
    """The next ``failures`` bucket writes of any store raise like a full disk
    (whichever thread writes: an adapter's own, or an offload queue's)."""
    real = BucketStore.batch_offload
    lock = threading.Lock()
    left = [failures]

    def batch_offload(self: BucketStore, *args: Any, **kwargs: Any) -> Any:
        with lock:
            fail = left[0] > 0
            if fail:
                left[0] -= 1
        if fail:
            raise StorageIOError("writing bucket: No space left on device", OSError(28, "No space left on device"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BucketStore, "batch_offload", batch_offload)


class DeletionGate(FileSystem):
    """A file system whose unlinks wait while ``held`` is held, so a ``du``
    scan under ``held`` sees no file vanish (the background evictor deletes
    on its own thread)."""

    def __init__(self) -> None:
        self.held = threading.Lock()

    def unlink(self, path: str) -> None:
        with self.held:
            super().unlink(path)


def hold_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """From now on every object read waits for ``release`` (the second event);
    ``entered`` (the first) is set when a read starts."""
    entered, release = threading.Event(), threading.Event()
    read = ReadPath.read

    def held_read(self: ReadPath, *args: Any) -> None:
        entered.set()
        release.wait()
        read(self, *args)

    monkeypatch.setattr(ReadPath, "read", held_read)
    return entered, release


def record_submits(monkeypatch: pytest.MonkeyPatch, store: BucketStore) -> list[int]:
    """The sizes of the batches handed to ``store.submit_load`` from now on."""
    submitted: list[int] = []
    submit = store.submit_load
    monkeypatch.setattr(store, "submit_load", lambda dests, **kw: submitted.append(len(dests)) or submit(dests, **kw))
    return submitted


class SetOnRecord(logging.Handler):
    """Sets ``event`` when a record whose message contains ``fragment`` is logged."""

    def __init__(self, fragment: str, event: threading.Event) -> None:
        super().__init__(logging.DEBUG)
        self.fragment, self.event = fragment, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.fragment in record.getMessage():
            self.event.set()


class ReprCountingKey(str):
    """A key that counts how often its ``repr`` is composed (error messages
    use it); set ``reprs`` to 0 before the calls counted."""

    reprs = 0

    def __repr__(self) -> str:
        type(self).reprs += 1
        return super().__repr__()
