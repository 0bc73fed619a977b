"""The ``LOCK`` file: one writer per directory, the store's identity, the
bucket-id high-water mark and the last writer's limits.

A writer holds an exclusive ``flock`` on ``LOCK`` for as long as the store is
open; the kernel drops it when the process dies, so a crashed writer never
blocks the next one.

The file also records the highest bucket id ever handed out, so ids keep
increasing after the newest buckets are deleted. It holds two slots in
separate 512-byte sectors; each slot is ``magic, high-water mark, crc32c``.
A write goes to an invalid slot if there is one, else to the slot holding
the lower value, so a torn write can only destroy a slot whose value is
already superseded by the other.

A third record, in its own sector, holds the limits of the last writer that
opened the store, for readers (``kvbucket stats``) to show.

Invariants:

* ``LOCK`` is opened with ``O_NOFOLLOW`` and used only when it is a regular
  file: the store never writes through a link.
* A ``LOCK`` with a valid slot is the store's identity: a writer writes the
  first slot durably (in either durability) before any bucket exists, and a
  later write only replaces the other slot or a superseded value.
* Before any file of bucket ``b`` is unlinked, a slot records a value
  ``>= b`` and has been fsynced (in strict durability).

``flock`` also refuses a second lock taken through another descriptor of the
same process, so this module keeps the identities (``st_dev``, ``st_ino``) of
the ``LOCK`` files this process holds, to tell that case apart from another
process in the error message.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
from typing import NamedTuple

from ..errors import ForeignEntry, StoreLocked
from .checksum import crc32c
from .format import LOCK_NAME, MAX_BUCKET_ID
from .fs import FileSystem

__all__ = ["StoreLock", "WriterLimits", "lock_identifies_store", "read_writer_limits"]

_SLOT = struct.Struct("<8sQI")
_MAGIC = b"KVBLOCK\x00"
_SLOT_OFFSETS = (0, 512)
_LIMITS = struct.Struct("<8sQQQI")
_LIMITS_MAGIC = b"KVBLIMS\x00"
_LIMITS_OFFSET = 1024
_MAX_SIZE = _LIMITS_OFFSET + _LIMITS.size
"""The largest ``LOCK`` kvbucket writes; a larger one is another program's."""


class WriterLimits(NamedTuple):
    """The limits the last writer of a store ran with (0: unlimited)."""

    max_total_size: int
    max_physical_bytes: int
    total_keys_limit: int


# The (st_dev, st_ino) of every LOCK file this process holds. Taking a lock and
# recording it, and releasing one and forgetting it, happen under _HELD_MUTEX,
# so a failed lock sees exactly the holders of this process at that moment.
_HELD: set[tuple[int, int]] = set()
_HELD_MUTEX = threading.Lock()


class StoreLock:
    """The held writer lock of one store directory."""

    def __init__(self, fs: FileSystem, directory: str, fd: int, identity: tuple[int, int], durable: bool) -> None:
        self._fs = fs
        self._directory = directory
        self._fd = fd
        self._identity = identity
        self._durable = durable
        self._slots = [self._read_slot(offset) for offset in _SLOT_OFFSETS]
        self.identified = any(slot is not None for slot in self._slots)
        """A slot was valid when the lock was taken: the directory is a store."""
        self.blank = not self.identified and _blank(fs, fd)
        """``LOCK`` holds no slot and nothing of another program's: empty,
        zeros or a torn first slot, as a writer leaves that stopped before
        its first slot was durable."""

    @classmethod
    def open_existing(cls, fs: FileSystem, directory: str, durable: bool) -> StoreLock | None:
        """Lock the existing ``LOCK`` (see :meth:`acquire`); ``None`` when there is none."""
        try:
            return cls._acquire(fs, directory, durable, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None

    @classmethod
    def acquire(cls, fs: FileSystem, directory: str, durable: bool) -> StoreLock:
        """Create (if needed) and lock ``LOCK``, or raise :class:`StoreLocked`.
        Raises :class:`ForeignEntry` when ``LOCK`` is a link (dangling or
        not) or not a regular file: nothing is written through it."""
        return cls._acquire(fs, directory, durable, os.O_RDWR | os.O_NOFOLLOW | os.O_CREAT)

    @classmethod
    def _acquire(cls, fs: FileSystem, directory: str, durable: bool, flags: int) -> StoreLock:
        path = os.path.join(directory, LOCK_NAME)
        try:
            fd = fs.open(path, flags)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise
            raise _not_a_lock_file(path, "a symbolic link or not a regular file") from exc
        try:
            st = fs.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _not_a_lock_file(path, "not a regular file")
            identity = (st.st_dev, st.st_ino)  # what flock conflicts on
            with _HELD_MUTEX:
                if not fs.lock(fd):
                    raise StoreLocked(_conflict_message(directory, identity in _HELD))
                _HELD.add(identity)
        except BaseException:
            fs.close(fd)
            raise
        try:
            return cls(fs, directory, fd, identity, durable)
        except BaseException:
            with _HELD_MUTEX:
                _HELD.discard(identity)
                fs.close(fd)
            raise

    @property
    def high_water_mark(self) -> int:
        """The highest bucket id recorded as handed out (0 when none)."""
        return max((slot for slot in self._slots if slot is not None), default=0)

    def claim(self) -> None:
        """Make ``LOCK`` the store's identity: write a first valid slot, durably
        in either durability, unless one is valid already. Called once the
        directory is known to be a store, before any bucket is written; the
        slot also gives ``LOCK`` its disk block, so raising the mark later
        never grows the directory's allocated size behind the limit checks."""
        if not self.identified:
            self._write_slot(self._target_slot(), 0, durable=True)
            self.identified = True

    def raise_high_water_mark(self, bucket_id: int) -> None:
        """Durably record that ids up to ``bucket_id`` have been handed out."""
        if bucket_id > self.high_water_mark:
            self._write_slot(self._target_slot(), bucket_id, durable=self._durable)

    def record_limits(self, limits: WriterLimits) -> None:
        """Record the limits this writer runs with, for readers to show."""
        payload = _LIMITS.pack(_LIMITS_MAGIC, *limits, 0)
        payload = payload[:-4] + struct.pack("<I", crc32c(payload[:-4]))
        self._fs.write_all(self._fd, [memoryview(payload)], _LIMITS_OFFSET)
        if self._durable:
            self._fs.fsync(self._fd)

    def _target_slot(self) -> int:
        """An invalid slot, else the one holding the lower value."""
        if None in self._slots:
            return self._slots.index(None)
        return self._slots.index(min(self._slots))  # type: ignore[type-var]

    def _write_slot(self, slot: int, value: int, *, durable: bool) -> None:
        payload = _SLOT.pack(_MAGIC, value, 0)
        payload = payload[:-4] + struct.pack("<I", crc32c(payload[:-4]))
        self._fs.write_all(self._fd, [memoryview(payload)], _SLOT_OFFSETS[slot])
        if durable:
            self._fs.fsync(self._fd)
            self._fs.fsync_dir(self._directory)
        self._slots[slot] = value

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        if self._fd >= 0:
            with _HELD_MUTEX:
                _HELD.discard(self._identity)
                self._fs.close(self._fd)
            self._fd = -1

    def _read_slot(self, offset: int) -> int | None:
        buf = bytearray(_SLOT.size)
        got = self._fs.read_into(self._fd, memoryview(buf), offset)
        return _slot_value(bytes(buf[:got]))


def lock_identifies_store(fs: FileSystem, directory: str) -> bool:
    """Whether ``directory/LOCK`` is a regular file with a valid slot (the
    store's identity). Reads only, takes no lock."""
    raw = _read_lock(fs, directory, 0, _SLOT_OFFSETS[-1] + _SLOT.size)
    return raw is not None and any(_slot_value(raw[offset : offset + _SLOT.size]) is not None for offset in _SLOT_OFFSETS)


def read_writer_limits(fs: FileSystem, directory: str) -> WriterLimits | None:
    """The limits recorded by the last writer of ``directory``; ``None`` when
    no ``LOCK`` (a regular file) holds a valid record. Reads only, takes no lock."""
    raw = _read_lock(fs, directory, _LIMITS_OFFSET, _LIMITS.size)
    if raw is None or len(raw) != _LIMITS.size:
        return None
    magic, total, physical, keys, stored_crc = _LIMITS.unpack(raw)
    if magic != _LIMITS_MAGIC or crc32c(raw[:-4]) != stored_crc:
        return None
    return WriterLimits(total, physical, keys)


def _read_lock(fs: FileSystem, directory: str, offset: int, size: int) -> bytes | None:
    """Up to ``size`` bytes of ``LOCK`` from ``offset``; ``None`` when it is
    missing, unreadable, a link or not a regular file (a FIFO does not block)."""
    try:
        fd = fs.open(os.path.join(directory, LOCK_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(fs.fstat(fd).st_mode):
            return None
        buf = bytearray(size)
        got = fs.read_into(fd, memoryview(buf), offset)
        return bytes(buf[:got])
    finally:
        fs.close(fd)


def _slot_value(raw: bytes) -> int | None:
    """The mark a slot's bytes hold; ``None`` when short, damaged or outside
    the range ids are handed out from."""
    if len(raw) != _SLOT.size:
        return None
    slot: tuple[bytes, int, int] = _SLOT.unpack(raw)
    magic, value, stored_crc = slot
    if magic != _MAGIC or crc32c(raw[:-4]) != stored_crc or value > MAX_BUCKET_ID:
        return None
    return value


def _blank(fs: FileSystem, fd: int) -> bool:
    """Whether the open file holds nothing: empty, only zero bytes, or a
    first slot cut short (its start is a prefix of the slot magic)."""
    size = fs.fstat(fd).st_size
    if size > _MAX_SIZE:
        return False
    buf = bytearray(size)
    got = fs.read_into(fd, memoryview(buf), 0)
    torn_first_slot = got < _SLOT.size and _MAGIC.startswith(bytes(buf[: min(got, len(_MAGIC))]))
    return torn_first_slot or buf[:got].count(0) == got


def _conflict_message(directory: str, held_here: bool) -> str:
    """Why the writer lock of ``directory`` cannot be taken, and what to do."""
    if held_here:
        return (
            f"this process already has a writer open on {directory}; close it or share "
            "that BucketStore (it is safe to use from many threads), or open this one "
            "with readonly=True."
        )
    return (
        f"{directory} is in use by another writer process. One directory has "
        "one writer: give each process (each rank) its own sub-directory, "
        "or open this one with readonly=True."
    )


def _not_a_lock_file(path: str, what: str) -> ForeignEntry:
    return ForeignEntry(
        f"{path} is {what}; kvbucket never writes through a link or into another "
        "program's file. Remove or rename it if it is not needed, or use another directory."
    )
