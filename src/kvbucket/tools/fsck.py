"""fsck: check a store directory (kvbucket or Mooncake) and repair it.

:func:`check` and :func:`check_mooncake` only read: no lock, no write. A
repair acts on what a check reported: :func:`repair` finishes one for a
kvbucket store just opened as the writer (whose recovery already removed the
reported files), :func:`repair_mooncake` removes the files of the broken
Mooncake buckets the check saw. Both confirm with a fresh scan.

Every function returns or fills one :class:`FsckReport`, the document that
``kvbucket fsck --json`` prints (the README, "Operating a store", shows one).
Every call on the directory goes through the ``fs`` given (the real
:class:`~kvbucket._core.fs.FileSystem` by default), so fault injection
reaches checks and repairs alike.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .. import mooncake
from .._core.checksum import crc32c
from .._core.format import LOCK_NAME, data_name
from .._core.fs import FileSystem
from .._core.index import Index, ObjectMeta
from .._core.problems import ForeignFile, Problem, ProblemKind, entry_type
from .._core.recovery import DirectoryScan, Finding, build_index, scan_directory

if TYPE_CHECKING:
    from ..store import BucketStore

__all__ = ["FsckReport", "RepairSummary", "Progress", "ProgressBar", "check", "repair", "check_mooncake", "repair_mooncake", "writer_active"]

log = logging.getLogger(__name__)

T = TypeVar("T")

@dataclasses.dataclass(kw_only=True)
class RepairSummary:
    """What a repair did; the fields of one engine only are ``None`` for the other."""

    removed: list[str]
    """Files that left the directory (deleted or quarantined)."""
    freed_bytes: int
    """Bytes of the deleted files (quarantined ones are not freed)."""
    quarantined_bytes: int | None = None
    """Bytes moved to ``quarantine/`` (Mooncake: only with quarantine)."""
    rewritten_buckets: list[int] | None = None
    """kvbucket: metas rewritten to finish an interrupted compaction."""
    salvaged_buckets: list[int] | None = None
    """kvbucket: buckets whose verified objects were kept under a rewritten meta."""
    dropped_keys: list[str] | None = None
    """kvbucket: keys of the broken buckets."""
    removed_keys: list[str] | None = None
    """kvbucket: corrupt objects removed (``--deep``)."""
    skipped: list[tuple[str, str]] | None = None
    """Mooncake: ``(file, reason)`` for files left in place (changed since the check)."""
    quarantined: bool
    remaining_problems: list[Problem]
    """What a fresh check after the repair still finds."""

    def to_json(self) -> dict[str, Any]:
        """The JSON form: the fields that apply (``skipped`` as ``file``/``reason`` objects)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        if self.skipped is not None:
            out["skipped"] = [{"file": name, "reason": why} for name, why in self.skipped]
        out["remaining_problems"] = [problem.to_json() for problem in self.remaining_problems]
        return out


@dataclasses.dataclass(kw_only=True)
class FsckReport:
    """What a check found and, after a repair, what the repair did.

    Each problem is a :class:`~kvbucket._core.problems.Problem` (its
    ``to_json`` is the problem's JSON form); each foreign entry a
    :class:`~kvbucket._core.problems.ForeignFile`.
    """

    path: str
    format: str
    """``"kvbucket"`` or ``"mooncake"``."""
    deep: bool
    """Every live object's checksum was verified too."""
    writer_active: bool | None
    """A process holds the writer lock (``None``: unknown, or Mooncake, which takes none)."""
    valid_buckets: int
    valid_objects: int
    """Live objects (a key listed by two buckets counts once)."""
    logical_bytes: int
    """Value bytes of the live objects."""
    dead_bytes: int
    """Bytes of valid data files that no live object uses (not a problem)."""
    duplicate_keys: int | None = None
    """Mooncake only: keys stored in more than one valid bucket (not a problem)."""
    problems: list[Problem]
    foreign: list[ForeignFile]
    """Entries that are not the engine's, never touched."""
    repair: RepairSummary | None = None
    """What a repair did (``None`` before one)."""
    clean: bool = False
    """No problems; after a repair: nothing left to fix."""
    scan: mooncake.MooncakeScan | None = dataclasses.field(default=None, repr=False, compare=False)
    """The Mooncake scan the problems come from (a repair removes exactly its files)."""

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (without ``duplicate_keys`` for kvbucket)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "scan"}
        out["problems"] = [problem.to_json() for problem in self.problems]
        out["foreign"] = [entry.to_json() for entry in self.foreign]
        out["repair"] = None if self.repair is None else self.repair.to_json()
        if self.duplicate_keys is None:
            del out["duplicate_keys"]
        return out


class ProgressBar(Protocol):
    """A progress bar: a context manager that counts units done (a ``tqdm`` is one)."""

    def __enter__(self) -> ProgressBar: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None, /) -> object: ...

    def update(self, n: int = 1) -> object: ...


class Progress(Protocol):
    """Opens a :class:`ProgressBar` (``tqdm`` itself is one, with its own keywords)."""

    def __call__(self, *, desc: str, total: int, unit: str, unit_scale: bool = False) -> ProgressBar: ...


