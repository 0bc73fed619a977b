"""Reading and writing a bucket's data file, buffered or with O_DIRECT.

A data file is the values of its objects at the offsets the meta records
(docs/FORMAT.md, "The data file"). Buffered writes hand the caller's buffers
straight to ``pwritev`` (no copy in Python). Direct writes copy through
page-aligned staging buffers, because O_DIRECT needs aligned memory, offsets
and lengths; aligned buckets pad every value to :data:`ALIGNMENT`, so either
mode reads either kind of bucket.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .format import ALIGNMENT
from .fs import O_DIRECT, WRITE_CHUNK, FileSystem

__all__ = ["write_values", "read_value", "open_for_read", "STAGING_BYTES"]

STAGING_BYTES = WRITE_CHUNK
"""Size of one page-aligned staging buffer for direct I/O."""


class _StagingPool:
    """Reused page-aligned buffers (anonymous mmaps are page-aligned)."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    @contextmanager
    def buffer(self) -> Iterator[memoryview]:
        with self._lock:
            buf = self._free.pop() if self._free else mmap.mmap(-1, STAGING_BYTES)
        view = memoryview(buf)
        try:
            yield view
        finally:
            view.release()
            with self._lock:
                self._free.append(buf)


_POOL = _StagingPool()


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
    """Copy values into aligned staging buffers and write whole buffers.

    Invariant: ``offsets`` are multiples of ALIGNMENT and ``length`` is the
    padded end, so every write starts and ends on an aligned boundary, and
    padding bytes are written as zeros.
    """
    with _POOL.buffer() as stage:
        filled = 0  # bytes of ``stage`` holding data for file offset ``base``
        base = 0
        for pieces, offset in zip(values, offsets):
            position = offset
            for piece in pieces:
                start = 0
                while start < len(piece):
                    if position - base >= STAGING_BYTES:
                        _zero(stage, filled, STAGING_BYTES)
                        fs.write_all(fd, [stage], base)
                        base += STAGING_BYTES
                        filled = 0
                    room = STAGING_BYTES - (position - base)
                    chunk = piece[start : start + room]
                    _zero(stage, filled, position - base)
                    stage[position - base : position - base + len(chunk)] = chunk
                    filled = position - base + len(chunk)
                    position += len(chunk)
                    start += len(chunk)
        while base < length:
            end = min(length - base, STAGING_BYTES)
            _zero(stage, filled, end)
            fs.write_all(fd, [stage[:end]], base)
            base += end
            filled = 0


def _zero(stage: memoryview, start: int, end: int) -> None:
    if end > start:
        stage[start:end] = bytes(end - start)


def open_for_read(fs: FileSystem, path: str, direct: bool) -> int:
    """A read descriptor of a data file (O_DIRECT when ``direct``)."""
    return fs.open(path, os.O_RDONLY | (O_DIRECT if direct else 0))


def read_value(fs: FileSystem, fd: int, offset: int, dests: Sequence[memoryview], direct: bool) -> int:
    """Read the value at ``offset`` into ``dests`` back to back; returns bytes
    read (short only when the file is shorter than the meta says)."""
    if not direct:
        return fs.readv_into(fd, dests, offset)
    total = sum(len(d) for d in dests)
    pieces = iter(dests)
    piece, used = next(pieces, memoryview(b"")), 0
    done = 0
    while done < total:
        start = offset + done
        aligned = start - start % ALIGNMENT
        with _POOL.buffer() as stage:
            want = min(STAGING_BYTES, -(-(start + total - done - aligned) // ALIGNMENT) * ALIGNMENT)
            got = fs.read_into(fd, stage[:want], aligned)
            usable = min(got - (start - aligned), total - done)
            if usable <= 0:
                break
            source = stage[start - aligned : start - aligned + usable]
            while len(source):  # scatter into the destination pieces
                while used == len(piece):
                    piece, used = next(pieces), 0
                n = min(len(source), len(piece) - used)
                piece[used : used + n] = source[:n]
                used += n
                source = source[n:]
        done += usable
    return done
