"""Measuring a directory's real disk usage the way ``du`` and a kubelet do."""

from __future__ import annotations

import os
import stat

from .fs import FileSystem

__all__ = ["measure_directory"]


def measure_directory(fs: FileSystem, path: str) -> int:
    """Allocated bytes (``st_blocks * 512``) of ``path`` and everything below
    it, links not followed. Files that vanish during the walk are skipped."""
    total = fs.stat(path).st_blocks * 512
    for name in fs.listdir(path):
        child = os.path.join(path, name)
        try:
            st = fs.stat(child)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            total += measure_directory(fs, child)
        else:
            total += st.st_blocks * 512
    return total
