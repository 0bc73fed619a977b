"""Caller-memory addresses and page-aligned staging buffers for O_DIRECT.

O_DIRECT moves bytes between the file and memory only when the memory, the
file offset and the length are all aligned to :data:`ALIGNMENT`. These
helpers tell which part of a caller's buffer qualifies, and lend reusable
page-aligned buffers (anonymous mmaps) for the rest.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Callable

from .format import ALIGNMENT
from .fs import WRITE_CHUNK

__all__ = ["STAGING_BYTES", "READ_COPY_OUTSIDE_GIL", "address_of", "split_for_direct", "copy_out", "Stage", "StagingPool", "POOL"]

STAGING_BYTES = WRITE_CHUNK
"""Size of the largest page-aligned staging buffer for direct I/O."""

READ_COPY_OUTSIDE_GIL = 256 << 10
"""The same for the copy-out of a read. Reads run in a pool of many threads:
giving the GIL up and waiting to get it back costs more than a 64 KiB copy
under it (measured: 16 threads, 2 vCPUs), so only long copies release it."""


# ---------------------------------------------------------------------------
# addresses of caller buffers
# ---------------------------------------------------------------------------


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer``, to read the address of a read-only buffer."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer: Callable[..., int] | None  # PyObject_GetBuffer; None when not CPython
try:
    _py_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
    _py_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
    _py_get_buffer.restype = ctypes.c_int
    _get_buffer = _py_get_buffer
    _release_buffer = ctypes.pythonapi.PyBuffer_Release
    _release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
    _release_buffer.restype = None
except (AttributeError, OSError):  # not CPython: read-only buffers count as unaligned
    _get_buffer = None


def address_of(view: memoryview) -> int | None:
    """Where ``view``'s bytes start in memory; None when unknown (treated as
    unaligned, so the bytes are staged)."""
    if not len(view):
        return None
    try:
        if not view.readonly:
            return ctypes.addressof(ctypes.c_char.from_buffer(view))
        if _get_buffer is None:
            return None
        info = _PyBuffer()
        _get_buffer(view, ctypes.byref(info), 0)  # PyBUF_SIMPLE
        try:
            address: int | None = info.buf  # a c_void_p field: None when NULL
            return address
        finally:
            _release_buffer(ctypes.byref(info))
    except (TypeError, ValueError, BufferError):
        return None


def split_for_direct(view: memoryview, position: int) -> tuple[int | None, int, int]:
    """How a piece of ``len(view)`` bytes at file ``position`` splits for
    O_DIRECT: ``(address, head, middle)``. The ``middle`` bytes after the
    first ``head`` are aligned in memory, in the file and in length (they go
    straight between file and buffer); the head and the rest are staged.
    A piece whose address is not congruent to its file position is staged
    whole (``head = len(view)``)."""
    n = len(view)
    address = address_of(view)
    if address is None or (address - position) % ALIGNMENT:
        return address, n, 0
    head = min(n, -position % ALIGNMENT)
    return address, head, (n - head) - (n - head) % ALIGNMENT


def copy_out(dst: memoryview, dst_address: int | None, src: memoryview, src_address: int | None, n: int) -> None:
    """Copy ``n`` bytes of a read from staging ``src`` to ``dst`` (outside the GIL when long)."""
    if n >= READ_COPY_OUTSIDE_GIL and dst_address is not None and src_address is not None:
        ctypes.memmove(dst_address, src_address, n)
    else:
        dst[:n] = src[:n]


# ---------------------------------------------------------------------------
# staging buffers
# ---------------------------------------------------------------------------


class Stage:
    """One page-aligned staging buffer (a private anonymous mmap)."""

    __slots__ = ("size", "map", "view", "address")

    def __init__(self, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.map)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))


def _size_class(nbytes: int) -> int:
    """The staging size for a request of ``nbytes``: a power of two from
    ALIGNMENT to STAGING_BYTES."""
    nbytes = min(max(nbytes, ALIGNMENT), STAGING_BYTES)
    return min(1 << (nbytes - 1).bit_length(), STAGING_BYTES)


class StagingPool:
    """Reused staging buffers by size class; the lock covers only the free lists."""

    def __init__(self) -> None:
        self._free: dict[int, list[Stage]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Stage:
        """A buffer of at least ``min(nbytes, STAGING_BYTES)`` bytes."""
        size = _size_class(nbytes)
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        return Stage(size)

    def give(self, stage: Stage) -> None:
        with self._lock:
            self._free.setdefault(stage.size, []).append(stage)

    def reset(self) -> None:
        """Forget every buffer (in a forked child: the lock may be held)."""
        self._free = {}
        self._lock = threading.Lock()


POOL = StagingPool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=POOL.reset)
