"""One ProblemKind for every check, typed problem records, one version helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kvbucket import BucketStore
from kvbucket import mooncake as mc
from kvbucket._core.format import LOCK_NAME, data_name, meta_name, tmp_name
from kvbucket._core.problems import ForeignFile, Problem, ProblemKind
from kvbucket._core.recovery import scan_directory
from kvbucket.tools import fsck
from kvbucket.tools.version import installed_version
from mooncake_writer import MooncakeDir


def test_every_kind_has_its_own_name_and_description() -> None:
    assert len({kind.value for kind in ProblemKind}) == len({kind.description for kind in ProblemKind}) == len(ProblemKind)
    assert all(kind.description and kind.value == str(kind) for kind in ProblemKind)
    assert ProblemKind("orphan_data") is ProblemKind.ORPHAN_DATA
    assert f"{ProblemKind.KEY_MISMATCH}" == "key_mismatch"


def _damaged_store(path: Path) -> None:
    with BucketStore.open(path) as store:
        for b in range(1, 5):
            store.batch_offload({f"b{b}-{i}": bytes([b]) * 300 for i in range(2)})
    os.unlink(path / LOCK_NAME)
    os.unlink(path / meta_name(2))
    os.truncate(path / data_name(3), 10)
    (path / tmp_name(6)).write_bytes(b"half")
    (path / "notes.txt").write_text("operator notes")


def test_kvbucket_findings_and_fsck_problems_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "kv"
    _damaged_store(path)
    assert all(isinstance(f.kind, ProblemKind) for f in scan_directory(path).findings)
    report = fsck.check(path)
    assert all(isinstance(p, Problem) for p in report.problems)
    assert report.foreign == [ForeignFile("notes.txt", len("operator notes"), "file")]
    orphan = next(p for p in report.to_json()["problems"] if p["kind"] == "orphan_data")
    assert orphan == {
        "kind": "orphan_data",
        "description": "data file without meta",
        "bucket": 2,
        "files": [data_name(2)],
        "bytes": os.path.getsize(path / data_name(2)),
        "detail": "data file without a committed meta",
    }
    short = next(p for p in report.to_json()["problems"] if p["kind"] == "short_data")
    assert list(short) == ["kind", "description", "bucket", "files", "bytes", "detail", "dropped_keys"]
    assert short["dropped_keys"] == ["b3-0", "b3-1"]
    json.dumps(report.to_json())  # every value is JSON-ready


def test_mooncake_broken_buckets_use_the_same_kinds(tmp_path: Path) -> None:
    d = MooncakeDir(tmp_path / "mc")
    for b in range(1, 4):
        d.write_bucket(b, {f"k{b}": b"v" * 20})
    d.orphan_data(2)
    d.garbage_meta(3)
    scan = mc.scan_mooncake(d.root)
    assert [(f.bucket, f.kind) for f in scan.findings] == [(2, ProblemKind.ORPHAN_DATA), (3, ProblemKind.INVALID_META)]
    problems = fsck.check_mooncake(d.root).to_json()["problems"]
    assert [p["description"] for p in problems] == [ProblemKind.ORPHAN_DATA.description, ProblemKind.INVALID_META.description]
    assert problems[1]["files"] == ["3.bucket", "3.meta"] and problems[1]["bytes"] == scan.findings[1].bytes


def test_the_command_reports_the_installed_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "kvbucket.tools.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"kvbucket, version {installed_version()}"
