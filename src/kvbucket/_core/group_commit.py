"""Writing batches of objects as new buckets committed together.

A batch is checked before anything is written: its keys against the index
and the batches before it in the group (:class:`KeyExists`, or left out),
its size against the bucket limits. Room is made for the whole group (the
store's limits, then the shared budget), then every bucket is written and
committed with one directory ``fsync``
(:meth:`~kvbucket._core.bucket_files.BucketFiles.add_group`; in strict
durability the buckets' data files, then their metas, are written and
synced concurrently on the commit pool). A bucket's checksums are computed
on the read path's helper threads while its data is written. A bucket whose ``on_complete`` raises is rolled back (deleted).

:class:`GroupCommit` holds no state of its own: it runs holding the store's
writer lock, and its components take their own locks.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..config import BucketConfig
from ..errors import InvalidArgument, KeyExists, StorageIOError
from .arguments import key_value_pairs
from .bucket_files import BucketFiles
from .buffers import Buffer, views_of_value
from .catalog import Catalog
from .checksum import crc32c_of
from .commit import NewBucket
from .eviction import Eviction
from .format import ALIGNMENT, HEADER_SIZE, RECORD_SIZE, BucketMeta, check_key
from .index import Bucket, ObjectMeta
from .interfaces import EvictionListener
from .read_path import ReadPath
from .space import Space, Usage

log = logging.getLogger(__name__)

__all__ = ["BatchObject", "GroupCommit", "prepare_batch"]

Value = Buffer | Sequence[Buffer]
Objects = Mapping[str, Value] | Iterable[tuple[str, Value]]


@dataclass
class BatchObject:
    """One object of a batch being written."""

    key: str
    views: list[memoryview]
    size: int


class GroupCommit:
    """The writes of new buckets of one writer store."""

    def __init__(self, config: BucketConfig, catalog: Catalog, reads: ReadPath, space: Space, files: BucketFiles, eviction: Eviction) -> None:
        self._config = config
        self._catalog = catalog
        self._reads = reads
        self._space = space
        self._files = files
        self._eviction = eviction

    def commit(
        self, batches: list[list[BatchObject]], on_evict: EvictionListener | None, skip: bool, started: float
    ) -> list[tuple[Bucket, BucketMeta] | None]:
        """Write ``batches`` as new buckets committed together; per batch, its
        bucket and meta (None when every key was skipped).

        A key stored already, or in an earlier batch of the group, raises
        :class:`KeyExists` unless ``skip``; then it is left out.

        Requires: the writer lock held.
        """
        taken: set[str] = set()
        kept: list[list[BatchObject]] = []
        for batch in batches:
            keys = [o.key for o in batch]
            earlier = set(self._catalog.stored(keys)) | taken.intersection(keys)
            batch = _without_stored(batch, [k for k in keys if k in earlier], skip=skip)
            if batch:
                _check_bucket_limits(batch, self._config)
            taken.update(o.key for o in batch)
            kept.append(batch)
        layouts = [self._files.layout([o.size for o in batch]) for batch in kept]
        need = sum(
            (Usage(sum(o.size for o in b), _physical_estimate(b, length), len(b)) for b, (_, _, length) in zip(kept, layouts) if b),
            Usage(),
        )
        if not need.keys:
            return [None] * len(kept)
        self._eviction.make_room(need, on_evict)
        new = [self._new_bucket(batch, offsets, length, aligned) for batch, (aligned, offsets, length) in zip(kept, layouts) if batch]
        written = iter(zip(self._files.add_group(new, started), (b.meta for b in new)))
        self._space.track_directory_growth()
        return [next(written) if batch else None for batch in kept]

    def _new_bucket(self, batch: list[BatchObject], offsets: list[int], length: int, aligned: bool) -> NewBucket:
        """A fresh id and meta for ``batch``; its checksums computed while the data is written.

        Requires: the writer lock held.
        """
        meta = BucketMeta.from_columns(
            self._files.allocate_id(), length, aligned, [o.key for o in batch], array("Q", offsets), array("Q", [o.size for o in batch]), array("I")
        )
        checksums = self._reads.executor().submit(lambda: array("I", [crc32c_of(o.views) for o in batch]))
        return NewBucket(meta, [o.views for o in batch], checksums.result)

    def notify_complete(self, bucket: Bucket, meta: BucketMeta, on_complete: Callable[..., object]) -> None:
        """Run ``on_complete``; roll the bucket back if it raises.

        Requires: the writer lock held.
        """
        keys = list(meta.keys)
        metas = [ObjectMeta(meta.bucket_id, *fields) for fields in zip(meta.offsets, meta.sizes, meta.crcs)]
        try:
            on_complete(keys, metas)
        except BaseException:
            log.warning("on_complete failed for bucket %d; rolling it back", bucket.bucket_id)
            try:
                self._files.delete([bucket])
            except StorageIOError as exc:  # the callback's error is the one to report
                log.error("rolling back bucket %d failed (%s); the next open removes it only if it is damaged", bucket.bucket_id, exc)
            raise


def prepare_batch(objects: Objects) -> list[BatchObject]:
    """Validate a batch and turn its values into views; nothing is written yet."""
    batch: list[BatchObject] = []
    seen: set[str] = set()
    for key, value in key_value_pairs(objects, "batch_offload"):
        check_key(key)
        if key in seen:
            raise KeyExists(f"key {key!r} appears twice in the batch")
        seen.add(key)
        views = views_of_value(key, value)
        batch.append(BatchObject(key, views, sum(map(len, views))))
    if not batch:
        raise InvalidArgument("batch_offload needs at least one object")
    return batch


def _without_stored(batch: list[BatchObject], stored: list[str], skip: bool) -> list[BatchObject]:
    """``batch`` less its ``stored`` keys; :class:`KeyExists` unless ``skip``."""
    if stored and not skip:
        raise KeyExists(f"key {stored[0]!r} is already stored" + (f" (and {len(stored) - 1} more)" if len(stored) > 1 else ""))
    if not stored:
        return batch
    skipped = set(stored)
    return [o for o in batch if o.key not in skipped]


def _check_bucket_limits(batch: list[BatchObject], config: BucketConfig) -> None:
    """A batch of several objects must fit one bucket (one object always does)."""
    if len(batch) == 1:
        return
    size = sum(o.size for o in batch)
    if len(batch) > config.bucket_keys_limit:
        raise InvalidArgument(f"batch of {len(batch)} objects exceeds bucket_keys_limit={config.bucket_keys_limit}")
    if size > config.bucket_size_limit:
        raise InvalidArgument(
            f"batch of {size} value bytes exceeds bucket_size_limit={config.bucket_size_limit}; split it (group_for_offload does)"
        )


def _physical_estimate(batch: list[BatchObject], data_length: int) -> int:
    """Upper bound of the allocated bytes a new bucket adds: whole blocks for
    the data and the meta, a block for the directory's growth, plus a block of
    extent-tree slack per 128 MiB of data."""
    meta_length = HEADER_SIZE + RECORD_SIZE * len(batch) + sum(len(o.key.encode()) for o in batch) + 4
    blocks = -(-data_length // ALIGNMENT) + -(-meta_length // ALIGNMENT) + 1 + data_length // (128 << 20)
    return blocks * ALIGNMENT
