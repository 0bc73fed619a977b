"""The harness checks itself: each invariant check must fail on a store
state that breaks it, and the power-loss model must produce the states it
promises. A harness that cannot fail proves nothing."""

from __future__ import annotations

import os

import crash_harness as H
import crash_power as P
from crash_fs import CANARIES, GROUP_CANARIES, FaultFS, ForwardingFS, KillFS, NoUnlinkFS, RecordingFS, unknown_seam_methods
from crash_sweeps import kill_sweep
from kvbucket import BucketStore
from kvbucket._core.fs import FileSystem


def test_seam_is_fully_wrapped():
    """Every FileSystem method is known to the wrappers; a new primitive would
    bypass the recorder and the fault injector silently."""
    assert not unknown_seam_methods(), f"update crash_fs for new FileSystem methods: {unknown_seam_methods()}"


def test_harness_file_systems_run_group_commits_in_turn():
    """The sweeps count calls and replay by call number: a group commit of
    theirs makes its calls in one order, on one thread."""
    assert FileSystem.concurrent_syncs, "production runs a group's syncs concurrently"
    for wrapper in (ForwardingFS, KillFS, FaultFS, RecordingFS, *CANARIES.values(), *GROUP_CANARIES.values()):
        assert wrapper.concurrent_syncs is False, wrapper.__name__


def _store_with(path: str, pairs: dict[str, bytes]) -> int:
    with BucketStore.open(path) as store:
        return store.batch_offload(pairs)


def test_checker_flags_a_lost_key(tmp_path):
    path = H.fresh_dir(str(tmp_path / "s"))
    k = H.make_key("a", 10)
    _store_with(path, {k: H.value_for(k)})
    exp = H.Expectation(live={k, H.make_key("lost", 3)})
    res = H.check_recovered(path, exp)
    assert any("lost" in f for f in res.failures), res.failures


def test_checker_flags_wrong_bytes(tmp_path):
    path = H.fresh_dir(str(tmp_path / "s"))
    k = H.make_key("a", 10)
    _store_with(path, {k: b"x" * 10})  # checksummed, but not the key's bytes
    res = H.check_recovered(path, H.Expectation(live={k}))
    assert any("WRONG BYTES" in f for f in res.failures), res.failures


def test_checker_flags_a_resurrected_or_unknown_key(tmp_path):
    path = H.fresh_dir(str(tmp_path / "s"))
    k, j = H.make_key("a", 10), H.make_key("b", 10)
    _store_with(path, {k: H.value_for(k), j: H.value_for(j)})
    res = H.check_recovered(path, H.Expectation(gone={k}))
    assert any("removed or never" in f for f in res.failures), res.failures
    assert any("never written" in f for f in res.failures), res.failures


def test_checker_flags_a_leak_and_a_wrong_report(tmp_path, monkeypatch):
    import kvbucket._core.recovery

    path = H.fresh_dir(str(tmp_path / "s"))
    k = H.make_key("a", 10)
    b = _store_with(path, {k: H.value_for(k)})
    with open(os.path.join(path, f"{b + 1}.bucket"), "wb") as f:
        f.write(b"orphan")
    monkeypatch.setattr(kvbucket._core.recovery, "unlink_if_present", lambda fs, p: None)
    res = H.check_recovered(path, H.Expectation(live={k}), post_ops=False)
    assert any("not accounted for" in f for f in res.failures), res.failures
    assert any("removed_files" in f for f in res.failures), res.failures


def test_checker_flags_a_reused_bucket_id(tmp_path):
    path = H.fresh_dir(str(tmp_path / "s"))
    k = H.make_key("a", 10)
    _store_with(path, {k: H.value_for(k)})
    res = H.check_recovered(path, H.Expectation(live={k}, max_acked_id=1000))
    assert any("not above" in f for f in res.failures), res.failures


