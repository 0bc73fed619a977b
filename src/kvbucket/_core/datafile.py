"""Reading and writing a bucket's data file, buffered or with O_DIRECT.

A data file is the values of its objects at the offsets the meta records
(docs/FORMAT.md, "The data file"). Buffered writes hand the caller's buffers
straight to ``pwritev`` (no copy in Python). O_DIRECT needs aligned memory,
offsets and lengths, and aligned buckets pad every value to
:data:`ALIGNMENT`, so either mode reads either kind of bucket. Direct I/O
moves the bytes of a caller's buffer straight between the file and the
buffer wherever both are aligned (pinned host pools, mmap-backed arrays: the
usual case for whole pages), and copies through page-aligned staging buffers
only the rest: unaligned buffers, heads and tails, padding. Copies run
outside the GIL (``ctypes.memmove``), and a long staged write overlaps the
copy into one staging buffer with the write of the previous one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from . import fs as _fs
from .format import ALIGNMENT
from .fs import IOV_MAX, O_DIRECT, FileSystem
from .staging import POOL, STAGING_BYTES, Stage, address_of, copy_out, split_for_direct

__all__ = ["write_values", "read_value", "open_for_read", "STAGING_BYTES"]

_COPY_OUTSIDE_GIL = 16 << 10
"""Staging copies of a write at least this long go through ``ctypes.memmove``
(which releases the GIL, so the write thread keeps going); shorter ones are
memoryview slice assignments (less call overhead)."""

# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------


def write_values(
    fs: FileSystem, fd: int, values: Sequence[Sequence[memoryview]], offsets: Sequence[int], length: int, direct: bool
) -> None:
    """Write each value's pieces at its offset; the file ends up ``length`` long."""
    if direct:
        _write_direct(fs, fd, values, offsets, length)
    else:
        fs.write_all(fd, [piece for pieces in values for piece in pieces], 0)


def _write_direct(
    fs: FileSystem, fd: int, values: Sequence[Sequence[memoryview]], offsets: Sequence[int], length: int
) -> None:
    """Write values with O_DIRECT: aligned middles of the pieces straight from
    the caller's memory, everything else (and the zero padding) staged.

    Pieces are planned as they are handed to the writer, so the planning of
    one batch overlaps the write of the previous one.

    Invariant: ``offsets`` are multiples of ALIGNMENT and ``length`` is the
    padded end, so every write starts and ends on an aligned boundary, and
    every byte of the file not covered by a value is written as zero.
    """
    writer = _DirectWriter(fs, fd, length)
    try:
        for pieces, offset in zip(values, offsets):
            position = offset
            for piece in pieces:
                _write_piece(writer, piece, position)
                position += len(piece)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        writer.release()


def _write_piece(writer: _DirectWriter, piece: memoryview, position: int) -> None:
    """Hand one piece at file ``position`` to ``writer``: its aligned middle
    direct, its head and tail staged."""
    n = len(piece)
    if not n:
        return
    address, head, middle = split_for_direct(piece, position)
    if middle == n:  # the usual case for whole pages: no slicing
        writer.direct(position, piece)
        return
    if head:
        writer.staged(position, piece[:head], address)
    if middle:
        writer.direct(position + head, piece[head : head + middle])
    rest = head + middle
    if n - rest:
        writer.staged(position + rest, piece[rest:], None if address is None else address + rest)


