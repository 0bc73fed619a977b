"""Mooncake Store bucket directories: read, check, repair and import them.

Mooncake's ``BucketStorageBackend`` keeps each bucket as two files in one flat
directory (kvcache-ai/Mooncake, ``mooncake-store/src/storage_backend.cpp``):

* ``<id>.bucket``: the objects back to back, each ``[key bytes][value bytes]``,
  with no header, padding or checksum.
* ``<id>.meta``: protobuf wire format of ::

      message BucketObjectMetadata { int64 offset = 1; int64 key_size = 2; int64 data_size = 3; }
      message BucketMetadata {
        int64 data_size = 1;                          // sum of key+value sizes = .bucket length
        repeated string keys = 2;                     // parallel to metadatas
        repeated BucketObjectMetadata metadatas = 3;
      }

  Scalars are plain (non-zigzag) varint ``int64``; fields equal to zero are
  omitted. ``offset`` is where the object's *key* starts; its value follows
  the key, so the value is ``[offset + key_size, offset + key_size + data_size)``.

This module decodes (and, for tests, encodes) that format with a small
protobuf-wire codec of its own, so kvbucket needs no protobuf dependency.

Invariants:

* Only names matching ``^[0-9]+\\.(bucket|meta)$`` that are regular files are
  Mooncake's; everything else in the directory (including symlinks and
  sub-directories with such names) is *foreign* and is never opened for
  writing, moved or deleted.
* :func:`scan_mooncake` only reads (every file is opened ``O_RDONLY``); it
  never creates, changes or deletes anything.
* :func:`repair_mooncake` removes only the files of buckets that the scan
  reported as broken, and only if a file is still the one that was scanned
  (same inode, size and modification time). Every unlink goes through
  :class:`kvbucket._core.fs.FileSystem`, and the directory is fsynced afterwards.
* :func:`import_mooncake` never writes to the source directory.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ._core.fs import FileSystem
from ._core.quarantine import move_to_quarantine, quarantine_folder
from .errors import CorruptionError, InvalidArgument
from .policy.grouping import split_batches

if TYPE_CHECKING:
    from .config import BucketConfig

__all__ = [
    "MooncakeMetaError",
    "ObjectMetadata",
    "BucketMetadata",
    "decode_meta",
    "encode_meta",
    "parse_name",
    "split_tenant",
    "Finding",
    "ForeignFile",
    "MooncakeBucket",
    "MooncakeScan",
    "RepairResult",
    "SkippedObject",
    "ImportReport",
    "scan_mooncake",
    "repair_mooncake",
    "read_bucket",
    "read_object",
    "iter_objects",
    "source_key",
    "import_mooncake",
    "meta_kind",
    "PROBLEM_KINDS",
    "FormatEvidence",
    "format_evidence",
    "detect_format",
]

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"([0-9]+)\.(bucket|meta)")  # used with fullmatch: no "$" newline loophole
TENANT_SEPARATOR = b"\x00"
QUARANTINE_SUFFIX = ".quarantined"

PROBLEM_KINDS: dict[str, str] = {
    "orphan_data": "data file without meta",
    "meta_without_data": "meta without data file",
    "invalid_meta": "meta does not parse",
    "list_length_mismatch": "meta lists disagree in length",
    "object_past_end": "object reaches past the end of the data file",
    "key_mismatch": "stored key differs from the meta",
    "short_data": "data file shorter than recorded",
}
"""Every problem kind a Mooncake scan reports, with its human description."""


class MooncakeMetaError(CorruptionError):
    """A Mooncake ``.meta`` file that does not parse or is not a usable bucket."""


# ---------------------------------------------------------------------------
# The protobuf wire codec
# ---------------------------------------------------------------------------

_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
_INT64_LIMIT = 1 << 64


@dataclass(frozen=True, slots=True)
class ObjectMetadata:
    """One ``BucketObjectMetadata``: where an object's key starts, and the sizes."""

    offset: int
    key_size: int
    data_size: int

    @property
    def value_offset(self) -> int:
        """Where the value starts in the data file (right after the key)."""
        return self.offset + self.key_size

    @property
    def end(self) -> int:
        """One past the object's last byte in the data file."""
        return self.offset + self.key_size + self.data_size


