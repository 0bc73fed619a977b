"""Recovery: what a store directory holds, and how open() makes it clean.

:func:`scan_directory` reads a directory without changing anything (open
with ``readonly=True`` and ``kvbucket fsck`` use it alone). :func:`repair`
then acts on the scan's findings; a writer's ``open()`` runs both.

After :func:`repair`, the directory holds only ``LOCK``, foreign files
(never touched), the quarantine folder, and complete bucket pairs whose meta
verifies and whose data file has the recorded length; and no key is listed
by two metas. A file is ours only by its name *and*, for a meta, its content
(:func:`kvbucket._core.format.meta_is_ours`); a writer acts only on a directory
that :func:`check_ownership` accepts. The rules and their arguments are in
docs/FORMAT.md, "Recovery".
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ..errors import CorruptionError, ForeignDirectory, ForeignEntry, MooncakeDirectory
from ..mooncake.detect import meta_kind
from .checksum import crc32c
from .commit import delete_bucket_files, publish_meta, unlink_if_present
from .format import (
    HEADER_SIZE,
    LOCK_NAME,
    META_MAGIC,
    QUARANTINE_DIR,
    BucketMeta,
    FileKind,
    check_meta_length,
    data_name,
    decode_meta,
    footprint,
    meta_is_ours,
    meta_name,
    parse_name,
    tmp_name,
)
from .fs import FileSystem
from .index import Bucket, Index, rebuilt_meta
from .lockfile import StoreLock
from .problems import ProblemKind
from .quarantine import move_to_quarantine, quarantine_folder

log = logging.getLogger(__name__)

__all__ = ["Finding", "LoadedBucket", "DirectoryScan", "RecoveryReport", "scan_directory", "build_index", "check_ownership", "repair"]

LARGE_META = 1 << 20
"""Metas longer than this are read whole only after a header check."""

SCAN_THREADS = 8
"""Parallel stat and meta reads during a scan (cold reads are latency-bound)."""


@dataclass(frozen=True)
class Finding:
    """One problem in a store directory and the files it concerns."""

    kind: ProblemKind
    """``ORPHAN_DATA``, ``META_WITHOUT_DATA``, ``INVALID_META``, ``SHORT_DATA``,
    ``LONG_DATA``, ``EMPTY_BUCKET`` or ``TEMPORARY``."""
    bucket_id: int
    files: tuple[str, ...]
    bytes: int
    """Sum of the files' sizes."""
    reason: str
    dropped_keys: tuple[str, ...] = ()
    """Keys a repair drops (known when the meta decodes)."""
    salvage: BucketMeta | None = None
    """For ``short_data``/``long_data`` with objects whose bytes verify: the
    meta a repair publishes instead of removing the files (those objects,
    data length = the file's); ``files`` is then empty."""


@dataclass
class LoadedBucket:
    """A bucket whose meta verifies and whose data file has the recorded length."""

    meta: BucketMeta
    physical: int
    """Allocated bytes of the data and meta files."""
    mtime_ns: int
    """Modification time of the data file (write order of recovered buckets)."""


@dataclass
class DirectoryScan:
    """What :func:`scan_directory` found."""

    path: str
    buckets: dict[int, LoadedBucket] = field(default_factory=dict)
    """Valid buckets, ascending by id."""
    findings: list[Finding] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    """Names that are not ours (never touched)."""
    shadowed: dict[int, list[str]] = field(default_factory=dict)
    """Keys listed by a bucket that a newer bucket also lists (an interrupted
    compaction); the newer copy wins. Filled by :func:`build_index`."""
    max_id: int = 0
    """Largest bucket id among all of our file names."""
    claimed: list[str] = field(default_factory=list)
    """Regular files with our names, whatever their content."""
    own_metas: int = 0
    """Metas that start with kvbucket's magic: proof the directory is a store."""
    mooncake_metas: list[str] = field(default_factory=list)
    """Metas (foreign) that decode as Mooncake's."""


