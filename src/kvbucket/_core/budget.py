"""A physical budget shared by several store directories on one file system.

Each member (one writer store per directory, typically one per
tensor-parallel rank) names the same budget file. The file holds the budget's
size and one slot per member: the member's directory (identity and path), its
last published physical usage, its reservation for the write in progress,
and the bytes it asked the others to free. Every read-modify-write of the
file happens under an exclusive ``flock`` on it; docs/FORMAT.md ("The budget
file") specifies the layout.

Invariants:

* **Bound.** While a member is alive, its directory's allocated bytes are at
  most its slot's ``usage + reserved``: it reserves what a write may add
  before writing, and publishes a lower figure only after the bytes are
  gone. A member grants itself a reservation only when the sum of every
  slot's ``usage + reserved`` stays within the budget, so the directories
  together never exceed it.
* **Liveness.** A slot is live while some process holds the writer lock
  (``LOCK``) of its directory; a non-blocking ``flock`` probe on ``LOCK``
  tells. A dead member's slot still bounds its directory (nothing writes
  there after its death but a new writer, which joins first), so it is
  safe to keep; it is replaced by a ``du``-exact measure of the directory
  (reservation and request dropped) whenever its count could refuse a
  write, and at every join.
* **Probes do not race writers.** A member takes the budget's ``flock``
  before it takes its directory's ``LOCK`` at open, and probes only under
  the ``flock``, so a probe never makes a joining member's lock fail.
* Membership records are written durably (``fsync``), in either durability,
  before the member writes any bucket; the numbers are not synced: they are
  re-measured at the next join after a power cut.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import CapacityExceeded, ForeignEntry, InvalidArgument
from .checksum import crc32c
from .du import measure_store
from .format import LOCK_NAME
from .fs import FileSystem, stat_directory

__all__ = ["Budget", "BudgetSlot", "BudgetFile", "decode_budget", "encode_header", "encode_member", "encode_numbers", "MAX_MEMBERS"]

SECTOR = 512
_HEADER = struct.Struct("<8sHHIQ")  # magic, version, 0, 0, budget bytes; then a u32 CRC32C
_HEADER_MAGIC = b"KVBBUDG\x00"
_VERSION = 1
_MEMBER = struct.Struct("<8sQQH")  # magic, st_dev, st_ino, path length; then the path and a u32 CRC32C
_MEMBER_MAGIC = b"KVBMEMB\x00"
_NUMBERS = struct.Struct("<8sQQQ")  # magic, usage, reserved, wanted; then a u32 CRC32C
_NUMBERS_MAGIC = b"KVBUSED\x00"
_CRC = struct.Struct("<I")
SLOT_SIZE = 2 * SECTOR
MAX_PATH_BYTES = SECTOR - _MEMBER.size - _CRC.size
MAX_MEMBERS = 1024
MAX_FILE_BYTES = SECTOR + MAX_MEMBERS * SLOT_SIZE
NEW_MEMBER_FLOOR = 3 * 4096
"""What a new member's empty directory and ``LOCK`` may allocate before it joins."""


@dataclass
class BudgetSlot:
    """One member's slot: its directory and its numbers (``None`` when free)."""

    device: int
    inode: int
    path: str
    usage: int = 0
    reserved: int = 0
    wanted: int = 0

    @property
    def counted(self) -> int:
        """What the slot counts against the budget."""
        return self.usage + self.reserved


@dataclass
class BudgetFile:
    """The decoded content of a budget file."""

    size: int
    slots: list[BudgetSlot | None]


def encode_header(size: int) -> bytes:
    """The header record of a budget of ``size`` bytes."""
    return _sealed(_HEADER.pack(_HEADER_MAGIC, _VERSION, 0, 0, size))


def encode_member(slot: BudgetSlot) -> bytes:
    """The membership record of ``slot``."""
    path = os.fsencode(slot.path)
    return _sealed(_MEMBER.pack(_MEMBER_MAGIC, slot.device, slot.inode, len(path)) + path)


def encode_numbers(slot: BudgetSlot) -> bytes:
    """The numbers record of ``slot``."""
    return _sealed(_NUMBERS.pack(_NUMBERS_MAGIC, slot.usage, slot.reserved, slot.wanted))


