"""The commit protocol: how a bucket becomes durable, and how it goes away.

Order of a write (docs/FORMAT.md, "Commit protocol"):

1. create ``<id>.bucket`` exclusively, write the values, ``fdatasync``;
2. write the meta to ``<id>.meta.tmp``, ``fsync``;
3. ``rename`` it to ``<id>.meta``;
4. ``fsync`` the directory.

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

from .datafile import write_values
from .format import BucketMeta, data_name, encode_meta, meta_name, tmp_name
from .fs import O_DIRECT, FileSystem

log = logging.getLogger(__name__)

__all__ = ["write_bucket", "publish_meta", "delete_bucket_files", "unlink_if_present"]


def write_bucket(
    fs: FileSystem,
    directory: str,
    meta: BucketMeta,
    values: Sequence[Sequence[memoryview]],
    *,
    direct: bool,
    durable: bool,
    checksums: Callable[[], array[int]] | None = None,
) -> int:
    """Write a new bucket's data file and meta; return their allocated bytes.

    ``checksums``, when given, supplies ``meta.crcs`` once the data is
    durable (the caller computes them while the data is written). On any
    failure both files are removed before the error propagates.
    """
    data_path = os.path.join(directory, data_name(meta.bucket_id))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (O_DIRECT if direct else 0)
    fd = fs.open(data_path, flags)
    try:
        try:
            write_values(fs, fd, values, meta.offsets, meta.data_length, direct)
            if durable:
                fs.fdatasync(fd)
            data_physical = fs.fstat(fd).st_blocks * 512
        finally:
            fs.close(fd)
        if checksums is not None:
            meta.crcs = checksums()
        return data_physical + publish_meta(fs, directory, meta, durable=durable)
    except BaseException:
        _discard(fs, directory, meta.bucket_id)
        raise


def publish_meta(fs: FileSystem, directory: str, meta: BucketMeta, *, durable: bool) -> int:
    """Atomically (re)place ``<id>.meta`` with ``meta``; return its allocated bytes.

    Used for new buckets and for rewriting a bucket after removals: either way
    the old content (or none) stays until the rename, and the new content is
    durable before it.
    """
    tmp_path = os.path.join(directory, tmp_name(meta.bucket_id))
    fd = fs.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        try:
            fs.write_all(fd, [memoryview(encode_meta(meta))], 0)
            if durable:
                fs.fsync(fd)
            physical = fs.fstat(fd).st_blocks * 512
        finally:
            fs.close(fd)
        fs.rename(tmp_path, os.path.join(directory, meta_name(meta.bucket_id)))
    except BaseException:
        _quietly(unlink_if_present, fs, tmp_path)
        raise
    if durable:
        fs.fsync_dir(directory)
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
