"""A writer's bucket files: new ids, writing buckets, rewriting metas, deleting.

Every method runs holding the store's writer lock, which guards
:attr:`BucketFiles._next_id` and the commit pool; the index changes go through the catalog and
the bytes of files awaiting deletion through the space account.

Deletion invariant: a bucket leaves the index before its files are deleted,
and its allocated bytes count as usage until they are gone. A deletion that
fails (an I/O error) is retried by :meth:`BucketFiles.finish_deletions`,
which every mutation runs first and which must succeed before it proceeds,
so no later change (a removal, a compaction's meta rewrite) can be undone
at the next open by an old bucket's files coming back.

A group of several durable buckets is written on the commit pool
(:data:`COMMIT_THREADS` threads, started on the first such group, shut
down by :meth:`BucketFiles.close`): its data files' writes and syncs run
concurrently, then its metas' (see :func:`~kvbucket._core.commit.write_group`).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from ..errors import CapacityExceeded
from .catalog import Catalog
from .commit import NewBucket, delete_bucket_files, publish_meta, write_group
from .format import MAX_BUCKET_ID, BucketMeta, MetaRecord, meta_name
from .fs import FileSystem, run_io
from .index import Bucket, rebuilt_meta
from .lockfile import StoreLock
from .space import Space
from .write_mode import WriteMode

__all__ = ["BucketFiles", "COMMIT_THREADS"]

COMMIT_THREADS = 8
"""Buckets of a group written and synced at once; 4 to 16 measured alike
with 4 MiB buckets (docs/BENCHMARKS.md, "Group commit")."""


class BucketFiles:
    """The files of the buckets of one store (``lock`` is None when readonly)."""

    def __init__(
        self,
        fs: FileSystem,
        directory: str,
        lock: StoreLock | None,
        catalog: Catalog,
        space: Space,
        *,
        durable: bool,
        write_mode: WriteMode,
        committed: Callable[[], None],
        reserve: Callable[[int], None],
    ) -> None:
        self._fs = fs
        self._dir = directory
        self._lock = lock
        self._catalog = catalog
        self._space = space
        self._durable = durable
        self._write_mode = write_mode
        self._committed = committed  # told after each bucket is indexed
        self._reserve = reserve  # reserves bytes in the shared budget before a meta rewrite
        self._next_id = 1  # guarded by the writer lock
        self._pool: ThreadPoolExecutor | None = None  # guarded by the writer lock; started by the first group

    def resume_ids(self, highest_used: int) -> None:
        """New buckets get ids above ``highest_used`` (at open, after recovery)."""
        self._next_id = highest_used + 1

    def allocate_id(self) -> int:
        """A fresh bucket id.

        Requires: the writer lock held.
        """
        if self._next_id > MAX_BUCKET_ID:
            raise CapacityExceeded(
                f"bucket ids of {self._dir} are used up to the limit {MAX_BUCKET_ID}: files with huge ids "
                "were put in the directory. Copy the objects into a new store (or, with no writer "
                "running, remove the files with the highest ids and LOCK, which records them)."
            )
        bucket_id = self._next_id
        self._next_id += 1
        return bucket_id

    def layout(self, sizes: list[int]) -> tuple[bool, list[int], int]:
        """``(aligned, offsets, data_length)`` of a new bucket of objects of
        ``sizes``, as the store's ``io_mode`` chooses it (see
        :mod:`kvbucket._core.write_mode`)."""
        return self._write_mode.layout(sizes)

    def add(
        self,
        meta: BucketMeta,
        views: Sequence[Sequence[memoryview]],
        checksums: Callable[[], array[int]] | None = None,
        started: float | None = None,
    ) -> Bucket:
        """Write and commit a new bucket (data, then meta, durably; see
        :func:`~kvbucket._core.commit.write_group`), then index it
        (``started``: when its write began, for the counters).

        Requires: the writer lock held.
        """
        return self.add_group([NewBucket(meta, views, checksums)], started)[0]

    def add_group(self, new: Sequence[NewBucket], started: float | None = None) -> list[Bucket]:
        """Write and commit new buckets together (one directory ``fsync``; see
        :func:`~kvbucket._core.commit.write_group`), then index them all.

        No bucket is indexed (visible, acknowledged) before the group's last
        sync; when the group fails, none is.

        Requires: the writer lock held.
        """
        ids = [b.meta.bucket_id for b in new]
        physical = run_io(
            f"writing bucket{'s' if len(ids) > 1 else ''} {_ids(ids)}",
            self._dir,
            lambda: write_group(self._fs, self._dir, new, durable=self._durable, pool=self._commit_pool(len(new))),
        )
        buckets = []
        for b, allocated in zip(new, physical):
            bucket = Bucket(b.meta.bucket_id, b.meta.data_length, b.meta.aligned, allocated)
            self._catalog.commit(bucket, b.meta, started)
            self._committed()
            buckets.append(bucket)
        return buckets

    def close(self) -> None:
        """Stop the commit pool's threads (the store is closing).

        Requires: the writer lock held.
        """
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _commit_pool(self, group_size: int) -> ThreadPoolExecutor | None:
        """The pool a group of ``group_size`` buckets is written on; None for
        a lone bucket (written on the caller's thread).

        Requires: the writer lock held.
        """
        if group_size < 2:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="kvbucket-commit")
        return self._pool

    def compact(self, group: list[Bucket], values: dict[str, bytes]) -> int:
        """Rewrite ``group``'s live objects (``values``) as one new bucket, then
        delete the old ones; the allocated bytes freed.

        Requires: the writer lock held.
        """
        keys = [key for bucket in group for key in bucket.keys]
        aligned, offsets, length = self.layout([len(values[k]) for k in keys])
        crcs = self._catalog.checksums(keys)
        rows = [MetaRecord(k, off, len(values[k]), c) for k, off, c in zip(keys, offsets, crcs)]
        meta = BucketMeta(self.allocate_id(), length, aligned, rows)
        before = sum(b.physical for b in group)
        bucket = self.add(meta, [[memoryview(values[k])] for k in keys])
        self.delete(group)
        return before - bucket.physical

    def remove(self, bucket_id: int, removed: set[str]) -> None:
        """Remove ``removed`` from a bucket: rewrite its meta without them, or
        delete the bucket when nothing else is left.

        Requires: the writer lock held.
        """
        bucket, kept = self._catalog.without(bucket_id, removed)
        if not kept:
            self.delete([bucket])
            return
        meta = rebuilt_meta(bucket, kept)
        meta_path = os.path.join(self._dir, meta_name(bucket_id))
        old_meta_physical = run_io("stat", self._dir, lambda: self._fs.stat(meta_path).st_blocks * 512)
        self._reserve(old_meta_physical)  # the new meta (no longer than the old) sits beside it until the rename
        meta_physical = run_io(
            f"rewriting the meta of bucket {bucket_id}", self._dir, lambda: publish_meta(self._fs, self._dir, meta, durable=self._durable)
        )
        self._catalog.drop_keys(bucket, removed, meta_physical - old_meta_physical)

    def delete(self, buckets: Sequence[Bucket]) -> None:
        """Take buckets out of the index (those still in it), then delete their files.

        Requires: the writer lock held.
        """
        if not buckets:
            return
        self._catalog.drop_buckets(buckets)
        self._space.await_deletion([b.bucket_id for b in buckets], [b.physical for b in buckets])
        self.finish_deletions()

    def finish_deletions(self) -> None:
        """Delete the files of every bucket out of the index whose deletion
        has not completed (an earlier I/O error).

        Requires: the writer lock held.
        """
        bucket_ids = self._space.awaiting_deletion()
        if not bucket_ids:
            return

        def delete() -> None:
            if self._lock is not None and bucket_ids[-1] > self._lock.high_water_mark:
                self._lock.raise_high_water_mark(self._next_id - 1)
            for bucket_id in bucket_ids:
                delete_bucket_files(self._fs, self._dir, bucket_id, durable=False)
            if self._durable:
                self._fs.fsync_dir(self._dir)

        run_io(f"deleting bucket(s) {_ids(bucket_ids)}", self._dir, delete)
        self._space.deleted(bucket_ids)


def _ids(bucket_ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in bucket_ids[:5])
    return shown + (f" and {len(bucket_ids) - 5} more" if len(bucket_ids) > 5 else "")
