"""Which I/O a store uses: how each new bucket is laid out and written, and how objects are read.

``io_mode`` (:class:`~kvbucket.config.BucketConfig`) makes two separate decisions:

* reads: O_DIRECT under ``direct``, through the page cache otherwise;
* writes, per new bucket (one ``batch_offload``, one bucket of an
  ``offload_group``, one compaction's output): ``direct`` lays every bucket
  out aligned and writes it with O_DIRECT; ``buffered`` lays every bucket out
  packed and writes it through the page cache; ``auto`` writes a bucket
  aligned with O_DIRECT when the directory's file system accepts O_DIRECT,
  every object size is a multiple of :data:`~kvbucket._core.format.ALIGNMENT`
  (so the aligned layout pads nothing and costs no space) and the mean
  object size is at least :data:`AUTO_DIRECT_MIN_OBJECT`, and packed and
  buffered otherwise.

Invariant: a data file is written with O_DIRECT exactly when its layout is
aligned, and the layout is recorded in the bucket's meta (its aligned flag),
so a reader, a rewrite or a later open needs nothing else to know it; a
store may hold buckets of both layouts, and either read mode reads both.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidArgument
from .format import ALIGNMENT, LOCK_NAME, aligned_layout, packed_layout
from .fs import O_DIRECT, FileSystem, run_io

__all__ = ["AUTO_DIRECT_MIN_OBJECT", "WriteMode", "reads_direct", "accepts_direct", "writer_mode"]

AUTO_DIRECT_MIN_OBJECT = 128 << 10
"""Least mean object size of a bucket that ``auto`` writes with O_DIRECT.
``benchmarks/io_mode.py`` (durable offloads in 256 MiB buckets, the store's
O_DIRECT write speed over its buffered one, median of the trials): 0.89x at
64 KiB, 1.13x at 128 KiB (two runs alike), 0.95-1.11x at 256 KiB, 1.20-1.23x
at 512 KiB, 1.19x at 1 MiB."""


def reads_direct(io_mode: str) -> bool:
    """Whether a store with ``io_mode`` reads with O_DIRECT (only ``direct``:
    buffered reads were as fast or faster cold, and much faster warm)."""
    return io_mode == "direct"


@dataclass(frozen=True)
class WriteMode:
    """How a writer chooses each new bucket's layout.

    ``direct_ok``: the store's file system accepts O_DIRECT (probed once, at
    open, by :func:`writer_mode`); only ``auto`` consults it.
    """

    io_mode: str
    direct_ok: bool

    def aligned(self, sizes: Sequence[int]) -> bool:
        """Whether a new bucket of objects of ``sizes`` is aligned (and written with O_DIRECT)."""
        if self.io_mode != "auto":
            return self.io_mode == "direct"
        if not (self.direct_ok and sizes):
            return False
        return all(size % ALIGNMENT == 0 for size in sizes) and sum(sizes) >= AUTO_DIRECT_MIN_OBJECT * len(sizes)

    def layout(self, sizes: list[int]) -> tuple[bool, list[int], int]:
        """``(aligned, offsets, data_length)`` of a new bucket of objects of ``sizes``."""
        aligned = self.aligned(sizes)
        offsets, length = (aligned_layout if aligned else packed_layout)(sizes)
        return aligned, offsets, length


def accepts_direct(fs: FileSystem, path: str) -> bool:
    """Whether the file system holding ``path`` (an existing regular file of
    the store) opens it with O_DIRECT. Opens it read-only and closes it:
    writes nothing. A refusal is EINVAL; any other error propagates."""
    if not O_DIRECT:
        return False
    try:
        fd = fs.open(path, os.O_RDONLY | os.O_NOFOLLOW | O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    fs.close(fd)
    return True


def writer_mode(fs: FileSystem, directory: str, io_mode: str) -> WriteMode:
    """The :class:`WriteMode` of a writer of ``directory`` (its ``LOCK`` held).

    ``auto`` and ``direct`` probe the file system once, through ``LOCK``.
    Raises :class:`InvalidArgument` when ``direct`` is asked of a file system
    that refuses O_DIRECT (every write would fail).
    """
    if io_mode == "buffered":
        return WriteMode(io_mode, direct_ok=False)
    lock_path = os.path.join(directory, LOCK_NAME)
    direct_ok = run_io("checking O_DIRECT support", directory, lambda: accepts_direct(fs, lock_path))
    if io_mode == "direct" and not direct_ok:
        raise InvalidArgument(
            f"the file system of {directory} does not accept O_DIRECT, which io_mode='direct' needs; "
            "use io_mode='auto' (O_DIRECT wherever it helps and works) or io_mode='buffered'"
        )
    return WriteMode(io_mode, direct_ok)
