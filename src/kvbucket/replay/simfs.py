"""An in-memory stand-in for a store directory, for capacity planning.

:class:`SimulatedFileSystem` implements every :class:`~kvbucket._core.fs.FileSystem`
primitive in memory, so a :class:`~kvbucket.BucketStore` runs its own code
(grouping, commit protocol, recovery, eviction) without touching a disk.
Data files (``*.bucket``) keep only their length: reads of them return
zeros, so a store opened on this file system needs ``verify_checksums=False``
unless every value written was zeros. Every other file (metas, ``LOCK``,
temporary files) keeps its bytes. Memory use is therefore about the metas'
size, whatever the simulated tier holds: a 10 TB tier is simulated in a few
hundred megabytes.

Allocated sizes are whole 4 KiB blocks, as on a typical file system.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._core.format import FileKind, parse_name
from .._core.fs import FileSystem

__all__ = ["SimulatedFileSystem", "BLOCK_SIZE"]

BLOCK_SIZE = 4096
"""Allocation unit of simulated files (``st_blocks`` counts 512-byte sectors of it)."""


@dataclass
class _File:
    """One simulated regular file. ``content`` is None for a data file,
    whose bytes are not kept (only ``length``)."""

    content: bytearray | None
    length: int = 0
    mtime_ns: int = 0
    inode: int = 0


@dataclass
class _Directory:
    entries: dict[str, _File | _Directory] = field(default_factory=dict)
    inode: int = 0


@dataclass
class _Open:
    """An open descriptor: the file it names and how it was opened."""

    file: _File
    writable: bool


class SimulatedFileSystem(FileSystem):
    """A directory tree in memory; ``root`` (and its parents) exist from the start."""

    concurrent_syncs = False  # its counters are not thread-safe, and its syncs cost nothing

    def __init__(self, root: str) -> None:
        self._root = _Directory(inode=1)
        self._descriptors: dict[int, _Open] = {}
        self._next_fd = 1 << 20  # far from real descriptors, so a mix-up fails loudly
        self._clock = 0
        self._inodes = 1
        self.mkdir(root)

    # -- primitives -------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        parent, name = self._parent(path)
        entry = parent.entries.get(name)
        if isinstance(entry, _Directory):  # the store only lists and fsyncs directories
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if entry is None:
            if not flags & os.O_CREAT:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            entry = parent.entries[name] = self._new_file(name)
        elif flags & os.O_CREAT and flags & os.O_EXCL:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        if flags & os.O_TRUNC:
            self._truncate(entry)
        fd = self._next_fd
        self._next_fd += 1
        self._descriptors[fd] = _Open(entry, bool(flags & (os.O_WRONLY | os.O_RDWR)))
        return fd

    def close(self, fd: int) -> None:
        self._descriptor(fd)
        del self._descriptors[fd]

    def pwritev(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        handle = self._descriptor(fd)
        if not handle.writable:
            raise _error(errno.EBADF)
        file = handle.file
        written = sum(len(b) for b in buffers)
        if file.content is not None:
            end = offset + written
            if len(file.content) < end:
                file.content.extend(bytes(end - len(file.content)))
            file.content[offset:end] = b"".join(buffers)
        file.length = max(file.length, offset + written)
        file.mtime_ns = self._tick()
        return written

    def preadv(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        file = self._descriptor(fd).file
        done = 0
        for buffer in buffers:
            start = offset + done
            count = max(0, min(len(buffer), file.length - start))
            if count == 0:
                break
            if file.content is None:
                buffer[:count] = bytes(count)
            else:
                buffer[:count] = file.content[start : start + count]
            done += count
            if count < len(buffer):
                break
        return done

    def fdatasync(self, fd: int) -> None:
        self._descriptor(fd)

    def fsync(self, fd: int) -> None:
        self._descriptor(fd)

    def fstat(self, fd: int) -> os.stat_result:
        return self._stat_of(self._descriptor(fd).file)

    def stat(self, path: str) -> os.stat_result:
        return self._stat_of(self._lookup(path))

    def rename(self, src: str, dst: str) -> None:
        src_parent, src_name = self._parent(src)
        entry = src_parent.entries.get(src_name)
        if entry is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), src)
        dst_parent, dst_name = self._parent(dst)
        if isinstance(dst_parent.entries.get(dst_name), _Directory):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), dst)
        del src_parent.entries[src_name]
        if isinstance(entry, _File) and (entry.content is None) != _is_data(dst_name):
            entry = self._converted(entry, dst_name)
        dst_parent.entries[dst_name] = entry

    def unlink(self, path: str) -> None:
        parent, name = self._parent(path)
        entry = parent.entries.get(name)
        if entry is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if isinstance(entry, _Directory):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        del parent.entries[name]  # open descriptors keep the file, as POSIX does

    def mkdir(self, path: str) -> None:
        directory = self._root
        for part in _parts(path):
            entry = directory.entries.get(part)
            if entry is None:
                self._inodes += 1
                entry = directory.entries[part] = _Directory(inode=self._inodes)
            if not isinstance(entry, _Directory):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
            directory = entry

    def listdir(self, path: str) -> list[str]:
        directory = self._lookup(path)
        if not isinstance(directory, _Directory):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        return list(directory.entries)

    def fsync_dir(self, path: str) -> None:
        if not isinstance(self._lookup(path), _Directory):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)

    def lock(self, fd: int) -> bool:
        self._descriptor(fd)
        return True  # one process owns the simulation

    def advise_dontneed(self, fd: int) -> None:
        self._descriptor(fd)

    def advise_willneed(self, fd: int, offset: int, length: int) -> None:
        self._descriptor(fd)

    # -- helpers ----------------------------------------------------------
    def _new_file(self, name: str) -> _File:
        self._inodes += 1
        return _File(None if _is_data(name) else bytearray(), mtime_ns=self._tick(), inode=self._inodes)

    def _converted(self, file: _File, name: str) -> _File:
        """``file`` under a name of the other kind (data <-> not data): a
        data file's bytes are unknown, so it becomes zeros of its length."""
        content = None if _is_data(name) else (bytearray(file.length) if file.content is None else file.content)
        return _File(content, file.length, file.mtime_ns, file.inode)

    def _truncate(self, file: _File) -> None:
        if file.content is not None:
            file.content.clear()
        file.length = 0
        file.mtime_ns = self._tick()

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _descriptor(self, fd: int) -> _Open:
        handle = self._descriptors.get(fd)
        if handle is None:
            raise _error(errno.EBADF)
        return handle

    def _lookup(self, path: str) -> _File | _Directory:
        entry: _File | _Directory = self._root
        for part in _parts(path):
            if not isinstance(entry, _Directory) or part not in entry.entries:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            entry = entry.entries[part]
        return entry

    def _parent(self, path: str) -> tuple[_Directory, str]:
        head, name = os.path.split(os.path.normpath(os.path.abspath(path)))
        parent = self._lookup(head)
        if not isinstance(parent, _Directory):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        return parent, name

    def _stat_of(self, entry: _File | _Directory) -> os.stat_result:
        if isinstance(entry, _Directory):
            mode, size, mtime, inode = stat.S_IFDIR | 0o755, BLOCK_SIZE, 0, entry.inode
        else:
            mode, size, mtime, inode = stat.S_IFREG | 0o644, entry.length, entry.mtime_ns, entry.inode
        blocks = -(-size // BLOCK_SIZE) * (BLOCK_SIZE // 512)
        seconds = mtime // 1_000_000_000
        return os.stat_result(
            (mode, inode, 0, 1, 0, 0, size, seconds, seconds, seconds,
             mtime / 1e9, mtime / 1e9, mtime / 1e9, mtime, mtime, mtime, BLOCK_SIZE, blocks, 0)
        )


def _is_data(name: str) -> bool:
    """Whether ``name`` is a bucket data file's name (its bytes are not kept)."""
    parsed = parse_name(name)
    return parsed is not None and parsed[1] is FileKind.DATA


def _parts(path: str) -> list[str]:
    return [part for part in os.path.normpath(os.path.abspath(path)).split(os.sep) if part]


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))