@dataclass(frozen=True, slots=True)
class BucketMetadata:
    """A decoded ``BucketMetadata``. Keys are raw bytes (Mooncake keys are
    ``std::string``; current releases prefix them with ``<tenant>\\x00``)."""

    data_size: int
    keys: list[bytes]
    metadatas: list[ObjectMetadata]


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    """Decode one varint at ``pos``; return ``(value, next position)``.

    A varint is at most 10 bytes and encodes at most 64 bits."""
    value = shift = 0
    while True:
        if pos >= len(raw):
            raise MooncakeMetaError("truncated varint")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise MooncakeMetaError("varint longer than 10 bytes")
    if value >= _INT64_LIMIT:
        raise MooncakeMetaError("varint exceeds 64 bits")
    return value, pos


def _as_int64(value: int) -> int:
    """Interpret a 64-bit varint as two's-complement ``int64`` (protobuf ``int64``)."""
    return value - _INT64_LIMIT if value >= 1 << 63 else value


def _fields(raw: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield ``(field number, wire type, value)`` for every field of a message.

    Varints yield ints, length-delimited fields yield bytes; fixed-width fields
    are skipped (no known field uses them); groups and reserved wire types
    are errors, as are fields running past the end of the buffer."""
    pos = 0
    while pos < len(raw):
        tag, pos = _read_varint(raw, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise MooncakeMetaError("field number 0")
        if wire == _VARINT:
            value, pos = _read_varint(raw, pos)
            yield number, wire, value
        elif wire == _LENGTH:
            length, pos = _read_varint(raw, pos)
            if pos + length > len(raw):
                raise MooncakeMetaError(f"field {number} runs past the end of the meta")
            yield number, wire, raw[pos : pos + length]
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
            if pos > len(raw):
                raise MooncakeMetaError(f"field {number} runs past the end of the meta")
        else:
            raise MooncakeMetaError(f"unsupported wire type {wire} in field {number}")


def _expect(number: int, wire: int, expected: int) -> None:
    if wire != expected:
        raise MooncakeMetaError(f"field {number} has wire type {wire}, expected {expected}")


def _decode_object(raw: bytes) -> ObjectMetadata:
    """Decode one embedded ``BucketObjectMetadata``; negative values are errors."""
    values = {1: 0, 2: 0, 3: 0}
    for number, wire, value in _fields(raw):
        if number in values:
            _expect(number, wire, _VARINT)
            values[number] = _as_int64(value)  # type: ignore[arg-type]  # varint: an int
    if min(values.values()) < 0:
        raise MooncakeMetaError(f"negative offset or size in object metadata {values}")
    return ObjectMetadata(offset=values[1], key_size=values[2], data_size=values[3])


def decode_meta(raw: bytes) -> BucketMetadata:
    """Parse the bytes of a Mooncake ``.meta`` file.

    Raises :class:`MooncakeMetaError` when the bytes are not valid protobuf
    wire format for ``BucketMetadata`` (truncated varint or field, group or
    reserved wire type, known field with the wrong wire type, negative size).
    Unknown fields are skipped, as protobuf does. The *consistency* of a
    parsed meta (list lengths, bounds) is checked by :func:`scan_mooncake`.
    """
    data_size = 0
    keys: list[bytes] = []
    metadatas: list[ObjectMetadata] = []
    for number, wire, value in _fields(raw):
        if number == 1:
            _expect(number, wire, _VARINT)
            data_size = _as_int64(value)  # type: ignore[arg-type]
        elif number == 2:
            _expect(number, wire, _LENGTH)
            keys.append(bytes(value))
        elif number == 3:
            _expect(number, wire, _LENGTH)
            metadatas.append(_decode_object(value))  # type: ignore[arg-type]
    if data_size < 0:
        raise MooncakeMetaError(f"negative data_size {data_size}")
    return BucketMetadata(data_size, keys, metadatas)


def _varint(value: int) -> bytes:
    """Encode a non-negative int (< 2**64) as a varint."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int64_field(number: int, value: int) -> bytes:
    """A varint ``int64`` field, omitted when zero (iguana ``omit_default_val``)."""
    if value == 0:
        return b""
    return _varint(number << 3 | _VARINT) + _varint(value % _INT64_LIMIT)


def _length_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LENGTH) + _varint(len(payload)) + payload


