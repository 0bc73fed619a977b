"""Measuring a store directory's real disk usage the way ``du`` and a kubelet do.

Invariants: links are never followed (``stat`` without following), the walk
is iterative (any depth), an entry that vanishes during the walk is skipped,
and a sub-directory or entry below the store's own listing that cannot be
listed or stat'ed is *unmeasurable*: its path is reported and only what could
be seen is counted. Failing to list or stat the store directory itself, or an
entry of its listing, is an error (nothing can be said about the store).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .format import LOCK_NAME, QUARANTINE_DIR, parse_name
from .fs import FileSystem

__all__ = ["PhysicalUsage", "measure_store", "is_store_entry"]

T = TypeVar("T")


@dataclass
class PhysicalUsage:
    """What :func:`measure_store` found."""

    total: int = 0
    """Allocated bytes (``st_blocks * 512``) counted, the directory's own included."""
    foreign: int = 0
    """The part of ``total`` under foreign entries (0 when they were not walked)."""
    unmeasurable: list[str] = field(default_factory=list)
    """Paths that could not be listed or stat'ed (their content is not counted)."""


def is_store_entry(name: str, st: os.stat_result) -> bool:
    """Whether a store directory entry is the store's own: a regular file with
    one of the store's names (buckets, metas, temporaries, ``LOCK``) or the
    ``quarantine`` directory. Anything else is foreign."""
    if name == QUARANTINE_DIR:
        return stat.S_ISDIR(st.st_mode)
    return stat.S_ISREG(st.st_mode) and (name == LOCK_NAME or parse_name(name) is not None)


def measure_store(fs: FileSystem, path: str, *, foreign: bool = True) -> PhysicalUsage:
    """Allocated bytes of the store directory ``path`` and everything below
    it; with ``foreign=False`` only the directory itself and the store's own
    entries (foreign entries are neither walked nor counted)."""
    usage = PhysicalUsage(total=fs.stat(path).st_blocks * 512)
    for name in fs.listdir(path):
        child = os.path.join(path, name)
        try:
            st = fs.stat(child)
        except FileNotFoundError:
            continue
        own = is_store_entry(name, st)
        if not own and not foreign:
            continue
        size = _measure_tree(fs, child, st, usage)
        usage.total += size
        if not own:
            usage.foreign += size
    return usage


def _measure_tree(fs: FileSystem, path: str, st: os.stat_result, usage: PhysicalUsage) -> int:
    """Allocated bytes of ``path`` (already stat'ed as ``st``) and, for a
    directory, of everything below it; what cannot be read goes to
    ``usage.unmeasurable``."""
    total = st.st_blocks * 512
    pending = [path] if stat.S_ISDIR(st.st_mode) else []
    while pending:
        directory = pending.pop()
        names = _attempt(fs.listdir, directory, usage)
        for name in names or ():
            child = os.path.join(directory, name)
            child_st = _attempt(fs.stat, child, usage)
            if child_st is None:
                continue
            total += child_st.st_blocks * 512
            if stat.S_ISDIR(child_st.st_mode):
                pending.append(child)
    return total


def _attempt(call: Callable[[str], T], path: str, usage: PhysicalUsage) -> T | None:
    """``call(path)``; None when ``path`` vanished or cannot be read (then
    it is listed in ``usage.unmeasurable``)."""
    try:
        return call(path)
    except FileNotFoundError:
        return None
    except OSError:
        usage.unmeasurable.append(path)
        return None
