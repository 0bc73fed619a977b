"""The on-disk format: file names, the data-file layout and the meta encoding.

docs/FORMAT.md is the specification; this module implements it. Nothing here
touches the disk.

Invariants:
* Only names matched by :func:`parse_name` are ours; anything else in a store
  directory is foreign and is never opened, moved or deleted.
* A meta that :func:`decode_meta` accepts is exactly the bytes
  :func:`encode_meta` produced: its length, magic, version and trailing
  CRC32C all check, and every object lies inside the recorded data length.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import Enum

from .checksum import crc32c
from .errors import CorruptionError

__all__ = [
    "FileKind",
    "parse_name",
    "data_name",
    "meta_name",
    "tmp_name",
    "LOCK_NAME",
    "QUARANTINE_DIR",
    "ALIGNMENT",
    "MAX_KEY_BYTES",
    "MetaRecord",
    "BucketMeta",
    "encode_meta",
    "decode_meta",
    "aligned_layout",
    "packed_layout",
]

LOCK_NAME = "LOCK"
QUARANTINE_DIR = "quarantine"
MAX_KEY_BYTES = 4096
MAX_BUCKET_ID = (1 << 63) - 1
ALIGNMENT = 4096
"""Value alignment in direct-I/O buckets (the page and logical-block size)."""

META_MAGIC = b"KVBMETA\x00"
META_VERSION = 1
FLAG_ALIGNED = 0x1

# magic, version, flags, object count, bucket id, data length, key-blob length
_HEADER = struct.Struct("<8sHHIqQQ")
# value offset, value size, value crc32c, key length
_RECORD = struct.Struct("<QQII")
_TRAILER = struct.Struct("<I")
HEADER_SIZE = _HEADER.size
RECORD_SIZE = _RECORD.size


class FileKind(Enum):
    """What a store file name says the file is."""

    DATA = ".bucket"
    META = ".meta"
    TMP = ".meta.tmp"


_NAME_RE = re.compile(r"(0|[1-9][0-9]{0,18})(\.bucket|\.meta|\.meta\.tmp)")
_KIND_BY_SUFFIX = {kind.value: kind for kind in FileKind}


def parse_name(name: str) -> tuple[int, FileKind] | None:
    """Return ``(bucket_id, kind)`` for one of our file names, else ``None``.

    Ids are canonical decimals (no sign, no leading zero) up to 2**63-1, so
    ``05.meta`` or ``-1.bucket`` are foreign and never touched.
    """
    match = _NAME_RE.fullmatch(name)
    if match is None:
        return None
    bucket_id = int(match.group(1))
    if bucket_id > MAX_BUCKET_ID:
        return None
    return bucket_id, _KIND_BY_SUFFIX[match.group(2)]


def data_name(bucket_id: int) -> str:
    return f"{bucket_id}{FileKind.DATA.value}"


def meta_name(bucket_id: int) -> str:
    return f"{bucket_id}{FileKind.META.value}"


def tmp_name(bucket_id: int) -> str:
    return f"{bucket_id}{FileKind.TMP.value}"


@dataclass(frozen=True, slots=True)
class MetaRecord:
    """One object of a bucket as the meta records it."""

    key: str
    offset: int
    size: int
    crc: int


@dataclass(frozen=True, slots=True)
class BucketMeta:
    """The decoded content of a ``<id>.meta`` file."""

    bucket_id: int
    data_length: int
    aligned: bool
    records: list[MetaRecord]


def packed_layout(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of values written back to back, and the data length."""
    offsets, position = [], 0
    for size in sizes:
        offsets.append(position)
        position += size
    return offsets, position


def aligned_layout(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets with every value starting on an :data:`ALIGNMENT` boundary, and
    the data length (padded to a multiple of the alignment)."""
    offsets, position = [], 0
    for size in sizes:
        offsets.append(position)
        position += -(-size // ALIGNMENT) * ALIGNMENT
    return offsets, position


def encode_meta(meta: BucketMeta) -> bytes:
    """Serialize a bucket's meta (see docs/FORMAT.md, "The meta file")."""
    keys = [record.key.encode("utf-8") for record in meta.records]
    blob = b"".join(keys)
    parts = [
        _HEADER.pack(
            META_MAGIC,
            META_VERSION,
            FLAG_ALIGNED if meta.aligned else 0,
            len(meta.records),
            meta.bucket_id,
            meta.data_length,
            len(blob),
        )
    ]
    parts.extend(_RECORD.pack(r.offset, r.size, r.crc, len(k)) for r, k in zip(meta.records, keys))
    parts.append(blob)
    body = b"".join(parts)
    return body + _TRAILER.pack(crc32c(body))


def decode_meta(raw: bytes, expected_id: int) -> BucketMeta:
    """Parse and verify a meta file's bytes; raise :class:`CorruptionError` with the reason."""
    if len(raw) < HEADER_SIZE + _TRAILER.size:
        raise CorruptionError(f"meta of bucket {expected_id} is truncated ({len(raw)} bytes)")
    (stored_crc,) = _TRAILER.unpack_from(raw, len(raw) - _TRAILER.size)
    body = memoryview(raw)[: len(raw) - _TRAILER.size]
    if crc32c(body) != stored_crc:
        raise CorruptionError(f"meta of bucket {expected_id} fails its checksum")
    magic, version, flags, count, bucket_id, data_length, blob_length = _HEADER.unpack_from(raw, 0)
    if magic != META_MAGIC:
        raise CorruptionError(f"meta of bucket {expected_id} has a bad magic number")
    if version != META_VERSION:
        raise CorruptionError(f"meta of bucket {expected_id} has unsupported version {version}")
    if bucket_id != expected_id:
        raise CorruptionError(f"meta named for bucket {expected_id} records bucket {bucket_id}")
    records_end = HEADER_SIZE + count * RECORD_SIZE
    if records_end + blob_length != len(body):
        raise CorruptionError(f"meta of bucket {expected_id} has inconsistent lengths")
    records = _decode_records(body, count, records_end, data_length, expected_id)
    return BucketMeta(bucket_id, data_length, bool(flags & FLAG_ALIGNED), records)


def _decode_records(
    body: memoryview, count: int, records_end: int, data_length: int, bucket_id: int
) -> list[MetaRecord]:
    blob = bytes(body[records_end:])
    records: list[MetaRecord] = []
    position = 0
    seen: set[str] = set()
    for offset, size, crc, key_length in _RECORD.iter_unpack(body[HEADER_SIZE:records_end]):
        if key_length == 0 or key_length > MAX_KEY_BYTES or offset + size > data_length:
            raise CorruptionError(f"meta of bucket {bucket_id} has an invalid record")
        try:
            key = blob[position : position + key_length].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptionError(f"meta of bucket {bucket_id} has a key that is not UTF-8") from exc
        position += key_length
        if key in seen:
            raise CorruptionError(f"meta of bucket {bucket_id} lists key {key!r} twice")
        seen.add(key)
        records.append(MetaRecord(key, offset, size, crc))
    if position != len(blob):
        raise CorruptionError(f"meta of bucket {bucket_id} has inconsistent key lengths")
    return records
