"""Turning caller values into flat byte views, without copying.

A value is any object with the buffer protocol (bytes, bytearray, memoryview,
numpy arrays, mmap, ...), a CPU torch tensor, or a list/tuple of those
written back to back. Each becomes a C-contiguous ``memoryview`` of format
``B`` over the caller's memory.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from ..errors import InvalidArgument

__all__ = ["Buffer", "byte_view", "destination_views", "value_views", "views_of_value", "writable_view", "writable_views"]

Buffer: TypeAlias = Any
"""Any object exposing the buffer protocol (``collections.abc.Buffer`` on 3.12+)."""


def byte_view(obj: Buffer, what: str) -> memoryview:
    """A flat, read-only-or-writable ``memoryview`` of ``obj``'s bytes.

    ``what`` names the object in the error (for example ``"value of key 'a'"``).
    """
    try:
        view = memoryview(obj)
    except TypeError:
        view = _tensor_view(obj, what)
    if not view.c_contiguous:
        raise InvalidArgument(f"{what} is not C-contiguous; pass a contiguous copy")
    if view.format == "B" and view.ndim == 1:
        return view
    return view.cast("B")


def _tensor_view(obj: Any, what: str) -> memoryview:
    """View a CPU torch tensor's bytes (tensors do not export the buffer protocol)."""
    if type(obj).__module__.startswith("torch") and hasattr(obj, "untyped_storage"):
        if obj.device.type != "cpu":
            raise InvalidArgument(f"{what} is a {obj.device.type} tensor; only CPU memory can be stored")
        if not obj.is_contiguous():
            raise InvalidArgument(f"{what} is not contiguous; pass tensor.contiguous()")
        import torch

        flat = obj.reshape(-1).view(torch.uint8)
        return memoryview(flat.numpy())
    raise InvalidArgument(f"{what} must be a buffer (bytes, bytearray, memoryview, array, tensor); got {type(obj).__name__}")


def value_views(value: Buffer | list[Buffer] | tuple[Buffer, ...], what: str) -> list[memoryview]:
    """The pieces of one value: a single buffer, or a list or tuple of buffers."""
    if isinstance(value, (list, tuple)):
        return [byte_view(part, what) for part in value]
    if isinstance(value, str):
        raise InvalidArgument(f"{what} is a str; encode it to bytes first")
    return [byte_view(value, what)]


def views_of_value(key: str, value: Buffer | list[Buffer] | tuple[Buffer, ...]) -> list[memoryview]:
    """:func:`value_views` of the value of ``key``; flat byte buffers (the
    usual value, alone or in a list) are taken without composing the name
    used in errors."""
    parts = value if isinstance(value, (list, tuple)) else (value,)
    views = []
    for part in parts:
        view = _flat_bytes(part)
        if view is None:
            return value_views(value, f"value of key {key!r}")
        views.append(view)
    return views


def _flat_bytes(obj: Buffer) -> memoryview | None:
    """A view of ``obj`` when it already is a flat, contiguous byte buffer, else None."""
    try:
        view = memoryview(obj)
    except TypeError:
        return None
    return view if view.ndim == 1 and view.format == "B" and view.c_contiguous else None


def writable_views(dest: Buffer | list[Buffer] | tuple[Buffer, ...], what: str) -> list[memoryview]:
    """The pieces of one destination: a writable buffer, or a list or tuple of
    them filled back to back (for example a page's K and V halves)."""
    parts = dest if isinstance(dest, (list, tuple)) else [dest]
    return [writable_view(part, what) for part in parts]


def destination_views(key: str, dest: Buffer | list[Buffer] | tuple[Buffer, ...]) -> list[memoryview]:
    """:func:`writable_views` of the destination of ``key``; flat writable byte
    buffers (the usual destination, alone or in a list) are taken without
    composing the name used in errors."""
    parts = dest if isinstance(dest, (list, tuple)) else (dest,)
    views = []
    for part in parts:
        view = _flat_bytes(part)
        if view is None or view.readonly:
            return writable_views(dest, f"buffer for key {key!r}")
        views.append(view)
    return views


def writable_view(obj: Buffer, what: str) -> memoryview:
    """A flat writable view of a destination buffer, or :class:`InvalidArgument`."""
    view = byte_view(obj, what)
    if view.readonly:
        raise InvalidArgument(f"{what} is read-only; pass a writable buffer (bytearray, numpy array, ...)")
    return view