def encode_meta(meta: BucketMetadata) -> bytes:
    """Serialize ``meta`` exactly as Mooncake does (used by tests and tools).

    Zero scalars are omitted; every key and every object metadata is emitted,
    even when empty."""
    parts = [_int64_field(1, meta.data_size)]
    parts.extend(_length_field(2, key) for key in meta.keys)
    for obj in meta.metadatas:
        body = _int64_field(1, obj.offset) + _int64_field(2, obj.key_size) + _int64_field(3, obj.data_size)
        parts.append(_length_field(3, body))
    return b"".join(parts)


# ---------------------------------------------------------------------------
# Names and keys
# ---------------------------------------------------------------------------


def parse_name(name: str) -> tuple[str, str] | None:
    """``(stem, "bucket" | "meta")`` for a name of Mooncake's exact pattern, else ``None``.

    Buckets are paired by their stem (the digits), so ``5.meta`` belongs with
    ``5.bucket``; Mooncake itself only ever writes canonical decimal ids."""
    match = _NAME_RE.fullmatch(name)
    return (match.group(1), match.group(2)) if match else None


def split_tenant(key: bytes) -> tuple[bytes | None, bytes]:
    """Split ``b"<tenant>\\x00<user key>"`` into ``(tenant, user key)``.

    Keys without a NUL (older Mooncake releases) have no tenant: ``(None, key)``."""
    tenant, sep, user_key = key.partition(TENANT_SEPARATOR)
    return (tenant, user_key) if sep else (None, key)


def meta_kind(raw: bytes) -> str:
    """Classify the first bytes of a ``.meta`` file: ``"kvbucket"`` (our magic),
    ``"mooncake"`` (a non-empty, parseable Mooncake meta) or ``"unknown"``."""
    from ._core.format import META_MAGIC

    if raw.startswith(META_MAGIC):
        return "kvbucket"
    try:
        meta = decode_meta(raw)
    except MooncakeMetaError:
        return "unknown"
    return "mooncake" if meta.keys and meta.metadatas else "unknown"


# ---------------------------------------------------------------------------
# Scanning
# ---------------------------------------------------------------------------


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
class Finding:
    """One problem: a broken bucket, with the files a repair would remove."""

    kind: str
    """One of :data:`PROBLEM_KINDS`."""
    bucket: int
    files: tuple[FileIdentity, ...]
    detail: str

    @property
    def bytes(self) -> int:
        """Bytes the bucket's files occupy (what a repair frees)."""
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready description."""
        return {
            "kind": self.kind,
            "description": PROBLEM_KINDS[self.kind],
            "bucket": self.bucket,
            "files": [f.name for f in self.files],
            "bytes": self.bytes,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class ForeignFile:
    """A directory entry that is not Mooncake's; listed, never touched."""

    name: str
    bytes: int
    type: str
    """``file``, ``dir``, ``symlink`` or ``other``."""

    def to_json(self) -> dict[str, object]:
        """A JSON-ready description."""
        return {"name": self.name, "bytes": self.bytes, "type": self.type}


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
    findings: list[Finding] = field(default_factory=list)
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


def _entry_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _list_directory(
    path: Path, fs: FileSystem
) -> tuple[dict[str, dict[str, FileIdentity]], list[ForeignFile]]:
    """Group Mooncake's regular files by stem; everything else is foreign."""
    pairs: dict[str, dict[str, FileIdentity]] = {}
    foreign: list[ForeignFile] = []
    for name in sorted(fs.listdir(os.fspath(path))):
        try:
            st = fs.stat(os.fspath(path / name))
        except FileNotFoundError:
            continue  # vanished since the listing: nothing to report
        parsed = parse_name(name)
        if parsed is None or not stat.S_ISREG(st.st_mode):
            foreign.append(ForeignFile(name, st.st_size, _entry_type(st.st_mode)))
            continue
        stem, kind = parsed
        pairs.setdefault(stem, {})[kind] = FileIdentity.of(name, st)
    return pairs, foreign


