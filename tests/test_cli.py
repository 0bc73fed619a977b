"""The ``kvbucket`` command, run for real in a subprocess.

Each test builds a directory (a kvbucket store, or a Mooncake directory
through tests/mooncake_writer.py), damages it, runs the command and checks
the output, the ``--json`` document, the exit status, and, for everything but
``--repair``/``rm``/``import``, that not one byte or name in the directory
changed (no LOCK file either).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvbucket import BucketStore
from kvbucket._core.format import LOCK_NAME, data_name, meta_name, tmp_name
from mooncake_writer import MooncakeDir, tree_digest

SRC = Path(__file__).resolve().parents[1] / "src"


def kvbucket(*args: str | os.PathLike[str], stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m kvbucket.tools.cli ARGS`` (in ``cwd``); never raises on a non-zero exit."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.fspath(SRC), env.get("PYTHONPATH")]))
    env.pop("KVBUCKET_PATH", None)
    proc = subprocess.run(
        [sys.executable, "-m", "kvbucket.tools.cli", *map(os.fspath, args)],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()
    return proc


def run_json(*args: str | os.PathLike[str]) -> tuple[int, dict]:
    proc = kvbucket(*args, "--json")
    return proc.returncode, json.loads(proc.stdout)


def values(prefix: str, n: int, size: int = 700) -> dict[str, bytes]:
    return {f"{prefix}-{i}": bytes([i % 256]) * size + b"\x00\n" + prefix.encode() for i in range(n)}


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A store with buckets 1..6 of three objects each, and no LOCK file."""
    path = tmp_path / "store"
    with BucketStore.open(path) as store:
        for b in range(1, 7):
            store.batch_offload(values(f"b{b}", 3))
    os.unlink(path / LOCK_NAME)
    return path