class _Quiet:
    """The default :class:`Progress`: no bar."""

    def __call__(self, **_kwargs: Any) -> _Quiet:
        return self

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *_exc_info: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def _each(progress: Progress, desc: str, unit: str) -> Callable[[Iterable[T]], Iterator[T]]:
    """Wrap a scan's iteration in a bar counting ``unit``s."""

    def wrap(items: Iterable[T]) -> Iterator[T]:
        items = list(items)
        with progress(desc=desc, total=len(items), unit=unit) as bar:
            for item in items:
                yield item
                bar.update(1)

    return wrap


# ---------------------------------------------------------------------------
# kvbucket directories
# ---------------------------------------------------------------------------


def check(
    path: str | os.PathLike[str], *, deep: bool = False, progress: Progress | None = None, fs: FileSystem | None = None
) -> FsckReport:
    """Check the kvbucket directory ``path``; with ``deep``, also verify every
    live object's CRC32C. Reads only: no lock is taken, nothing is written.
    An ``OSError`` of ``fs`` propagates."""
    progress = progress or _Quiet()
    fs = fs or FileSystem()
    root = Path(path)
    scan = scan_directory(root, fs, progress=_each(progress, "checking buckets", "bucket"))
    index = build_index(scan)
    report = FsckReport(
        path=os.fspath(root),
        format="kvbucket",
        deep=deep,
        writer_active=writer_active(root, fs),
        valid_buckets=len(scan.buckets),
        valid_objects=len(index),
        logical_bytes=index.logical_bytes,
        dead_bytes=sum(max(0, bucket.dead) for bucket in index.buckets.values()),
        problems=_scan_problems(scan),
        foreign=_foreign_entries(fs, root, scan.foreign),
    )
    if deep:
        report.problems += _verify(fs, root, index, progress)
    report.clean = not report.problems
    return report


def repair(
    store: BucketStore, report: FsckReport, *, deep: bool = False, progress: Progress | None = None, fs: FileSystem | None = None
) -> FsckReport:
    """Finish repairing the directory of ``report`` (from :func:`check` without
    ``deep``), given ``store`` just opened on it as the writer: its recovery
    removed (or quarantined) the reported files. With ``deep``, verify the
    checksums now, under the lock, add the failures to the problems and
    remove those objects. Then confirm with a fresh scan through ``fs``;
    fill ``report.repair`` and ``report.clean``. An ``OSError`` of ``fs``
    propagates; one in the first verification comes before any object is
    removed and leaves ``report`` as it was."""
    progress = progress or _Quiet()
    fs = fs or FileSystem()
    root = Path(store.path)
    recovery = store.recovery_report
    removed_keys: list[str] = []
    if deep:
        corrupt = _verify(fs, root, build_index(scan_directory(root, fs)), progress)
        report.problems += corrupt
        removed_keys = [p.key for p in corrupt if p.key is not None]
        if removed_keys:
            store.batch_remove(removed_keys)
    after = scan_directory(root, fs)
    after_index = build_index(after)  # also finds superseded keys
    remaining = [_finding_problem(f) for f in after.findings]
    if deep:
        remaining += _verify(fs, root, after_index, progress)
    report.deep, report.writer_active = deep, False
    report.repair = RepairSummary(
        removed=list(recovery.removed_files),
        freed_bytes=recovery.freed_bytes,
        quarantined_bytes=recovery.quarantined_bytes,
        rewritten_buckets=list(recovery.rewritten_buckets),
        salvaged_buckets=list(recovery.salvaged_buckets),
        dropped_keys=list(recovery.dropped_keys),
        removed_keys=removed_keys,
        quarantined=recovery.quarantined,
        remaining_problems=remaining,
    )
    report.clean = not remaining and not after.shadowed
    return report


def writer_active(path: Path, fs: FileSystem | None = None) -> bool | None:
    """Whether some process holds ``flock`` on ``path/LOCK``, read from
    ``/proc/locks`` (the kernel's table, not the store's) so that checking
    takes no lock itself (taking even a shared one could make a starting
    writer fail). ``None`` when unknown."""
    try:
        st = (fs or FileSystem()).stat(os.fspath(path / LOCK_NAME))
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        with open("/proc/locks", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and any(_same_dev_ino(f, st) for f in fields):
            return True
    return False


def _same_dev_ino(field: str, st: os.stat_result) -> bool:
    """Compare a ``/proc/locks`` ``MAJ:MIN:INODE`` field (hex device numbers)."""
    parts = field.split(":")
    if len(parts) != 3:
        return False
    try:
        major, minor, inode = int(parts[0], 16), int(parts[1], 16), int(parts[2])
    except ValueError:
        return False
    return (major, minor, inode) == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)


def _finding_problem(finding: Finding) -> Problem:
    """A recovery finding as a problem of the report."""
    return Problem(
        finding.kind,
        finding.bucket_id,
        finding.files,
        finding.bytes,
        finding.reason,
        dropped_keys=finding.dropped_keys,
        salvaged=finding.salvage is not None,
    )


