"""Small helpers shared by the store tests."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def value_for(key: str, size: int) -> bytes:
    """Deterministic bytes for ``key``, so any reader can check them."""
    seed = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return (seed * (size // len(seed) + 1))[:size]


def snapshot(directory: str | os.PathLike[str]) -> dict[str, str]:
    """Every file below ``directory`` (relative name -> sha256 of its bytes)."""
    root = Path(directory)
    if not root.exists():
        return {}
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(root.rglob("*"))
    }


def our_files(directory: str | os.PathLike[str]) -> list[str]:
    """Names in the store directory other than LOCK."""
    return sorted(name for name in os.listdir(directory) if name != "LOCK")


def du(path: str | os.PathLike[str]) -> int:
    """Allocated bytes of ``path`` and everything below it, as ``du`` counts them."""
    total = os.lstat(path).st_blocks * 512
    with os.scandir(path) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            total += du(entry.path) if stat.S_ISDIR(st.st_mode) else st.st_blocks * 512
    return total
