"""``kvbucket bench``: measure the raw disk, then kvbucket on the same workload.

The benchmark answers one question for a user on their own machine: *how close
to the disk does kvbucket run?* It therefore always measures a raw baseline
first, in the same process and on the same directory, and reports kvbucket as
a ratio to it:

* **write**: the same bytes written sequentially with the same sync points
  (one ``fdatasync`` per bucket of ``bucket_size`` bytes), by ``fio`` when it
  is installed, else by a minimal ``os.pwritev`` loop; then kvbucket's
  ``batch_offload`` of the same objects, one bucket per call.
* **cold random read**: the objects read in a random order, in batches of
  ``batch`` objects spread over ``threads`` workers (the same block size and
  parallelism), each batch finished before the next starts; by ``fio``
  (``psync``, ``threads`` jobs, each over its own slice of the file) or by a
  minimal ``os.preadv`` thread pool; then kvbucket's ``batch_load`` of the
  same batches into preallocated buffers.
* **async cold random read**: the same random batches through
  ``submit_load``, ``depth`` batches in flight (``io_threads`` = ``threads``,
  ``load_queue_depth`` = ``depth``), against ``threads`` Python threads that
  each ``os.preadv`` the next object of the same order with no barrier
  anywhere, so ``threads`` raw reads are in flight all the time.

The page cache is emptied before every read phase
(``/proc/sys/vm/drop_caches`` when permitted, else
``posix_fadvise(DONTNEED)`` on each file; ``direct`` mode bypasses it).

kvbucket is measured in every ``io_mode`` the configuration offers, the
default among them, with the default configuration otherwise (the bucket
geometry included); the raw baselines run buffered and with O_DIRECT. A mode
with no raw counterpart (one that picks per operation) is compared with the
faster raw mode, and so is the default in the ``*_default`` ratios.

Every figure is the median of ``repeats`` runs, with min and max; raw and
kvbucket alternate within each run so drift of a noisy disk hits both.
kvbucket's bytes are checked against the source after every pass, so a
figure never comes from a store that returned the wrong data.

The building blocks (:class:`Workload`, :func:`fio_write`, :func:`py_read`,
:func:`kv_offload`, ...) are public so the ``benchmarks/`` suite reuses them.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import mmap
import os
import platform
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .._core.format import MAX_BUCKET_KEYS, data_name
from ..config import BucketConfig, IOMode
from .version import installed_version

__all__ = [
    "Workload",
    "Source",
    "run",
    "format_report",
    "summarize",
    "make_cold",
    "fio_version",
    "fio_write",
    "fio_read",
    "py_write",
    "py_read",
    "py_read_pipelined",
    "raw_locations",
    "store_locations",
    "kv_offload",
    "kv_load",
    "kv_submit_load",
    "verify_loaded",
    "read_batches",
    "dest_views",
    "dest_sets",
    "kv_io_modes",
    "store_settings",
    "raw_io_modes",
    "machine_info",
]

MiB = 1 << 20
ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)
SOURCE_BYTES = 64 * MiB
"""Size of the random source pool that every value is a view of."""


# --------------------------------------------------------------------------
# Workload and data
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One benchmark shape: ``total_bytes`` of ``object_size`` objects.

    Objects are grouped ``per_bucket`` at a time (at most ``bucket_size``
    bytes, the store's ``bucket_size_limit``, and at most ``bucket_keys``
    objects, its ``bucket_keys_limit``); reads go in random batches of
    ``batch`` objects over ``threads`` workers, and asynchronous reads keep
    ``depth`` such batches in flight.
    """

    object_size: int = MiB
    total_bytes: int = 1 << 30
    threads: int = 16
    batch: int = 32
    bucket_size: int = 256 * MiB
    seed: int = 1
    depth: int = 4
    bucket_keys: int = MAX_BUCKET_KEYS

    @property
    def n_objects(self) -> int:
        """Objects in the workload (at least one)."""
        return max(1, self.total_bytes // self.object_size)

    @property
    def nbytes(self) -> int:
        """Bytes actually written: ``n_objects * object_size``."""
        return self.n_objects * self.object_size

    @property
    def per_bucket(self) -> int:
        """Objects per bucket."""
        return max(1, min(self.n_objects, self.bucket_size // self.object_size, self.bucket_keys))

    @property
    def write_block(self) -> int:
        """Bytes per raw write call: the object size, at least 1 MiB (the
        store coalesces small objects into large calls, so the raw writer
        gets the same benefit)."""
        return max(self.object_size, MiB)

    @property
    def direct_ok(self) -> bool:
        """Whether O_DIRECT can move these objects (4 KiB multiples)."""
        return O_DIRECT != 0 and self.object_size % ALIGN == 0

    def buckets(self) -> Iterator[range]:
        """Object indices, one range per bucket."""
        for start in range(0, self.n_objects, self.per_bucket):
            yield range(start, min(self.n_objects, start + self.per_bucket))


class Source:
    """A page-aligned pool of random bytes; object ``i`` is a view of it.

    Values are views (no copy, no per-object allocation), aligned for
    O_DIRECT; the pool is large enough that consecutive objects differ.
    """

    def __init__(self, object_size: int, pool_bytes: int = SOURCE_BYTES) -> None:
        count = max(2, pool_bytes // object_size)
        self.object_size = object_size
        self.size = count * object_size
        self._map = mmap.mmap(-1, self.size)
        rng = random.Random(0)
        for start in range(0, self.size, MiB):
            n = min(MiB, self.size - start)
            self._map[start : start + n] = rng.randbytes(n)
        self._view = memoryview(self._map)

    def value(self, i: int) -> memoryview:
        """The bytes of object ``i`` (a read-only view into the pool)."""
        start = (i * self.object_size) % self.size
        return self._view[start : start + self.object_size].toreadonly()

    def run(self, start: int, stop: int) -> list[memoryview]:
        """Views of objects ``start..stop-1``, for a raw writer."""
        return [self.value(i) for i in range(start, stop)]

    def close(self) -> None:
        """Release the pool."""
        self._view.release()
        self._map.close()


def make_keys(n: int, prefix: str = "") -> list[str]:
    """``n`` distinct 64-character hex keys, like the content hashes serving
    engines use (SGLang and LMCache key pages by SHA-256 hex)."""
    import hashlib

    return [prefix + hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).hexdigest() for i in range(n)]


def _slots(count: int, size: int) -> tuple[mmap.mmap, list[memoryview]]:
    """``count`` page-aligned buffers of ``size`` bytes in one map, every
    page faulted in before timing (as pinned host memory would be)."""
    area = mmap.mmap(-1, max(1, count * size))
    ones = b"\x01" * min(len(area), MiB)
    for start in range(0, len(area), len(ones)):
        area[start : start + len(ones)] = ones[: len(area) - start]
    view = memoryview(area)
    return area, [view[i * size : (i + 1) * size] for i in range(count)]


def dest_views(wl: Workload) -> tuple[mmap.mmap, list[memoryview]]:
    """Preallocated, pre-faulted, page-aligned destination buffers for one
    batch (as pinned host memory would be); returns the map and one view per
    slot."""
    return _slots(min(wl.batch, wl.n_objects), wl.object_size)


def dest_sets(wl: Workload) -> tuple[mmap.mmap, list[list[memoryview]]]:
    """Destination buffers for ``wl.depth`` batches in flight (as
    :func:`dest_views`, one set of ``batch`` slots per batch; no more sets
    than there are batches); returns the map and the sets."""
    per_set = min(wl.batch, wl.n_objects)
    count = max(1, min(wl.depth, -(-wl.n_objects // per_set)))
    area, views = _slots(count * per_set, wl.object_size)
    return area, [views[k * per_set : (k + 1) * per_set] for k in range(count)]


def read_batches(wl: Workload, seed: int | None = None) -> list[list[int]]:
    """Every object once, in a random order, cut into batches of ``batch``."""
    order = list(range(wl.n_objects))
    random.Random(wl.seed if seed is None else seed).shuffle(order)
    return [order[i : i + wl.batch] for i in range(0, len(order), wl.batch)]


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def summarize(values: Sequence[float], unit: str = "MiB/s") -> dict[str, Any]:
    """Median, min, max and the runs themselves, JSON-able."""
    vals = [float(v) for v in values]
    if not vals:
        return {"unit": unit, "median": None, "min": None, "max": None, "runs": []}
    return {"unit": unit, "median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": vals}


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """``median(a) / median(b)``, or None when either is missing."""
    if not a or not b or not a.get("median") or not b.get("median"):
        return None
    return float(a["median"] / b["median"])


def mib_s(nbytes: int, seconds: float) -> float:
    """Throughput in MiB/s."""
    return nbytes / MiB / max(seconds, 1e-9)


# --------------------------------------------------------------------------
# Cache control
# --------------------------------------------------------------------------


def _files_under(paths: Iterable[str]) -> Iterator[str]:
    for path in paths:
        if os.path.isfile(path):
            yield path
        elif os.path.isdir(path):
            for root, _dirs, files in os.walk(path):
                for name in files:
                    yield os.path.join(root, name)


def make_cold(paths: Iterable[str] = ()) -> str:
    """Empty the page cache of ``paths`` (files or directories).

    Flushes dirty pages first (``sync``), then writes ``3`` to
    ``/proc/sys/vm/drop_caches`` when permitted (root); otherwise drops each
    file's clean pages with ``posix_fadvise(DONTNEED)``. Returns the method
    used: ``"drop_caches"`` or ``"fadvise"``.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for name in _files_under(paths):
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


# --------------------------------------------------------------------------
# fio baseline
# --------------------------------------------------------------------------


def fio_version() -> str | None:
    """``fio-3.33`` or None when fio is not installed."""
    exe = shutil.which("fio")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _fio(args: list[str]) -> dict[str, Any]:
    """Run fio with JSON output and return the (group-reported) job."""
    cmd = ["fio", "--output-format=json", "--group_reporting", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr.strip()}")
    text = out.stdout[out.stdout.find("{") :]
    job: dict[str, Any] = json.loads(text)["jobs"][0]
    return job


def fio_write_args(path: str, wl: Workload, direct: bool) -> list[str]:
    """fio arguments of the raw sequential write: the workload's bytes in
    ``write_block`` calls, ``fdatasync`` once per bucket, never preallocated."""
    per_sync = max(1, (wl.per_bucket * wl.object_size) // wl.write_block)
    return [
        "--name=seqwrite",
        f"--filename={path}",
        "--rw=write",
        f"--bs={wl.write_block}",
        f"--size={wl.nbytes}",
        "--ioengine=psync",
        f"--fdatasync={per_sync}",
        "--end_fsync=1",
        "--fallocate=none",
        f"--direct={int(direct)}",
    ]


def fio_read_args(path: str, wl: Workload, direct: bool) -> list[str]:
    """fio arguments of the raw random read: ``threads`` psync jobs, each
    reading every ``object_size`` block of its own slice once, at random."""
    jobs = min(wl.threads, wl.n_objects)
    slice_bytes = (wl.n_objects // jobs) * wl.object_size
    return [
        "--name=randread",
        f"--filename={path}",
        "--rw=randread",
        f"--bs={wl.object_size}",
        f"--size={slice_bytes}",
        f"--offset_increment={slice_bytes}",
        f"--numjobs={jobs}",
        "--thread",
        "--ioengine=psync",
        "--randrepeat=0",
        "--invalidate=1",
        f"--direct={int(direct)}",
    ]


def fio_write(path: str, wl: Workload, direct: bool) -> float:
    """Raw sequential write by fio; returns MiB/s (fio's own runtime, syncs included)."""
    job = _fio(fio_write_args(path, wl, direct))["write"]
    return float(job["io_bytes"] / MiB / max(job["runtime"] / 1000.0, 1e-9))


def fio_read(path: str, wl: Workload, direct: bool) -> float:
    """Raw random read by fio of the file ``path``; returns MiB/s."""
    job = _fio(fio_read_args(path, wl, direct))["read"]
    return float(job["io_bytes"] / MiB / max(job["runtime"] / 1000.0, 1e-9))


# --------------------------------------------------------------------------
# Minimal Python baseline
# --------------------------------------------------------------------------


def _write_all(fd: int, views: list[memoryview], offset: int) -> int:
    """``pwritev`` ``views`` at ``offset``, looping over short writes."""
    done = 0
    total = sum(len(v) for v in views)
    while done < total:
        n = os.pwritev(fd, views, offset + done)
        if n <= 0:
            raise OSError(f"pwritev wrote {n}")
        done += n
        if done < total:  # rare: rebuild the remaining views
            views = _skip(views, n)
    return done


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out


def py_write(path: str, wl: Workload, source: Source, direct: bool) -> float:
    """Raw sequential write by a minimal ``os.pwritev`` loop: ``write_block``
    bytes per call, one ``fdatasync`` per bucket; returns MiB/s."""
    per_call = max(1, wl.write_block // wl.object_size)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (O_DIRECT if direct else 0)
    t0 = time.perf_counter()
    fd = os.open(path, flags, 0o644)
    try:
        offset = 0
        for rng in wl.buckets():
            for start in range(rng.start, rng.stop, per_call):
                offset += _write_all(fd, source.run(start, min(rng.stop, start + per_call)), offset)
            os.fdatasync(fd)
    finally:
        os.close(fd)
    return mib_s(wl.nbytes, time.perf_counter() - t0)


def _read_exact(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise OSError(f"short read at offset {offset + got}")
        got += n


def py_read(path: str, wl: Workload, dests: list[memoryview], direct: bool, pool: cf.ThreadPoolExecutor) -> float:
    """Raw random read by a minimal ``os.preadv`` thread pool: the same
    random batches as kvbucket, each finished before the next; returns MiB/s."""
    fd = os.open(path, os.O_RDONLY | (O_DIRECT if direct else 0))
    size = wl.object_size
    try:
        batches = read_batches(wl)
        t0 = time.perf_counter()
        for b in batches:
            futures = [pool.submit(_read_exact, fd, dests[j], i * size) for j, i in enumerate(b)]
            for f in futures:
                f.result()
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    return mib_s(wl.nbytes, elapsed)


def raw_locations(path: str, wl: Workload) -> list[tuple[str, int]]:
    """Where each object of a raw file written by :func:`py_write` or
    :func:`fio_write` lies: ``(path, offset)``, object ``i`` at ``i * object_size``."""
    return [(path, i * wl.object_size) for i in range(wl.n_objects)]


def py_read_pipelined(locations: Sequence[tuple[str, int]], wl: Workload, direct: bool, pool: cf.ThreadPoolExecutor) -> float:
    """Raw random read with no barrier: ``wl.threads`` workers of ``pool``
    (which must have that many), each ``os.preadv``-ing the next object of
    the :func:`read_batches` order at its ``locations[i]`` (path, offset)
    into its own buffer until none is left, so ``threads`` reads are in
    flight all the time; returns MiB/s."""
    order = iter([i for batch in read_batches(wl) for i in batch])
    lock = threading.Lock()
    flags = os.O_RDONLY | (O_DIRECT if direct else 0)
    fds: dict[str, int] = {}
    area, dests = _slots(min(wl.threads, wl.n_objects), wl.object_size)

    def reader(dest: memoryview) -> None:
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            path, offset = locations[i]
            _read_exact(fds[path], dest, offset)

    try:
        for path in dict.fromkeys(path for path, _ in locations):
            fds[path] = os.open(path, flags)
        t0 = time.perf_counter()
        for future in [pool.submit(reader, dest) for dest in dests]:
            future.result()
        elapsed = time.perf_counter() - t0
    finally:
        for fd in fds.values():
            os.close(fd)
        dests.clear()
        area.close()
    return mib_s(wl.nbytes, elapsed)


# --------------------------------------------------------------------------
# kvbucket
# --------------------------------------------------------------------------


def kv_io_modes(wl: Workload) -> list[str]:
    """kvbucket's ``io_mode`` values to measure for ``wl``: every one the
    configuration offers, buffered and direct first, the default among them
    (``direct`` only when ``wl.direct_ok``)."""
    offered = typing.get_args(IOMode)
    modes = dict.fromkeys(["buffered", "direct", *offered, BucketConfig().io_mode])
    return [m for m in modes if m in offered and (m != "direct" or wl.direct_ok)]


def raw_io_modes(wl: Workload) -> list[str]:
    """The raw baselines' modes: buffered, and O_DIRECT when ``wl.direct_ok``."""
    return ["buffered", "direct"] if wl.direct_ok else ["buffered"]


def store_settings(wl: Workload, durability: str, io_mode: str) -> dict[str, Any]:
    """The settings of a store shaped for ``wl`` (the default configuration
    otherwise): ``io_threads`` = ``wl.threads``, ``load_queue_depth`` =
    ``wl.depth``, buckets of ``wl.per_bucket`` objects."""
    return {
        "durability": durability,
        "io_mode": io_mode,
        "io_threads": wl.threads,
        "load_queue_depth": wl.depth,
        "bucket_size_limit": wl.bucket_size,
        "bucket_keys_limit": max(BucketConfig().bucket_keys_limit, wl.per_bucket),
    }


def open_store(path: str, wl: Workload, durability: str, io_mode: str, **extra: Any) -> Any:
    """Open a :class:`~kvbucket.BucketStore` with :func:`store_settings`;
    ``extra`` overrides any setting."""
    from .. import BucketStore

    return BucketStore.open(path, **{**store_settings(wl, durability, io_mode), **extra})


def kv_offload(store: Any, wl: Workload, keys: Sequence[str], source: Source) -> float:
    """``batch_offload`` every object, one bucket per call; returns seconds."""
    t0 = time.perf_counter()
    for rng in wl.buckets():
        store.batch_offload({keys[i]: source.value(i) for i in rng})
    return time.perf_counter() - t0


def kv_load(store: Any, wl: Workload, keys: Sequence[str], dests: list[memoryview]) -> float:
    """``batch_load`` every object once, in random batches; returns seconds."""
    batches = read_batches(wl)
    t0 = time.perf_counter()
    for b in batches:
        store.batch_load({keys[i]: dests[j] for j, i in enumerate(b)})
    return time.perf_counter() - t0


def kv_submit_load(store: Any, wl: Workload, keys: Sequence[str], sets: Sequence[Sequence[memoryview]]) -> float:
    """``submit_load`` every object once, in the random batches of
    :func:`read_batches`, ``len(sets)`` batches in flight: batch ``k`` loads
    into ``sets[k % len(sets)]`` once batch ``k - len(sets)`` is done, so
    each set ends holding the last batch loaded into it (see
    :func:`verify_loaded`); returns seconds, until the last batch is done."""
    in_flight: collections.deque[Any] = collections.deque()
    t0 = time.perf_counter()
    for k, batch in enumerate(read_batches(wl)):
        if len(in_flight) == len(sets):
            in_flight.popleft().result()
        dests = sets[k % len(sets)]
        in_flight.append(store.submit_load({keys[i]: dests[j] for j, i in enumerate(batch)}))
    for handle in in_flight:
        handle.result()
    return time.perf_counter() - t0


def verify_loaded(wl: Workload, sets: Sequence[Sequence[memoryview]], source: Source) -> int:
    """Check byte for byte the objects :func:`kv_submit_load` left in
    ``sets`` (the last ``len(sets)`` batches, each in ``sets[k % len(sets)]``);
    returns how many were checked, raises AssertionError at a wrong one."""
    batches = read_batches(wl)
    checked = 0
    for k in range(max(0, len(batches) - len(sets)), len(batches)):
        for j, i in enumerate(batches[k]):
            if sets[k % len(sets)][j].tobytes() != source.value(i).tobytes():
                raise AssertionError(f"kvbucket's submit_load returned wrong bytes for object {i}")
            checked += 1
    return checked


def store_locations(store: Any, keys: Sequence[str]) -> list[tuple[str, int]]:
    """Where each object lies in the store's own data files, ``(path, offset)``,
    for a raw reader of the very same bytes (:func:`py_read_pipelined`)."""
    metas = store.batch_query(keys)
    return [(os.path.join(store.path, data_name(metas[key].bucket_id)), metas[key].offset) for key in keys]


def verify_sample(store: Any, keys: Sequence[str], source: Source, count: int = 4) -> None:
    """Check a few objects byte for byte (guards against measuring a bug)."""
    step = max(1, len(keys) // count)
    for i in range(0, len(keys), step):
        got = store.batch_get([keys[i]])[keys[i]]
        if got != source.value(i):
            raise AssertionError(f"kvbucket returned wrong bytes for object {i}")


# --------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------


def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(path: str = ".") -> dict[str, Any]:
    """CPU, memory, kernel, and the device and filesystem under ``path``."""
    info: dict[str, Any] = {
        "uname": " ".join(platform.uname()),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    for line in _cmd(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            info["cpu_model"] = line.split(":", 1)[1].strip()
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    mount = _cmd(["findmnt", "-no", "SOURCE,FSTYPE,OPTIONS", "--target", path]).split()
    if mount:
        info["device"], info["fstype"] = mount[0], mount[1] if len(mount) > 1 else ""
        info["mount_options"] = mount[2] if len(mount) > 2 else ""
        dev = os.path.basename(mount[0])
        for attr in ("rotational", "scheduler", "max_sectors_kb", "logical_block_size"):
            try:
                with open(f"/sys/block/{dev}/queue/{attr}") as f:
                    info[attr] = f.read().strip()
            except OSError:
                pass
    return info


# --------------------------------------------------------------------------
# The `kvbucket bench` run
# --------------------------------------------------------------------------


class _Progress:
    """A tqdm bar over the benchmark's steps (silent when disabled)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="step", desc="kvbucket bench", leave=False)

    def step(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(label)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _raw_pass(work: str, wl: Workload, mode: str, engine: str, source: Source, dests: list[memoryview],
              pool: cf.ThreadPoolExecutor) -> dict[str, float | str]:
    """One raw write, cold batched read and cold pipelined read in ``mode``;
    returns their MiB/s by measurement name, and the cold method."""
    direct = mode == "direct"
    path = os.path.join(work, f"raw-{mode}.dat")
    try:
        make_cold([])
        w = fio_write(path, wl, direct) if engine == "fio" else py_write(path, wl, source, direct)
        make_cold([path])
        r = fio_read(path, wl, direct) if engine == "fio" else py_read(path, wl, dests, direct, pool)
        cold = make_cold([path])
        pipelined = py_read_pipelined(raw_locations(path, wl), wl, direct, pool)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return {f"raw_write_{mode}": w, f"raw_read_{mode}": r, f"raw_read_pipelined_{mode}": pipelined, "cold": cold}


def _kv_pass(work: str, wl: Workload, mode: str, durability: str, keys: Sequence[str], source: Source,
             dests: list[memoryview], sets: list[list[memoryview]]) -> dict[str, float]:
    """One kvbucket offload, cold ``batch_load`` and cold ``submit_load`` in
    ``mode``, each checked against the source; returns MiB/s by measurement
    name, and how many objects were checked byte for byte."""
    path = os.path.join(work, f"kv-{mode}")
    try:
        make_cold([])
        store = open_store(path, wl, durability, mode)
        try:
            w = mib_s(wl.nbytes, kv_offload(store, wl, keys, source))
            verify_sample(store, keys, source)
            make_cold([path])
            r = mib_s(wl.nbytes, kv_load(store, wl, keys, dests))
            make_cold([path])
            a = mib_s(wl.nbytes, kv_submit_load(store, wl, keys, sets))
            checked = verify_loaded(wl, sets, source)
        finally:
            store.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return {f"kv_write_{mode}": w, f"kv_read_{mode}": r, f"kv_read_async_{mode}": a, "checked": checked}


def run(
    path: str | None,
    *,
    object_size: int = 1 << 20,
    total_bytes: int = 1 << 30,
    threads: int = 16,
    batch: int = 32,
    progress: bool = True,
    repeats: int = 3,
    durability: str = "strict",
    io_modes: Sequence[str] | None = None,
    engine: str = "auto",
    bucket_size: int | None = None,
    bucket_keys: int | None = None,
    depth: int = 4,
) -> dict[str, Any]:
    """Benchmark the disk under ``path`` (a temp directory when None), then
    kvbucket on the same workload; return a JSON-able result.

    Per repeat it runs, buffered and with O_DIRECT, the raw write, the cold
    random read (``engine``: ``"fio"``, ``"python"`` or ``"auto"`` = fio
    when installed) and the cold pipelined Python read; and per kvbucket
    ``io_mode`` (``io_modes``, default :func:`kv_io_modes`) the
    ``batch_offload``, the cold ``batch_load`` and the cold ``submit_load``
    of the same bytes, ``depth`` batches in flight. Buckets default to the
    store's defaults (``bucket_size_limit``, ``bucket_keys_limit``). Only a
    scratch sub-directory of ``path`` is written, and it is removed
    afterwards. The result holds per-measurement summaries (median/min/max
    MiB/s), the ratios kvbucket / raw per mode, the ratio of kvbucket's best
    mode to the raw disk's best mode, and that of the default mode to the
    raw disk's best mode.
    """
    defaults = BucketConfig()
    wl = Workload(object_size, total_bytes, threads, batch, bucket_size or defaults.bucket_size_limit, depth=depth,
                  bucket_keys=bucket_keys or defaults.bucket_keys_limit)
    raw_modes = raw_io_modes(wl)
    kv_modes = [m for m in (kv_io_modes(wl) if io_modes is None else io_modes) if m != "direct" or wl.direct_ok]
    if not kv_modes:
        raise ValueError(f"no io_mode to measure among {list(io_modes or [])} (direct needs 4 KiB multiples)")
    fio = fio_version()
    engine = ("fio" if fio else "python") if engine == "auto" else engine
    if engine == "fio" and not fio:
        raise RuntimeError("engine='fio' but fio is not installed")
    base = path or tempfile.gettempdir()
    for mode in kv_modes:  # a bad setting fails here, not after the raw passes
        BucketConfig(path=os.path.join(base, "kv"), **store_settings(wl, durability, mode)).validated()
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(prefix="kvbucket-bench-", dir=base)
    runs: dict[str, list[float]] = {}
    cold = "none"
    checked = 0
    bar = _Progress(repeats * (len(raw_modes) + len(kv_modes)), progress)
    source = Source(object_size)
    area, dests = dest_views(wl)
    sets_area, sets = dest_sets(wl)
    keys = make_keys(wl.n_objects)
    try:
        with cf.ThreadPoolExecutor(wl.threads) as pool:
            for rep in range(repeats):
                for mode in dict.fromkeys([*raw_modes, *kv_modes]):
                    if mode in raw_modes:
                        figures = _raw_pass(work, wl, mode, engine, source, dests, pool)
                        cold = str(figures.pop("cold"))
                        _append(runs, figures)
                        bar.step(f"raw {mode} {rep + 1}/{repeats}")
                    if mode in kv_modes:
                        figures_kv = _kv_pass(work, wl, mode, durability, keys, source, dests, sets)
                        checked += int(figures_kv.pop("checked"))
                        _append(runs, figures_kv)
                        bar.step(f"kvbucket {mode} {rep + 1}/{repeats}")
    finally:
        bar.close()
        dests.clear()
        sets.clear()
        area.close()
        sets_area.close()
        source.close()
        shutil.rmtree(work, ignore_errors=True)
    result = _result(wl, kv_modes, raw_modes, engine, fio, cold, durability, repeats, base, runs)
    result["verified_objects"] = checked
    return result


def _append(runs: dict[str, list[float]], figures: dict[str, Any]) -> None:
    """Add one pass's figures to the runs of each measurement."""
    for name, value in figures.items():
        runs.setdefault(name, []).append(float(value))


RATIO_OPS = (("write", "write", "write"), ("read", "read", "read"), ("async_read", "read_async", "read_pipelined"))
"""Each ratio's name and the kvbucket and raw measurements it divides:
``<ratio>_<mode>`` = ``kv_<kv>_<mode>`` / ``raw_<raw>_<mode>``."""


def _result(wl: Workload, modes: list[str], raw_modes: list[str], engine: str, fio: str | None, cold: str,
            durability: str, repeats: int, base: str, runs: dict[str, list[float]]) -> dict[str, Any]:
    """Assemble the JSON-able result of :func:`run`.

    A kvbucket mode with a raw counterpart is divided by it; one without
    (a mode that picks per operation) by the faster raw mode, as is the
    default mode in ``<op>_default``."""
    m = {name: summarize(vals) for name, vals in runs.items()}
    default = BucketConfig().io_mode
    ratios: dict[str, float | None] = {}
    for op, kv, raw in RATIO_OPS:
        best_raw = max((m[f"raw_{raw}_{x}"] for x in raw_modes), key=lambda s: s["median"] or 0)
        for mode in modes:
            base_raw = m[f"raw_{raw}_{mode}"] if mode in raw_modes else best_raw
            ratios[f"{op}_{mode}"] = ratio(m.get(f"kv_{kv}_{mode}"), base_raw)
        best_kv = max((m[f"kv_{kv}_{x}"] for x in modes), key=lambda s: s["median"] or 0)
        ratios[f"{op}_best"] = ratio(best_kv, best_raw)
        if default in modes:
            ratios[f"{op}_default"] = ratio(m[f"kv_{kv}_{default}"], best_raw)
    return {
        "kvbucket_version": installed_version(),
        "workload": {**asdict(wl), "n_objects": wl.n_objects, "bytes": wl.nbytes, "per_bucket": wl.per_bucket,
                     "io_modes": modes, "raw_io_modes": raw_modes, "default_io_mode": default,
                     "durability": durability, "repeats": repeats},
        "raw_engine": fio if engine == "fio" else "python os.pwritev/os.preadv loop",
        "cold_cache": cold,
        "machine": machine_info(base),
        "measurements": m,
        "ratios": ratios,
    }


def _fmt(s: dict[str, Any] | None) -> str:
    if not s or s.get("median") is None:
        return "-"
    return f"{s['median']:8.0f} ({s['min']:.0f}-{s['max']:.0f})"


REPORT_ROWS = (("write", "durable write"), ("read", "cold random read"), ("async_read", "async cold random read"))
"""The rows of :func:`format_report`: a ratio name of :data:`RATIO_OPS` and its label."""


LABEL_WIDTH = 56
"""Width of the report's row labels (the longest: an async read row of the default mode)."""


def format_report(result: dict[str, Any]) -> str:
    """A plain-text table of a :func:`run` result, with the ratios."""
    wl = result["workload"]
    m = result["measurements"]
    r = result["ratios"]
    default = wl.get("default_io_mode")
    raw_modes = wl.get("raw_io_modes", wl["io_modes"])
    per_bucket = wl.get("per_bucket", wl["bucket_size"] // wl["object_size"])
    lines = [
        f"kvbucket {result['kvbucket_version']} bench: {wl['n_objects']} x {wl['object_size'] // 1024} KiB "
        f"= {wl['bytes'] / MiB:.0f} MiB, buckets of {per_bucket} objects "
        f"({per_bucket * wl['object_size'] / MiB:.0f} MiB), "
        f"reads in batches of {wl['batch']} over {wl['threads']} threads, "
        f"durability={wl['durability']}, median of {wl['repeats']} (min-max)",
        f"raw baseline: {result['raw_engine']}; cold cache: {result['cold_cache']}; "
        f"disk: {result['machine'].get('device', '?')} ({result['machine'].get('fstype', '?')})",
        f"async: submit_load with {wl.get('depth', '?')} batches in flight, against {wl['threads']} threads "
        "of os.preadv with no barrier between batches",
        "",
        f"{'':{LABEL_WIDTH}}{'raw MiB/s':>22}  {'kvbucket MiB/s':>22}  {'ratio':>6}",
    ]
    for op, label in REPORT_ROWS:
        _, kv, raw = next(row for row in RATIO_OPS if row[0] == op)
        best_raw = max((m.get(f"raw_{raw}_{x}") or {} for x in raw_modes), key=lambda s: s.get("median") or 0)
        for mode in wl["io_modes"]:
            if f"kv_{kv}_{mode}" not in m:
                continue
            row = f"{label} ({mode})" + (" [default]" if mode == default else "") + ("" if mode in raw_modes else " [vs best raw]")
            base = m.get(f"raw_{raw}_{mode}") if mode in raw_modes else best_raw
            lines.append(f"{row:{LABEL_WIDTH}}{_fmt(base):>22}  {_fmt(m.get(f'kv_{kv}_{mode}')):>22}  {_x(r.get(f'{op}_{mode}')):>6}")
    for op, _ in REPORT_ROWS:
        lines.append(f"best kvbucket mode / best raw mode, {op.replace('_', ' ')}: {_x(r.get(f'{op}_best'))}")
    if default is not None:
        figures = ", ".join(f"{op.replace('_', ' ')} {_x(r.get(f'{op}_default'))}" for op, _ in REPORT_ROWS)
        lines.append(f"default configuration (io_mode={default}) / best raw mode: {figures}")
    return "\n".join(lines)


def _x(value: float | None) -> str:
    """A ratio as ``0.93x``, or ``-``."""
    return "-" if value is None else f"{value:.2f}x"
