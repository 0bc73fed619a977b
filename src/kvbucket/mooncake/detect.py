"""Telling a kvbucket store from a Mooncake bucket directory, by what is in it.

Both engines name their files ``<id>.bucket`` and ``<id>.meta``; only the
content tells them apart: kvbucket's ``LOCK`` slot and meta magic, or a meta
that parses as Mooncake's protobuf. Nothing here writes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from .._core.format import META_MAGIC, parse_name
from .._core.fs import FileSystem
from .._core.lockfile import lock_identifies_store
from .wire import MooncakeMetaError, decode_bucket_meta, parse_file_name

__all__ = ["meta_kind", "FormatEvidence", "format_evidence", "detect_format"]


def meta_kind(raw: bytes) -> str:
    """Classify the first bytes of a ``.meta`` file: ``"kvbucket"`` (our magic),
    ``"mooncake"`` (a non-empty, parseable Mooncake meta) or ``"unknown"``."""
    if raw.startswith(META_MAGIC):
        return "kvbucket"
    try:
        meta = decode_bucket_meta(raw)
    except MooncakeMetaError:
        return "unknown"
    return "mooncake" if meta.keys and meta.metadatas else "unknown"


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
    fs = fs or FileSystem()
    root = os.fspath(path)
    evidence = FormatEvidence(root, kvbucket_lock=lock_identifies_store(fs, root))
    for name in sorted(fs.listdir(root)):
        parsed = parse_file_name(name)
        if parsed is None and parse_name(name) is None:
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
