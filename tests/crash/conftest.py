"""Shared set-up of the crash tests.

* Makes ``src/`` and this folder importable when kvbucket is not installed.
* ``runner``: one fork server for the kill -9 sweeps of the whole session.
* ``crash_counts``: tests record how many kill points, crash states and fault
  points they tried; the totals are printed at the end of the run and, when
  ``KVBUCKET_CRASH_REPORT`` names a file, written there as JSON.
* ``KVBUCKET_FULL_SWEEP=1`` runs the exhaustive sweeps instead of samples.
* ``tmp_path`` is on tmpfs (``/dev/shm``) when there is one: these tests
  simulate crashes and power cuts themselves, so real fsyncs only cost time
  (they dominate on a disk). ``KVBUCKET_CRASH_TMPDIR=/some/dir`` picks another
  parent folder, e.g. one on the SSD under test.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.abspath(os.path.join(HERE, "..", "..", "src")), HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

_COUNTS: dict[str, dict] = {}


def _crash_tmp_parent() -> str | None:
    chosen = os.environ.get("KVBUCKET_CRASH_TMPDIR")
    if chosen:
        return chosen
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return None


@pytest.fixture
def tmp_path(request, tmp_path_factory):
    """A fresh directory for one test, on tmpfs when available (see above)."""
    parent = _crash_tmp_parent()
    if parent is None:
        yield tmp_path_factory.mktemp(request.node.name[:30])
        return
    import pathlib

    path = pathlib.Path(tempfile.mkdtemp(prefix="kvbucket-crash-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def runner():
    from crash_harness import ChildRunner

    r = ChildRunner()
    yield r
    r.close()


@pytest.fixture
def crash_counts(request):
    """``crash_counts(**numbers)`` records this test's numbers (added up)."""
    start = time.perf_counter()
    entry: dict = {}
    _COUNTS[request.node.nodeid.split("::", 1)[-1]] = entry

    def record(**numbers):
        for k, v in numbers.items():
            entry[k] = entry.get(k, 0) + v if isinstance(v, (int, float)) else v

    yield record
    entry["seconds"] = round(time.perf_counter() - start, 2)


@pytest.fixture
def small_writes(monkeypatch):
    """Write in 8 KiB calls so one bucket is several pwritev calls."""
    import kvbucket._core.fs
    from crash_harness import SMALL_WRITE_CHUNK

    monkeypatch.setattr(kvbucket._core.fs, "WRITE_CHUNK", SMALL_WRITE_CHUNK)


def pytest_collection_modifyitems(config, items):
    """A full sweep runs longer than the suite's per-test timeout allows."""
    from crash_harness import FULL

    if FULL and config.pluginmanager.hasplugin("timeout"):
        for item in items:
            if str(item.fspath).startswith(HERE):
                item.add_marker(pytest.mark.timeout(3600))


def pytest_terminal_summary(terminalreporter):
    if not _COUNTS:
        return
    from crash_harness import FULL

    tr = terminalreporter
    tr.section(f"crash-test counts ({'full sweep' if FULL else 'sampled; KVBUCKET_FULL_SWEEP=1 for all'})")
    for name, entry in _COUNTS.items():
        tr.write_line(f"{name}: " + ", ".join(f"{k}={v}" for k, v in entry.items()))
    path = os.environ.get("KVBUCKET_CRASH_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"full": FULL, "tests": _COUNTS}, f, indent=2)