def _scan_problems(scan: DirectoryScan) -> list[Problem]:
    """The scan's findings, then the keys an interrupted compaction left in two buckets."""
    problems = [_finding_problem(f) for f in scan.findings]
    for bucket_id, keys in sorted(scan.shadowed.items()):
        detail = f"{len(keys)} key(s) also in a newer bucket (an interrupted compaction); the newer copy wins"
        problems.append(Problem(ProblemKind.SUPERSEDED_KEYS, bucket_id, (), 0, detail, keys=tuple(sorted(keys))))
    return problems


def _foreign_entries(fs: FileSystem, path: Path, names: Iterable[str]) -> list[ForeignFile]:
    """Size and type of each foreign entry (``stat`` of the entry itself; it is never opened)."""
    entries = []
    for name in names:
        try:
            st = fs.stat(os.fspath(path / name))
        except OSError:
            continue
        entries.append(ForeignFile(name, st.st_size, entry_type(st.st_mode)))
    return entries


def _verify(fs: FileSystem, path: Path, index: Index, progress: Progress) -> list[Problem]:
    """A ``corrupt_object`` problem for every live object whose CRC32C does not
    match its meta; reads only. A read that fails with an ``OSError`` is no
    evidence of corruption: the error propagates."""
    corrupt: list[Problem] = []
    with progress(desc="verifying checksums", total=index.logical_bytes, unit="B", unit_scale=True) as bar:
        for bucket_id, bucket in index.buckets.items():
            corrupt += _verify_bucket(fs, path, bucket_id, index.records(bucket), bar)
    return corrupt


def _verify_bucket(
    fs: FileSystem, path: Path, bucket_id: int, records: list[tuple[str, ObjectMeta]], bar: ProgressBar
) -> list[Problem]:
    """The ``corrupt_object`` problems of one bucket's ``records``."""
    try:
        fd = fs.open(os.fspath(path / data_name(bucket_id)), os.O_RDONLY)
    except FileNotFoundError:  # deleted by a live writer since the scan
        log.info("bucket %d vanished during the deep check", bucket_id)
        return []
    corrupt = []
    buf = memoryview(bytearray(max((meta.size for _, meta in records), default=0)))
    try:
        for key, meta in records:
            view = buf[: meta.size]
            got = fs.read_into(fd, view, meta.offset)
            if got != meta.size or crc32c(view) != meta.checksum:
                detail = "checksum mismatch" if got == meta.size else f"only {got} of {meta.size} bytes readable"
                where = f"{detail} (offset {meta.offset})"
                corrupt.append(Problem(ProblemKind.CORRUPT_OBJECT, bucket_id, (data_name(bucket_id),), meta.size, where, key=key))
            bar.update(meta.size)
    finally:
        fs.close(fd)
    return corrupt


# ---------------------------------------------------------------------------
# Mooncake directories
# ---------------------------------------------------------------------------


def check_mooncake(
    path: str | os.PathLike[str], *, deep: bool = False, progress: Progress | None = None, fs: FileSystem | None = None
) -> FsckReport:
    """Check the Mooncake directory ``path`` (:func:`kvbucket.mooncake.scan_mooncake`
    always compares the stored keys; ``deep`` is only recorded). Reads only."""
    root = Path(path)
    scan = mooncake.scan_mooncake(root, fs, progress=_each(progress or _Quiet(), "checking buckets", "bucket"))
    return FsckReport(
        path=os.fspath(root),
        format="mooncake",
        deep=deep,
        writer_active=None,
        valid_buckets=len(scan.buckets),
        valid_objects=scan.valid_objects,
        logical_bytes=scan.logical_bytes,
        dead_bytes=scan.dead_bytes,
        duplicate_keys=scan.duplicate_keys,
        problems=[f.problem() for f in scan.findings],
        foreign=list(scan.foreign),
        clean=not scan.findings,
        scan=scan,
    )


def repair_mooncake(report: FsckReport, *, quarantine: bool = False, fs: FileSystem | None = None) -> FsckReport:
    """Remove (or quarantine) the files of the broken buckets that ``report``
    (from :func:`check_mooncake`) lists, if unchanged since; confirm with a
    fresh scan; fill ``report.repair`` and ``report.clean``. An ``OSError``
    of ``fs`` propagates with ``report`` unchanged; the files removed until
    then stay removed, the others stay where they were, so a new check and
    repair finish the job."""
    if report.scan is None:
        raise ValueError("repair_mooncake needs a report from check_mooncake")
    result = mooncake.repair_mooncake(report.scan, fs, quarantine=quarantine)
    after = mooncake.scan_mooncake(report.path, fs)
    report.repair = RepairSummary(
        removed=result.removed,
        freed_bytes=0 if quarantine else result.freed_bytes,  # quarantined files are moved, not freed
        quarantined_bytes=result.freed_bytes if quarantine else None,
        skipped=result.skipped,
        quarantined=quarantine,
        remaining_problems=[f.problem() for f in after.findings],
    )
    report.clean = result.complete and not after.findings
    return report
