"""Small helpers shared by the store tests."""

from __future__ import annotations

import hashlib
import os
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
