"""The commit protocol: how a bucket becomes durable, and how it goes away.

Order of a write (docs/FORMAT.md, "Commit protocol"):

1. create ``<id>.bucket`` exclusively, write the values, ``fdatasync``;
2. write the meta to ``<id>.meta.tmp``, ``fsync``;
3. ``rename`` it to ``<id>.meta``;
4. ``fsync`` the directory.

A group (:func:`write_group`) runs step 1 for every bucket, then steps 2-3
for every bucket, then one step 4. A durable group of several buckets runs
each phase's buckets concurrently on the pool it is given (their syncs are
independent: each bucket's order is kept by its own task), and every task
of a phase has ended before the next phase, the directory ``fsync`` or the
cleanup of a failure begins.

Invariant: ``<id>.meta`` names a bucket only after its data file is durable,
and it appears atomically (rename), so a crash anywhere leaves either no meta
(the data file is an orphan that recovery deletes) or a complete one.
``durable=False`` (durability "relaxed") skips the three syncs.

Every function here cleans up what it created when it fails, then re-raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, wait
from functools import partial
from typing import NamedTuple, TypeVar

from .datafile import write_values
from .format import BucketMeta, data_name, encode_meta, meta_name, tmp_name
from .fs import O_DIRECT, FileSystem

log = logging.getLogger(__name__)

_T = TypeVar("_T")

__all__ = ["NewBucket", "write_group", "publish_meta", "delete_bucket_files", "unlink_if_present"]


class NewBucket(NamedTuple):
    """A bucket to write: its meta, its values, and what supplies its checksums."""

    meta: BucketMeta
    values: Sequence[Sequence[memoryview]]
    checksums: Callable[[], array[int]] | None


def write_group(
    fs: FileSystem, directory: str, buckets: Sequence[NewBucket], *, durable: bool, pool: Executor | None = None
) -> list[int]:
    """Write and commit new buckets (one or several) with one directory
    ``fsync``; return each one's allocated bytes.

    Every data file is written and synced, then every meta is published
    (temporary, ``fsync``, ``rename``), then the directory is synced once:
    each bucket keeps the order data, meta, directory, and none is durable
    for the caller before that last sync. When ``durable``, the group has
    several buckets, ``pool`` is given and ``fs.concurrent_syncs`` is true,
    each phase runs its buckets concurrently on ``pool``; otherwise every
    call is made in turn on the caller's thread. On any failure every task
    has ended before every bucket's files are removed and the first error
    propagates. A bucket's ``checksums``, when given, supplies ``meta.crcs``
    once its data is durable (the caller computes them while the data is
    written).
    """
    run = _in_turn if pool is None or len(buckets) < 2 or not durable or not fs.concurrent_syncs else partial(_concurrently, pool)
    try:
        physical = run([partial(_write_data, fs, directory, b.meta, b.values, durable=durable) for b in buckets])
        for bucket in buckets:
            if bucket.checksums is not None:
                bucket.meta.crcs = bucket.checksums()
        published = run([partial(_publish, fs, directory, b.meta, durable=durable) for b in buckets])
        if durable:
            fs.fsync_dir(directory)
        return [p + q for p, q in zip(physical, published)]
    except BaseException:
        for bucket in buckets:
            _discard(fs, directory, bucket.meta.bucket_id)
        raise


def _in_turn(tasks: Sequence[Callable[[], _T]]) -> list[_T]:
    """Each task's result, the tasks run one after another on this thread."""
    return [task() for task in tasks]


def _concurrently(pool: Executor, tasks: Sequence[Callable[[], _T]]) -> list[_T]:
    """Each task's result, the tasks run on ``pool``; raises the first
    failed task's error (in task order).

    Invariant: when this returns or raises, no task is running or will run
    (after a failure the tasks not yet started are cancelled, the others
    waited for), so the caller may remove what any task created.
    """
    futures: list[Future[_T]] = []
    try:
        futures.extend(pool.submit(task) for task in tasks)
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        for future in futures:
            future.cancel()
        wait(futures)
    errors = (future.exception() for future in futures if not future.cancelled())
    first = next((error for error in errors if error is not None), None)
    if first is not None:
        raise first
    return [future.result() for future in futures]


def _write_data(fs: FileSystem, directory: str, meta: BucketMeta, values: Sequence[Sequence[memoryview]], *, durable: bool) -> int:
    """Create ``<id>.bucket`` (never over an existing file), write the values
    (with O_DIRECT exactly when the layout is aligned), sync them when
    ``durable``; return its allocated bytes."""
    data_path = os.path.join(directory, data_name(meta.bucket_id))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (O_DIRECT if meta.aligned else 0)
    fd = fs.open(data_path, flags)
    try:
        write_values(fs, fd, values, meta.offsets, meta.data_length, meta.aligned)
        if durable:
            fs.fdatasync(fd)
        return int(fs.fstat(fd).st_blocks * 512)
    finally:
        fs.close(fd)


def publish_meta(fs: FileSystem, directory: str, meta: BucketMeta, *, durable: bool) -> int:
    """Atomically (re)place ``<id>.meta`` with ``meta``; return its allocated bytes.

    Used for new buckets and for rewriting a bucket after removals: either way
    the old content (or none) stays until the rename, and the new content is
    durable before it.
    """
    physical = _publish(fs, directory, meta, durable=durable)
    if durable:
        fs.fsync_dir(directory)
    return physical


def _publish(fs: FileSystem, directory: str, meta: BucketMeta, *, durable: bool) -> int:
    """:func:`publish_meta` up to the rename, without the directory ``fsync``
    (the caller's: until it, the rename may be lost)."""
    tmp_path = os.path.join(directory, tmp_name(meta.bucket_id))
    fd = fs.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        try:
            fs.write_all(fd, [memoryview(encode_meta(meta))], 0)
            if durable:
                fs.fsync(fd)
            physical = int(fs.fstat(fd).st_blocks * 512)
        finally:
            fs.close(fd)
        fs.rename(tmp_path, os.path.join(directory, meta_name(meta.bucket_id)))
    except BaseException:
        _quietly(unlink_if_present, fs, tmp_path)
        raise
    return physical


def delete_bucket_files(fs: FileSystem, directory: str, bucket_id: int, *, durable: bool) -> None:
    """Remove a bucket: meta first, so a crash in between leaves only an
    orphan data file, which recovery deletes."""
    unlink_if_present(fs, os.path.join(directory, meta_name(bucket_id)))
    unlink_if_present(fs, os.path.join(directory, data_name(bucket_id)))
    if durable:
        fs.fsync_dir(directory)


def unlink_if_present(fs: FileSystem, path: str) -> None:
    """Unlink ``path``; a file that is already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        fs.unlink(path)


def _discard(fs: FileSystem, directory: str, bucket_id: int) -> None:
    """Best-effort removal of a failed write's files (recovery removes what
    this cannot: without a durable meta they are orphans)."""
    for name in (meta_name(bucket_id), tmp_name(bucket_id), data_name(bucket_id)):
        _quietly(unlink_if_present, fs, os.path.join(directory, name))


def _quietly(function: Callable[..., None], *args: object) -> None:
    """Run a cleanup step; its own failure must not mask the original error."""
    try:
        function(*args)
    except OSError as exc:
        log.warning("cleanup step %s%r failed: %s", function.__name__, args[1:], exc)
