"""CRC32C (Castagnoli), hardware-accelerated where the CPU allows.

One function so the rest of the package never names the library.
"""

from __future__ import annotations

from collections.abc import Iterable

import crc32c as _crc32c

from .buffers import Buffer

__all__ = ["crc32c", "crc32c_of", "HARDWARE"]

HARDWARE: bool = bool(_crc32c.hardware_based)
"""Whether the library uses the CPU's CRC32C instruction."""


def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``value``."""
    return _crc32c.crc32c(data, value)


def crc32c_of(parts: Iterable[Buffer]) -> int:
    """CRC32C of the concatenation of ``parts``, without concatenating them."""
    value = 0
    for part in parts:
        value = _crc32c.crc32c(part, value)
    return value