@dataclass
class RecoveryReport:
    """What ``open()`` found and did."""

    buckets: int = 0
    """Valid buckets loaded."""
    keys: int = 0
    """Objects loaded."""
    removed_files: list[str] = field(default_factory=list)
    """Files that left the directory listing (deleted or quarantined)."""
    freed_bytes: int = 0
    """Sum of the sizes of the deleted ``removed_files`` (not of quarantined ones)."""
    dropped_buckets: list[tuple[int, str]] = field(default_factory=list)
    """``(bucket_id, reason)`` for every bucket id whose files were removed."""
    rewritten_buckets: list[int] = field(default_factory=list)
    """Buckets whose meta was rewritten to drop keys superseded by newer buckets."""
    foreign_files: list[str] = field(default_factory=list)
    """Names that are not ours, left untouched."""
    quarantined: bool = False
    """Files were moved to ``quarantine/`` rather than deleted."""
    quarantined_bytes: int = 0
    """Sum of the sizes of the ``removed_files`` moved to ``quarantine/``."""
    salvaged_buckets: list[int] = field(default_factory=list)
    """Buckets with a short or long data file whose meta was rewritten to
    list only the objects whose bytes verify."""
    dropped_keys: list[str] = field(default_factory=list)
    """Keys of the broken buckets that were dropped (when their meta decoded)."""