class _DirectWriter:
    """Gathers a data file into aligned batches of at most ``fs.WRITE_CHUNK``
    bytes: iovecs over the caller's memory and runs of one staging buffer.

    When the file takes more than one batch (``length > WRITE_CHUNK``),
    batches are written by one background thread while the caller plans the
    next one and fills its staging buffer (two buffers, one write in flight).
    Writes stay in file order, one at a time, through ``fs.write_all`` (which
    loops over short writes).
    """

    def __init__(self, fs: FileSystem, fd: int, length: int) -> None:
        self.fs, self.fd, self.length = fs, fd, length
        chunk = min(_fs.WRITE_CHUNK, STAGING_BYTES)  # read at call time: crash tests shrink it
        self.chunk = max(ALIGNMENT, chunk - chunk % ALIGNMENT)
        self.stage_bytes = min(length, STAGING_BYTES)  # taken only once something is staged
        self.overlap = length > self.chunk
        self.base = 0  # file offset of the current batch
        self.iov: list[memoryview] = []  # closed iovecs of the current batch
        self.size = 0  # bytes in ``iov``
        self.stage: Stage | None = None  # staging buffer of the current batch
        self.run = 0  # where the open staged run starts in ``stage``
        self.used = 0  # bytes of ``stage`` in use
        self.spare: list[Stage] = []
        self.inflight: tuple[Future[int], Stage | None] | None = None
        self.executor: ThreadPoolExecutor | None = None

    def _cursor(self) -> int:
        return self.base + self.size + self.used - self.run

    def staged(self, position: int, view: memoryview | None, address: int | None) -> None:
        """Stage zeros up to ``position``, then ``view`` (if any)."""
        gap = position - self._cursor()
        if gap > 0:
            self._put(gap, None, None)
        if view is not None:
            self._put(len(view), view, address)

    def direct(self, position: int, view: memoryview) -> None:
        """Write ``view`` (aligned) at ``position`` (aligned) from the caller's memory."""
        self.staged(position, None, None)
        self._close_run()
        if len(view) <= self.chunk - self.size and len(self.iov) < IOV_MAX:  # fits the batch: no slicing
            self.iov.append(view)
            self.size += len(view)
            return
        while len(view):
            room = self.chunk - self.size
            if room <= 0 or len(self.iov) >= IOV_MAX:
                self._seal()
                continue
            take = view[:room]
            self.iov.append(take)
            self.size += len(take)
            view = view[len(take) :]

    def finish(self) -> None:
        """Zero-pad to ``length``, write what is left and wait for it."""
        self.staged(self.length, None, None)
        self._seal()
        self._wait()

    def abort(self) -> None:
        """After an error: wait for a write still in flight (the caller closes
        the descriptor next); the error already propagating wins over its."""
        with contextlib.suppress(BaseException):
            self._wait()

    def release(self) -> None:
        """Stop the write thread and give the staging buffers back."""
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None
        for stage in self.spare + ([self.stage] if self.stage is not None else []):
            POOL.give(stage)
        self.spare, self.stage = [], None

    def _put(self, n: int, view: memoryview | None, address: int | None) -> None:
        """Append ``n`` staged bytes at the cursor: ``view``'s, or zeros."""
        done = 0
        while done < n:
            if self.stage is None:
                self.stage = self.spare.pop() if self.spare else POOL.take(self.stage_bytes)
                self.run = self.used = 0
            room = min(self.chunk - self.size - (self.used - self.run), self.stage.size - self.used)
            if room <= 0:
                self._seal()
                continue
            k = min(room, n - done)
            target = self.stage.address + self.used
            if view is None:
                ctypes.memset(target, 0, k)
            elif address is not None and k >= _COPY_OUTSIDE_GIL:
                ctypes.memmove(target, address + done, k)
            else:
                self.stage.view[self.used : self.used + k] = view[done : done + k]
            self.used += k
            done += k

    def _close_run(self) -> None:
        if self.stage is not None and self.used > self.run:
            self.iov.append(self.stage.view[self.run : self.used])
            self.size += self.used - self.run
            self.run = self.used

    def _seal(self) -> None:
        """Send the current batch to be written; start an empty one after it."""
        self._close_run()
        iov, base, stage = self.iov, self.base, self.stage
        self.base += self.size
        self.iov, self.size, self.stage, self.run, self.used = [], 0, None, 0, 0
        if not iov:
            if stage is not None:
                self.spare.append(stage)
            return
        if not self.overlap:
            try:
                self.fs.write_all(self.fd, iov, base)
            finally:
                if stage is not None:
                    self.spare.append(stage)
            return
        try:
            self._wait()
        except BaseException:
            if stage is not None:
                self.spare.append(stage)
            raise
        if self.executor is None:
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="kvbucket-write")
        self.inflight = (self.executor.submit(self.fs.write_all, self.fd, iov, base), stage)

    def _wait(self) -> None:
        if self.inflight is None:
            return
        future, stage = self.inflight
        self.inflight = None
        try:
            future.result()
        finally:
            if stage is not None:
                self.spare.append(stage)


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------


def open_for_read(fs: FileSystem, path: str, direct: bool) -> int:
    """A read descriptor of a data file (O_DIRECT when ``direct``)."""
    return fs.open(path, os.O_RDONLY | (O_DIRECT if direct else 0))


