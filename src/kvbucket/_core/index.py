"""The in-memory index: key -> object location, and bucket id -> bucket.

Lean enough for tens of millions of keys: a key maps to the position of its
record in one flat typed array (four 8-byte fields side by side, 32 bytes a
key, one cache line to read them all) instead of a Python object per key.

Invariants (callers hold the store's index lock):
* a key is in :attr:`Index.slots` exactly when it is in the ``keys`` of the
  bucket its slot names, and that bucket is in :attr:`Index.buckets`;
* ``Bucket.logical`` is the sum of the sizes of its live keys;
* :attr:`Index.logical_bytes` and :attr:`Index.physical_bytes` are the sums of
  the buckets' fields.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import compress, repeat
from operator import is_not
from typing import NamedTuple, cast

from .format import BucketMeta, MetaRecord, footprint

__all__ = ["ObjectMeta", "Bucket", "Index", "rebuilt_meta"]


class ObjectMeta(NamedTuple):
    """Where one object lives (a named tuple: cheap to make by the million)."""

    bucket_id: int
    """The bucket holding the object."""
    offset: int
    """Byte offset of the value in the bucket's data file."""
    size: int
    """Value length in bytes."""
    checksum: int
    """CRC32C of the value."""


_new_meta = partial(tuple.__new__, ObjectMeta)

_RECORD = struct.Struct("=4Q")
"""One object's record in :attr:`Index._records`: bucket id, offset, size, checksum."""
_RECORD_ITEMS = 4
_ITEM_BYTES = _RECORD.size // _RECORD_ITEMS
"""Bytes of one field: a record position divided by this is the array index of its bucket id."""
_unpack = _RECORD.unpack_from


@dataclass(eq=False, slots=True)
class Bucket:
    """One committed bucket: its files' sizes and its live keys.

    Guarded by the catalog's index lock, except ``pins``, ``fd`` and
    ``retired``: the read path's, guarded by its lock.
    """

    bucket_id: int
    data_length: int
    """Length of the data file as the meta records it."""
    aligned: bool
    """Values start on :data:`~kvbucket._core.format.ALIGNMENT` boundaries (direct I/O)."""
    physical: int
    """Allocated bytes of the data and meta files (``st_blocks * 512``)."""
    keys: list[str] = field(default_factory=list)
    logical: int = 0
    """Sum of the live values' sizes."""
    used: int = 0
    """Bytes of the data file that live values occupy (padding included)."""
    access: int = 0
    """LRU stamp: larger is more recently read or written."""
    segment: str = "main"
    """The 2Q eviction segment (``probation`` or ``main``); memory only, so
    buckets found at open are in ``main``."""
    pins: int = 0
    """Reads in flight; the data descriptor stays open while > 0."""
    fd: int = -1
    """Cached read descriptor of the data file, or -1."""
    retired: bool = False
    """Taken out of the index; close ``fd`` once ``pins`` drops to 0."""

    def footprint(self, size: int) -> int:
        """Bytes a value of ``size`` occupies in this bucket's data file."""
        return footprint(size, self.aligned)

    @property
    def dead(self) -> int:
        """Bytes of the data file that no live value uses."""
        return self.data_length - self.used


def rebuilt_meta(bucket: Bucket, records: Iterable[tuple[str, ObjectMeta]]) -> BucketMeta:
    """The meta of ``bucket`` listing exactly ``records`` (``(key, location)``
    pairs, as :meth:`Index.records` gives them), to publish or to re-index."""
    rows = (MetaRecord(key, meta.offset, meta.size, meta.checksum) for key, meta in records)
    return BucketMeta(bucket.bucket_id, bucket.data_length, bucket.aligned, rows)


