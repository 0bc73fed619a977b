"""The ``quarantine/`` folder: files a repair rejected, moved aside rather than deleted.

Invariants: files are moved only into a real directory of the store (not a
link, on the store's device), so a move never leaves the file system the
store is on and never lands outside the store; and a move never replaces
anything already in the folder (a hard link is made under a free name, then
the old name is removed).
"""

from __future__ import annotations

import os
import stat

from ..errors import ForeignEntry
from .format import QUARANTINE_DIR
from .fs import FileSystem

__all__ = ["quarantine_folder", "move_to_quarantine"]


def quarantine_folder(fs: FileSystem, directory: str) -> str:
    """``directory/quarantine``, created when missing; raises
    :class:`ForeignEntry` unless it is a directory on the store's device."""
    folder = os.path.join(directory, QUARANTINE_DIR)
    try:
        st = fs.stat(folder)
    except FileNotFoundError:
        fs.mkdir(folder)
        st = fs.stat(folder)
    store_device = fs.stat(os.path.join(directory, ".")).st_dev  # "." resolves a linked store path
    if not stat.S_ISDIR(st.st_mode):
        raise _unusable(folder, "is a symbolic link or not a directory")
    if st.st_dev != store_device:
        raise _unusable(folder, "is on another device than the store (a mount point?)")
    return folder


def move_to_quarantine(fs: FileSystem, path: str, folder: str, suffix: str = "") -> str:
    """Move the file ``path`` into ``folder`` as ``NAME+suffix``, or
    ``NAME.N+suffix`` with the first free ``N``; return the name it got.
    Nothing in ``folder`` is ever replaced."""
    name = os.path.basename(path)
    n = 0
    while True:
        candidate = f"{name}{suffix}" if n == 0 else f"{name}.{n}{suffix}"
        try:
            fs.link(path, os.path.join(folder, candidate))
        except FileExistsError:
            n += 1
            continue
        fs.unlink(path)
        return candidate


def _unusable(folder: str, what: str) -> ForeignEntry:
    return ForeignEntry(
        f"{folder} {what}; kvbucket moves rejected files only into a real directory "
        "of the store. Nothing was moved. Rename or remove it, or open without quarantine=True."
    )
