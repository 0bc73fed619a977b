"""The I/O seam: every system call the store makes on its directory.

The store never calls ``os`` directly for anything that touches its files; it
calls a :class:`FileSystem`. Production uses this class as is. Tests subclass
it to record operations (power-loss simulation), to kill the process at the
Nth step (crash sweeps) or to raise ``EIO``/``ENOSPC`` or write short (fault
injection). Subclasses override the primitive methods (those without a
leading ``write_``/``read_``); the loops in :meth:`write_all` and
:meth:`read_into` are built on them, so an override sees every real call.
"""

from __future__ import annotations

import fcntl
import os
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import TypeVar

from ..errors import StorageIOError

__all__ = ["FileSystem", "IOV_MAX", "WRITE_CHUNK", "io_failure", "run_io", "stat_directory"]

_T = TypeVar("_T")

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
WRITE_CHUNK = 4 << 20
"""Bytes per write call: 1-4 MiB calls run several times faster than one huge
``pwritev`` on the machines we measured (docs/BENCHMARKS.md)."""

O_DIRECT = getattr(os, "O_DIRECT", 0)


class FileSystem:
    """POSIX file operations, one method per system call."""

    concurrent_syncs: bool = True
    """Whether the store may run the independent writes and syncs of a group
    commit on several threads at once (each file's own calls stay in order).
    A file system that is not thread-safe, or whose calls must come in one
    reproducible order (a recorder replayed by call number), says False."""

    # -- primitives -------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        """A new descriptor (close-on-exec) of ``path`` opened with ``flags``; raises
        FileNotFoundError when it does not exist and ``O_CREAT`` is not given,
        FileExistsError when it exists and ``O_CREAT | O_EXCL`` is."""
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def close(self, fd: int) -> None:
        """Release ``fd``; the descriptor is released even when it raises (an error of a
        deferred write)."""
        os.close(fd)

    def pwritev(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        """Write ``buffers`` back to back at ``offset``; returns the bytes written,
        which may be fewer than given."""
        return os.pwritev(fd, buffers, offset)

    def preadv(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        """Fill ``buffers`` back to back from ``offset``; returns the bytes read, 0 at
        end of file, possibly fewer than asked before it."""
        return os.preadv(fd, buffers, offset)

    def fdatasync(self, fd: int) -> None:
        """Make the file's data (and the size) durable; raises OSError when the device
        reports a lost write."""
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        """Make the file's data and metadata durable; raises OSError when the device
        reports a lost write."""
        os.fsync(fd)

    def fstat(self, fd: int) -> os.stat_result:
        """The status of the open file ``fd``."""
        return os.fstat(fd)

    def stat(self, path: str) -> os.stat_result:
        """The status of the entry ``path`` itself (a final link is not followed);
        raises FileNotFoundError when it does not exist."""
        return os.stat(path, follow_symlinks=False)

    def rename(self, src: str, dst: str) -> None:
        """Atomically give ``src`` the name ``dst``, replacing a file there; raises
        FileNotFoundError when ``src`` does not exist."""
        os.rename(src, dst)

    def link(self, src: str, dst: str) -> None:
        """Give the file ``src`` (not followed if a link) the new name ``dst``;
        raises ``FileExistsError`` rather than replace anything at ``dst``."""
        os.link(src, dst, follow_symlinks=False)

    def unlink(self, path: str) -> None:
        """Remove the name ``path`` (a link itself, never its target); raises
        FileNotFoundError when it does not exist."""
        os.unlink(path)

    def mkdir(self, path: str) -> None:
        """Create the directory ``path`` and any missing parents; nothing when it
        already is a directory, FileExistsError when another entry holds the name."""
        os.makedirs(path, exist_ok=True)

    def listdir(self, path: str) -> list[str]:
        """The names in the directory ``path`` (no ``.``/``..``, any order); raises
        FileNotFoundError when it does not exist, NotADirectoryError when it is not a
        directory."""
        return os.listdir(path)

    def fsync_dir(self, path: str) -> None:
        """Make the directory's entries (creates, renames, unlinks) durable; raises
        FileNotFoundError when it does not exist."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def lock(self, fd: int) -> bool:
        """Take an exclusive ``flock`` without blocking; False when another holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def lock_wait(self, fd: int) -> None:
        """Take an exclusive ``flock``, waiting while another descriptor holds it."""
        fcntl.flock(fd, fcntl.LOCK_EX)

    def unlock(self, fd: int) -> None:
        """Release the ``flock`` held through ``fd`` (nothing when none is held)."""
        fcntl.flock(fd, fcntl.LOCK_UN)

    def advise_dontneed(self, fd: int) -> None:
        """Drop the file's pages from the page cache (benchmarks: cold reads); a hint,
        with no effect on the content."""
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def advise_willneed(self, fd: int, offset: int, length: int) -> None:
        """Start reading ``length`` bytes at ``offset`` into the page cache, not waiting
        for them (a hint, with no effect on the content)."""
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)

    # -- loops built on the primitives ------------------------------------
    def write_all(self, fd: int, views: Sequence[memoryview], offset: int) -> int:
        """Write ``views`` back to back at ``offset``, looping over short
        writes, in calls of at most :data:`IOV_MAX` pieces and about
        :data:`WRITE_CHUNK` bytes. Returns the bytes written."""
        total = 0
        for chunk in _chunks(views, WRITE_CHUNK, IOV_MAX):
            while chunk:
                written = self.pwritev(fd, chunk, offset + total)
                if written <= 0:
                    raise OSError(f"pwritev wrote {written} bytes")
                total += written
                chunk = _advance(chunk, written)
        return total

    def read_into(self, fd: int, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset``; see :meth:`readv_into`."""
        return self.readv_into(fd, [view], offset)

    def readv_into(self, fd: int, views: Sequence[memoryview], offset: int) -> int:
        """Fill ``views`` back to back from ``offset``, looping over short
        reads; returns the bytes read, fewer than asked only at end of file."""
        done = 0
        remaining = [v for v in views if len(v)]
        left = sum(map(len, remaining))  # bytes of ``remaining``: a whole read skips advancing
        while left:
            got = self.preadv(fd, remaining[:IOV_MAX], offset + done)
            if got == 0:
                break
            done += got
            left -= got
            if left:
                remaining = _advance(remaining, got)
        return done

    def read_file(self, path: str) -> bytes:
        """The whole content of a small file (a meta)."""
        fd = self.open(path, os.O_RDONLY)
        try:
            size = self.fstat(fd).st_size
            buf = bytearray(size)
            got = self.read_into(fd, memoryview(buf), 0)
            return bytes(buf[:got])
        finally:
            self.close(fd)


