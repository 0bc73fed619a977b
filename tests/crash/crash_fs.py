"""FileSystem wrappers for the crash, power-loss and fault-injection harnesses.

Everything here plugs into the store's I/O seam, :class:`kvbucket._core.fs.FileSystem`
(``BucketStore.open(path, filesystem=fs)``):

* :class:`ForwardingFS` forwards every primitive to an inner FileSystem, so
  wrappers compose (a canary around a recorder around the real ``os`` calls).
  The loops of the base class (``write_all``, ``read_into``, ``read_file``)
  stay in the outermost wrapper and so reach every wrapper's primitives.
* :class:`KillFS` counts the mutating calls and ``os._exit(137)``s before,
  after, or in the middle (torn write) of the Nth one: SQLite's
  ``crash_on_write``/RocksDB's kill points.
* :class:`FaultFS` raises ``EIO``/``ENOSPC`` or writes short at the Nth call,
  once or from then on (SQLite's I/O-error loop, RocksDB's
  FaultInjectionTestFS error injection).
* :class:`RecordingFS` performs the real calls and logs what a power cut
  could lose: creates, writes, truncations, syncs, directory syncs, renames
  and unlinks, with file identities (inodes) followed across renames.
  :mod:`crash_power` rebuilds the possible disk states from that log.
* Canaries (:class:`NoDataSyncFS`, :class:`NoMetaSyncFS`, :class:`NoDirSyncFS`,
  :class:`MetaInPlaceFS`) break the commit protocol on purpose; the
  power-loss harness must catch each of them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any

from kvbucket._core.fs import FileSystem

O_DIRECT = getattr(os, "O_DIRECT", 0)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC

# The primitives of the seam as this harness knows them. A method the
# FileSystem grows later would bypass the recorder and the fault injector
# silently; test_seam_is_fully_wrapped fails instead.
PRIMITIVES = (
    "open",
    "close",
    "pwritev",
    "preadv",
    "fdatasync",
    "fsync",
    "fstat",
    "stat",
    "rename",
    "link",
    "unlink",
    "mkdir",
    "listdir",
    "fsync_dir",
    "lock",
    "lock_wait",
    "unlock",
    "advise_dontneed",
    "advise_willneed",
)
LOOPS = ("write_all", "read_into", "readv_into", "read_file")


def unknown_seam_methods() -> set[str]:
    """Public methods of FileSystem that the wrappers here do not know."""
    names = {n for n in dir(FileSystem) if not n.startswith("_") and callable(getattr(FileSystem, n))}
    return names - set(PRIMITIVES) - set(LOOPS)


def _base(path: Any) -> str:
    return os.path.basename(os.fspath(path))


def _total(buffers: Sequence[memoryview]) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


def _prefix(buffers: Sequence[memoryview], nbytes: int) -> list[memoryview]:
    """The first ``nbytes`` bytes of ``buffers`` as a list of views."""
    out: list[memoryview] = []
    for buf in buffers:
        view = memoryview(buf).cast("B")
        if nbytes <= 0:
            break
        take = view[:nbytes]
        out.append(take)
        nbytes -= len(take)
    return out


def _join(buffers: Sequence[memoryview], nbytes: int) -> bytes:
    return b"".join(bytes(v) for v in _prefix(buffers, nbytes))


class ForwardingFS(FileSystem):
    """A FileSystem that forwards every primitive to ``inner``.

    ``concurrent_syncs`` is False: the harnesses count calls (kill and fault
    points by call number, re-run per point) and record one order of them
    (power loss), so a group commit makes its calls in turn on one thread.
    The concurrent path is checked by ``test_group_commit_concurrency``.
    """

    concurrent_syncs = False

    def __init__(self, inner: FileSystem | None = None) -> None:
        self.inner = inner if inner is not None else FileSystem()

    def open(self, path, flags, mode=0o644):
        return self.inner.open(path, flags, mode)

    def close(self, fd):
        return self.inner.close(fd)

    def pwritev(self, fd, buffers, offset):
        return self.inner.pwritev(fd, buffers, offset)

    def preadv(self, fd, buffers, offset):
        return self.inner.preadv(fd, buffers, offset)

    def fdatasync(self, fd):
        return self.inner.fdatasync(fd)

    def fsync(self, fd):
        return self.inner.fsync(fd)

    def fstat(self, fd):
        return self.inner.fstat(fd)

    def stat(self, path):
        return self.inner.stat(path)

    def rename(self, src, dst):
        return self.inner.rename(src, dst)

    def link(self, src, dst):
        return self.inner.link(src, dst)

    def unlink(self, path):
        return self.inner.unlink(path)

    def mkdir(self, path):
        return self.inner.mkdir(path)

    def listdir(self, path):
        return self.inner.listdir(path)

    def fsync_dir(self, path):
        return self.inner.fsync_dir(path)

    def lock(self, fd):
        return self.inner.lock(fd)

    def lock_wait(self, fd):
        return self.inner.lock_wait(fd)

    def unlock(self, fd):
        return self.inner.unlock(fd)

    def advise_dontneed(self, fd):
        return self.inner.advise_dontneed(fd)

    def advise_willneed(self, fd, offset, length):
        return self.inner.advise_willneed(fd, offset, length)


class FdNames(ForwardingFS):
    """Remembers the file name and open flags behind each descriptor."""

    def __init__(self, inner: FileSystem | None = None) -> None:
        super().__init__(inner)
        self.fd_name: dict[int, str] = {}
        self.fd_flags: dict[int, int] = {}

    def open(self, path, flags, mode=0o644):
        fd = super().open(path, flags, mode)
        self.fd_name[fd] = _base(path)
        self.fd_flags[fd] = flags
        return fd

    def close(self, fd):
        self.fd_name.pop(fd, None)
        self.fd_flags.pop(fd, None)
        return super().close(fd)


# ---------------------------------------------------------------------------
# kill -9 at the Nth mutating call
# ---------------------------------------------------------------------------

KILL_EXIT = 137


class KillFS(FdNames):
    """Counts mutating calls; ``os._exit(137)`` at the ``kill_at``-th one.

    ``mode``: ``before`` (the call never happens), ``after`` (it returned, the
    caller never saw it) or ``torn`` (a ``pwritev`` writes the first half of
    its bytes, 4 KiB-aligned under O_DIRECT, then the process dies).
    ``os._exit`` runs no ``finally``, no atexit and flushes nothing: to the
    files it is kill -9. ``calls`` lists the kinds of the calls counted, so a
    first run without ``kill_at`` enumerates the kill points.
    """

    def __init__(self, inner: FileSystem | None = None, kill_at: int | None = None, mode: str = "before") -> None:
        super().__init__(inner)
        self.kill_at = kill_at
        self.mode = mode
        self.calls: list[str] = []

    def _enter(self, kind: str) -> bool:
        self.calls.append(kind)
        hit = len(self.calls) == self.kill_at
        if hit and self.mode in ("before", "torn") and kind != "pwritev":
            os._exit(KILL_EXIT)
        if hit and self.mode == "before":
            os._exit(KILL_EXIT)
        return hit

    def _leave(self, hit: bool) -> None:
        if hit and self.mode == "after":
            os._exit(KILL_EXIT)

    def open(self, path, flags, mode=0o644):
        if not flags & WRITE_FLAGS:
            return super().open(path, flags, mode)
        hit = self._enter("open")
        fd = super().open(path, flags, mode)
        self._leave(hit)
        return fd

    def pwritev(self, fd, buffers, offset):
        hit = self._enter("pwritev")
        if hit and self.mode == "torn":
            half = _total(buffers) // 2
            if self.fd_flags.get(fd, 0) & O_DIRECT:
                half -= half % 4096
            if half:
                self.inner.pwritev(fd, _prefix(buffers, half), offset)
            os._exit(KILL_EXIT)
        written = super().pwritev(fd, buffers, offset)
        self._leave(hit)
        return written

    def _simple(self, kind: str, method: str, *args):
        hit = self._enter(kind)
        result = getattr(ForwardingFS, method)(self, *args)
        self._leave(hit)
        return result

    def fdatasync(self, fd):
        return self._simple("fdatasync", "fdatasync", fd)

    def fsync(self, fd):
        return self._simple("fsync", "fsync", fd)

    def rename(self, src, dst):
        return self._simple("rename", "rename", src, dst)

    def link(self, src, dst):
        return self._simple("link", "link", src, dst)

    def unlink(self, path):
        return self._simple("unlink", "unlink", path)

    def mkdir(self, path):
        return self._simple("mkdir", "mkdir", path)

    def fsync_dir(self, path):
        return self._simple("fsync_dir", "fsync_dir", path)


# ---------------------------------------------------------------------------
# fault injection
# ---------------------------------------------------------------------------

ENOSPC_CALLS = frozenset({"pwritev", "open_create", "fsync", "fdatasync", "fsync_dir", "rename", "link", "mkdir"})


class FaultFS(FdNames):
    """Raises ``EIO``/``ENOSPC`` or writes short at the ``fail_at``-th eligible call.

    ``kind``: ``eio`` (every primitive is eligible), ``enospc`` (calls that
    can run out of space: writes, creating opens, syncs, renames, mkdir) or
    ``short`` (``pwritev`` writes about half of what it was given and
    reports that) or ``short_read`` (``preadv`` reads about half). ``sticky``: fail every eligible call from ``fail_at`` on,
    until :meth:`disarm`. Errors are raised before the call takes effect,
    except ``close``, which releases the descriptor first, as Linux does.
    ``fired`` lists ``(call number, kind)`` of the injected faults.
    """

    def __init__(
        self,
        inner: FileSystem | None = None,
        fail_at: int | None = None,
        kind: str = "eio",
        sticky: bool = False,
    ) -> None:
        super().__init__(inner)
        self.fail_at = fail_at
        self.kind = kind
        self.sticky = sticky
        self.calls: list[str] = []
        self.fired: list[tuple[int, str]] = []
        self.paused = False
        """While True, calls are neither counted nor failed (the test's own checks)."""

    def disarm(self) -> None:
        self.fail_at = None

    def _eligible(self, call: str) -> bool:
        if self.kind == "eio":
            return True
        if self.kind == "enospc":
            return call in ENOSPC_CALLS
        if self.kind == "short_read":
            return call == "preadv"
        return call == "pwritev"

    def _check(self, call: str) -> bool:
        """Count ``call``; True when a fault fires on it."""
        if self.paused or not self._eligible(call):
            return False
        self.calls.append(call)
        n = len(self.calls)
        if self.fail_at is None:
            return False
        if n == self.fail_at or (self.sticky and n > self.fail_at):
            self.fired.append((n, call))
            return True
        return False

    def _error(self, call: str) -> OSError:
        code = errno.ENOSPC if self.kind == "enospc" else errno.EIO
        return OSError(code, f"{os.strerror(code)} (injected at {call} #{len(self.calls)})")

    def _plain(self, call: str, method: str, *args):
        if self._check(call):
            raise self._error(call)
        return getattr(FdNames, method)(self, *args)

    def open(self, path, flags, mode=0o644):
        call = "open_create" if flags & os.O_CREAT else "open"
        return self._plain(call, "open", path, flags, mode)

    def close(self, fd):
        fire = self._check("close")
        super().close(fd)
        if fire:
            raise self._error("close")

    def pwritev(self, fd, buffers, offset):
        if self._check("pwritev"):
            if self.kind != "short":
                raise self._error("pwritev")
            total = _total(buffers)
            part = total // 2
            if self.fd_flags.get(fd, 0) & O_DIRECT:
                part -= part % 4096
            if part <= 0:
                part = total
            return self.inner.pwritev(fd, _prefix(buffers, part), offset)
        return super().pwritev(fd, buffers, offset)

    def preadv(self, fd, buffers, offset):
        if self.kind != "short_read":
            return self._plain("preadv", "preadv", fd, buffers, offset)
        if not self._check("preadv"):
            return self.inner.preadv(fd, buffers, offset)
        total = _total(buffers)
        part = total // 2
        if self.fd_flags.get(fd, 0) & O_DIRECT:
            part -= part % 4096
        if part <= 0:
            part = total
        return self.inner.preadv(fd, _prefix(buffers, part), offset)

    def fdatasync(self, fd):
        return self._plain("fdatasync", "fdatasync", fd)

    def fsync(self, fd):
        return self._plain("fsync", "fsync", fd)

    def fstat(self, fd):
        return self._plain("fstat", "fstat", fd)

    def stat(self, path):
        return self._plain("stat", "stat", path)

    def rename(self, src, dst):
        return self._plain("rename", "rename", src, dst)

    def link(self, src, dst):
        return self._plain("link", "link", src, dst)

    def unlink(self, path):
        return self._plain("unlink", "unlink", path)

    def mkdir(self, path):
        return self._plain("mkdir", "mkdir", path)

    def listdir(self, path):
        return self._plain("listdir", "listdir", path)

    def fsync_dir(self, path):
        return self._plain("fsync_dir", "fsync_dir", path)

    def lock(self, fd):
        return self._plain("lock", "lock", fd)

    def lock_wait(self, fd):
        return self._plain("lock_wait", "lock_wait", fd)

    def unlock(self, fd):
        return self._plain("unlock", "unlock", fd)

    def advise_dontneed(self, fd):
        return self._plain("advise_dontneed", "advise_dontneed", fd)

    def advise_willneed(self, fd, offset, length):
        return self._plain("advise_willneed", "advise_willneed", fd, offset, length)


# ---------------------------------------------------------------------------
# recording for the power-loss simulation
# ---------------------------------------------------------------------------


class RecordingFS(FdNames):
    """Performs the real calls on ``root`` and logs what a power cut could lose.

    Log entries (tuples):

    * ``("create", name, ino)``, ``("rename", src, dst, ino)``,
      ``("unlink", name, ino)``: directory operations, durable only after a
      later ``("dirsync",)``;
    * ``("write", ino, offset, data)``, ``("trunc", ino, size)``: file
      contents, durable only after a later ``("sync", ino)`` of that inode
      (fsync and fdatasync alike);
    * ``("mark", event)``: a workload event (operation begun/acknowledged,
      keys chosen for eviction), placed where it happened.

    ``base`` holds the files already in ``root`` when recording starts
    (name -> (ino, bytes)); they are taken as durable.
    """

    def __init__(self, root: str | os.PathLike[str], inner: FileSystem | None = None) -> None:
        super().__init__(inner)
        self.root = os.path.abspath(os.fspath(root))
        self.log: list[tuple] = []
        self.names: dict[str, int] = {}
        self.base: dict[str, tuple[int, bytes]] = {}
        self.fd_ino: dict[int, int] = {}
        self._next_ino = 1
        for name in sorted(os.listdir(self.root)):
            full = os.path.join(self.root, name)
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as f:
                    self.base[name] = (self._new_ino(), f.read())
                self.names[name] = self.base[name][0]

    def _new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _local(self, path) -> str | None:
        """The entry name when ``path`` is directly inside ``root``, else None."""
        full = os.path.abspath(os.fspath(path))
        if os.path.dirname(full) == self.root:
            return os.path.basename(full)
        return None

    def mark(self, event: Any) -> None:
        self.log.append(("mark", event))

    def open(self, path, flags, mode=0o644):
        name = self._local(path)
        existed = name is not None and name in self.names
        fd = super().open(path, flags, mode)
        if name is None:
            return fd
        if existed:
            ino = self.names[name]
            if flags & os.O_TRUNC:
                self.log.append(("trunc", ino, 0))
        else:
            ino = self._new_ino()
            self.names[name] = ino
            self.log.append(("create", name, ino))
        self.fd_ino[fd] = ino
        return fd

    def close(self, fd):
        self.fd_ino.pop(fd, None)
        return super().close(fd)

    def pwritev(self, fd, buffers, offset):
        written = super().pwritev(fd, buffers, offset)
        ino = self.fd_ino.get(fd)
        if ino is not None and written > 0:
            self.log.append(("write", ino, offset, _join(buffers, written)))
        return written

    def fdatasync(self, fd):
        super().fdatasync(fd)
        if fd in self.fd_ino:
            self.log.append(("sync", self.fd_ino[fd]))

    def fsync(self, fd):
        super().fsync(fd)
        if fd in self.fd_ino:
            self.log.append(("sync", self.fd_ino[fd]))

    def fsync_dir(self, path):
        super().fsync_dir(path)
        if os.path.abspath(os.fspath(path)) == self.root:
            self.log.append(("dirsync",))

    def rename(self, src, dst):
        super().rename(src, dst)
        s, d = self._local(src), self._local(dst)
        if s is not None and s in self.names:
            ino = self.names.pop(s)
            if d is not None:
                self.names[d] = ino
                self.log.append(("rename", s, d, ino))
            else:  # moved out of the directory (quarantine): gone from it
                self.log.append(("unlink", s, ino))
        elif d is not None:  # moved in from elsewhere: unknown content, take it as it is
            ino = self._new_ino()
            self.names[d] = ino
            self.log.append(("create", d, ino))
            with open(os.path.join(self.root, d), "rb") as f:
                self.log.append(("write", ino, 0, f.read()))

    def link(self, src, dst):
        super().link(src, dst)
        s, d = self._local(src), self._local(dst)
        if d is not None and s is not None and s in self.names:  # a second name of the same inode
            self.names[d] = self.names[s]
            self.log.append(("create", d, self.names[s]))
        elif d is not None:  # linked in from elsewhere: unknown content, take it as it is
            ino = self._new_ino()
            self.names[d] = ino
            self.log.append(("create", d, ino))
            with open(os.path.join(self.root, d), "rb") as f:
                self.log.append(("write", ino, 0, f.read()))

    def unlink(self, path):
        super().unlink(path)
        name = self._local(path)
        if name is not None and name in self.names:
            self.log.append(("unlink", name, self.names.pop(name)))

    def ops(self) -> int:
        return sum(1 for entry in self.log if entry[0] != "mark")


# ---------------------------------------------------------------------------
# canaries: broken commit protocols the power-loss harness must catch
# ---------------------------------------------------------------------------


class NoDataSyncFS(FdNames):
    """Drops fsync/fdatasync of data files (``<id>.bucket``)."""

    def fdatasync(self, fd):
        if not self.fd_name.get(fd, "").endswith(".bucket"):
            super().fdatasync(fd)

    def fsync(self, fd):
        if not self.fd_name.get(fd, "").endswith(".bucket"):
            super().fsync(fd)


class NoMetaSyncFS(FdNames):
    """Drops fsync/fdatasync of meta files (``<id>.meta.tmp`` and ``<id>.meta``)."""

    def _is_meta(self, fd) -> bool:
        name = self.fd_name.get(fd, "")
        return name.endswith(".meta") or name.endswith(".meta.tmp")

    def fdatasync(self, fd):
        if not self._is_meta(fd):
            super().fdatasync(fd)

    def fsync(self, fd):
        if not self._is_meta(fd):
            super().fsync(fd)


class NoDirSyncFS(ForwardingFS):
    """Drops every directory fsync."""

    def fsync_dir(self, path):
        return None


class MetaInPlaceFS(FdNames):
    """Writes metas in place: ``<id>.meta.tmp`` is opened as ``<id>.meta``
    (truncating, not exclusive), and the rename onto ``<id>.meta`` is a no-op."""

    @staticmethod
    def _untmp(path):
        path = os.fspath(path)
        return path[: -len(".tmp")] if path.endswith(".meta.tmp") else path

    def open(self, path, flags, mode=0o644):
        if os.fspath(path).endswith(".meta.tmp"):
            flags = (flags & ~os.O_EXCL) | os.O_TRUNC
            path = self._untmp(path)
        return super().open(path, flags, mode)

    def rename(self, src, dst):
        if os.fspath(src).endswith(".meta.tmp") and self._untmp(src) == os.fspath(dst):
            return None
        return super().rename(src, dst)

    def unlink(self, path):
        if os.fspath(path).endswith(".meta.tmp"):
            return None
        return super().unlink(path)

    def stat(self, path):
        return super().stat(self._untmp(path))


class LateDirSyncFS(ForwardingFS):
    """Acknowledges before the directory fsync: each directory fsync is put
    off until the next ``open`` (the next operation's first call)."""

    def __init__(self, inner=None) -> None:
        super().__init__(inner)
        self.deferred: list = []

    def fsync_dir(self, path):
        self.deferred.append(path)

    def open(self, path, flags, mode=0o644):
        while self.deferred:
            super().fsync_dir(self.deferred.pop(0))
        return super().open(path, flags, mode)


class NoUnlinkFS(ForwardingFS):
    """Never deletes anything: deleted buckets stay on disk. A canary for the
    kill -9 harness (which cannot see missing syncs, but sees this)."""

    def unlink(self, path):
        return None


CANARIES = {
    "no_data_fdatasync": NoDataSyncFS,
    "no_meta_fsync": NoMetaSyncFS,
    "no_dir_fsync": NoDirSyncFS,
    "meta_in_place": MetaInPlaceFS,
}

# The canaries of the group-commit path: the sync breaks, plus a group
# acknowledged before its directory fsync (meta_in_place breaks only meta
# rewrites, which a group commit never does).
GROUP_CANARIES = {
    **{name: CANARIES[name] for name in ("no_data_fdatasync", "no_meta_fsync", "no_dir_fsync")},
    "ack_before_dir_fsync": LateDirSyncFS,
}