def read_value(fs: FileSystem, fd: int, offset: int, dests: Sequence[memoryview], direct: bool) -> int:
    """Read the value at ``offset`` into ``dests`` back to back; returns bytes
    read (short only when the file is shorter than the meta says)."""
    if not direct:
        return fs.readv_into(fd, dests, offset)
    if len(dests) == 1:  # the common cases, without the general planning below
        dest = dests[0]
        address = address_of(dest)
        if address is not None and not (offset | len(dest) | address) % ALIGNMENT:
            return fs.readv_into(fd, dests, offset)  # one aligned page buffer: no staging
        start = offset - offset % ALIGNMENT
        stop = -(-(offset + len(dest)) // ALIGNMENT) * ALIGNMENT
        if dest and (address is None or (address - offset) % ALIGNMENT) and stop - start <= STAGING_BYTES:
            return _read_staged(fs, fd, offset, dest, address, start, stop)
    return _read_direct(fs, fd, offset, dests)


def _read_staged(fs: FileSystem, fd: int, offset: int, dest: memoryview, address: int | None, start: int, stop: int) -> int:
    """Read one unaligned destination through one staging buffer sized to it."""
    stage = POOL.take(stop - start)
    try:
        got = fs.read_into(fd, stage.view[: stop - start], start)
        usable = max(0, min(len(dest), start + got - offset))
        copy_out(dest, address, stage.view[offset - start :], stage.address + offset - start, usable)
        return usable
    finally:
        POOL.give(stage)


def _read_direct(fs: FileSystem, fd: int, offset: int, dests: Sequence[memoryview]) -> int:
    """O_DIRECT read of the aligned range around the value: the aligned
    middles of the destinations are read into directly, every other byte
    (unaligned destinations, heads, tails, neighbouring bytes) into a staging
    buffer sized to them, then copied out."""
    direct: list[tuple[int, memoryview]] = []  # (file position, destination slice)
    staged: list[tuple[int, memoryview, int | None]] = []  # (file position, destination slice, its address)
    position = offset
    for piece in dests:
        n = len(piece)
        if not n:
            continue
        address, head, middle = split_for_direct(piece, position)
        if head:
            staged.append((position, piece[:head], address))
        if middle:
            direct.append((position + head, piece[head : head + middle]))
        if n - head - middle:
            rest = head + middle
            staged.append((position + rest, piece[rest:], None if address is None else address + rest))
        position += n
    end = position
    if end == offset:
        return 0
    start = offset - offset % ALIGNMENT
    stop = -(-end // ALIGNMENT) * ALIGNMENT
    staged_bytes = (stop - start) - sum(len(v) for _, v in direct)
    reader = _DirectReader(fs, fd, start, staged, staged_bytes)
    try:
        cursor = start
        for position, view in direct:
            if position > cursor and not reader.gap(cursor, position):
                break
            if not reader.direct(view):
                break
            cursor = position + len(view)
        else:
            if stop > cursor:
                reader.gap(cursor, stop)
            reader.flush()
    finally:
        reader.close()
    return max(0, min(end, reader.valid_end) - offset)


class _DirectReader:
    """Issues the reads of one value: calls over a contiguous aligned file
    range, with iovecs over the destinations and one staging buffer; after
    each call, copies the staged bytes that belong to the value out."""

    def __init__(self, fs: FileSystem, fd: int, start: int, staged: list[tuple[int, memoryview, int | None]], staged_bytes: int) -> None:
        self.fs, self.fd = fs, fd
        self.staged = staged
        self.next_staged = 0  # first entry of ``staged`` not yet fully copied out
        self.stage = POOL.take(staged_bytes) if staged_bytes > 0 else None
        self.base = start  # file offset of the current call
        self.size = 0  # bytes in ``iov``
        self.iov: list[memoryview] = []
        self.chunks: list[tuple[int, int, int]] = []  # (stage offset, file start, file end)
        self.used = 0
        self.valid_end = start  # file bytes before this are in place
        self.short = False

    def gap(self, begin: int, end: int) -> bool:
        """Read file bytes ``[begin, end)`` into staging; False after a short read."""
        assert self.stage is not None
        while begin < end:
            room = self.stage.size - self.used
            if room <= 0 or len(self.iov) >= IOV_MAX:
                if not self.flush():
                    return False
                continue
            k = min(room, end - begin)
            self.iov.append(self.stage.view[self.used : self.used + k])
            self.chunks.append((self.used, begin, begin + k))
            self.used += k
            self.size += k
            begin += k
        return True

    def direct(self, view: memoryview) -> bool:
        if len(self.iov) >= IOV_MAX and not self.flush():
            return False
        self.iov.append(view)
        self.size += len(view)
        return True

    def flush(self) -> bool:
        """Issue the current call and copy out; False when it read short."""
        if not self.iov:
            return True
        got = self.fs.readv_into(self.fd, self.iov, self.base)
        self.valid_end = self.base + got
        self._copy_out()
        self.short = got < self.size
        self.base += self.size
        self.iov, self.chunks, self.size, self.used = [], [], 0, 0
        return not self.short

    def _copy_out(self) -> None:
        stage = self.stage
        staged = self.staged
        for stage_offset, begin, end in self.chunks:
            end = min(end, self.valid_end)
            i = self.next_staged
            while i < len(staged) and staged[i][0] + len(staged[i][1]) <= begin:
                i += 1
            self.next_staged = i
            while i < len(staged) and staged[i][0] < end:
                position, view, address = staged[i]
                lo, hi = max(position, begin), min(position + len(view), end)
                if hi > lo:
                    source = stage_offset + lo - begin
                    copy_out(
                        view[lo - position :],
                        None if address is None else address + lo - position,
                        stage.view[source:],  # type: ignore[union-attr]
                        stage.address + source,  # type: ignore[union-attr]
                        hi - lo,
                    )
                i += 1

    def close(self) -> None:
        if self.stage is not None:
            POOL.give(self.stage)
            self.stage = None