def run_io(what: str, directory: str, operation: Callable[[], _T]) -> _T:
    """``operation()``, with an :class:`OSError` turned into
    :class:`~kvbucket.errors.StorageIOError` saying ``what`` failed in ``directory``."""
    try:
        return operation()
    except StorageIOError:
        raise
    except OSError as exc:
        raise io_failure(what, directory, exc) from exc


def io_failure(what: str, directory: str, exc: OSError) -> StorageIOError:
    """The :class:`~kvbucket.errors.StorageIOError` saying ``what`` failed in
    ``directory`` with ``exc`` (for a hot path that cannot afford to compose
    ``what`` before it knows the operation failed)."""
    return StorageIOError(f"{what} in {directory} failed: {exc.strerror or exc}", exc)


def _chunks(views: Sequence[memoryview], max_bytes: int, max_pieces: int) -> list[list[memoryview]]:
    """Split ``views`` into runs of at most ``max_pieces`` views and about
    ``max_bytes`` bytes; a larger view is split into ``max_bytes`` slices."""
    chunks: list[list[memoryview]] = []
    current: list[memoryview] = []
    size = 0
    for view in views:
        start = 0
        while start < len(view):
            piece = view[start : start + max_bytes - size]
            current.append(piece)
            start += len(piece)
            size += len(piece)
            if size >= max_bytes or len(current) >= max_pieces:
                chunks.append(current)
                current, size = [], 0
    if current:
        chunks.append(current)
    return chunks


def _advance(chunk: list[memoryview], written: int) -> list[memoryview]:
    """What remains of ``chunk`` after ``written`` bytes of it went out (C-level
    passes over the pieces and one copy of the rest: linear in the pieces)."""
    ends = list(accumulate(map(len, chunk)))  # ends[i]: bytes up to the end of piece i
    done = bisect_right(ends, written)  # pieces wholly written (empty ones at the cut too)
    rest = chunk[done:]
    cut = written - ends[done - 1] if done else written
    if cut:
        rest[0] = rest[0][cut:]
    return rest


def stat_directory(fs: FileSystem, path: str) -> os.stat_result:
    """The status of the directory ``path``, a link to one followed (the
    store's own path may be a link; its entries never are); raises
    FileNotFoundError when nothing is there, NotADirectoryError when it is
    not a directory."""
    return fs.stat(os.path.join(path, "."))  # "." makes the kernel resolve a link and require a directory