class Index:
    """Keys, their locations, and the buckets that hold them."""

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        """Key -> byte position of its record in ``_records`` (a multiple of the record size)."""
        self.buckets: dict[int, Bucket] = {}
        self._records = array("Q")
        self._free: list[int] = []  # byte positions of unused records
        self.logical_bytes = 0
        self.physical_bytes = 0
        self.dead_bytes = 0

    def __len__(self) -> int:
        return len(self.slots)

    def __contains__(self, key: object) -> bool:
        return key in self.slots

    def bucket_of(self, key: str) -> int:
        """The id of the bucket holding ``key`` (which must be indexed)."""
        return self._records[self.slots[key] // _ITEM_BYTES]

    def get(self, key: str) -> ObjectMeta | None:
        position = self.slots.get(key)
        if position is None:
            return None
        return _new_meta(_unpack(self._records, position))

    def query(self, keys: Sequence[str]) -> dict[str, ObjectMeta]:
        """Locations of the indexed keys among ``keys`` (a loop-free pass: every
        step runs in C, which is what makes a batch of lookups cheap)."""
        positions = list(map(self.slots.get, keys))
        if None in positions:
            present = list(map(is_not, positions, repeat(None)))
            keys = list(compress(keys, present))
            positions = list(compress(positions, present))
        found = cast("list[int]", positions)  # every None was filtered out above
        return dict(zip(keys, map(_new_meta, map(_unpack, repeat(self._records), found))))

    def add_bucket(self, bucket: Bucket, meta: BucketMeta) -> None:
        """Insert ``bucket`` with the objects of ``meta``.

        A key already indexed moves to ``bucket`` (recovery resolves a key
        present in two buckets in favour of the newer one; compaction moves
        keys to their new bucket).
        """
        keys = meta.keys
        moved = self.slots.keys() & keys
        if moved:
            self.drop_keys(moved)
        self.buckets[bucket.bucket_id] = bucket
        positions = self._allocate(len(keys))
        if isinstance(positions, range):  # fresh records are contiguous: one strided assignment per field
            first, stop = positions.start // _ITEM_BYTES, positions.stop // _ITEM_BYTES
            fields = (array("Q", [bucket.bucket_id]) * len(keys), meta.offsets, meta.sizes, array("Q", meta.crcs))
            for item, values in enumerate(fields):
                self._records[first + item : stop : _RECORD_ITEMS] = values
        else:
            for position, offset, size, crc in zip(positions, meta.offsets, meta.sizes, meta.crcs):
                _RECORD.pack_into(self._records, position, bucket.bucket_id, offset, size, crc)
        self.slots.update(zip(keys, positions))
        bucket.keys.extend(keys)
        bucket.logical += sum(meta.sizes)
        bucket.used += sum(map(bucket.footprint, meta.sizes)) if bucket.aligned else sum(meta.sizes)
        self.logical_bytes += bucket.logical
        self.physical_bytes += bucket.physical
        self.dead_bytes += bucket.dead

    def drop_bucket(self, bucket_id: int) -> Bucket:
        """Remove a bucket and all its keys; return it."""
        bucket = self.buckets.pop(bucket_id)
        for key in bucket.keys:
            self._release(self.slots.pop(key))
        self.logical_bytes -= bucket.logical
        self.physical_bytes -= bucket.physical
        self.dead_bytes -= bucket.dead
        return bucket

    def drop_keys(self, keys: Iterable[str]) -> None:
        """Remove objects from their buckets (their bytes become dead)."""
        for key in keys:
            position = self.slots.pop(key)
            bucket_id, _, size, _ = _unpack(self._records, position)
            bucket = self.buckets[bucket_id]
            bucket.keys.remove(key)
            bucket.logical -= size
            bucket.used -= bucket.footprint(size)
            self.logical_bytes -= size
            self.dead_bytes += bucket.footprint(size)
            self._release(position)

    def set_physical(self, bucket: Bucket, physical: int) -> None:
        """Record a new allocated size for ``bucket`` (after its meta was rewritten)."""
        self.physical_bytes += physical - bucket.physical
        bucket.physical = physical

    def records(self, bucket: Bucket) -> list[tuple[str, ObjectMeta]]:
        """The live objects of ``bucket``, in its key order."""
        return [(key, self.get(key)) for key in bucket.keys]  # type: ignore[misc]

    def _allocate(self, count: int) -> list[int] | range:
        """Byte positions of ``count`` free records: recycled ones first, then
        new ones at the end."""
        cut = len(self._free) - min(count, len(self._free))
        reused = self._free[cut:]
        del self._free[cut:]
        start = len(self._records) * _ITEM_BYTES
        self._records.frombytes(bytes((count - len(reused)) * _RECORD.size))
        fresh = range(start, len(self._records) * _ITEM_BYTES, _RECORD.size)
        return [*reused, *fresh] if reused else fresh

    def _release(self, position: int) -> None:
        self._free.append(position)
