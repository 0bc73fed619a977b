"""The ``LOCK`` file: one writer per directory, and the bucket-id high-water mark.

A writer holds an exclusive ``flock`` on ``LOCK`` for as long as the store is
open; the kernel drops it when the process dies, so a crashed writer never
blocks the next one.

The file also records the highest bucket id ever handed out, so ids keep
increasing after the newest buckets are deleted. It holds two slots in
separate 512-byte sectors; each slot is ``magic, high-water mark, crc32c``.
A write goes to the slot holding the lower valid value, so a torn write can
only destroy a slot whose value is already superseded by the other.

Invariant: before any file of bucket ``b`` is unlinked, a slot records a value
``>= b`` and has been fsynced (in strict durability).

``flock`` also refuses a second lock taken through another descriptor of the
same process, so this module keeps the identities (``st_dev``, ``st_ino``) of
the ``LOCK`` files this process holds, to tell that case apart from another
process in the error message.
"""

from __future__ import annotations

import os
import struct
import threading

from .checksum import crc32c
from .errors import StoreLocked
from .format import LOCK_NAME
from .fs import FileSystem

__all__ = ["StoreLock"]

_SLOT = struct.Struct("<8sQI")
_MAGIC = b"KVBLOCK\x00"
_SLOT_OFFSETS = (0, 512)

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
        self._slots = [0, 0]

    def _init_slots(self) -> None:
        """Read both slots; give a new (empty) LOCK its first slot."""
        self._slots = [self._read_slot(offset) for offset in _SLOT_OFFSETS]
        if self._fs.fstat(self._fd).st_size == 0:
            # A new LOCK gets its block now, so raising the mark later never
            # grows the directory's allocated size behind the limit checks.
            self._write_slot(0, 0)

    @classmethod
    def acquire(cls, fs: FileSystem, directory: str, durable: bool) -> StoreLock:
        """Create (if needed) and lock ``LOCK``, or raise :class:`StoreLocked`."""
        path = os.path.join(directory, LOCK_NAME)
        fd = fs.open(path, os.O_RDWR | os.O_CREAT)
        try:
            identity = _identity(fs, fd)
            with _HELD_MUTEX:
                if not fs.lock(fd):
                    raise StoreLocked(_conflict_message(directory, identity in _HELD))
                _HELD.add(identity)
        except BaseException:
            fs.close(fd)
            raise
        lock = cls(fs, directory, fd, identity, durable)
        try:
            lock._init_slots()
        except BaseException:
            lock.release()
            raise
        return lock

    @property
    def high_water_mark(self) -> int:
        """The highest bucket id recorded as handed out (0 when none)."""
        return max(self._slots)

    def raise_high_water_mark(self, bucket_id: int) -> None:
        """Durably record that ids up to ``bucket_id`` have been handed out."""
        if bucket_id > self.high_water_mark:
            self._write_slot(self._slots.index(min(self._slots)), bucket_id)

    def _write_slot(self, slot: int, value: int) -> None:
        payload = _SLOT.pack(_MAGIC, value, 0)
        payload = payload[:-4] + struct.pack("<I", crc32c(payload[:-4]))
        self._fs.write_all(self._fd, [memoryview(payload)], _SLOT_OFFSETS[slot])
        if self._durable:
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

    def _read_slot(self, offset: int) -> int:
        buf = bytearray(_SLOT.size)
        got = self._fs.read_into(self._fd, memoryview(buf), offset)
        if got != _SLOT.size:
            return 0
        magic, value, stored_crc = _SLOT.unpack(buf)
        if magic != _MAGIC or crc32c(bytes(buf[:-4])) != stored_crc:
            return 0
        return value


def _identity(fs: FileSystem, fd: int) -> tuple[int, int]:
    """The file a descriptor refers to: what ``flock`` conflicts on."""
    st = fs.fstat(fd)
    return st.st_dev, st.st_ino


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
