"""Mooncake's bucket files as bytes: the protobuf codec of the meta, file names, keys.

Mooncake Store's ``BucketStorageBackend`` (kvcache-ai/Mooncake,
``mooncake-store/src/storage_backend.cpp``) keeps each bucket as two files
in one flat directory:

* ``<id>.bucket``: the objects back to back, each ``[key bytes][value bytes]``,
  with no header, padding or checksum.
* ``<id>.meta``: protobuf wire format of ::

      message BucketObjectMetadata { int64 offset = 1; int64 key_size = 2; int64 data_size = 3; }
      message BucketMetadata {
        int64 data_size = 1;                          // sum of key+value sizes = .bucket length
        repeated string keys = 2;                     // parallel to metadatas
        repeated BucketObjectMetadata metadatas = 3;
      }

  Scalars are plain (non-zigzag) varint ``int64``; fields equal to zero are
  omitted. ``offset`` is where the object's *key* starts; its value follows
  the key, so the value is ``[offset + key_size, offset + key_size + data_size)``.

The codec here is a small protobuf-wire reader and writer of its own, so
kvbucket needs no protobuf dependency. Only names matching
``^[0-9]+\\.(bucket|meta)$`` are Mooncake's (:func:`parse_file_name`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import CorruptionError

__all__ = [
    "MooncakeMetaError",
    "ObjectMetadata",
    "BucketMetadata",
    "decode_bucket_meta",
    "encode_bucket_meta",
    "parse_file_name",
    "TENANT_SEPARATOR",
    "split_tenant",
    "source_key",
    "show_key",
]

_NAME_RE = re.compile(r"([0-9]+)\.(bucket|meta)")  # used with fullmatch: no "$" newline loophole
TENANT_SEPARATOR = b"\x00"
"""Separates ``<tenant>`` from the user key in current Mooncake keys."""


class MooncakeMetaError(CorruptionError):
    """A Mooncake ``.meta`` file that does not parse or is not a usable bucket."""


_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
_INT64_LIMIT = 1 << 64


@dataclass(frozen=True, slots=True)
class ObjectMetadata:
    """One ``BucketObjectMetadata``: where an object's key starts, and the sizes."""

    offset: int
    key_size: int
    data_size: int

    @property
    def value_offset(self) -> int:
        """Where the value starts in the data file (right after the key)."""
        return self.offset + self.key_size

    @property
    def end(self) -> int:
        """One past the object's last byte in the data file."""
        return self.offset + self.key_size + self.data_size


@dataclass(frozen=True, slots=True)
class BucketMetadata:
    """A decoded ``BucketMetadata``. Keys are raw bytes (Mooncake keys are
    ``std::string``; current releases prefix them with ``<tenant>\\x00``)."""

    data_size: int
    keys: list[bytes]
    metadatas: list[ObjectMetadata]


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    """Decode one varint at ``pos``; return ``(value, next position)``.

    A varint is at most 10 bytes and encodes at most 64 bits."""
    value = shift = 0
    while True:
        if pos >= len(raw):
            raise MooncakeMetaError("truncated varint")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise MooncakeMetaError("varint longer than 10 bytes")
    if value >= _INT64_LIMIT:
        raise MooncakeMetaError("varint exceeds 64 bits")
    return value, pos


def _as_int64(value: int) -> int:
    """Interpret a 64-bit varint as two's-complement ``int64`` (protobuf ``int64``)."""
    return value - _INT64_LIMIT if value >= 1 << 63 else value


