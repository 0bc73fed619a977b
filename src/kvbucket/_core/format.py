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
import sys
from array import array
from collections.abc import Iterable
from enum import Enum
from functools import partial
from itertools import accumulate
from operator import add, le
from typing import NamedTuple

from ..errors import CorruptionError, InvalidArgument
from .checksum import crc32c

__all__ = [
    "FileKind",
    "check_key",
    "parse_name",
    "data_name",
    "meta_name",
    "tmp_name",
    "meta_is_ours",
    "LOCK_NAME",
    "QUARANTINE_DIR",
    "ALIGNMENT",
    "MAX_KEY_BYTES",
    "MAX_BUCKET_KEYS",
    "MAX_META_BYTES",
    "MetaRecord",
    "BucketMeta",
    "encode_meta",
    "decode_meta",
    "check_meta_length",
    "aligned_layout",
    "packed_layout",
]

LOCK_NAME = "LOCK"
QUARANTINE_DIR = "quarantine"
MAX_KEY_BYTES = 4096
MAX_BUCKET_ID = (1 << 53) - 1
"""The largest bucket id: ids are handed out from 1 up and never reach it in
practice (a million buckets a second for 285 years), they stay exact in JSON
readers that use doubles, and a name with a larger id is foreign, so a stray
``9223372036854775807.bucket`` cannot exhaust the id space of a store."""
ALIGNMENT = 4096
"""Value alignment in direct-I/O buckets (the page and logical-block size)."""

META_MAGIC = b"KVBMETA\x00"
META_VERSION = 1
FLAG_ALIGNED = 0x1

# magic, version, flags, object count, bucket id, data length, key-blob length
_HEADER = struct.Struct("<8sHHIqQQ")
_TRAILER = struct.Struct("<I")
HEADER_SIZE = _HEADER.size
RECORD_SIZE = 8 + 8 + 4 + 4
"""Bytes per object in the four column arrays: offset, size, crc32c, key length."""
MAX_BUCKET_KEYS = 1 << 20
"""Most objects in one bucket (the largest ``bucket_keys_limit``)."""
MAX_META_BYTES = HEADER_SIZE + MAX_BUCKET_KEYS * (RECORD_SIZE + MAX_KEY_BYTES) + _TRAILER.size
"""Longest valid meta: the most objects, each with the longest key. A longer
file is invalid without being read."""
_BIG_ENDIAN = sys.byteorder == "big"
_COLUMNS = (("Q", 8), ("Q", 8), ("I", 4), ("I", 4))
assert all(array(code).itemsize == width for code, width in _COLUMNS), "unsupported platform integer sizes"


class FileKind(Enum):
    """What a store file name says the file is."""

    DATA = ".bucket"
    META = ".meta"
    TMP = ".meta.tmp"


_NAME_RE = re.compile(r"(0|[1-9][0-9]{0,18})(\.bucket|\.meta|\.meta\.tmp)")
_KIND_BY_SUFFIX = {kind.value: kind for kind in FileKind}


def parse_name(name: str) -> tuple[int, FileKind] | None:
    """Return ``(bucket_id, kind)`` for one of our file names, else ``None``.

    Ids are canonical decimals (no sign, no leading zero) up to
    :data:`MAX_BUCKET_ID`, so ``05.meta``, ``-1.bucket`` or
    ``9223372036854775807.bucket`` are foreign and never touched.
    """
    match = _NAME_RE.fullmatch(name)
    if match is None:
        return None
    bucket_id = int(match.group(1))
    if bucket_id > MAX_BUCKET_ID:
        return None
    return bucket_id, _KIND_BY_SUFFIX[match.group(2)]


def check_key(key: object) -> str:
    """``key``, once it is a non-empty ``str`` of at most :data:`MAX_KEY_BYTES`
    UTF-8 bytes (any character, NUL included); else :class:`InvalidArgument`."""
    if not isinstance(key, str):
        raise InvalidArgument(f"keys must be str; got {type(key).__name__} {key!r}")
    if not key:
        raise InvalidArgument("keys must be non-empty")
    if key.isascii() and len(key) <= MAX_KEY_BYTES:
        return key
    try:
        encoded = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"key {key[:40]!r} is not valid UTF-8 text") from exc
    if encoded > MAX_KEY_BYTES:
        raise InvalidArgument(f"key {key[:40]!r}... is {encoded} UTF-8 bytes; the limit is {MAX_KEY_BYTES}")
    return key


