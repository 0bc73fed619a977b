"""The stores a user would pick instead of kvbucket, behind one small interface.

Each peer stores the same objects (key -> bytes) the way its project does, so
the suite can time them on the same bytes as kvbucket:

* ``hicache_file``: one file per key, SGLang ``HiCacheFile`` style (0.5.23):
  write to ``.<uuid>.tmp``, ``os.replace`` to ``<key>_<suffix>.bin``, no fsync;
  reads one file after another with ``readinto`` (SGLang's ``batch_get`` is a
  plain loop); ``exists`` is ``os.path.exists``.
* ``lmcache_disk``: one file per key, LMCache ``LocalDiskBackend`` style
  (0.5.6): a thread pool writes ``<key>.pt`` in place (no tmp, no fsync) and
  reads with ``readinto``; ``exists`` is its in-memory dict (which, unlike
  ours, does not survive a restart).
* ``lmdb``: py-lmdb, one write transaction per bucket-sized batch, default
  ``sync=True`` (durable, so it compares with kvbucket "strict"), reads in a
  thread pool with ``buffers=True`` and one copy into the destination.
* ``rocksdb``: rocksdict in raw mode, one ``WriteBatch`` per bucket-sized
  batch, default options (WAL written, not synced), reads in a thread pool.
* ``diskcache``: ``diskcache.Cache`` defaults (values over 32 KiB go to their
  own file, SQLite index), ``set`` one by one, reads in a thread pool through
  ``get(read=True)`` + ``readinto``.

Every peer reopens its store before the cold read (so nothing is served from
a memtable or a Python-side cache) and is given the same destination buffers.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import uuid
from collections.abc import Sequence

__all__ = ["Peer", "PEERS", "make_peer"]

Items = Sequence[tuple[str, memoryview]]


class Peer:
    """A key-value store under test. Subclasses fill in the operations."""

    name = "peer"
    durable = False
    """Whether a returned write survives power loss (it fsyncs)."""
    description = ""

    def __init__(self, root: str, pool: cf.ThreadPoolExecutor, total_bytes: int) -> None:
        self.root = root
        self.pool = pool
        self.total_bytes = total_bytes
        os.makedirs(root, exist_ok=True)
        self.open()

    def open(self) -> None:
        """Open (or reopen) the store at ``self.root``."""

    def close(self) -> None:
        """Close the store (flushing whatever it buffers)."""

    def write(self, items: Items) -> None:
        """Store one bucket-sized batch of ``(key, value)`` pairs."""
        raise NotImplementedError

    def read(self, items: Items) -> None:
        """Fill each destination buffer with its key's value."""
        raise NotImplementedError

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is stored."""
        raise NotImplementedError

    def reopen(self) -> None:
        """Close and open again (before a cold read)."""
        self.close()
        self.open()

    def destroy(self) -> None:
        """Close and delete everything under ``root``."""
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _parallel(self, fn, items: Items) -> None:
        for f in [self.pool.submit(fn, k, v) for k, v in items]:
            f.result()


def _readinto_file(path: str, dest: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        got = f.readinto(dest)
    if got != len(dest):
        raise OSError(f"short read of {path}: {got} of {len(dest)} bytes")


class HiCacheFilePeer(Peer):
    """SGLang ``HiCacheFile``: file per key, tmp + ``os.replace``, no fsync, serial."""

    name = "hicache_file"
    description = "file per key, tmp + os.replace, no fsync, serial (SGLang HiCacheFile)"
    suffix = "_model_0_1"

    def _path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}{self.suffix}.bin")

    def write(self, items: Items) -> None:
        for key, value in items:
            tmp = os.path.join(self.root, f".{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(value)
            os.replace(tmp, self._path(key))

    def read(self, items: Items) -> None:
        for key, dest in items:
            _readinto_file(self._path(key), dest)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        return [os.path.exists(self._path(k)) for k in keys]


class LMCacheDiskPeer(Peer):
    """LMCache ``LocalDiskBackend``: file per key, in place, thread pool, no fsync."""

    name = "lmcache_disk"
    description = "file per key, written in place by a thread pool, no fsync (LMCache LocalDiskBackend)"

    def open(self) -> None:
        self.index: dict[str, int] = getattr(self, "index", {})

    def _path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}.pt")

    def _put(self, key: str, value: memoryview) -> None:
        with open(self._path(key), "wb") as f:
            f.write(value)
        self.index[key] = len(value)

    def write(self, items: Items) -> None:
        self._parallel(self._put, items)

    def read(self, items: Items) -> None:
        self._parallel(lambda k, d: _readinto_file(self._path(k), d), items)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        index = self.index
        return [k in index for k in keys]


class LMDBPeer(Peer):
    """py-lmdb, default durability (``sync=True``): one transaction per batch."""

    name = "lmdb"
    durable = True
    description = "LMDB (py-lmdb), one txn per bucket, sync=True (durable), parallel readers"

    def open(self) -> None:
        import lmdb

        self.env = lmdb.open(self.root, map_size=2 * self.total_bytes + (256 << 20), readahead=False,
                             max_readers=max(126, 4 * (self.pool._max_workers + 2)))

    def close(self) -> None:
        self.env.close()

    def write(self, items: Items) -> None:
        with self.env.begin(write=True) as txn:
            for key, value in items:
                txn.put(key.encode(), value)

    def _get(self, key: str, dest: memoryview) -> None:
        with self.env.begin(buffers=True) as txn:
            dest[:] = txn.get(key.encode())

    def read(self, items: Items) -> None:
        self._parallel(self._get, items)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        with self.env.begin(buffers=True) as txn:
            return [txn.get(k.encode()) is not None for k in keys]


class RocksDBPeer(Peer):
    """RocksDB through rocksdict (raw mode, default options: WAL not synced)."""

    name = "rocksdb"
    description = "RocksDB (rocksdict raw mode), one WriteBatch per bucket, WAL not synced, parallel reads"

    def open(self) -> None:
        from rocksdict import Options, Rdict

        self.db = Rdict(self.root, Options(raw_mode=True))

    def close(self) -> None:
        self.db.close()

    def write(self, items: Items) -> None:
        from rocksdict import WriteBatch

        wb = WriteBatch(raw_mode=True)
        for key, value in items:
            wb.put(key.encode(), bytes(value))
        self.db.write(wb)

    def _get(self, key: str, dest: memoryview) -> None:
        dest[:] = self.db.get(key.encode())

    def read(self, items: Items) -> None:
        self._parallel(self._get, items)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        db = self.db
        return [k.encode() in db for k in keys]


class DiskCachePeer(Peer):
    """``diskcache.Cache`` with its defaults (values > 32 KiB in their own files)."""

    name = "diskcache"
    description = "diskcache.Cache defaults: SQLite index + file per value, no fsync, parallel reads"

    def open(self) -> None:
        import diskcache

        self.cache = diskcache.Cache(self.root, size_limit=4 * self.total_bytes + (1 << 30))

    def close(self) -> None:
        self.cache.close()

    def write(self, items: Items) -> None:
        for key, value in items:
            self.cache.set(key, bytes(value))

    def _get(self, key: str, dest: memoryview) -> None:
        handle = self.cache.get(key, read=True)
        with handle:
            got = handle.readinto(dest)
        if got != len(dest):
            raise OSError(f"diskcache short read of {key}")

    def read(self, items: Items) -> None:
        self._parallel(self._get, items)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        cache = self.cache
        return [k in cache for k in keys]


PEERS: dict[str, type[Peer]] = {
    cls.name: cls for cls in (HiCacheFilePeer, LMCacheDiskPeer, LMDBPeer, RocksDBPeer, DiskCachePeer)
}


def make_peer(name: str, root: str, pool: cf.ThreadPoolExecutor, total_bytes: int) -> Peer:
    """Build the peer called ``name`` over the directory ``root``."""
    return PEERS[name](root, pool, total_bytes)
