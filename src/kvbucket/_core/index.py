"""The in-memory index: key -> object location, and bucket id -> bucket.

Lean enough for tens of millions of keys: a key maps to an ``int`` slot, and
the slot's fields live in flat typed arrays (about 28 bytes a key) instead of
a Python object per key.

Invariants (callers hold the store's index lock):
* a key is in :attr:`Index.slots` exactly when it is in the ``keys`` of the
  bucket its slot names, and that bucket is in :attr:`Index.buckets`;
* ``Bucket.logical`` is the sum of the sizes of its live keys;
* :attr:`Index.logical_bytes` and :attr:`Index.physical_bytes` are the sums of
  the buckets' fields.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from typing import NamedTuple

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
        self.buckets: dict[int, Bucket] = {}
        self._bucket = array("q")
        self._offset = array("Q")
        self._size = array("Q")
        self._crc = array("I")
        self._free: list[int] = []
        self.logical_bytes = 0
        self.physical_bytes = 0
        self.dead_bytes = 0

    def __len__(self) -> int:
        return len(self.slots)

    def __contains__(self, key: object) -> bool:
        return key in self.slots

    def bucket_of(self, key: str) -> int:
        """The id of the bucket holding ``key`` (which must be indexed)."""
        return self._bucket[self.slots[key]]

    def get(self, key: str) -> ObjectMeta | None:
        slot = self.slots.get(key)
        if slot is None:
            return None
        return _new_meta((self._bucket[slot], self._offset[slot], self._size[slot], self._crc[slot]))

    def query(self, keys: Iterable[str]) -> dict[str, ObjectMeta]:
        """Locations of the indexed keys among ``keys``."""
        slots, found = self.slots, {}
        bucket, offset, size, crc = self._bucket, self._offset, self._size, self._crc
        for key in keys:
            slot = slots.get(key)
            if slot is not None:
                found[key] = _new_meta((bucket[slot], offset[slot], size[slot], crc[slot]))
        return found

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
        slots = self._allocate(len(keys))
        columns = (
            (self._bucket, array("q", [bucket.bucket_id]) * len(keys)),
            (self._offset, meta.offsets),
            (self._size, meta.sizes),
            (self._crc, meta.crcs),
        )
        for column, values in columns:
            if isinstance(slots, range):  # fresh slots are contiguous: one slice assignment
                column[slots.start : slots.stop] = values
            else:
                for slot, value in zip(slots, values):
                    column[slot] = value
        self.slots.update(zip(keys, slots))
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
            slot = self.slots.pop(key)
            bucket = self.buckets[self._bucket[slot]]
            size = self._size[slot]
            bucket.keys.remove(key)
            bucket.logical -= size
            bucket.used -= bucket.footprint(size)
            self.logical_bytes -= size
            self.dead_bytes += bucket.footprint(size)
            self._release(slot)

    def set_physical(self, bucket: Bucket, physical: int) -> None:
        """Record a new allocated size for ``bucket`` (after its meta was rewritten)."""
        self.physical_bytes += physical - bucket.physical
        bucket.physical = physical

    def records(self, bucket: Bucket) -> list[tuple[str, ObjectMeta]]:
        """The live objects of ``bucket``, in its key order."""
        return [(key, self.get(key)) for key in bucket.keys]  # type: ignore[misc]

    def _allocate(self, count: int) -> list[int] | range:
        """``count`` free slots: recycled ones first, then new ones at the end."""
        if not self._free:
            start = len(self._bucket)
            self._grow(count)
            return range(start, start + count)
        reused = self._free[-count:]
        del self._free[-count:]
        fresh = count - len(reused)
        start = len(self._bucket)
        self._grow(fresh)
        return [*reused, *range(start, start + fresh)]

    def _grow(self, count: int) -> None:
        for column in (self._bucket, self._offset, self._size, self._crc):
            column.extend(repeat(0, count))

    def _release(self, slot: int) -> None:
        self._free.append(slot)

