"""Counting what a store writes and syncs, through the FileSystem seam."""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .._core.format import FileKind, parse_name
from .._core.fs import FileSystem
from .simfs import SimulatedFileSystem

__all__ = ["WriteCounts", "CountingFileSystem", "CountingSimulatedFileSystem"]


@dataclass
class WriteCounts:
    """Bytes written, by kind of file."""

    data: int = 0
    """Bucket data files (values, and any rewrite of them)."""
    meta: int = 0
    """Metas and their temporary files."""
    other: int = 0
    """Everything else (``LOCK``)."""

    @property
    def total(self) -> int:
        """Bytes written to every file."""
        return self.data + self.meta + self.other


class CountingFileSystem(FileSystem):
    """A :class:`FileSystem` that counts the bytes each ``pwritev`` writes
    (:attr:`counts`) and its sync calls by name (:attr:`syncs`:
    ``fdatasync``, ``fsync``, ``fsync_dir``)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.counts = WriteCounts()
        self.syncs: Counter[str] = Counter()
        self._kinds: dict[int, str] = {}  # open descriptor -> field of WriteCounts
        self._counting = threading.Lock()

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        with self._counting:
            self._kinds[fd] = _kind_of(os.path.basename(path))
        return fd

    def close(self, fd: int) -> None:
        with self._counting:
            self._kinds.pop(fd, None)
        super().close(fd)

    def pwritev(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        written = super().pwritev(fd, buffers, offset)
        with self._counting:
            kind = self._kinds.get(fd, "other")
            setattr(self.counts, kind, getattr(self.counts, kind) + written)
        return written

    def fdatasync(self, fd: int) -> None:
        self._count_sync("fdatasync")
        super().fdatasync(fd)

    def fsync(self, fd: int) -> None:
        self._count_sync("fsync")
        super().fsync(fd)

    def fsync_dir(self, path: str) -> None:
        self._count_sync("fsync_dir")
        super().fsync_dir(path)

    def _count_sync(self, name: str) -> None:
        with self._counting:
            self.syncs[name] += 1


class CountingSimulatedFileSystem(CountingFileSystem, SimulatedFileSystem):
    """The in-memory stand-in for a store directory, counting its writes."""


def _kind_of(name: str) -> str:
    parsed = parse_name(name)
    if parsed is None:
        return "other"
    return "data" if parsed[1] is FileKind.DATA else "meta"