def data_name(bucket_id: int) -> str:
    return f"{bucket_id}{FileKind.DATA.value}"


def meta_name(bucket_id: int) -> str:
    return f"{bucket_id}{FileKind.META.value}"


def tmp_name(bucket_id: int) -> str:
    return f"{bucket_id}{FileKind.TMP.value}"


def meta_is_ours(raw: bytes) -> bool:
    """Whether a ``<id>.meta`` with these bytes is kvbucket's: it starts with
    the meta magic, or it is what a lost write of one leaves (empty, cut
    inside the magic, or zero-filled). Any other content is another
    program's file, kept however damaged it looks."""
    head = raw[: len(META_MAGIC)]
    return META_MAGIC.startswith(head) or raw.count(0) == len(raw)


class MetaRecord(NamedTuple):
    """One object of a bucket as the meta records it."""

    key: str
    offset: int
    size: int
    crc: int


class BucketMeta:
    """The decoded content of a ``<id>.meta`` file, stored column-wise.

    Offsets, sizes and checksums are typed arrays (8, 8 and 4 bytes an
    object, no Python object each), so a million objects load without a
    million tuples; :attr:`records` gives the row view.
    """

    __slots__ = ("bucket_id", "data_length", "aligned", "keys", "offsets", "sizes", "crcs")

    def __init__(self, bucket_id: int, data_length: int, aligned: bool, records: Iterable[MetaRecord] = ()) -> None:
        rows = list(records)
        self.bucket_id = bucket_id
        self.data_length = data_length
        self.aligned = aligned
        self.keys: list[str] = [r[0] for r in rows]
        self.offsets = array("Q", [r[1] for r in rows])
        self.sizes = array("Q", [r[2] for r in rows])
        self.crcs = array("I", [r[3] for r in rows])

    @classmethod
    def from_columns(
        cls, bucket_id: int, data_length: int, aligned: bool, keys: list[str], offsets: array[int], sizes: array[int], crcs: array[int]
    ) -> BucketMeta:
        meta = cls(bucket_id, data_length, aligned)
        meta.keys, meta.offsets, meta.sizes, meta.crcs = keys, offsets, sizes, crcs
        return meta

    @property
    def records(self) -> list[MetaRecord]:
        """The objects as rows, in record (offset) order."""
        return list(map(_new_record, zip(self.keys, self.offsets, self.sizes, self.crcs)))

    def without(self, keys: set[str]) -> BucketMeta:
        """This meta minus the objects of ``keys``."""
        return BucketMeta(self.bucket_id, self.data_length, self.aligned, (r for r in self.records if r.key not in keys))

    def __len__(self) -> int:
        return len(self.keys)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BucketMeta):
            return NotImplemented
        mine = (self.bucket_id, self.data_length, self.aligned, self.keys, self.offsets, self.sizes, self.crcs)
        return mine == (other.bucket_id, other.data_length, other.aligned, other.keys, other.offsets, other.sizes, other.crcs)

    def __repr__(self) -> str:
        return f"BucketMeta(bucket_id={self.bucket_id}, data_length={self.data_length}, aligned={self.aligned}, objects={len(self)})"


_new_record = partial(tuple.__new__, MetaRecord)
"""Build a MetaRecord from a 4-tuple without NamedTuple's Python-level __new__."""