def decode_budget(raw: bytes) -> BudgetFile | None:
    """The budget in ``raw``; ``None`` when it is blank (empty, all zeros or a
    header cut inside its magic: a creation that did not complete). Raises
    :class:`ValueError` when ``raw`` is not a budget file kvbucket wrote.

    A slot whose membership record is zero or damaged is free; a member whose
    numbers record is damaged counts as its directory's measure (``usage``
    -1 asks the caller to measure it)."""
    if len(raw) > MAX_FILE_BYTES:
        raise ValueError(f"it is {len(raw)} bytes, more than a budget file of {MAX_MEMBERS} members")
    header_end = _HEADER.size + _CRC.size
    if (len(raw) < header_end and _HEADER_MAGIC.startswith(raw[: len(_HEADER_MAGIC)])) or raw.count(0) == len(raw):
        return None
    magic, version, *_, size = _HEADER.unpack_from(raw) if len(raw) >= _HEADER.size else (b"", 0, 0, 0, 0)
    if magic != _HEADER_MAGIC:
        raise ValueError("it does not start with the budget magic")
    if len(raw) < header_end or _unsealed(raw[:header_end]) is None or version != _VERSION:
        raise ValueError(f"its header is damaged or of another version ({version})")
    return BudgetFile(size, [_decode_slot(raw[offset : offset + SLOT_SIZE]) for offset in range(SECTOR, len(raw), SLOT_SIZE)])


def _decode_slot(raw: bytes) -> BudgetSlot | None:
    member = _decode_member(raw[:SECTOR])
    if member is None:
        return None
    slot = BudgetSlot(*member)
    numbers = _unsealed(raw[SECTOR : SECTOR + _NUMBERS.size + _CRC.size])
    if numbers is None or numbers[:8] != _NUMBERS_MAGIC:
        slot.usage = -1
    else:
        _, slot.usage, slot.reserved, slot.wanted = _NUMBERS.unpack(numbers)
    return slot


@functools.lru_cache(maxsize=MAX_MEMBERS)
def _decode_member(sector: bytes) -> tuple[int, int, str] | None:
    """``(st_dev, st_ino, path)`` of a membership record; ``None`` when it is
    zero or damaged. Cached: every read of the file decodes the same records."""
    if len(sector) < _MEMBER.size:
        return None
    magic, device, inode, length = _MEMBER.unpack_from(sector)
    record = sector[: _MEMBER.size + length + _CRC.size]
    if magic != _MEMBER_MAGIC or not 0 < length <= MAX_PATH_BYTES or _unsealed(record) is None:
        return None
    return device, inode, os.fsdecode(record[_MEMBER.size : _MEMBER.size + length])


def _sealed(record: bytes) -> bytes:
    return record + _CRC.pack(crc32c(record))


def _unsealed(record: bytes) -> bytes | None:
    """``record`` without its trailing CRC32C; ``None`` when short or the CRC does not match."""
    if len(record) < _CRC.size:
        return None
    body = record[: -_CRC.size]
    return body if _CRC.unpack(record[-_CRC.size :])[0] == crc32c(body) else None


