"""Reading a Mooncake directory's objects and importing them into a kvbucket store.

Invariant: nothing here writes to the Mooncake directory; every read goes
through :class:`~kvbucket._core.fs.FileSystem` and checks that the bytes are
still the ones the scan saw (the data file's length, the stored key).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .._core.format import MAX_KEY_BYTES
from .._core.fs import FileSystem
from .._core.interfaces import ObjectStore
from ..errors import CorruptionError
from ..policy.grouping import split_batches
from .scan import BrokenBucket, MooncakeBucket, MooncakeScan, scan_mooncake
from .wire import show_key, source_key, split_tenant

__all__ = ["read_bucket", "read_object", "iter_objects", "SkippedObject", "ImportReport", "import_mooncake"]


def read_bucket(root: Path, bucket: MooncakeBucket, fs: FileSystem | None = None) -> bytearray:
    """The whole data file of a valid bucket, checked to be the length the scan saw."""
    buf, got = _read_at(fs or FileSystem(), root / bucket.data.name, bucket.data.size, 0)
    if got != bucket.data.size:
        raise CorruptionError(f"Mooncake bucket {bucket.bucket_id} shrank while being read ({got} of {bucket.data.size} bytes)")
    return buf


def _read_at(fs: FileSystem, path: Path, size: int, offset: int) -> tuple[bytearray, int]:
    """``size`` bytes of the file ``path`` from ``offset``, and how many could be read."""
    fd = fs.open(os.fspath(path), os.O_RDONLY)
    try:
        buf = bytearray(size)
        return buf, fs.read_into(fd, memoryview(buf), offset)
    finally:
        fs.close(fd)


def iter_objects(data: bytearray, bucket: MooncakeBucket) -> Iterator[tuple[bytes, memoryview | None]]:
    """``(raw key, value view)`` for each object; the view is ``None`` when
    the key stored in ``data`` differs from the meta (the file changed)."""
    view = memoryview(data)
    for key, obj in zip(bucket.meta.keys, bucket.meta.metadatas):
        if view[obj.offset : obj.value_offset] != key:
            yield key, None
        else:
            yield key, view[obj.value_offset : obj.end]


@dataclass(frozen=True, slots=True)
class SkippedObject:
    """An object of the source that was not imported, and why."""

    key: str
    """The source key (see :func:`source_key`), tenant prefix included."""
    bucket: int
    reason: str
    destination_key: str | None = None
    """The key it would have had in the store, when it is a valid key."""

    def to_json(self) -> dict[str, object]:
        """A JSON-ready description."""
        return {"key": self.key, "destination_key": self.destination_key, "bucket": self.bucket, "reason": self.reason}


@dataclass
class ImportReport:
    """What :func:`import_mooncake` did."""

    source: Path
    destination: Path
    imported: int = 0
    imported_bytes: int = 0
    buckets_written: int = 0
    skipped: list[SkippedObject] = field(default_factory=list)
    skipped_buckets: list[BrokenBucket] = field(default_factory=list)
    """Broken source buckets (see :func:`~kvbucket.mooncake.scan.scan_mooncake`); none of their objects is imported."""

    @property
    def complete(self) -> bool:
        """True when every object in the source was imported."""
        return not self.skipped and not self.skipped_buckets

    def to_json(self) -> dict[str, object]:
        """A JSON-ready description."""
        return {
            "source": os.fspath(self.source),
            "destination": os.fspath(self.destination),
            "imported": self.imported,
            "imported_bytes": self.imported_bytes,
            "buckets_written": self.buckets_written,
            "skipped": [s.to_json() for s in self.skipped],
            "skipped_buckets": [f.to_json() for f in self.skipped_buckets],
            "complete": self.complete,
        }


def _import_key(raw: bytes, keep_tenant: bool) -> tuple[str | None, str]:
    """The kvbucket key for a Mooncake key, or ``(None, reason)``."""
    key = raw if keep_tenant else split_tenant(raw)[1]
    if not key:
        return None, "empty user key"
    if len(key) > MAX_KEY_BYTES:
        return None, f"key longer than {MAX_KEY_BYTES} bytes"
    try:
        return key.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "key is not valid UTF-8"


def import_mooncake(
    source: str | os.PathLike[str],
    store: ObjectStore,
    *,
    keep_tenant: bool = False,
    fs: FileSystem | None = None,
    scan: MooncakeScan | None = None,
    progress: Callable[[int], object] | None = None,
) -> ImportReport:
    """Copy every valid object of the Mooncake directory ``source`` into ``store``
    (an open, writable :class:`~kvbucket.BucketStore`).

    Keys lose their tenant prefix (``default\\x00``) unless ``keep_tenant``.
    Skipped and reported: objects of broken buckets, keys that are not valid
    kvbucket keys, a key seen earlier in the source, keys already in the
    store. Each source bucket is written as one or more kvbucket buckets within
    the store's limits, with checksums. ``progress(n)`` is called with the
    value bytes handled after each source bucket. The source is only read.
    """
    fs = fs or FileSystem()
    root = Path(source)
    scan = scan if scan is not None else scan_mooncake(root, fs)
    config = store.config
    report = ImportReport(root, Path(config.path), skipped_buckets=list(scan.findings))
    seen: set[str] = set()
    for bucket in scan.buckets:
        data = read_bucket(root, bucket, fs)
        fresh = _select_new(bucket, data, keep_tenant, seen, store, report)
        for batch in split_batches(fresh, max_bytes=config.bucket_size_limit, max_keys=config.bucket_keys_limit, size=lambda kv: len(kv[1])):
            store.batch_offload(dict(batch))
            report.buckets_written += 1
            report.imported += len(batch)
            report.imported_bytes += sum(len(v) for _, v in batch)
        if progress:
            progress(sum(m.data_size for m in bucket.meta.metadatas))
    return report


def _select_new(
    bucket: MooncakeBucket, data: bytearray, keep_tenant: bool, seen: set[str], store: ObjectStore, report: ImportReport
) -> list[tuple[str, memoryview]]:
    """The objects of one source bucket to import; record the others in ``report``."""
    candidates: list[tuple[bytes, str, memoryview]] = []
    for raw, value in iter_objects(data, bucket):
        key, reason = _import_key(raw, keep_tenant)
        if value is None:
            reason = "stored key bytes changed since the scan"
        elif key is not None and key in seen:
            reason = "duplicate key in source (an earlier copy was taken)"
        if key is None or value is None or reason:
            report.skipped.append(SkippedObject(source_key(raw), bucket.bucket_id, reason, key))
            continue
        seen.add(key)
        candidates.append((raw, key, value))
    if not candidates:
        return []
    exists = store.batch_exists([key for _, key, _ in candidates])
    fresh = []
    for (raw, key, value), present in zip(candidates, exists):
        if present:
            report.skipped.append(SkippedObject(source_key(raw), bucket.bucket_id, "already in destination", key))
        else:
            fresh.append((key, value))
    return fresh


def read_object(root: Path, bucket: MooncakeBucket, key: bytes, fs: FileSystem | None = None) -> bytes:
    """The value of ``key`` in a valid bucket; :class:`KvBucketError` if the
    stored key bytes no longer match."""
    obj = bucket.meta.metadatas[bucket.meta.keys.index(key)]
    buf, got = _read_at(fs or FileSystem(), root / bucket.data.name, obj.key_size + obj.data_size, obj.offset)
    if got != len(buf) or buf[: obj.key_size] != key:
        raise CorruptionError(f"key {show_key(key)} in Mooncake bucket {bucket.bucket_id}: stored bytes changed")
    return bytes(buf[obj.key_size :])
