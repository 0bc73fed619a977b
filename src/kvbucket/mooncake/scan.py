"""Checking a Mooncake bucket directory: which buckets are valid, which are broken.

Invariants:

* Only names of Mooncake's exact pattern (:func:`~kvbucket.mooncake.wire.parse_file_name`)
  that are regular files are Mooncake's; everything else in the directory
  (including symlinks and sub-directories with such names) is foreign.
* :func:`scan_mooncake` only reads (every file is opened ``O_RDONLY``, every
  call goes through :class:`~kvbucket._core.fs.FileSystem`); it never
  creates, changes or deletes anything.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .._core.fs import FileSystem, stat_directory
from .._core.problems import ForeignFile, Problem, ProblemKind, entry_type
from ..errors import InvalidArgument
from .wire import BucketMetadata, MooncakeMetaError, decode_bucket_meta, parse_file_name, show_key

__all__ = ["FileIdentity", "BrokenBucket", "MooncakeBucket", "MooncakeScan", "scan_mooncake"]


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What a file was when scanned; a repair skips a file that no longer matches."""

    name: str
    size: int
    inode: int
    device: int
    mtime_ns: int

    @classmethod
    def of(cls, name: str, st: os.stat_result) -> FileIdentity:
        """The identity of ``name`` from its ``lstat`` result."""
        return cls(name, st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns)


@dataclass(frozen=True, slots=True)
class BrokenBucket:
    """A bucket that failed a check, with the files a repair would remove."""

    kind: ProblemKind
    bucket: int
    files: tuple[FileIdentity, ...]
    detail: str

    @property
    def bytes(self) -> int:
        """Bytes the bucket's files occupy (what a repair frees)."""
        return sum(f.size for f in self.files)

    def problem(self) -> Problem:
        """The bucket as one problem of ``fsck``'s report."""
        return Problem(self.kind, self.bucket, tuple(f.name for f in self.files), self.bytes, self.detail)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready description (:meth:`Problem.to_json`)."""
        return self.problem().to_json()


@dataclass(frozen=True, slots=True)
class MooncakeBucket:
    """A bucket that passed every check: its meta and its data file's identity."""

    bucket_id: int
    stem: str
    meta: BucketMetadata
    data: FileIdentity
    meta_file: FileIdentity

    @property
    def data_name(self) -> str:
        """The data file's name."""
        return self.data.name

    @property
    def dead_bytes(self) -> int:
        """Bytes of the data file that no object covers."""
        return max(0, self.data.size - sum(m.key_size + m.data_size for m in self.meta.metadatas))


@dataclass
class MooncakeScan:
    """What :func:`scan_mooncake` found in a directory."""

    path: Path
    buckets: list[MooncakeBucket] = field(default_factory=list)
    findings: list[BrokenBucket] = field(default_factory=list)
    foreign: list[ForeignFile] = field(default_factory=list)

    @property
    def valid_objects(self) -> int:
        """Objects in the valid buckets."""
        return sum(len(b.meta.keys) for b in self.buckets)

    @property
    def logical_bytes(self) -> int:
        """Value bytes of the valid objects."""
        return sum(m.data_size for b in self.buckets for m in b.meta.metadatas)

    @property
    def dead_bytes(self) -> int:
        """Bytes of valid data files that no object covers."""
        return sum(b.dead_bytes for b in self.buckets)

    @property
    def duplicate_keys(self) -> int:
        """Keys stored in more than one valid bucket (Mooncake serves one of them)."""
        seen: set[bytes] = set()
        duplicates = 0
        for bucket in self.buckets:
            for key in bucket.meta.keys:
                duplicates += key in seen
                seen.add(key)
        return duplicates


def _list_directory(path: Path, fs: FileSystem) -> tuple[dict[str, dict[str, FileIdentity]], list[ForeignFile]]:
    """Group Mooncake's regular files by stem; everything else is foreign."""
    pairs: dict[str, dict[str, FileIdentity]] = {}
    foreign: list[ForeignFile] = []
    for name in sorted(fs.listdir(os.fspath(path))):
        try:
            st = fs.stat(os.fspath(path / name))
        except FileNotFoundError:
            continue  # vanished since the listing: nothing to report
        parsed = parse_file_name(name)
        if parsed is None or not stat.S_ISREG(st.st_mode):
            foreign.append(ForeignFile(name, st.st_size, entry_type(st.st_mode)))
            continue
        stem, kind = parsed
        pairs.setdefault(stem, {})[kind] = FileIdentity.of(name, st)
    return pairs, foreign