class Budget:
    """One member's handle on a budget file (an open descriptor; see the module docstring).

    Thread safety: every method takes :attr:`_mutex` and then the file's
    ``flock`` (:meth:`locked`); the store calls in holding its writer lock.
    """

    def __init__(self, fs: FileSystem, path: str, fd: int, directory: str, requested: int) -> None:
        self._fs = fs
        self.path = path
        self._fd = fd
        self._dir = os.path.abspath(directory)
        self._requested = requested  # the budget_bytes setting (0: take the recorded size)
        self._mutex = threading.Lock()
        self._identity: tuple[int, int] | None = None  # the member's directory, once joined
        self._file = BudgetFile(requested, [])  # guarded by the flock: read at each locked()
        self._wanted = 0  # guarded by _mutex: bytes this member asks the others to free

    @classmethod
    def open(cls, fs: FileSystem, path: str, budget_bytes: int, directory: str) -> Budget:
        """Open (creating it when missing and ``budget_bytes`` is given) the
        budget file ``path`` for the store ``directory``. Raises
        :class:`ForeignEntry` when it is a link, not a regular file, or on
        another file system than the store, and :class:`InvalidArgument` when
        it is missing and no size is given; nothing is created then."""
        store_device = _device_of(fs, directory)
        try:
            st = fs.stat(path)
        except FileNotFoundError:
            if not budget_bytes:
                raise InvalidArgument(
                    f"there is no budget file at {path}; give budget_bytes (the disk's size, e.g. 3500G) to create it"
                ) from None
            st = stat_directory(fs, os.path.dirname(os.path.abspath(path)))
        else:
            if not stat.S_ISREG(st.st_mode):
                raise _foreign(path, "a link or not a regular file")
        if st.st_dev != store_device:
            raise _foreign(path, f"on another file system than the store {directory}")
        try:
            fd = fs.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise
            raise _foreign(path, "a link or not a regular file") from exc
        try:
            if not stat.S_ISREG(fs.fstat(fd).st_mode):
                raise _foreign(path, "not a regular file")
        except BaseException:
            fs.close(fd)
            raise
        return cls(fs, path, fd, directory, budget_bytes)

    def close(self) -> None:
        """Close the descriptor (the slot stays: the directory still occupies the disk)."""
        with self._mutex:
            if self._fd >= 0:
                self._fs.close(self._fd)
                self._fd = -1

    @property
    def size(self) -> int:
        """The budget's size in bytes, as last read."""
        return self._file.size

    # -- the file under the flock -------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[BudgetFile]:
        """Hold the budget's ``flock`` and yield its content, read afresh."""
        with self._mutex:
            self._fs.lock_wait(self._fd)
            try:
                self._file = self._read()
                yield self._file
            finally:
                self._fs.unlock(self._fd)

    def _read(self) -> BudgetFile:
        size = self._fs.fstat(self._fd).st_size
        buf = bytearray(min(size, MAX_FILE_BYTES + 1))
        got = self._fs.read_into(self._fd, memoryview(buf), 0)
        try:
            decoded = decode_budget(bytes(buf[:got]))
        except ValueError as exc:
            raise _foreign(self.path, f"not a kvbucket budget file ({exc})") from None
        return decoded if decoded is not None else BudgetFile(0, [])

    def _check_size(self) -> None:
        """Create the header of a new (blank) file, or apply a changed
        ``budget_bytes`` when no other member is alive; refuse it otherwise
        (:class:`InvalidArgument`).

        Requires: the flock held."""
        current, requested = self._file.size, self._requested
        if not requested and not current:
            raise InvalidArgument(f"the budget file {self.path} records no size; give budget_bytes to set it")
        if not requested or requested == current:
            return
        if current:
            self._reconcile(everyone=True)
            live = [slot.path for slot in self._file.slots if slot is not None and _alive(self._fs, slot.path)]
            if live:
                raise InvalidArgument(
                    f"the budget file {self.path} records a budget of {current} bytes and its members "
                    f"{', '.join(live[:3])} run with it; give budget_bytes={current} (or 0 to take the "
                    "recorded size), or stop every member to change it"
                )
        self._write(0, encode_header(requested), durable=True)
        self._file.size = requested

    # -- membership ---------------------------------------------------------------
    def admit(self) -> None:
        """Check the budget's size (see ``budget_bytes``: create the header of
        a new file, apply a changed size while no other member runs, else
        raise :class:`InvalidArgument`), then raise :class:`CapacityExceeded`
        when the store's directory does not exist and a new member's floor
        does not fit in the budget.

        Requires: :meth:`locked` held, before the store's writer lock is taken."""
        self._check_size()
        try:
            stat_directory(self._fs, self._dir)
            return
        except (FileNotFoundError, NotADirectoryError):
            pass
        self._reconcile(everyone=False)
        others = self._others()
        if others + NEW_MEMBER_FLOOR > self._file.size:
            raise CapacityExceeded(self._full_message(NEW_MEMBER_FLOOR, 0, others))

    def join(self, usage: int) -> None:
        """Claim (or take back) this directory's slot, publishing ``usage``;
        the slots of dead members are re-measured first.

        Requires: :meth:`locked` held and the store's writer lock taken."""
        st = stat_directory(self._fs, self._dir)
        self._identity = (st.st_dev, st.st_ino)
        self._reconcile(everyone=True)
        self._publish_locked(usage, 0, 0)

    # -- reservations ---------------------------------------------------------------
    def reserve(self, need: int, usage: Callable[[], int], evict_to: Callable[[int], bool] | None) -> None:
        """Reserve ``need`` bytes for a write, first evicting this member's
        own buckets (``evict_to(target)`` evicts down to ``target`` physical
        bytes, returning False, having evicted nothing, when it cannot) when
        the budget would be exceeded, or when other members asked for room.
        Raises :class:`CapacityExceeded` naming the holders when it cannot
        make room; the bytes it still lacks are then asked of the others."""
        with self.locked():
            self._reconcile(everyone=False)
            mine, others, wanted = usage(), self._others(), self._wanted_by_others()
            if mine + need + others > self._file.size or wanted:
                self._reconcile(everyone=True)
                others, wanted = self._others(), self._wanted_by_others()
            hard = self._file.size - others - need
            if evict_to is not None and mine > hard - wanted:
                if not (wanted and evict_to(hard - wanted)) and mine > hard:
                    evict_to(hard)
                mine = usage()
            if mine > hard:
                self._wanted = max(mine - hard, need)
                self._publish_locked(mine, 0, self._wanted)
                raise CapacityExceeded(self._full_message(need, mine, others))
            self._wanted = 0
            self._publish_locked(mine, need, 0)

    def publish(self, usage: int) -> None:
        """Publish this member's measured ``usage`` and drop its reservation
        (after a commit, an eviction, a deletion or a failed write)."""
        with self.locked():
            self._publish_locked(usage, 0, self._wanted)

    def leave(self, usage: int) -> None:
        """Publish ``usage`` with no reservation and no request (the store closes)."""
        with self.locked():
            self._wanted = 0
            self._publish_locked(usage, 0, 0)

    def used(self) -> int:
        """What every slot counts together, as last published."""
        with self.locked() as state:
            return sum(max(slot.counted, 0) for slot in state.slots if slot is not None)

    # -- internals (Requires: the flock held) ------------------------------------------
    def _publish_locked(self, usage: int, reserved: int, wanted: int) -> None:
        """Write this member's numbers, claiming a slot (durably) when it has none."""
        assert self._identity is not None, "join() first"
        index = self._own_slot()
        if index is None:
            index = self._claim_slot()
        slot = self._file.slots[index]
        assert slot is not None
        slot.usage, slot.reserved, slot.wanted = usage, reserved, wanted
        self._write(SECTOR + index * SLOT_SIZE + SECTOR, encode_numbers(slot), durable=False)

    def _own_slot(self) -> int | None:
        return next((index for index, slot in enumerate(self._file.slots) if slot is not None and self._is_own(slot)), None)

    def _is_own(self, slot: BudgetSlot) -> bool:
        """Whether ``slot`` is this member's: the same directory (identity) at
        the same path; a reused inode at another path is not."""
        return (slot.device, slot.inode) == self._identity and slot.path == self._dir

    def _claim_slot(self) -> int:
        """A slot for this directory: a free one, or a new one at the end;
        its membership record is made durable before it is used."""
        assert self._identity is not None
        path = self._dir
        if len(os.fsencode(path)) > MAX_PATH_BYTES:
            raise InvalidArgument(f"the store path {path} is longer than {MAX_PATH_BYTES} bytes; a budget member needs a shorter one")
        slots = self._file.slots
        index = next((i for i, slot in enumerate(slots) if slot is None), len(slots))
        if index >= MAX_MEMBERS:
            raise InvalidArgument(f"the budget file {self.path} already has {MAX_MEMBERS} members; use another budget file")
        slot = BudgetSlot(*self._identity, path)
        if index == len(slots):
            slots.append(slot)
        slots[index] = slot
        offset = SECTOR + index * SLOT_SIZE
        self._write(offset, encode_member(slot).ljust(SECTOR, b"\0") + encode_numbers(slot), durable=True)
        return index

    def _others(self) -> int:
        """What the other members' slots count."""
        return sum(slot.counted for slot in self._file.slots if slot is not None and not self._is_own(slot))

    def _wanted_by_others(self) -> int:
        return sum(slot.wanted for slot in self._file.slots if slot is not None and not self._is_own(slot))

    def _reconcile(self, *, everyone: bool) -> None:
        """Replace the numbers of dead members by a measure of their
        directory (and free the slot of a directory that is gone). Without
        ``everyone``, only slots whose numbers are damaged are measured."""
        for index, slot in enumerate(self._file.slots):
            if slot is None or self._is_own(slot):
                continue
            if not everyone and slot.usage >= 0:
                continue
            # Once joined, a slot at this member's path but of another directory
            # (the one there before it was replaced) is not live: the LOCK there is ours.
            ours = self._identity is not None and slot.path == self._dir
            if not ours and _alive(self._fs, slot.path):
                if slot.usage < 0:  # a live member with damaged numbers: count its directory
                    slot.usage = self._measure(slot) or 0
                continue
            usage = self._measure(slot)
            offset = SECTOR + index * SLOT_SIZE
            if usage is None:
                self._file.slots[index] = None
                self._write(offset, bytes(SECTOR), durable=False)
            elif (slot.usage, slot.reserved, slot.wanted) != (usage, 0, 0):
                slot.usage, slot.reserved, slot.wanted = usage, 0, 0
                self._write(offset + SECTOR, encode_numbers(slot), durable=False)

    def _measure(self, slot: BudgetSlot) -> int | None:
        """``du`` of a member's directory; ``None`` when the directory is gone
        (or another one is at its path); its last count when it cannot be measured."""
        try:
            st = stat_directory(self._fs, slot.path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError:
            return max(slot.counted, 0)
        if (st.st_dev, st.st_ino) != (slot.device, slot.inode):
            return None
        try:
            return measure_store(self._fs, slot.path).total
        except OSError:
            return max(slot.counted, 0)

    def _write(self, offset: int, record: bytes, *, durable: bool) -> None:
        self._fs.write_all(self._fd, [memoryview(record)], offset)
        if durable:
            self._fs.fsync(self._fd)
            self._fs.fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def _full_message(self, need: int, mine: int, others: int) -> str:
        holders = sorted((slot for slot in self._file.slots if slot is not None and slot.path != self._dir), key=lambda s: -s.counted)
        listed = ", ".join(f"{slot.path} {slot.counted}" for slot in holders[:4]) + (" ..." if len(holders) > 4 else "")
        return (
            f"the budget {self.path} of {self._file.size} bytes has no room for {need} more bytes: "
            f"this store ({self._dir}) holds {mine} after evicting what it could, the other members "
            f"hold {others} ({listed or 'none'}). They free the rest at their next write; raise "
            "budget_bytes, or evict in the members holding the space"
        )


def _alive(fs: FileSystem, directory: str) -> bool:
    """Whether a process holds the writer lock of ``directory`` (a
    non-blocking ``flock`` probe on its ``LOCK``, released at once)."""
    try:
        fd = fs.open(os.path.join(directory, LOCK_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return stat.S_ISREG(fs.fstat(fd).st_mode) and not fs.lock(fd)
    finally:
        fs.close(fd)


def _device_of(fs: FileSystem, directory: str) -> int:
    """The ``st_dev`` of ``directory``, or of its nearest existing ancestor
    (where it will be created)."""
    path = os.path.abspath(directory)
    while True:
        try:
            return stat_directory(fs, path).st_dev
        except (FileNotFoundError, NotADirectoryError):
            parent = os.path.dirname(path)
            if parent == path:
                raise
            path = parent


def _foreign(path: str, what: str) -> ForeignEntry:
    return ForeignEntry(
        f"the budget file {path} is {what}; kvbucket never writes through a link, into another "
        "program's file or across file systems. Point budget_path at a file next to the store "
        "directories, on their file system, that only kvbucket uses"
    )
