"""Repairing a Mooncake bucket directory: removing the files of its broken buckets.

Invariants: :func:`repair_mooncake` removes only the files of buckets that
the scan reported as broken, and only if a file is still the one that was
scanned (same inode, size and modification time). Every unlink and move
goes through :class:`~kvbucket._core.fs.FileSystem`, and the directory is
fsynced afterwards. A repair that fails part-way has removed some of the
files and left the others where they were: a new scan reports what remains,
and a second repair finishes.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field

from .._core.fs import FileSystem
from .._core.quarantine import move_to_quarantine, quarantine_folder
from .scan import FileIdentity, MooncakeScan

__all__ = ["QUARANTINE_SUFFIX", "RepairResult", "repair_mooncake"]

log = logging.getLogger(__name__)

QUARANTINE_SUFFIX = ".quarantined"
"""Added to quarantined names: Mooncake's Init walks sub-directories too and
deletes the ``*.bucket`` files it finds there."""


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
    and a bucket it is writing looks like an orphan. An ``OSError`` of the
    file system propagates; the files already removed stay removed.
    """
    fs = fs or FileSystem()
    result = RepairResult()
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
