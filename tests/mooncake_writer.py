"""A test-side writer of Mooncake bucket directories, and ways to damage them.

It follows Mooncake's layout (``BucketStorageBackend``, see
shared/notes/mooncake-bucket-backend.md §1.1) and is deliberately written
without kvbucket.mooncake, so the tests check kvbucket's decoder against an
independent encoder:

* ``<id>.bucket``: ``[key bytes][value bytes]`` per object, back to back;
* ``<id>.meta``: protobuf wire format of ``BucketMetadata {int64 data_size = 1;
  repeated string keys = 2; repeated BucketObjectMetadata metadatas = 3;}``,
  ``BucketObjectMetadata {int64 offset = 1; int64 key_size = 2; int64 data_size = 3;}``,
  varint int64 (not zigzag), zero-valued scalars omitted, every key and
  object emitted (even when empty).

Keys are stored with Mooncake's tenant prefix (``default\\x00<user key>``)
unless ``tenant=None``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TENANT = "default"


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int (negatives as 64-bit two's complement)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def int64_field(number: int, value: int) -> bytes:
    """Tag (wire type 0) + varint; omitted when zero."""
    return b"" if value == 0 else varint(number << 3) + varint(value)


def bytes_field(number: int, payload: bytes) -> bytes:
    """Tag (wire type 2) + length + payload; always emitted."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def object_metadata(offset: int, key_size: int, data_size: int) -> bytes:
    """Serialized ``BucketObjectMetadata``."""
    return int64_field(1, offset) + int64_field(2, key_size) + int64_field(3, data_size)


def bucket_metadata(data_size: int, keys: list[bytes], objects: list[tuple[int, int, int]]) -> bytes:
    """Serialized ``BucketMetadata``: ``objects`` are ``(offset, key_size, data_size)``."""
    out = int64_field(1, data_size)
    out += b"".join(bytes_field(2, key) for key in keys)
    out += b"".join(bytes_field(3, object_metadata(*obj)) for obj in objects)
    return out


def stored_key(user_key: str | bytes, tenant: str | None = DEFAULT_TENANT) -> bytes:
    """The key as Mooncake stores it: ``<tenant>\\x00<user key>`` (or bare)."""
    raw = user_key.encode("utf-8") if isinstance(user_key, str) else user_key
    return raw if tenant is None else tenant.encode() + b"\x00" + raw


@dataclass
class WrittenBucket:
    """What :meth:`MooncakeDir.write_bucket` wrote."""

    bucket_id: int
    keys: list[bytes]
    """Stored (raw) keys, in file order."""
    values: dict[bytes, bytes]
    objects: list[tuple[int, int, int]]

    @property
    def data_size(self) -> int:
        return sum(k + d for _, k, d in self.objects)


class MooncakeDir:
    """Builds (and damages) a Mooncake storage directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.buckets: dict[int, WrittenBucket] = {}

    def data_path(self, bucket_id: int) -> Path:
        return self.root / f"{bucket_id}.bucket"

    def meta_path(self, bucket_id: int) -> Path:
        return self.root / f"{bucket_id}.meta"

    def write_bucket(
        self,
        bucket_id: int,
        objects: dict[str | bytes, bytes],
        *,
        tenant: str | None = DEFAULT_TENANT,
        meta_data_size: int | None = None,
    ) -> WrittenBucket:
        """Write ``<id>.bucket`` then ``<id>.meta`` as Mooncake does.

        ``meta_data_size`` overrides the recorded ``data_size`` (damage)."""
        keys, values, records, data = [], {}, [], bytearray()
        for user_key, value in objects.items():
            key = stored_key(user_key, tenant)
            records.append((len(data), len(key), len(value)))
            data += key + value
            keys.append(key)
            values[key] = value
        self.data_path(bucket_id).write_bytes(bytes(data))
        size = len(data) if meta_data_size is None else meta_data_size
        self.meta_path(bucket_id).write_bytes(bucket_metadata(size, keys, records))
        written = WrittenBucket(bucket_id, keys, values, records)
        self.buckets[bucket_id] = written
        return written

    # -- damage -------------------------------------------------------------
    def orphan_data(self, bucket_id: int) -> None:
        """A crash between the data write and the meta write: data without meta."""
        self.meta_path(bucket_id).unlink()

    def remove_data(self, bucket_id: int) -> None:
        """A meta whose data file is gone."""
        self.data_path(bucket_id).unlink()

    def garbage_meta(self, bucket_id: int, raw: bytes = b"\xff\xff\xff") -> None:
        """A meta that does not parse (a truncated varint by default)."""
        self.meta_path(bucket_id).write_bytes(raw)

    def truncate_meta(self, bucket_id: int, length: int) -> None:
        """A torn meta write: keep only the first ``length`` bytes."""
        raw = self.meta_path(bucket_id).read_bytes()
        self.meta_path(bucket_id).write_bytes(raw[:length])

    def mismatched_lists(self, bucket_id: int) -> None:
        """A meta with one key more than object metadatas."""
        b = self.buckets[bucket_id]
        raw = bucket_metadata(b.data_size, [*b.keys, b"default\x00extra"], b.objects)
        self.meta_path(bucket_id).write_bytes(raw)

    def truncate_data(self, bucket_id: int, length: int) -> None:
        """A data file shorter than the meta says (objects reach past its end)."""
        with open(self.data_path(bucket_id), "r+b") as f:
            f.truncate(length)

    def flip_key_byte(self, bucket_id: int, index: int = 0) -> None:
        """Change the first stored key byte of object ``index`` (a torn or stale write)."""
        offset = self.buckets[bucket_id].objects[index][0]
        with open(self.data_path(bucket_id), "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))


def tree_digest(root: str | os.PathLike[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of every entry under ``root`` (directories
    and symlinks too), to prove a command changed nothing."""
    digest: dict[str, str] = {}
    base = Path(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = os.fspath(path.relative_to(base))
            if path.is_symlink():
                digest[rel] = "symlink:" + os.readlink(path)
            elif path.is_dir():
                digest[rel] = "dir"
            else:
                digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest
