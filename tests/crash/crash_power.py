"""Disk states a power cut could leave, rebuilt from a :class:`RecordingFS` log.

The persistence model (ALICE's abstract model, as SQLite's crash VFS and
RocksDB's FaultInjectionTestFS apply it), for a cut after the first ``k``
logged operations:

* a file's writes and truncations up to its last ``fsync``/``fdatasync``
  are on disk; each later one is independently **absent**, **full**,
  **zero** (the size reached the disk, the data did not: the appended bytes
  read as zeros) or **torn** (a prefix, in whole 512-byte sectors);
* directory operations (create, rename, unlink) up to the last directory
  fsync are on disk; the later ones survive either as an in-order prefix
  (the "ordered" model, ext4-like) or as any subset (the "reorder" model,
  pessimistic, btrfs-like). A syncing a file does not make its name durable.

Every crash point also gets the extreme states (everything unsynced lost;
everything kept; data kept with no directory change; directory changes kept
with no data), then random ones. States that materialise to the same files
(with the same acknowledged operations) are checked once.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

SECTOR = 512
WRITE_MODES = ("absent", "full", "zero", "torn")


@dataclass
class CrashPoint:
    """What is durable and what is pending after the first ``k`` log entries."""

    k: int
    names: dict[str, int]  # durable directory: name -> ino
    content: dict[int, bytes]  # durable content per inode
    pending_data: list[tuple]  # ("write", ino, off, data) / ("trunc", ino, size), in order
    pending_dir: list[tuple]  # ("create", name, ino) / ("rename", s, d, ino) / ("unlink", name, ino)
    events: list  # workload marks before k


@dataclass
class CrashState:
    point: CrashPoint
    data_choice: tuple  # per pending data op: (mode, torn_len)
    dir_choice: tuple  # indices of pending dir ops that survive
    label: str
    files: dict[str, bytes] = field(default_factory=dict)

    def describe(self) -> str:
        data = ", ".join(
            f"{op[0]}(ino {op[1]}{', @' + str(op[2]) + '+' + str(len(op[3])) if op[0] == 'write' else ''})={choice[0]}"
            + (f":{choice[1]}" if choice[0] == "torn" else "")
            for op, choice in zip(self.point.pending_data, self.data_choice)
        )
        dirs = ", ".join(
            f"{'+' if i in self.dir_choice else '-'}{op[0]}({', '.join(map(str, op[1:-1]))})"
            for i, op in enumerate(self.point.pending_dir)
        )
        return f"cut after log entry {self.point.k} [{self.label}] data: [{data}] dir: [{dirs}] files: {sorted(self.files)}"


def _apply_data(content: bytearray, op: tuple, mode: str, torn_len: int = 0) -> None:
    if op[0] == "trunc":
        if mode != "absent":
            del content[op[2] :]
        return
    _, _ino, offset, data = op
    if mode == "absent":
        return
    if mode == "torn":
        data = data[:torn_len]
    elif mode == "zero":
        # the size reached the disk, the new bytes did not: bytes past the old
        # end read as zeros, bytes inside keep their old content
        old_end = len(content)
        end = offset + len(data)
        if end > old_end:
            content.extend(b"\0" * (end - old_end))
        return
    end = offset + len(data)
    if end > len(content):
        content.extend(b"\0" * (end - len(content)))
    content[offset:end] = data


def _apply_dir(names: dict[str, int], op: tuple) -> None:
    if op[0] == "create":
        names[op[1]] = op[2]
    elif op[0] == "rename":
        _, src, dst, ino = op
        if names.get(src) == ino:
            del names[src]
        names[dst] = ino
    elif op[0] == "unlink":
        _, name, ino = op
        if names.get(name) == ino:
            del names[name]


def crash_points(base: dict[str, tuple[int, bytes]], log: list[tuple]) -> Iterator[CrashPoint]:
    """Every op boundary ``k`` of ``log`` (0..len), with durable and pending parts."""
    names0 = {name: ino for name, (ino, _) in base.items()}
    content0 = {ino: data for ino, data in base.values()}
    for k in range(len(log) + 1):
        prefix = log[:k]
        last_dirsync = max((i for i, e in enumerate(prefix) if e[0] == "dirsync"), default=-1)
        last_sync: dict[int, int] = {}
        for i, e in enumerate(prefix):
            if e[0] == "sync":
                last_sync[e[1]] = i
        names = dict(names0)
        content = {ino: bytearray(data) for ino, data in content0.items()}
        pending_data, pending_dir, events = [], [], []
        for i, e in enumerate(prefix):
            kind = e[0]
            if kind == "mark":
                events.append(e[1])
            elif kind in ("create", "rename", "unlink"):
                if i < last_dirsync:
                    _apply_dir(names, e)
                else:
                    pending_dir.append(e)
                if kind == "create":
                    content.setdefault(e[2], bytearray())
            elif kind in ("write", "trunc"):
                content.setdefault(e[1], bytearray())
                if i < last_sync.get(e[1], -1):
                    _apply_data(content[e[1]], e, "full")
                else:
                    pending_data.append(e)
        yield CrashPoint(k, names, {i: bytes(c) for i, c in content.items()}, pending_data, pending_dir, events)


def _torn_lengths(op: tuple) -> list[int]:
    if op[0] != "write":
        return []
    size = len(op[3])
    return list(range(SECTOR, size, SECTOR))


def materialise(point: CrashPoint, data_choice: tuple, dir_choice: tuple) -> dict[str, bytes]:
    names = dict(point.names)
    for i in sorted(dir_choice):
        _apply_dir(names, point.pending_dir[i])
    wanted = set(names.values())
    content = {ino: bytearray(point.content.get(ino, b"")) for ino in wanted}
    for op, (mode, torn_len) in zip(point.pending_data, data_choice):
        ino = op[1]
        if ino in content:
            _apply_data(content[ino], op, mode, torn_len)
    return {name: bytes(content[ino]) for name, ino in names.items()}


def _random_data_choice(point: CrashPoint, rng: random.Random) -> tuple:
    out = []
    for op in point.pending_data:
        torn = _torn_lengths(op)
        modes = [m for m in WRITE_MODES if m != "torn" or torn]
        if op[0] == "trunc":
            modes = ["absent", "full"]
        mode = rng.choice(modes)
        out.append((mode, rng.choice(torn) if mode == "torn" else 0))
    return tuple(out)


def _random_dir_choice(point: CrashPoint, rng: random.Random) -> tuple:
    n = len(point.pending_dir)
    if rng.random() < 0.5:
        return tuple(range(rng.randint(0, n)))  # ordered: a prefix
    return tuple(i for i in range(n) if rng.random() < 0.5)  # reordered: any subset


def states_at(point: CrashPoint, rng: random.Random, n_random: int, exhaustive_limit: int = 0) -> Iterator[CrashState]:
    """Candidate disk states for one crash point (duplicates included)."""
    nd, nr = len(point.pending_data), len(point.pending_dir)
    none_d = tuple(("absent", 0) for _ in range(nd))
    all_d = tuple(("full", 0) for _ in range(nd))
    all_r = tuple(range(nr))
    yield CrashState(point, none_d, (), "all unsynced lost")
    yield CrashState(point, all_d, all_r, "all unsynced kept")
    yield CrashState(point, all_d, (), "data kept, dir ops lost")
    yield CrashState(point, none_d, all_r, "dir ops kept, data lost")
    zero_d = tuple(("zero", 0) if op[0] == "write" else ("full", 0) for op in point.pending_data)
    yield CrashState(point, zero_d, all_r, "writes zero-filled, dir ops kept")
    torn_d = tuple(
        ("torn", min(4096, len(op[3]) - SECTOR) // SECTOR * SECTOR) if _torn_lengths(op) else ("full", 0)
        for op in point.pending_data
    )
    yield CrashState(point, torn_d, all_r, "writes torn at 4 KiB, dir ops kept")
    for p in range(1, nr):
        yield CrashState(point, all_d, tuple(range(p)), f"dir ops prefix {p}")
    if exhaustive_limit:
        per_op = []
        for op in point.pending_data:
            if op[0] == "trunc":
                per_op.append([("absent", 0), ("full", 0)])
            else:
                torn = _torn_lengths(op)
                choices = [("absent", 0), ("full", 0), ("zero", 0)]
                if torn:
                    choices.append(("torn", torn[len(torn) // 2]))
                per_op.append(choices)
        dir_subsets = [tuple(i for i in range(nr) if mask >> i & 1) for mask in range(1 << nr)] if nr <= 8 else None
        total = 1
        for choices in per_op:
            total *= len(choices)
        total *= len(dir_subsets) if dir_subsets is not None else exhaustive_limit + 1
        if dir_subsets is not None and total <= exhaustive_limit:
            for data in itertools.product(*per_op):
                for dirs in dir_subsets:
                    yield CrashState(point, tuple(data), dirs, "exhaustive")
            return
    for _ in range(n_random):
        yield CrashState(point, _random_data_choice(point, rng), _random_dir_choice(point, rng), "random")


def fingerprint(files: dict[str, bytes], extra: object) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(extra).encode())
    for name in sorted(files):
        h.update(name.encode() + b"\0" + len(files[name]).to_bytes(8, "little"))
        h.update(hashlib.blake2b(files[name], digest_size=16).digest())
    return h.digest()


def write_state(directory: str, files: dict[str, bytes]) -> None:
    os.makedirs(directory)
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