def footprint(size: int, aligned: bool) -> int:
    """Bytes a value of ``size`` occupies in a data file, padding included."""
    return -(-size // ALIGNMENT) * ALIGNMENT if aligned else size


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
        position += footprint(size, True)
    return offsets, position


def encode_meta(meta: BucketMeta) -> bytes:
    """Serialize a bucket's meta (see docs/FORMAT.md, "The meta file")."""
    keys = [key.encode("utf-8") for key in meta.keys]
    blob = b"".join(keys)
    flags = FLAG_ALIGNED if meta.aligned else 0
    header = _HEADER.pack(META_MAGIC, META_VERSION, flags, len(keys), meta.bucket_id, meta.data_length, len(blob))
    lengths = array("I", map(len, keys))
    body = b"".join([header, _le(meta.offsets), _le(meta.sizes), _le(meta.crcs), _le(lengths), blob])
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
    if version != META_VERSION or flags & ~FLAG_ALIGNED:
        raise CorruptionError(f"meta of bucket {expected_id} has unsupported version {version} or flags {flags:#x}")
    if bucket_id != expected_id:
        raise CorruptionError(f"meta named for bucket {expected_id} records bucket {bucket_id}")
    if count > MAX_BUCKET_KEYS or HEADER_SIZE + count * RECORD_SIZE + blob_length != len(body):
        raise CorruptionError(f"meta of bucket {expected_id} has inconsistent lengths")
    meta = _decode_columns(body, count, bucket_id, data_length, bool(flags & FLAG_ALIGNED))
    _check_layout(meta)
    return meta


def check_meta_length(length: int, header: bytes, expected_id: int) -> None:
    """Raise :class:`CorruptionError` unless a meta file of ``length`` bytes
    whose first :data:`HEADER_SIZE` bytes are ``header`` can be valid: at most
    :data:`MAX_META_BYTES`, kvbucket's magic and version, and exactly the
    length its object count and key-blob length give. Lets a reader reject a
    large file without reading it whole; :func:`decode_meta` still verifies
    everything."""
    if length > MAX_META_BYTES:
        raise CorruptionError(f"meta of bucket {expected_id} is {length} bytes; no valid meta exceeds {MAX_META_BYTES}")
    if len(header) < HEADER_SIZE:
        raise CorruptionError(f"meta of bucket {expected_id} is truncated ({len(header)} bytes)")
    magic, version, _flags, count, _bucket_id, _data_length, blob_length = _HEADER.unpack_from(header, 0)
    if magic != META_MAGIC or version != META_VERSION:
        raise CorruptionError(f"meta of bucket {expected_id} ({length} bytes) has a bad magic number or version")
    if count > MAX_BUCKET_KEYS or HEADER_SIZE + count * RECORD_SIZE + blob_length + _TRAILER.size != length:
        raise CorruptionError(f"meta of bucket {expected_id} is {length} bytes, not the length its header records")


def _decode_columns(body: memoryview, count: int, bucket_id: int, data_length: int, aligned: bool) -> BucketMeta:
    position = HEADER_SIZE
    columns = []
    for typecode, width in _COLUMNS:
        column = array(typecode)
        column.frombytes(body[position : position + count * width])
        if _BIG_ENDIAN:
            column.byteswap()
        columns.append(column)
        position += count * width
    offsets, sizes, crcs, lengths = columns
    keys = _split_keys(bytes(body[position:]), lengths, bucket_id)
    return BucketMeta.from_columns(bucket_id, data_length, aligned, keys, offsets, sizes, crcs)


def _check_layout(meta: BucketMeta) -> None:
    """Objects in offset order, not overlapping, inside the data file; keys unique."""
    if not meta.keys:
        return
    offsets, sizes = meta.offsets, meta.sizes
    ends = [offset + footprint(size, True) for offset, size in zip(offsets, sizes)] if meta.aligned else list(map(add, offsets, sizes))
    if ends[-1] > meta.data_length or not all(map(le, ends, offsets[1:])):
        raise CorruptionError(
            f"meta of bucket {meta.bucket_id} has objects out of order, overlapping or past the end of its data file"
        )
    if len(set(meta.keys)) != len(meta.keys):
        raise CorruptionError(f"meta of bucket {meta.bucket_id} lists a key twice")


def _split_keys(blob: bytes, lengths: array[int], bucket_id: int) -> list[str]:
    """Cut the key blob at the recorded byte lengths."""
    if not lengths:
        if blob:
            raise CorruptionError(f"meta of bucket {bucket_id} has inconsistent key lengths")
        return []
    if min(lengths) == 0 or max(lengths) > MAX_KEY_BYTES:
        raise CorruptionError(f"meta of bucket {bucket_id} has an invalid key length")
    ends = list(accumulate(lengths))
    if ends[-1] != len(blob):
        raise CorruptionError(f"meta of bucket {bucket_id} has inconsistent key lengths")
    starts = [0, *ends[:-1]]
    if blob.isascii():  # one decode; str indices equal byte indices
        text = blob.decode("ascii")
        return [text[a:b] for a, b in zip(starts, ends)]
    try:
        return [blob[a:b].decode("utf-8") for a, b in zip(starts, ends)]
    except UnicodeDecodeError as exc:
        raise CorruptionError(f"meta of bucket {bucket_id} has a key that is not UTF-8") from exc


def _le(column: array[int]) -> bytes:
    """A column's bytes in little-endian order."""
    if not _BIG_ENDIAN:
        return column.tobytes()
    swapped = array(column.typecode, column)
    swapped.byteswap()
    return swapped.tobytes()