def scan_directory(
    path: str | os.PathLike[str],
    fs: FileSystem | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> DirectoryScan:
    """Classify every entry of a store directory; changes nothing.

    ``progress`` may wrap the iteration over bucket ids (a progress bar).
    """
    fs = fs or FileSystem()
    directory = os.fspath(path)
    scan = DirectoryScan(directory)
    names = sorted(fs.listdir(directory))
    ours = {name: parsed for name in names if (parsed := parse_name(name)) is not None}
    with ThreadPoolExecutor(SCAN_THREADS) as pool:  # cold metadata reads are latency-bound
        stats = dict(zip(ours, pool.map(lambda n: _regular_stat(fs, os.path.join(directory, n)), ours)))
        ids: dict[int, dict[FileKind, os.stat_result]] = {}
        for name in names:
            st = stats.get(name)
            if st is None:
                if name not in (LOCK_NAME, QUARANTINE_DIR):
                    scan.foreign.append(name)
                continue
            bucket_id, kind = ours[name]
            ids.setdefault(bucket_id, {})[kind] = st
            scan.claimed.append(name)
        # Ids are never reused, not even one a look-alike (a directory or
        # link named like ours) occupies: creating its data file would fail.
        scan.max_id = max((bucket_id for bucket_id, _ in ours.values()), default=0)
        with_meta = [b for b in sorted(ids) if FileKind.META in ids[b]]
        raws = dict(zip(with_meta, pool.map(lambda b: _read_meta(fs, directory, b), with_meta)))
    for bucket_id in (progress or iter)(sorted(ids)):
        _classify(fs, scan, bucket_id, ids[bucket_id], raws.get(bucket_id))
    scan.foreign.sort()
    return scan


def _regular_stat(fs: FileSystem, path: str) -> os.stat_result | None:
    """``stat`` of a regular file; None for anything else (a directory or
    link named like ours is foreign)."""
    try:
        st = fs.stat(path)
    except FileNotFoundError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _read_meta(fs: FileSystem, directory: str, bucket_id: int) -> bytes | CorruptionError | None:
    """The meta's bytes; None if it vanished since the listing; the reason
    when its length alone shows it invalid (a file longer than
    :data:`LARGE_META` is read whole only once its header shows it ours and
    agrees with its length, so a huge or sparse file costs one small read;
    a foreign one yields just its header). Any other error
    propagates: a meta we cannot read now is not evidence of damage, and
    deleting its bucket could lose acknowledged data."""
    try:
        fd = fs.open(os.path.join(directory, meta_name(bucket_id)), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = fs.fstat(fd).st_size
        if size > LARGE_META:
            header = bytearray(HEADER_SIZE)
            got = fs.read_into(fd, memoryview(header), 0)
            if not meta_is_ours(bytes(header[:got])):
                return bytes(header[:got])  # another program's file: its head is all the evidence needed
            try:
                check_meta_length(size, bytes(header[:got]), bucket_id)
            except CorruptionError as exc:
                return exc
        buf = bytearray(size)
        got = fs.read_into(fd, memoryview(buf), 0)
        return bytes(buf[:got])
    finally:
        fs.close(fd)


def _classify(
    fs: FileSystem,
    scan: DirectoryScan,
    bucket_id: int,
    files: dict[FileKind, os.stat_result],
    raw_meta: bytes | CorruptionError | None,
) -> None:
    tmp = files.get(FileKind.TMP)
    if tmp is not None:
        scan.findings.append(Finding(ProblemKind.TEMPORARY, bucket_id, (tmp_name(bucket_id),), tmp.st_size, "temporary file of an unfinished write"))
    data, meta_st = files.get(FileKind.DATA), files.get(FileKind.META)
    names = tuple(n for n, st in ((meta_name(bucket_id), meta_st), (data_name(bucket_id), data)) if st is not None)
    size = sum(st.st_size for st in (meta_st, data) if st is not None)
    if meta_st is None or raw_meta is None:
        if data is not None:
            scan.findings.append(Finding(ProblemKind.ORPHAN_DATA, bucket_id, names, size, "data file without a committed meta"))
        return
    if isinstance(raw_meta, bytes) and not meta_is_ours(raw_meta):  # another program's bucket: both files foreign
        scan.foreign += names
        if meta_kind(raw_meta) == "mooncake":
            scan.mooncake_metas.append(meta_name(bucket_id))
        return
    scan.own_metas += isinstance(raw_meta, bytes) and raw_meta.startswith(META_MAGIC)
    problem = _check_pair(raw_meta, bucket_id, data)
    if isinstance(problem, BucketMeta) and data.st_size != problem.data_length:  # type: ignore[union-attr]
        problem = _salvage(fs, os.path.join(scan.path, data_name(bucket_id)), problem, data.st_size)  # type: ignore[union-attr]
    if isinstance(problem, Finding):
        if problem.salvage is None:
            scan.findings.append(replace(problem, files=names, bytes=size))
            return
        scan.findings.append(problem)
        problem = problem.salvage
    physical = (meta_st.st_blocks + data.st_blocks) * 512  # type: ignore[union-attr]
    scan.buckets[bucket_id] = LoadedBucket(problem, physical, data.st_mtime_ns)  # type: ignore[union-attr]


def _check_pair(raw_meta: bytes | CorruptionError, bucket_id: int, data: os.stat_result | None) -> BucketMeta | Finding:
    """The bucket's verified meta, or the finding that rejects it. A data
    file of another length than recorded is left to :func:`_salvage`."""
    try:
        if isinstance(raw_meta, CorruptionError):
            raise raw_meta
        meta = decode_meta(raw_meta, bucket_id)
    except CorruptionError as exc:
        return Finding(ProblemKind.INVALID_META, bucket_id, (), 0, str(exc))
    if data is None:
        return Finding(ProblemKind.META_WITHOUT_DATA, bucket_id, (), 0, "meta without its data file", tuple(meta.keys))
    if data.st_size != meta.data_length:
        return meta
    if not meta.keys:
        return Finding(ProblemKind.EMPTY_BUCKET, bucket_id, (), 0, "meta lists no objects")
    return meta


def _salvage(fs: FileSystem, data_path: str, meta: BucketMeta, data_size: int) -> Finding:
    """The finding for a data file of ``data_size`` bytes where ``meta``
    records another length: its ``salvage`` lists the objects that lie inside
    the file and whose CRC32C matches (data length = the file's), or is None
    when no object survives. Reads only."""
    kind = ProblemKind.SHORT_DATA if data_size < meta.data_length else ProblemKind.LONG_DATA
    kept = _intact_objects(fs, data_path, meta, data_size)
    dropped = tuple(key for key in meta.keys if key not in kept)
    reason = f"data file is {data_size} bytes, meta records {meta.data_length}"
    if not kept:
        return Finding(kind, meta.bucket_id, (), 0, reason, dropped)
    rows = (record for record in meta.records if record.key in kept)
    salvage = BucketMeta(meta.bucket_id, data_size, meta.aligned, rows)
    reason += f"; {len(kept)} of {len(meta)} object(s) verify and are kept"
    return Finding(kind, meta.bucket_id, (), 0, reason, dropped, salvage)


def _intact_objects(fs: FileSystem, data_path: str, meta: BucketMeta, data_size: int) -> set[str]:
    """Keys of ``meta`` whose value (and, aligned, its padding) lies inside the
    first ``data_size`` bytes of the data file and matches its CRC32C."""
    inside = [r for r in meta.records if r.offset + footprint(r.size, meta.aligned) <= data_size]
    if not inside:
        return set()
    try:
        fd = fs.open(data_path, os.O_RDONLY)
    except FileNotFoundError:  # removed since the listing
        return set()
    kept = set()
    buf = memoryview(bytearray(max(r.size for r in inside)))
    try:
        for record in inside:
            view = buf[: record.size]
            if fs.read_into(fd, view, record.offset) == record.size and crc32c(view) == record.crc:
                kept.add(record.key)
    finally:
        fs.close(fd)
    return kept


def build_index(scan: DirectoryScan) -> Index:
    """The scan's valid buckets indexed as a store indexes them on open, and
    ``scan.shadowed`` filled in.

    A key listed by two buckets lives in the newer one (the older copy is
    dead). For LRU, buckets are stamped 1, 2, ... in write order: data-file
    mtime, ties broken by id. The index is the only key map built, so a
    million keys are hashed once.
    """
    index = Index()
    by_age = sorted(scan.buckets.items(), key=lambda item: (item[1].mtime_ns, item[0]))
    stamps = {bucket_id: stamp for stamp, (bucket_id, _) in enumerate(by_age, start=1)}
    scan.shadowed.clear()
    for bucket_id, loaded in scan.buckets.items():  # ascending ids: newer buckets win
        meta = loaded.meta
        for key in index.slots.keys() & meta.keys:  # usually empty
            scan.shadowed.setdefault(index.bucket_of(key), []).append(key)
        bucket = Bucket(bucket_id, meta.data_length, meta.aligned, loaded.physical, access=stamps[bucket_id])
        index.add_bucket(bucket, meta)
    return index


def check_ownership(scan: DirectoryScan, lock: StoreLock | None) -> None:
    """Raise :class:`ForeignDirectory` unless a writer may act on the scanned
    directory: ``LOCK`` holds a valid slot or a meta carries kvbucket's
    magic (a store), or nothing has our names and ``LOCK`` is missing
    (``lock`` is None) or blank (a new store). Changes nothing."""
    if scan.own_metas or (lock is not None and lock.identified):
        return
    if not scan.claimed and (lock is None or lock.blank):
        return
    if scan.mooncake_metas:
        raise MooncakeDirectory(
            f"{scan.path} is a Mooncake offload directory ({len(scan.mooncake_metas)} Mooncake meta file(s), "
            f"e.g. {scan.mooncake_metas[0]}); opening it as a kvbucket store would treat Mooncake's files as "
            f"broken buckets, so nothing was opened or changed. Copy it into a new store with "
            f"'kvbucket import --from-mooncake {scan.path} NEW_DIR', or use an empty directory."
        )
    if not scan.claimed:
        raise ForeignEntry(
            f"{os.path.join(scan.path, LOCK_NAME)} is not a kvbucket lock file (no valid slot); the directory "
            "belongs to another program, so nothing was opened or changed. Use another directory."
        )
    shown = ", ".join(scan.claimed[:3]) + (f" and {len(scan.claimed) - 3} more" if len(scan.claimed) > 3 else "")
    raise ForeignDirectory(
        f"{scan.path} holds files named like a kvbucket store's ({shown}) but nothing shows it is one "
        "(no LOCK with a kvbucket slot, no meta with kvbucket's magic); kvbucket deletes only files it can "
        "tell are its own, so nothing was opened or changed. Use an empty directory, or move those files out."
    )


def repair(
    fs: FileSystem, scan: DirectoryScan, index: Index, lock: StoreLock, *, quarantine: bool, durable: bool
) -> RecoveryReport:
    """Remove (or quarantine) every finding's files, and finish interrupted
    compactions (``scan.shadowed``, from :func:`build_index` of the same
    scan): ``index`` is updated to match the directory. The caller checked
    :func:`check_ownership` of the same scan."""
    report = RecoveryReport(foreign_files=list(scan.foreign), quarantined=quarantine)
    folder = quarantine_folder(fs, scan.path) if quarantine and any(f.salvage is None for f in scan.findings) else None
    if scan.findings or scan.shadowed:
        lock.raise_high_water_mark(scan.max_id)
    removals = [finding for finding in scan.findings if finding.salvage is None]
    for finding in removals:
        _remove_files(fs, scan.path, finding, folder, report)
    if removals and durable:
        if folder is not None:
            fs.fsync_dir(folder)
        fs.fsync_dir(scan.path)
    for finding in scan.findings:
        if finding.salvage is not None:
            _publish_salvage(fs, scan.path, index, finding, finding.salvage, durable, report)
    for bucket_id, keys in scan.shadowed.items():
        _drop_shadowed(fs, scan.path, index, bucket_id, len(keys), durable, report)
    report.buckets = len(index.buckets)
    report.keys = len(index)
    return report


def _remove_files(fs: FileSystem, directory: str, finding: Finding, folder: str | None, report: RecoveryReport) -> None:
    """Delete the finding's files, or move them into ``folder`` (quarantine)."""
    action = "removed" if folder is None else "quarantined"
    for name in finding.files:
        path = os.path.join(directory, name)
        if folder is None:
            unlink_if_present(fs, path)
        else:
            move_to_quarantine(fs, path, folder)
        report.removed_files.append(name)
    if folder is None:
        report.freed_bytes += finding.bytes
    else:
        report.quarantined_bytes += finding.bytes
    if finding.kind is not ProblemKind.TEMPORARY:
        report.dropped_buckets.append((finding.bucket_id, finding.reason))
    report.dropped_keys += finding.dropped_keys
    log.warning("recovery %s %s (bucket %d: %s, %d bytes)", action, ", ".join(finding.files), finding.bucket_id, finding.reason, finding.bytes)


def _publish_salvage(
    fs: FileSystem, directory: str, index: Index, finding: Finding, meta: BucketMeta, durable: bool, report: RecoveryReport
) -> None:
    """Replace the meta of a bucket with a short or long data file by its
    salvage: the objects whose bytes verify, data length = the file's (a
    long file's tail becomes dead bytes). The data file is not touched and
    the meta is replaced atomically, so a crash at any step leaves either
    the old meta (the next open salvages again) or the new one."""
    meta_physical = publish_meta(fs, directory, meta, durable=durable)
    bucket = index.buckets[finding.bucket_id]
    index.set_physical(bucket, _data_physical(fs, directory, finding.bucket_id) + meta_physical)
    report.salvaged_buckets.append(finding.bucket_id)
    report.dropped_keys += finding.dropped_keys
    log.warning(
        "recovery rewrote the meta of bucket %d (%s); dropped %d key(s): %s",
        finding.bucket_id,
        finding.reason,
        len(finding.dropped_keys),
        ", ".join(repr(key) for key in finding.dropped_keys) or "none",
    )


def _drop_shadowed(
    fs: FileSystem, directory: str, index: Index, bucket_id: int, superseded: int, durable: bool, report: RecoveryReport
) -> None:
    """Finish an interrupted compaction: the older bucket's meta forgets the
    keys the newer one holds (the index already moved them)."""
    bucket = index.buckets[bucket_id]
    if not bucket.keys:
        names = [meta_name(bucket_id), data_name(bucket_id)]
        size = sum(fs.stat(os.path.join(directory, name)).st_size for name in names)
        delete_bucket_files(fs, directory, bucket_id, durable=durable)
        index.drop_bucket(bucket_id)
        reason = "every object superseded by a newer bucket"
        report.removed_files += names
        report.freed_bytes += size
        report.dropped_buckets.append((bucket_id, reason))
        log.warning("recovery removed bucket %d: %s", bucket_id, reason)
        return
    meta_physical = publish_meta(fs, directory, rebuilt_meta(bucket, index.records(bucket)), durable=durable)
    index.set_physical(bucket, _data_physical(fs, directory, bucket_id) + meta_physical)
    report.rewritten_buckets.append(bucket_id)
    log.warning("recovery rewrote the meta of bucket %d without %d superseded keys", bucket_id, superseded)


def _data_physical(fs: FileSystem, directory: str, bucket_id: int) -> int:
    return fs.stat(os.path.join(directory, data_name(bucket_id))).st_blocks * 512