class _Broken(Exception):
    """Internal: a bucket failed a check (kind, detail)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _check_meta_shape(meta: BucketMetadata, data_size: int) -> None:
    """Checks that need only the meta and the data file's length."""
    if meta.data_size == 0 or not meta.keys or not meta.metadatas:
        raise _Broken("invalid_meta", "meta records no objects (Mooncake drops such buckets)")
    if len(meta.keys) != len(meta.metadatas):
        raise _Broken("list_length_mismatch", f"{len(meta.keys)} keys but {len(meta.metadatas)} object metadatas")
    for i, (key, obj) in enumerate(zip(meta.keys, meta.metadatas)):
        if obj.end > data_size:
            raise _Broken(
                "object_past_end",
                f"object {i} ({_show(key)}) ends at byte {obj.end}, data file has {data_size} bytes",
            )
        if obj.key_size != len(key):
            raise _Broken("key_mismatch", f"object {i} ({_show(key)}) records key_size {obj.key_size}, key has {len(key)} bytes")
    if data_size < meta.data_size:
        raise _Broken("short_data", f"data file has {data_size} bytes, meta records {meta.data_size}")


def _check_stored_keys(fs: FileSystem, data_path: str, meta: BucketMetadata) -> None:
    """Compare the key bytes stored before each value with the meta's keys."""
    fd = fs.open(data_path, os.O_RDONLY)
    try:
        for i, (key, obj) in enumerate(zip(meta.keys, meta.metadatas)):
            stored = bytearray(obj.key_size)
            got = fs.read_into(fd, memoryview(stored), obj.offset)
            if got != obj.key_size or stored != key:
                raise _Broken("key_mismatch", f"object {i}: stored key bytes differ from {_show(key)}")
    finally:
        fs.close(fd)


def _check_bucket(path: Path, stem: str, files: dict[str, FileIdentity], fs: FileSystem, verify_keys: bool) -> MooncakeBucket:
    """Validate one bucket pair; raise :class:`_Broken` naming the first failure."""
    meta_file, data_file = files.get("meta"), files.get("bucket")
    if meta_file is None:
        raise _Broken("orphan_data", "no meta: left by a crash between the data and the meta write")
    if data_file is None:
        raise _Broken("meta_without_data", "no data file")
    if meta_file.size == 0:
        raise _Broken("invalid_meta", "meta is empty")
    try:
        meta = decode_meta(fs.read_file(os.fspath(path / meta_file.name)))
    except MooncakeMetaError as exc:
        raise _Broken("invalid_meta", str(exc)) from None
    _check_meta_shape(meta, data_file.size)
    if verify_keys:
        _check_stored_keys(fs, os.fspath(path / data_file.name), meta)
    return MooncakeBucket(int(stem), stem, meta, data_file, meta_file)