def _fields(raw: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield ``(field number, wire type, value)`` for every field of a message.

    Varints yield ints, length-delimited fields yield bytes; fixed-width fields
    are skipped (no known field uses them); groups and reserved wire types
    are errors, as are fields running past the end of the buffer."""
    pos = 0
    while pos < len(raw):
        tag, pos = _read_varint(raw, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise MooncakeMetaError("field number 0")
        if wire == _VARINT:
            value, pos = _read_varint(raw, pos)
            yield number, wire, value
        elif wire == _LENGTH:
            length, pos = _read_varint(raw, pos)
            if pos + length > len(raw):
                raise MooncakeMetaError(f"field {number} runs past the end of the meta")
            yield number, wire, raw[pos : pos + length]
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
            if pos > len(raw):
                raise MooncakeMetaError(f"field {number} runs past the end of the meta")
        else:
            raise MooncakeMetaError(f"unsupported wire type {wire} in field {number}")


def _expect(number: int, wire: int, expected: int) -> None:
    if wire != expected:
        raise MooncakeMetaError(f"field {number} has wire type {wire}, expected {expected}")


def _decode_object(raw: bytes) -> ObjectMetadata:
    """Decode one embedded ``BucketObjectMetadata``; negative values are errors."""
    values = {1: 0, 2: 0, 3: 0}
    for number, wire, value in _fields(raw):
        if number in values:
            _expect(number, wire, _VARINT)
            values[number] = _as_int64(value)  # type: ignore[arg-type]  # varint: an int
    if min(values.values()) < 0:
        raise MooncakeMetaError(f"negative offset or size in object metadata {values}")
    return ObjectMetadata(offset=values[1], key_size=values[2], data_size=values[3])


def decode_bucket_meta(raw: bytes) -> BucketMetadata:
    """Parse the bytes of a Mooncake ``.meta`` file.

    Raises :class:`MooncakeMetaError` when the bytes are not valid protobuf
    wire format for ``BucketMetadata`` (truncated varint or field, group or
    reserved wire type, known field with the wrong wire type, negative size).
    Unknown fields are skipped, as protobuf does. The *consistency* of a
    parsed meta (list lengths, bounds) is checked by :func:`kvbucket.mooncake.scan.scan_mooncake`.
    """
    data_size = 0
    keys: list[bytes] = []
    metadatas: list[ObjectMetadata] = []
    for number, wire, value in _fields(raw):
        if number == 1:
            _expect(number, wire, _VARINT)
            data_size = _as_int64(value)  # type: ignore[arg-type]
        elif number == 2:
            _expect(number, wire, _LENGTH)
            keys.append(bytes(value))
        elif number == 3:
            _expect(number, wire, _LENGTH)
            metadatas.append(_decode_object(value))  # type: ignore[arg-type]
    if data_size < 0:
        raise MooncakeMetaError(f"negative data_size {data_size}")
    return BucketMetadata(data_size, keys, metadatas)


def _varint(value: int) -> bytes:
    """Encode a non-negative int (< 2**64) as a varint."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int64_field(number: int, value: int) -> bytes:
    """A varint ``int64`` field, omitted when zero (iguana ``omit_default_val``)."""
    if value == 0:
        return b""
    return _varint(number << 3 | _VARINT) + _varint(value % _INT64_LIMIT)


def _length_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LENGTH) + _varint(len(payload)) + payload


def encode_bucket_meta(meta: BucketMetadata) -> bytes:
    """Serialize ``meta`` exactly as Mooncake does (used by tests and tools).

    Zero scalars are omitted; every key and every object metadata is emitted,
    even when empty."""
    parts = [_int64_field(1, meta.data_size)]
    parts.extend(_length_field(2, key) for key in meta.keys)
    for obj in meta.metadatas:
        body = _int64_field(1, obj.offset) + _int64_field(2, obj.key_size) + _int64_field(3, obj.data_size)
        parts.append(_length_field(3, body))
    return b"".join(parts)


def parse_file_name(name: str) -> tuple[str, str] | None:
    """``(stem, "bucket" | "meta")`` for a name of Mooncake's exact pattern, else ``None``.

    Buckets are paired by their stem (the digits), so ``5.meta`` belongs with
    ``5.bucket``; Mooncake itself only ever writes canonical decimal ids."""
    match = _NAME_RE.fullmatch(name)
    return (match.group(1), match.group(2)) if match else None


def split_tenant(key: bytes) -> tuple[bytes | None, bytes]:
    """Split ``b"<tenant>\\x00<user key>"`` into ``(tenant, user key)``.

    Keys without a NUL (older Mooncake releases) have no tenant: ``(None, key)``."""
    tenant, sep, user_key = key.partition(TENANT_SEPARATOR)
    return (tenant, user_key) if sep else (None, key)


def source_key(raw: bytes) -> str:
    """A Mooncake key as text: UTF-8, with invalid bytes as ``\\xNN`` escapes."""
    return raw.decode("utf-8", "backslashreplace")


def show_key(key: bytes) -> str:
    """A quoted, printable form of a raw key for messages."""
    return repr(source_key(key))