def damage(path: Path, kind: str) -> None:
    """Break ``path`` in one of the ways fsck reports."""
    if kind == "orphan_data":
        os.unlink(path / meta_name(2))
    elif kind == "meta_without_data":
        os.unlink(path / data_name(3))
    elif kind == "invalid_meta":
        raw = bytearray((path / meta_name(4)).read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (path / meta_name(4)).write_bytes(bytes(raw))
    elif kind == "short_data":
        os.truncate(path / data_name(5), 100)
    elif kind == "temporary":
        (path / tmp_name(7)).write_bytes(b"half a meta")
    else:
        raise AssertionError(kind)


KV_KINDS = ["orphan_data", "meta_without_data", "invalid_meta", "short_data", "temporary"]


def corrupt_value(path: Path, bucket_id: int) -> None:
    """Flip one byte inside the first value of a bucket."""
    with open(path / data_name(bucket_id), "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0x55]))


# -- fsck on kvbucket directories ---------------------------------------------------


def test_fsck_clean_store(store_dir: Path) -> None:
    before = tree_digest(store_dir)
    proc = kvbucket("fsck", store_dir)
    assert proc.returncode == 0
    assert b"valid buckets   6" in proc.stdout and b"clean." in proc.stdout
    code, report = run_json("fsck", store_dir, "--deep")
    assert code == 0
    assert report["valid_buckets"] == 6 and report["valid_objects"] == 18
    assert report["problems"] == [] and report["clean"] is True and report["exit_code"] == 0
    assert report["format"] == "kvbucket" and report["repair"] is None
    assert tree_digest(store_dir) == before


@pytest.mark.parametrize("kind", KV_KINDS)
def test_fsck_reports_each_damage_and_changes_nothing(store_dir: Path, kind: str) -> None:
    damage(store_dir, kind)
    before = tree_digest(store_dir)
    code, report = run_json("fsck", store_dir)
    assert code == 1
    assert [p["kind"] for p in report["problems"]] == [kind]
    problem = report["problems"][0]
    assert problem["bytes"] == sum(os.path.getsize(store_dir / f) for f in problem["files"])
    assert report["clean"] is False
    human = kvbucket("fsck", store_dir)
    assert human.returncode == 1 and kind.encode() in human.stdout and b"nothing was changed" in human.stdout
    assert tree_digest(store_dir) == before
    assert not (store_dir / LOCK_NAME).exists()


@pytest.mark.parametrize("kind", KV_KINDS)
def test_fsck_repair_fixes_each_damage(store_dir: Path, kind: str) -> None:
    damage(store_dir, kind)
    (store_dir / "notes.txt").write_bytes(b"foreign")
    code, report = run_json("fsck", "--repair", store_dir)
    assert code == 0, report
    assert [p["kind"] for p in report["problems"]] == [kind]
    assert sorted(report["repair"]["removed"]) == sorted(report["problems"][0]["files"])
    assert report["repair"]["remaining_problems"] == [] and report["clean"] is True
    assert (store_dir / "notes.txt").read_bytes() == b"foreign"
    code, after = run_json("fsck", store_dir, "--deep")
    assert code == 0 and after["problems"] == []
    with BucketStore.open(store_dir, readonly=True) as store:
        assert store.batch_get(["b1-2", "b6-0"]) == {"b1-2": values("b1", 3)["b1-2"], "b6-0": values("b6", 3)["b6-0"]}


def test_fsck_all_damage_at_once_with_quarantine(store_dir: Path) -> None:
    for kind in KV_KINDS:
        damage(store_dir, kind)
    orphan = (store_dir / data_name(2)).read_bytes()
    proc = kvbucket("fsck", store_dir, "--repair", "--quarantine")
    assert proc.returncode == 0
    assert b"repair: quarantined 7 file(s)" in proc.stdout and b"all problems fixed." in proc.stdout
    assert (store_dir / "quarantine" / data_name(2)).read_bytes() == orphan
    assert sorted(os.listdir(store_dir)) == ["1.bucket", "1.meta", "6.bucket", "6.meta", LOCK_NAME, "quarantine"]


def test_fsck_deep_finds_and_repair_removes_only_the_corrupt_object(store_dir: Path) -> None:
    corrupt_value(store_dir, 4)
    before = tree_digest(store_dir)
    assert run_json("fsck", store_dir)[0] == 0  # a shallow check cannot see it
    code, report = run_json("fsck", store_dir, "--deep")
    assert code == 1
    assert [(p["kind"], p["key"], p["bucket"]) for p in report["problems"]] == [("corrupt_object", "b4-0", 4)]
    assert tree_digest(store_dir) == before
    assert kvbucket("get", store_dir, "b4-0").returncode == 1
    code, report = run_json("fsck", store_dir, "--deep", "--repair")
    assert code == 0 and report["repair"]["removed_keys"] == ["b4-0"]
    assert kvbucket("get", store_dir, "b4-0").returncode == 1  # gone, not served
    survivors = values("b4", 3)
    for key in ("b4-1", "b4-2"):
        assert kvbucket("get", store_dir, key).stdout == survivors[key]
    code, report = run_json("fsck", store_dir, "--deep")
    assert code == 0 and report["valid_objects"] == 17 and report["dead_bytes"] > 0


def test_foreign_files_and_dead_bytes_are_not_problems(store_dir: Path) -> None:
    with BucketStore.open(store_dir) as store:
        store.remove("b1-0")
    os.unlink(store_dir / LOCK_NAME)
    (store_dir / "README").write_text("mine")
    (store_dir / "7.bucket.bak").write_bytes(b"x" * 10)
    (store_dir / "sub").mkdir()
    before = tree_digest(store_dir)
    code, report = run_json("fsck", store_dir)
    assert code == 0 and report["problems"] == []
    assert report["dead_bytes"] == len(values("b1", 3)["b1-0"])
    assert {f["name"]: f["type"] for f in report["foreign"]} == {"README": "file", "7.bucket.bak": "file", "sub": "dir"}
    code, report = run_json("fsck", store_dir, "--repair")
    assert code == 0 and report["repair"]["removed"] == []
    before.pop(LOCK_NAME, None)
    after = tree_digest(store_dir)
    after.pop(LOCK_NAME)
    assert after == before


@pytest.fixture
def held_writer(store_dir: Path) -> Iterator[Path]:
    """Another process holding the store's writer lock (synchronised by a pipe, no sleeps)."""
    code = (
        "import sys\nfrom kvbucket import BucketStore\n"
        f"s = BucketStore.open({os.fspath(store_dir)!r})\nprint('ready', flush=True)\nsys.stdin.read()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.fspath(SRC)}
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        yield store_dir
    finally:
        child.communicate(timeout=60)


def test_repair_and_rm_refuse_while_a_writer_holds_the_lock(held_writer: Path) -> None:
    damage(held_writer, "orphan_data")
    before = tree_digest(held_writer)
    proc = kvbucket("fsck", held_writer, "--repair")
    assert proc.returncode == 2 and b"another process holds its writer lock" in proc.stderr
    proc = kvbucket("rm", held_writer, "b1-0")
    assert proc.returncode == 2 and b"another process holds its writer lock" in proc.stderr
    code, report = run_json("rm", held_writer, "b1-0")
    assert code == 2 and "writer lock" in report["error"]
    code, report = run_json("fsck", held_writer)  # a plain check still works, and says so
    assert code == 1 and report["writer_active"] is True
    assert tree_digest(held_writer) == before


def test_quarantine_needs_repair(store_dir: Path) -> None:
    proc = kvbucket("fsck", store_dir, "--quarantine")
    assert proc.returncode == 2 and b"--quarantine only applies with --repair" in proc.stderr


# -- stats, ls, get, rm ----------------------------------------------------------------


def test_read_only_commands_change_nothing(store_dir: Path) -> None:
    damage(store_dir, "orphan_data")
    before = tree_digest(store_dir)
    code, stats = run_json("stats", store_dir)
    assert code == 0
    assert (stats["keys"], stats["buckets"], stats["format"]) == (15, 5, "kvbucket")
    assert stats["logical_bytes"] == sum(len(v) for b in (1, 3, 4, 5, 6) for v in values(f"b{b}", 3).values())
    assert stats["physical_bytes"] > stats["logical_bytes"]
    human = kvbucket("stats", store_dir)
    assert human.returncode == 0 and b"keys                 15" in human.stdout
    code, listing = run_json("ls", store_dir, "--bucket", "3")
    assert code == 0 and [o["key"] for o in listing["objects"]] == ["b3-0", "b3-1", "b3-2"]
    lines = kvbucket("ls", store_dir).stdout.decode().splitlines()
    assert len(lines) == 15 and lines[0].split("\t") == ["1", str(len(values("b1", 1)["b1-0"])), "b1-0"]
    assert kvbucket("get", store_dir, "b6-1").stdout == values("b6", 3)["b6-1"]
    assert tree_digest(store_dir) == before
    assert not (store_dir / LOCK_NAME).exists()


def test_get_output_file_and_unknown_key(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "value.bin"
    proc = kvbucket("get", "-o", out, store_dir, "b2-0")
    assert proc.returncode == 0 and proc.stdout == b""
    assert out.read_bytes() == values("b2", 3)["b2-0"]
    proc = kvbucket("get", store_dir, "no-such-key")
    assert proc.returncode == 1 and proc.stdout == b"" and b"no-such-key" in proc.stderr
    proc = kvbucket("ls", store_dir, "--bucket", "99")
    assert proc.returncode == 1 and b"bucket 99" in proc.stderr


def test_get_output_dash_is_stdout(store_dir: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for option in ("-o", "--output"):
        proc = kvbucket("get", store_dir, "b2-1", option, "-", cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == values("b2", 3)["b2-1"]
    assert os.listdir(cwd) == []  # no file named "-"


def test_keys_with_nul_and_backslash_round_trip_through_ls_and_get(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with BucketStore.open(path) as store:
        store.batch_offload({"tenant\x00page\\1": b"nul", "caf\u00e9\u200b": b"zwsp"})
    lines = kvbucket("ls", path).stdout.decode().splitlines()
    printed = sorted(line.split("\t")[2] for line in lines)
    assert printed == ["caf\u00e9\\u200b", "tenant\\x00page\\\\1"]
    assert kvbucket("get", path, "-e", "tenant\\x00page\\\\1").stdout == b"nul"
    assert kvbucket("get", path, "--escaped", "caf\u00e9\\u200b").stdout == b"zwsp"
    _code, listing = run_json("ls", path)
    assert sorted(o["key"] for o in listing["objects"]) == ["caf\u00e9\u200b", "tenant\x00page\\1"]


def test_rm(store_dir: Path) -> None:
    before = tree_digest(store_dir)
    proc = kvbucket("rm", store_dir, "b1-0", "nope")
    assert proc.returncode == 1 and b"nothing removed" in proc.stderr
    assert tree_digest(store_dir) == {**before, LOCK_NAME: tree_digest(store_dir)[LOCK_NAME]}
    code, report = run_json("rm", store_dir, "b1-0", "b1-1", "nope", "--force")
    assert code == 0 and report["removed"] == ["b1-0", "b1-1"] and report["missing"] == ["nope"]
    proc = kvbucket("rm", store_dir, "b2-0")
    assert proc.returncode == 0 and proc.stdout == b"removed 1 key(s)\n"
    code, stats = run_json("stats", store_dir)
    assert stats["keys"] == 15


# -- usage and I/O errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["fsck"],
        ["fsck", "{dir}", "--no-such-option"],
        ["fsck", "{dir}", "--format", "rocksdb"],
        ["frobnicate"],
        ["rm", "{dir}"],
        ["bench", "--object-size", "lots"],
        ["bench", "--bucket-keys", str((1 << 20) + 1)],
        ["bench", "--depth", "0"],
        ["import", "{dir}", "{dir}/x"],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    proc = kvbucket(*(a.format(dir=tmp_path) for a in args))
    assert proc.returncode == 2
    assert proc.stderr


@pytest.mark.parametrize("command", ["fsck", "stats", "ls", "rm"])
def test_missing_directory_exits_2_and_creates_nothing(tmp_path: Path, command: str) -> None:
    extra = ["k"] if command == "rm" else []
    code, report = run_json(command, tmp_path / "absent", *extra)
    assert code == 2 and "no such directory" in report["error"]
    assert not (tmp_path / "absent").exists()


def test_help_on_every_command() -> None:
    for command in ["fsck", "stats", "ls", "get", "rm", "import", "bench"]:
        proc = kvbucket(command, "--help")
        assert proc.returncode == 0 and b"Usage: kvbucket " + command.encode() in proc.stdout


def test_verbose_logs_details_quiet_by_default(store_dir: Path) -> None:
    damage(store_dir, "orphan_data")
    quiet = kvbucket("fsck", store_dir, "--repair")
    assert quiet.returncode == 0 and quiet.stderr == b""
    damage(store_dir, "temporary")
    loud = kvbucket("fsck", store_dir, "--repair", "-v")
    assert loud.returncode == 0 and b"7.meta.tmp" in loud.stderr


@pytest.mark.parametrize(
    "command, expected",
    [
        (["stats", "{store}"], ["stats of {store}", "kvbucket format", "6 bucket(s), 18 object(s)"]),
        (["ls", "{store}"], ["listing {store}", "kvbucket format", "6 bucket(s), 18 object(s)"]),
        (["get", "{store}", "b1-0"], ["reading key 'b1-0' from {store}", "writing 704 byte(s) to stdout"]),
        (["fsck", "{store}"], ["fsck {store} (read-only)", "kvbucket format", "0 problem(s)"]),
        (["fsck", "{store}", "--repair"], ["fsck {store} --repair", "opening {store} as its writer"]),
        (["rm", "{store}", "b1-0", "nope", "--force"], ["removing 2 key(s) from {store}", "of them stored"]),
        (["import", "--from-mooncake", "{store}", "{tmp}/dst"], ["importing the Mooncake directory {store} into {tmp}/dst"]),
        (
            ["bench", "{tmp}", "--object-size", "64KiB", "--total", "256KiB", "--threads", "1", "--batch", "4", "--repeats", "1"],
            ["benchmarking the disk under {tmp}: 65536-byte objects"],
        ),
    ],
    ids=["stats", "ls", "get", "fsck", "fsck-repair", "rm", "import", "bench"],
)
def test_verbose_says_what_every_command_does(store_dir: Path, tmp_path: Path, command: list[str], expected: list[str]) -> None:
    args = [a.format(store=store_dir, tmp=tmp_path) for a in command]
    quiet = kvbucket(*args)
    assert b"INFO" not in quiet.stderr  # (importing a kvbucket store fails, with one error line)
    for flag in ("-v", "-vv"):
        loud = kvbucket(*args, flag)
        assert loud.returncode == quiet.returncode
        log = loud.stderr.decode()
        for text in expected:
            assert "kvbucket: INFO kvbucket.tools.cli: " in log and text.format(store=store_dir, tmp=tmp_path) in log, log


# -- Mooncake directories -----------------------------------------------------------------


@pytest.fixture
def mooncake_dir(tmp_path: Path) -> MooncakeDir:
    d = MooncakeDir(tmp_path / "mc")
    for b in range(1, 8):
        d.write_bucket(b, {f"m{b}-{i}": os.urandom(300 + i) for i in range(3)})
    return d


MOONCAKE_DAMAGE = {
    "orphan_data": lambda d: d.orphan_data(2),
    "meta_without_data": lambda d: d.remove_data(2),
    "invalid_meta": lambda d: d.truncate_meta(2, 5),
    "list_length_mismatch": lambda d: d.mismatched_lists(2),
    "object_past_end": lambda d: d.truncate_data(2, 500),
    "key_mismatch": lambda d: d.flip_key_byte(2, 1),
}


@pytest.mark.parametrize("kind", sorted(MOONCAKE_DAMAGE))
def test_fsck_mooncake_reports_and_repairs_each_damage(mooncake_dir: MooncakeDir, kind: str) -> None:
    MOONCAKE_DAMAGE[kind](mooncake_dir)
    (mooncake_dir.root / "LOCK.txt").write_text("foreign")
    before = tree_digest(mooncake_dir.root)
    code, report = run_json("fsck", mooncake_dir.root, "--json", "--format", "mooncake")
    assert code == 1 and report["format"] == "mooncake"
    assert [(p["kind"], p["bucket"]) for p in report["problems"]] == [(kind, 2)]
    assert report["valid_buckets"] == 6 and report["valid_objects"] == 18
    assert tree_digest(mooncake_dir.root) == before
    code, report = run_json("fsck", "--repair", mooncake_dir.root)  # detected without --format
    assert code == 0 and report["format"] == "mooncake" and report["clean"] is True
    assert sorted(report["repair"]["removed"]) == sorted(report["problems"][0]["files"])
    after = tree_digest(mooncake_dir.root)
    assert after == {k: v for k, v in before.items() if not k.startswith("2.")}


def test_mooncake_read_commands(mooncake_dir: MooncakeDir) -> None:
    before = tree_digest(mooncake_dir.root)
    code, stats = run_json("stats", mooncake_dir.root)
    assert code == 0 and (stats["format"], stats["keys"], stats["buckets"]) == ("mooncake", 21, 7)
    lines = kvbucket("ls", mooncake_dir.root, "--bucket", "3").stdout.decode().splitlines()
    assert [line.split("\t")[2] for line in lines] == ["default\\x00m3-0", "default\\x00m3-1", "default\\x00m3-2"]
    value = mooncake_dir.buckets[3].values[b"default\x00m3-1"]
    assert kvbucket("get", mooncake_dir.root, "m3-1").stdout == value
    assert kvbucket("get", mooncake_dir.root, "-e", "default\\x00m3-1").stdout == value
    assert kvbucket("get", mooncake_dir.root, "m3-9").returncode == 1
    assert tree_digest(mooncake_dir.root) == before


def test_writers_refuse_a_mooncake_directory(mooncake_dir: MooncakeDir, tmp_path: Path) -> None:
    before = tree_digest(mooncake_dir.root)
    proc = kvbucket("rm", mooncake_dir.root, "m1-0")
    assert proc.returncode == 2 and b"looks like a Mooncake directory" in proc.stderr
    proc = kvbucket("fsck", mooncake_dir.root, "--repair", "--format", "kvbucket")
    assert proc.returncode == 2 and b"looks like a Mooncake directory" in proc.stderr
    other = MooncakeDir(tmp_path / "other")
    other.write_bucket(1, {"x": b"1"})
    proc = kvbucket("import", "--from-mooncake", other.root, mooncake_dir.root)
    assert proc.returncode == 2 and b"looks like a Mooncake directory" in proc.stderr
    assert tree_digest(mooncake_dir.root) == before


def test_fsck_repair_detects_mooncake_past_unreadable_metas(tmp_path: Path) -> None:
    """The first 16 metas in listing order are unreadable: detection still
    sees the valid Mooncake ones, and the repair keeps every healthy bucket."""
    d = MooncakeDir(tmp_path / "mc")
    for b in range(1, 37):
        d.write_bucket(b, {f"m{b}-0": os.urandom(200)})
    broken = [int(name.split(".")[0]) for name in sorted(f"{b}.meta" for b in range(1, 37))[:16]]
    for b in broken:
        d.garbage_meta(b)
    healthy = {k: v for k, v in tree_digest(d.root).items() if int(k.split(".")[0]) not in broken}
    code, report = run_json("fsck", "--repair", d.root)
    assert code == 0 and report["format"] == "mooncake"
    assert sorted(report["repair"]["removed"]) == sorted(f"{b}.{kind}" for b in broken for kind in ("bucket", "meta"))
    assert tree_digest(d.root) == healthy


def test_fsck_repair_refuses_when_the_format_is_unknown(tmp_path: Path) -> None:
    d = MooncakeDir(tmp_path / "mc")
    for b in range(1, 5):
        d.write_bucket(b, {f"m{b}-0": os.urandom(200)})
        d.garbage_meta(b)
    before = tree_digest(d.root)
    for args in (("fsck", "--repair", d.root), ("fsck", d.root), ("stats", d.root)):
        proc = kvbucket(*args)
        assert proc.returncode == 2 and b"cannot tell whether" in proc.stderr and b"--format" in proc.stderr
    assert tree_digest(d.root) == before


@pytest.mark.parametrize("content", ["empty", "foreign files", "parent of a store"])
def test_commands_on_a_directory_that_is_not_a_store(tmp_path: Path, content: str) -> None:
    path = tmp_path / "dir"
    path.mkdir()
    if content == "foreign files":
        (path / "notes.txt").write_text("x")
        (path / "sub").mkdir()
    elif content == "parent of a store":
        with BucketStore.open(path / "store") as store:
            store.batch_offload({"a": b"1"})
    before = tree_digest(path)
    for args in (("stats",), ("fsck",), ("fsck", "--repair"), ("ls",), ("get", "a"), ("rm", "a")):
        proc = kvbucket(*args[:1], path, *args[1:])
        assert proc.returncode == 2, (args, proc.stderr)
        assert b"not a kvbucket store" in proc.stderr, (args, proc.stderr)
        if args[0] != "get":  # get writes the value itself, it has no --json
            code, report = run_json(*args[:1], path, *args[1:])
            assert code == 2 and "not a kvbucket store" in report["error"]
    assert tree_digest(path) == before
    assert not (path / LOCK_NAME).exists()


def test_stats_shows_the_limits_the_writer_runs_with(tmp_path: Path) -> None:
    path = tmp_path / "store"
    limits = {"max_total_size": 64 << 20, "max_physical_bytes": 128 << 20, "total_keys_limit": 1000}
    with BucketStore.open(path, **limits) as store:
        store.batch_offload({"a": b"1"})
        code, report = run_json("stats", path)  # while the writer runs
        assert code == 0 and {k: report[k] for k in limits} == limits and report["limits_known"] is True
        text = kvbucket("stats", path).stdout.decode()
        assert "unlimited" not in text and "67,108,864" in text and "128.0 MiB" in text and "1,000" in text
    with BucketStore.open(path, readonly=True) as reader:  # the library reports them too
        stats = reader.stats()
        assert (stats.max_total_size, stats.max_physical_bytes, stats.total_keys_limit) == tuple(limits.values())
    with BucketStore.open(path):  # the next writer records its own (none)
        pass
    code, report = run_json("stats", path)
    assert code == 0 and {k: report[k] for k in limits} == dict.fromkeys(limits, 0)
    assert "unlimited" in kvbucket("stats", path).stdout.decode()


def test_stats_says_unknown_when_no_limits_are_recorded(store_dir: Path) -> None:
    assert not (store_dir / LOCK_NAME).exists()  # nothing records the writer's limits
    code, report = run_json("stats", store_dir)
    assert code == 0 and report["limits_known"] is False
    assert "unknown" in kvbucket("stats", store_dir).stdout.decode()


def test_import_from_mooncake(mooncake_dir: MooncakeDir, tmp_path: Path) -> None:
    before = tree_digest(mooncake_dir.root)
    dst = tmp_path / "new" / "store"
    proc = kvbucket("import", "--from-mooncake", mooncake_dir.root, dst)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"imported 21 object(s)") and b"complete." in proc.stdout
    expected = {raw.split(b"\x00", 1)[1].decode(): v for b in mooncake_dir.buckets.values() for raw, v in b.values.items()}
    with BucketStore.open(dst, readonly=True) as store:
        assert store.batch_get(list(expected)) == expected
    assert kvbucket("get", dst, "m7-2").stdout == expected["m7-2"]
    code, report = run_json("fsck", dst, "--deep")
    assert code == 0 and report["valid_objects"] == 21
    # again: every key is already there, so everything is skipped and reported
    code, report = run_json("import", mooncake_dir.root, dst, "--from-mooncake")
    assert code == 1 and report["imported"] == 0 and len(report["skipped"]) == 21
    assert {s["reason"] for s in report["skipped"]} == {"already in destination"}
    assert set(report) >= {"source", "destination", "imported", "imported_bytes", "skipped", "skipped_buckets", "complete"}
    assert tree_digest(mooncake_dir.root) == before


def test_import_reports_broken_source_buckets_and_keep_tenant(mooncake_dir: MooncakeDir, tmp_path: Path) -> None:
    mooncake_dir.flip_key_byte(5)
    before = tree_digest(mooncake_dir.root)
    code, report = run_json("import", "--from-mooncake", "--keep-tenant", mooncake_dir.root, tmp_path / "dst")
    assert code == 1 and report["imported"] == 18 and report["complete"] is False
    assert [(f["bucket"], f["kind"]) for f in report["skipped_buckets"]] == [(5, "key_mismatch")]
    assert kvbucket("get", "-e", tmp_path / "dst", "default\\x00m1-0").stdout == mooncake_dir.buckets[1].values[b"default\x00m1-0"]
    assert tree_digest(mooncake_dir.root) == before


def test_import_needs_the_source_flag_and_distinct_directories(mooncake_dir: MooncakeDir) -> None:
    assert kvbucket("import", mooncake_dir.root, mooncake_dir.root / "x").returncode == 2
    proc = kvbucket("import", "--from-mooncake", mooncake_dir.root, mooncake_dir.root)
    assert proc.returncode == 2 and b"same directory" in proc.stderr


# -- bench ---------------------------------------------------------------------------------


def test_bench_small_run_json(tmp_path: Path) -> None:
    proc = kvbucket(
        "bench", tmp_path, "--object-size", "64KiB", "--total", "1MiB", "--threads", "2", "--batch", "4", "--repeats", "1", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["workload"]["object_size"] == 64 << 10 and "ratios" in result
    assert result["ratios"]["async_read_buffered"] > 0 and result["ratios"]["async_read_default"] > 0
    assert result["verified_objects"] > 0
    assert os.listdir(tmp_path) == []  # the scratch directory is gone


def test_bench_takes_the_async_depth_and_bucket_geometry(tmp_path: Path) -> None:
    proc = kvbucket(
        "bench", tmp_path, "--object-size", "64KiB", "--total", "1MiB", "--threads", "2", "--batch", "2", "--depth", "3",
        "--bucket-size", "256KiB", "--bucket-keys", "3", "--repeats", "1", "--json",
    )
    assert proc.returncode == 0, proc.stderr
    workload = json.loads(proc.stdout)["workload"]
    assert (workload["depth"], workload["bucket_size"], workload["bucket_keys"], workload["per_bucket"]) == (3, 256 << 10, 3, 3)


def test_fsck_reports_and_repairs_a_huge_sparse_meta(store_dir: Path) -> None:
    BucketStore.open(store_dir).close()  # a store that has been opened has its LOCK
    os.truncate(store_dir / meta_name(4), 8 << 30)  # sparse: no disk space, no memory
    code, report = run_json("fsck", store_dir)
    assert code == 1
    (problem,) = report["problems"]
    assert (problem["kind"], problem["bucket"]) == ("invalid_meta", 4)
    assert "no valid meta exceeds" in problem["detail"]
    assert os.path.getsize(store_dir / meta_name(4)) == 8 << 30  # a check changes nothing
    code, report = run_json("fsck", store_dir, "--repair")
    assert code == 0 and sorted(report["repair"]["removed"]) == [data_name(4), meta_name(4)]
    assert not (store_dir / meta_name(4)).exists()


# -- salvage of short and long data files --------------------------------------------
OBJECT = len(values("b5", 1)["b5-0"])


@pytest.mark.parametrize("cut", ["long", "short"])
def test_fsck_repair_keeps_the_objects_that_verify(store_dir: Path, cut: str) -> None:
    if cut == "long":
        with open(store_dir / data_name(5), "ab") as f:
            f.write(b"\0" * 4096)  # a block too long
        dropped: list[str] = []
    else:
        os.truncate(store_dir / data_name(5), OBJECT + 100)  # cut after the first object
        dropped = ["b5-1", "b5-2"]
    before = tree_digest(store_dir)
    code, report = run_json("fsck", store_dir, "--repair", "--dry-run")
    assert code == 1 and report["dry_run"] is True and report["repair"] is None
    assert report["plan"]["dropped_keys"] == dropped and report["plan"]["salvaged_buckets"] == [5]
    assert report["plan"]["files"] == []
    human = kvbucket("fsck", store_dir, "--repair", "--dry-run")
    assert human.returncode == 1
    assert b"would keep the objects that verify in bucket(s) 5" in human.stdout
    assert all(f"'{key}'".encode() in human.stdout for key in dropped)
    assert b"nothing was changed" in human.stdout
    assert tree_digest(store_dir) == before and not (store_dir / LOCK_NAME).exists()

    proc = kvbucket("fsck", store_dir, "--repair")
    assert proc.returncode == 0, proc.stdout
    announced, _, rest = proc.stdout.partition(b"fsck ")  # the plan comes before the report
    assert f"drops {len(dropped)} key(s)".encode() in announced
    assert all(f"'{key}'".encode() in announced for key in dropped)
    assert b"all problems fixed." in rest
    assert os.listdir(store_dir).count(data_name(5)) == 1
    kept = {k: v for k, v in values("b5", 3).items() if k not in dropped}
    for key, value in kept.items():
        assert kvbucket("get", store_dir, key).stdout == value
    for key in dropped:
        assert kvbucket("get", store_dir, key).returncode == 1
    code, after = run_json("fsck", store_dir, "--deep")
    assert code == 0 and after["valid_objects"] == 18 - len(dropped)


def test_fsck_repair_reports_what_it_dropped(store_dir: Path) -> None:
    os.truncate(store_dir / data_name(5), OBJECT + 100)
    os.unlink(store_dir / data_name(3))  # meta without data: its keys are known too
    code, report = run_json("fsck", store_dir, "--repair")
    assert code == 0
    assert sorted(report["repair"]["dropped_keys"]) == ["b3-0", "b3-1", "b3-2", "b5-1", "b5-2"]
    assert report["repair"]["salvaged_buckets"] == [5] and report["repair"]["removed"] == [meta_name(3)]


def test_fsck_quarantine_does_not_claim_freed_bytes(store_dir: Path) -> None:
    damage(store_dir, "orphan_data")
    size = os.path.getsize(store_dir / data_name(2))
    code, report = run_json("fsck", store_dir, "--repair", "--quarantine")
    assert code == 0
    assert report["repair"]["freed_bytes"] == 0 and report["repair"]["quarantined_bytes"] == size
    damage(store_dir, "meta_without_data")
    proc = kvbucket("fsck", store_dir, "--repair", "--quarantine")
    assert b"moved to quarantine/, not freed" in proc.stdout and b" freed" not in proc.stdout.replace(b"not freed", b"")