class _Broken(Exception):
    """A bucket failed a check: the kind and the detail of the first failure."""

    def __init__(self, kind: ProblemKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _check_meta_shape(meta: BucketMetadata, data_size: int) -> None:
    """Checks that need only the meta and the data file's length."""
    if meta.data_size == 0 or not meta.keys or not meta.metadatas:
        raise _Broken(ProblemKind.INVALID_META, "meta records no objects (Mooncake drops such buckets)")
    if len(meta.keys) != len(meta.metadatas):
        raise _Broken(ProblemKind.LIST_LENGTH_MISMATCH, f"{len(meta.keys)} keys but {len(meta.metadatas)} object metadatas")
    for i, (key, obj) in enumerate(zip(meta.keys, meta.metadatas)):
        if obj.end > data_size:
            raise _Broken(
                ProblemKind.OBJECT_PAST_END,
                f"object {i} ({show_key(key)}) ends at byte {obj.end}, data file has {data_size} bytes",
            )
        if obj.key_size != len(key):
            raise _Broken(
                ProblemKind.KEY_MISMATCH, f"object {i} ({show_key(key)}) records key_size {obj.key_size}, key has {len(key)} bytes"
            )
    if data_size < meta.data_size:
        raise _Broken(ProblemKind.SHORT_DATA, f"data file has {data_size} bytes, meta records {meta.data_size}")


def _check_stored_keys(fs: FileSystem, data_path: str, meta: BucketMetadata) -> None:
    """Compare the key bytes stored before each value with the meta's keys."""
    fd = fs.open(data_path, os.O_RDONLY)
    try:
        for i, (key, obj) in enumerate(zip(meta.keys, meta.metadatas)):
            stored = bytearray(obj.key_size)
            got = fs.read_into(fd, memoryview(stored), obj.offset)
            if got != obj.key_size or stored != key:
                raise _Broken(ProblemKind.KEY_MISMATCH, f"object {i}: stored key bytes differ from {show_key(key)}")
    finally:
        fs.close(fd)


def _check_bucket(path: Path, stem: str, files: dict[str, FileIdentity], fs: FileSystem, verify_keys: bool) -> MooncakeBucket:
    """Validate one bucket pair; raise :class:`_Broken` naming the first failure."""
    meta_file, data_file = files.get("meta"), files.get("bucket")
    if meta_file is None:
        raise _Broken(ProblemKind.ORPHAN_DATA, "no meta: left by a crash between the data and the meta write")
    if data_file is None:
        raise _Broken(ProblemKind.META_WITHOUT_DATA, "no data file")
    if meta_file.size == 0:
        raise _Broken(ProblemKind.INVALID_META, "meta is empty")
    try:
        meta = decode_bucket_meta(fs.read_file(os.fspath(path / meta_file.name)))
    except MooncakeMetaError as exc:
        raise _Broken(ProblemKind.INVALID_META, str(exc)) from None
    _check_meta_shape(meta, data_file.size)
    if verify_keys:
        _check_stored_keys(fs, os.fspath(path / data_file.name), meta)
    return MooncakeBucket(int(stem), stem, meta, data_file, meta_file)


def _require_directory(fs: FileSystem, root: Path) -> None:
    """Raise :class:`InvalidArgument` unless ``root`` is a directory (a link to one counts)."""
    try:
        stat_directory(fs, os.fspath(root))
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidArgument(f"{os.fspath(root)!r} is not a directory") from None


def scan_mooncake(
    path: str | os.PathLike[str],
    fs: FileSystem | None = None,
    *,
    verify_keys: bool = True,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> MooncakeScan:
    """Check a Mooncake bucket directory without changing anything.

    Reports, as :class:`BrokenBucket`: data files without a meta, metas
    without a data file, metas that do not parse (or record no objects),
    metas whose ``keys`` and ``metadatas`` differ in length, objects reaching
    past the end of the data file, stored key bytes that differ from the
    meta's key (when ``verify_keys``), and data files shorter than the meta's
    ``data_size``. ``progress`` may wrap the iteration over bucket stems (a
    tqdm bar). Raises :class:`InvalidArgument` if ``path`` is not a
    directory, and lets an ``OSError`` of the directory listing propagate.
    """
    fs = fs or FileSystem()
    root = Path(path)
    _require_directory(fs, root)
    pairs, foreign = _list_directory(root, fs)
    scan = MooncakeScan(root, foreign=foreign)
    stems: Iterable[str] = sorted(pairs, key=lambda s: (int(s), s))
    for stem in progress(stems) if progress else stems:
        files = pairs[stem]
        identities = tuple(files[k] for k in ("bucket", "meta") if k in files)
        try:
            scan.buckets.append(_check_bucket(root, stem, files, fs, verify_keys))
        except _Broken as broken:
            scan.findings.append(BrokenBucket(broken.kind, int(stem), identities, broken.detail))
        except OSError as exc:  # unreadable: report it, a repair removes it like Mooncake would
            scan.findings.append(BrokenBucket(ProblemKind.INVALID_META, int(stem), identities, f"cannot read: {exc.strerror or exc}"))
    return scan
