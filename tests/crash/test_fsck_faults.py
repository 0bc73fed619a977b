"""Faults injected into ``kvbucket fsck``'s checks and repairs through the FileSystem seam.

For every call a repair makes, :class:`crash_fs.FaultFS` fails that call with
``EIO``: the repair raises the ``OSError`` (the CLI: exit 2, one error line
that says what to do) and leaves the report as it was, or, when the fault
hits the confirming scan, reports the file it could not read as a remaining
problem; nothing is half-done (each file is either untouched or gone; valid
buckets, live objects and foreign files are intact), and a second repair
finishes the job.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from crash_fs import FaultFS, ForwardingFS
from kvbucket import BucketStore
from kvbucket import mooncake as mc
from kvbucket._core.format import data_name
from kvbucket.tools import cli, fsck
from mooncake_writer import MooncakeDir, tree_digest


def _objects(bucket_id: int, count: int = 3) -> dict[str | bytes, bytes]:
    return {f"key-{bucket_id}-{i}": bytes([bucket_id]) * (40 + 13 * i) for i in range(count)}


def _damaged_mooncake(root: Path) -> MooncakeDir:
    """Buckets 1 and 5 valid; 2, 3 and 4 broken (one, one and two files); a foreign file."""
    d = MooncakeDir(root)
    for bucket_id in range(1, 6):
        d.write_bucket(bucket_id, _objects(bucket_id))
    d.orphan_data(2)
    d.remove_data(3)
    d.garbage_meta(4)
    (d.root / "notes.txt").write_text("operator notes")
    return d


BROKEN = {"2.bucket", "3.meta", "4.bucket", "4.meta"}


def _repair_calls(root: Path, quarantine: bool) -> int:
    """How many calls a fault-free repair of ``root`` makes through the seam."""
    counter = FaultFS()
    report = fsck.check_mooncake(root)
    fsck.repair_mooncake(report, quarantine=quarantine, fs=counter)
    assert report.clean
    return len(counter.calls)


@pytest.mark.parametrize("quarantine", [False, True], ids=["delete", "quarantine"])
def test_mooncake_repair_fails_cleanly_at_every_call(tmp_path: Path, quarantine: bool) -> None:
    calls = _repair_calls(_damaged_mooncake(tmp_path / "probe").root, quarantine)
    assert calls > len(BROKEN)
    for fail_at in range(1, calls + 1):
        d = _damaged_mooncake(tmp_path / f"mc-{fail_at}")
        before = tree_digest(d.root)
        report = fsck.check_mooncake(d.root)
        problems_before = [p.to_json() for p in report.problems]
        faulty = FaultFS(fail_at=fail_at)
        try:
            fsck.repair_mooncake(report, quarantine=quarantine, fs=faulty)
        except OSError as exc:
            assert exc.errno == errno.EIO, fail_at
            assert report.repair is None and not report.clean
        else:  # the fault hit the confirming scan, which reports a meta it cannot read
            assert report.repair is not None and not report.clean, fail_at
            assert all("cannot read" in p.detail for p in report.repair.remaining_problems), fail_at
        assert faulty.fired, fail_at
        assert [p.to_json() for p in report.problems] == problems_before
        after = tree_digest(d.root)
        assert {name for name in before if name not in after} <= BROKEN, fail_at
        for name, digest in after.items():  # nothing changed in place; new: only whole quarantined copies
            if name in before:
                assert before[name] == digest, (fail_at, name)
            elif name != "quarantine":
                assert quarantine and name.startswith("quarantine/"), (fail_at, name)
                assert digest == before[name.removeprefix("quarantine/").removesuffix(".quarantined")], (fail_at, name)
        rescan = mc.scan_mooncake(d.root)
        assert [b.bucket_id for b in rescan.buckets] == [1, 5]
        assert {i.name for f in rescan.findings for i in f.files} == BROKEN & set(after), fail_at
        second = fsck.repair_mooncake(fsck.check_mooncake(d.root), quarantine=quarantine)
        assert second.clean, (fail_at, second.repair)


def test_cli_repair_interrupted_by_an_io_error_exits_2_and_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _damaged_mooncake(tmp_path / "mc")

    class FailingUnlink(ForwardingFS):
        """Removes the first file, then fails every unlink with EIO."""

        unlinks = 0

        def unlink(self, path: str) -> None:
            FailingUnlink.unlinks += 1
            if FailingUnlink.unlinks > 1:
                raise OSError(errno.EIO, os.strerror(errno.EIO), path)
            super().unlink(path)

    monkeypatch.setattr(cli, "FileSystem", FailingUnlink)
    result = CliRunner().invoke(cli.cli, ["fsck", "--repair", "--json", os.fspath(d.root)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.output.splitlines()[-1]
    assert message.startswith("kvbucket: error: the repair of ") and "Input/output error" in message
    assert "run 'kvbucket fsck --repair" in message
    assert sum(name in os.listdir(d.root) for name in BROKEN) == len(BROKEN) - 1
    monkeypatch.undo()
    assert fsck.repair_mooncake(fsck.check_mooncake(d.root)).clean


def test_kvbucket_deep_repair_fails_cleanly_at_every_call(tmp_path: Path) -> None:
    """A deep repair removes the corrupt object, or raises; never anything else."""
    values = {f"b{b}-{i}": bytes([b * 16 + i]) * 500 for b in range(1, 4) for i in range(3)}
    corrupt_key = "b2-0"

    def make(path: Path) -> None:
        with BucketStore.open(path) as store:
            for b in range(1, 4):
                store.batch_offload({k: v for k, v in values.items() if k.startswith(f"b{b}-")})
            bucket = store.batch_query([corrupt_key])[corrupt_key]
        with open(path / data_name(bucket.bucket_id), "r+b") as f:
            f.seek(bucket.offset + 7)
            f.write(b"\xff")

    probe = tmp_path / "probe"
    make(probe)
    counter = FaultFS()
    with BucketStore.open(probe) as store:
        assert fsck.repair(store, fsck.check(probe), deep=True, fs=counter).clean
    calls = len(counter.calls)
    for fail_at in range(1, calls + 1):
        path = tmp_path / f"kv-{fail_at}"
        make(path)
        report = fsck.check(path)
        with BucketStore.open(path) as store:
            faulty = FaultFS(fail_at=fail_at)
            with pytest.raises(OSError) as info:
                fsck.repair(store, report, deep=True, fs=faulty)
            assert info.value.errno == errno.EIO and faulty.fired, fail_at
            assert report.repair is None
        after = fsck.check(path, deep=True)
        assert [p.kind for p in after.problems] in ([], ["corrupt_object"]), (fail_at, after.problems)
        with BucketStore.open(path, readonly=True) as store:
            good = {k: v for k, v in values.items() if k != corrupt_key}
            assert store.batch_get(list(good)) == good, fail_at