def scan_mooncake(
    path: str | os.PathLike[str],
    fs: FileSystem | None = None,
    *,
    verify_keys: bool = True,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> MooncakeScan:
    """Check a Mooncake bucket directory without changing anything.

    Reports, as :class:`Finding`: data files without a meta, metas without a
    data file, metas that do not parse (or record no objects), metas whose
    ``keys`` and ``metadatas`` differ in length, objects reaching past the end
    of the data file, stored key bytes that differ from the meta's key (when
    ``verify_keys``), and data files shorter than the meta's ``data_size``.
    ``progress`` may wrap the iteration over bucket stems (a tqdm bar).
    Raises :class:`InvalidArgument` if ``path`` is not a directory, and lets
    an ``OSError`` of the directory listing propagate.
    """
    fs = fs or FileSystem()
    root = Path(path)
    if not root.is_dir():
        raise InvalidArgument(f"{os.fspath(root)!r} is not a directory")
    pairs, foreign = _list_directory(root, fs)
    scan = MooncakeScan(root, foreign=foreign)
    stems: Iterable[str] = sorted(pairs, key=lambda s: (int(s), s))
    for stem in progress(stems) if progress else stems:
        files = pairs[stem]
        identities = tuple(files[k] for k in ("bucket", "meta") if k in files)
        try:
            scan.buckets.append(_check_bucket(root, stem, files, fs, verify_keys))
        except _Broken as broken:
            scan.findings.append(Finding(broken.kind, int(stem), identities, broken.detail))
        except OSError as exc:  # unreadable: report it, a repair removes it like Mooncake would
            scan.findings.append(Finding("invalid_meta", int(stem), identities, f"cannot read: {exc.strerror or exc}"))
    return scan


def source_key(raw: bytes) -> str:
    """A Mooncake key as text: UTF-8, with invalid bytes as ``\\xNN`` escapes."""
    return raw.decode("utf-8", "backslashreplace")


def _show(key: bytes) -> str:
    """A quoted, printable form of a raw key for messages."""
    return repr(source_key(key))


# ---------------------------------------------------------------------------
# Repair
# ---------------------------------------------------------------------------


@dataclass
class RepairResult:
    """What :func:`repair_mooncake` did."""

    removed: list[str] = field(default_factory=list)
    """Files that left the directory (deleted, or moved to ``quarantine/``)."""
    freed_bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """``(file name, reason)`` for files left in place (changed since the scan)."""

    @property
    def complete(self) -> bool:
        """True when every reported file was removed."""
        return not self.skipped

    def to_json(self) -> dict[str, object]:
        """A JSON-ready description."""
        return {
            "removed": self.removed,
            "freed_bytes": self.freed_bytes,
            "skipped": [{"file": name, "reason": why} for name, why in self.skipped],
        }


def _unchanged(fs: FileSystem, path: str, identity: FileIdentity) -> bool:
    """Whether ``path`` is still the file the scan saw (guards against a
    Mooncake process that wrote or replaced it since)."""
    try:
        st = fs.stat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and FileIdentity.of(identity.name, st) == identity


def repair_mooncake(scan: MooncakeScan, fs: FileSystem | None = None, *, quarantine: bool = False) -> RepairResult:
    """Remove (or move to ``quarantine/``) the files of every broken bucket in ``scan``.

    Only files listed in the scan's findings are touched, and each only if it
    is unchanged since the scan; anything else is left and reported in
    :attr:`RepairResult.skipped`. Valid buckets and foreign files are never
    touched. Stop Mooncake before repairing its directory: it takes no lock,
    and a bucket it is writing looks like an orphan.
    """
    fs = fs or FileSystem()
    result = RepairResult()
    # Mooncake's Init walks sub-directories too and deletes ``*.bucket`` files
    # it finds there, so quarantined files get a ``.quarantined`` suffix.
    folder = quarantine_folder(fs, os.fspath(scan.path)) if quarantine and scan.findings else None
    for finding in scan.findings:
        for identity in finding.files:
            path = os.fspath(scan.path / identity.name)
            if not _unchanged(fs, path, identity):
                result.skipped.append((identity.name, "changed since the scan"))
                continue
            if folder is not None:
                move_to_quarantine(fs, path, folder, QUARANTINE_SUFFIX)
            else:
                fs.unlink(path)
            log.info("removed %s (%s, %d bytes)", identity.name, finding.kind, identity.size)
            result.removed.append(identity.name)
            result.freed_bytes += identity.size
    if result.removed:
        fs.fsync_dir(os.fspath(scan.path))
        if folder is not None:
            fs.fsync_dir(folder)
    return result


# ---------------------------------------------------------------------------
# Reading and importing
# ---------------------------------------------------------------------------


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
    skipped_buckets: list[Finding] = field(default_factory=list)
    """Broken source buckets (see :func:`scan_mooncake`); none of their objects is imported."""

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
    from ._core.format import MAX_KEY_BYTES

    key = raw if keep_tenant else split_tenant(raw)[1]
    if not key:
        return None, "empty user key"
    if len(key) > MAX_KEY_BYTES:
        return None, f"key longer than {MAX_KEY_BYTES} bytes"
    try:
        return key.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "key is not valid UTF-8"


class ImportTarget(Protocol):
    """The store calls :func:`import_mooncake` makes; a :class:`~kvbucket.BucketStore` has them all."""

    @property
    def config(self) -> BucketConfig: ...

    def batch_offload(self, objects: dict[str, memoryview]) -> int | None: ...

    def batch_exists(self, keys: Iterable[str]) -> list[bool]: ...


def import_mooncake(
    source: str | os.PathLike[str],
    store: ImportTarget,
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
    bucket: MooncakeBucket, data: bytearray, keep_tenant: bool, seen: set[str], store: ImportTarget, report: ImportReport
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
        raise CorruptionError(f"key {_show(key)} in Mooncake bucket {bucket.bucket_id}: stored bytes changed")
    return bytes(buf[obj.key_size :])



# ---------------------------------------------------------------------------
# Telling the formats apart
# ---------------------------------------------------------------------------


@dataclass
class FormatEvidence:
    """What a directory holds that tells a kvbucket store from a Mooncake one."""

    path: str
    kvbucket_lock: bool = False
    """``LOCK`` is a regular file with a valid kvbucket slot (a store's identity)."""
    kvbucket_metas: list[str] = field(default_factory=list)
    """Metas that start with kvbucket's magic."""
    mooncake_metas: list[str] = field(default_factory=list)
    """Metas that parse as non-empty Mooncake metas."""
    bucket_files: list[str] = field(default_factory=list)
    """Every regular file named like a bucket's data or meta file (either engine)."""

    @property
    def format(self) -> str:
        """``"kvbucket"`` or ``"mooncake"`` when only that engine's evidence is
        present; ``"unknown"`` when both are, or neither but there are bucket
        files (all metas unreadable); ``"none"`` for a directory with nothing
        of either (empty, or only other files)."""
        kvbucket = self.kvbucket_lock or bool(self.kvbucket_metas)
        mooncake = bool(self.mooncake_metas)
        if kvbucket != mooncake:
            return "kvbucket" if kvbucket else "mooncake"
        return "unknown" if kvbucket or self.bucket_files else "none"

    def describe(self) -> str:
        """The evidence in words, for an error message."""
        parts = []
        if self.kvbucket_lock:
            parts.append("a kvbucket LOCK")
        if self.kvbucket_metas:
            parts.append(f"{len(self.kvbucket_metas)} kvbucket meta(s)")
        if self.mooncake_metas:
            parts.append(f"{len(self.mooncake_metas)} Mooncake meta(s)")
        if not parts:
            parts.append(f"{len(self.bucket_files)} bucket file(s) whose format no meta tells" if self.bucket_files else "no bucket files")
        return ", ".join(parts)


_DETECT_READ_LIMIT = 64 << 20
"""Metas larger than this are not read to detect a format (no valid meta of
either engine is near it)."""


def format_evidence(path: str | os.PathLike[str], fs: FileSystem | None = None) -> FormatEvidence:
    """Read (never write) what tells the engines apart in ``path``: the
    ``LOCK`` and every meta, stopping early only once both engines' evidence
    is found."""
    from ._core.format import META_MAGIC
    from ._core.format import parse_name as kv_name
    from ._core.lockfile import lock_identifies_store

    fs = fs or FileSystem()
    root = os.fspath(path)
    evidence = FormatEvidence(root, kvbucket_lock=lock_identifies_store(fs, root))
    for name in sorted(fs.listdir(root)):
        parsed = parse_name(name)
        if parsed is None and kv_name(name) is None:
            continue
        full = os.path.join(root, name)
        try:
            st = fs.stat(full)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        evidence.bucket_files.append(name)
        if parsed is None or parsed[1] != "meta":
            continue
        if evidence.mooncake_metas and (evidence.kvbucket_lock or evidence.kvbucket_metas):
            continue  # both engines seen: the verdict cannot change
        try:  # the magic alone tells a kvbucket meta: its body is not read
            if _read_head(fs, full, len(META_MAGIC)) == META_MAGIC:
                kind = "kvbucket"
            elif st.st_size > _DETECT_READ_LIMIT:
                continue  # too large to be a Mooncake meta worth reading
            else:
                kind = meta_kind(fs.read_file(full))
        except OSError:
            continue
        if kind == "kvbucket":
            evidence.kvbucket_metas.append(name)
        elif kind == "mooncake":
            evidence.mooncake_metas.append(name)
    return evidence


def _read_head(fs: FileSystem, path: str, size: int) -> bytes:
    """The first ``size`` bytes of the file ``path`` (fewer if it is shorter)."""
    fd = fs.open(path, os.O_RDONLY)
    try:
        buf = bytearray(size)
        return bytes(buf[: fs.read_into(fd, memoryview(buf), 0)])
    finally:
        fs.close(fd)


def detect_format(path: str | os.PathLike[str], fs: FileSystem | None = None) -> str:
    """Which engine wrote the directory ``path``: ``"kvbucket"``,
    ``"mooncake"``, ``"unknown"`` (both, or bucket files that no meta
    identifies) or ``"none"`` (see :attr:`FormatEvidence.format`)."""
    return format_evidence(path, fs).format