def test_checker_flags_a_changed_foreign_file(tmp_path):
    path = H.fresh_dir(str(tmp_path / "s"))
    with open(os.path.join(path, "notes"), "wb") as f:
        f.write(b"mine")
    foreign = H.snapshot_foreign(path)
    with open(os.path.join(path, "notes"), "wb") as f:
        f.write(b"changed")
    res = H.check_recovered(path, H.Expectation(), foreign=foreign)
    assert "foreign files changed" in res.failures


def test_expectation_model():
    ops = [
        {"op": "offload", "keys": ["a#1", "b#1"]},
        {"op": "remove", "keys": ["a#1"]},
        {"op": "offload", "keys": ["c#1"]},
        {"op": "offload", "keys": ["d#1"]},
    ]
    events = [
        {"ev": "begin", "i": 0},
        {"ev": "done", "i": 0, "result": 1},
        {"ev": "begin", "i": 1},
        {"ev": "done", "i": 1, "result": ["a#1"]},
        {"ev": "begin", "i": 2},
    ]
    exp = H.expectation(ops, events)
    assert exp.live == {"b#1"} and exp.gone == {"a#1", "d#1"} and exp.maybe == {"c#1"} and exp.max_acked_id == 1
    relaxed = H.expectation(ops, events, acked_durable=False)
    assert relaxed.live == set() and relaxed.maybe == {"a#1", "b#1", "c#1"} and relaxed.max_acked_id == -1


def test_power_model_states():
    """Unsynced writes and directory entries can be lost; synced ones cannot;
    a rename persists as an atomic name switch or not at all."""
    log = [
        ("create", "d", 1),
        ("write", 1, 0, b"D" * 1500),
        ("sync", 1),
        ("create", "t", 2),
        ("write", 2, 0, b"M" * 100),
        ("sync", 2),
        ("rename", "t", "m", 2),
        ("dirsync",),
        ("write", 1, 1500, b"E" * 600),
    ]
    points = {p.k: p for p in P.crash_points({}, log)}
    p = points[7]  # after the rename, before the directory sync
    states = {s.label: P.materialise(p, s.data_choice, s.dir_choice) for s in P.states_at(p, __import__("random").Random(0), 0)}
    assert states["all unsynced lost"] == {}
    assert states["all unsynced kept"] == {"d": b"D" * 1500, "m": b"M" * 100}
    assert {frozenset(s) for s in states.values()} >= {frozenset(), frozenset({"d"}), frozenset({"d", "m"})}
    assert all("t" not in s or "m" not in s for s in states.values())
    p = points[9]  # an unsynced append after everything was synced
    found = {bytes(P.materialise(p, s.data_choice, s.dir_choice)["d"][1500:]) for s in P.states_at(p, __import__("random").Random(0), 20)}
    assert {b"", b"E" * 600, b"\0" * 600, b"E" * 512} <= found
    assert all(P.materialise(p, s.data_choice, s.dir_choice)["m"] == b"M" * 100 for s in P.states_at(p, __import__("random").Random(0), 20))


def test_canaries_are_registered():
    assert set(CANARIES) == {"no_data_fdatasync", "no_meta_fsync", "no_dir_fsync", "meta_in_place"}


def test_kill9_harness_catches_a_store_that_never_deletes(runner, tmp_path, crash_counts):
    """A kill -9 cannot lose unsynced data, but it does expose a store whose
    deletions never happen: removed keys come back after the crash."""
    ops = [
        {"op": "offload", "keys": [H.make_key("n0", 3000), H.make_key("n1", 10)]},
        {"op": "offload", "keys": [H.make_key("n2", 3000)]},
        {"op": "batch_remove", "keys": [H.make_key("n0", 3000), H.make_key("n1", 10)]},
        {"op": "offload", "keys": [H.make_key("n3", 100)]},
    ]
    failures, stats = kill_sweep(runner, tmp_path, ops, {"io_threads": 1}, budget=10**9, wrap=NoUnlinkFS.__name__, stop_at_first=True)
    crash_counts(kill_points_until_caught=stats["kill_points_tried"])
    assert failures, "the kill -9 harness did not notice a store that never deletes"
