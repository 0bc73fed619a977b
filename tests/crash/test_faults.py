"""Fault-injection sweep (issue 2, item 3).

:class:`crash_fs.FaultFS` makes the Nth eligible call fail with ``EIO``
(any call: opens, reads, writes, syncs, renames, unlinks, stats, listings,
the lock) or ``ENOSPC`` (calls that allocate: writes, creating opens, syncs,
renames, mkdir), or makes the Nth ``pwritev`` write short or the Nth ``preadv`` read short. The workload
starts on a directory that needs recovery, so faults also land inside
``open()``'s repair. For every N (sampled in CI): the failing operation
raises a ``KvBucketError`` without acknowledging; nothing it wrote stays
behind (the directory matches the index right after the error); sync
errors are never swallowed; a retry succeeds; everything acknowledged reads
back; a reopen finds nothing to clean up. A short write is no error at all.
"""

from __future__ import annotations

import pytest

import crash_harness as H
from crash_sweeps import fault_sweep


def fault_workload() -> list[dict]:
    ops = H.simple_workload(2, per_bucket=3, tag="f", seed=21)
    first, second = ops[0]["keys"], ops[1]["keys"]
    ops[2:2] = [
        {"op": "remove", "keys": [first[0]]},
        {"op": "batch_remove", "keys": [second[0], H.make_key("never-stored", 3)]},
        {"op": "compact", "ratio": 0.01},
        {"op": "load", "keys": [*first[1:], *second[1:]]},
        {"op": "delete_bucket_of", "key": first[1]},
        {"op": "offload", "keys": [H.make_key("f-last", 10000), H.make_key("f-last2", 0)]},
    ]
    return ops


@pytest.fixture(scope="module")
def dirty_template(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dirty") / "store")
    H.fresh_dir(path)
    fates = H.make_dirty(path)
    return path, H.dirty_expect(fates)


CASES = {
    # name: (kind, sticky, durability, CI budget of fault points; all in a full sweep)
    "eio": ("eio", False, "strict", 400),
    "enospc": ("enospc", False, "strict", 400),
    "enospc-sticky": ("enospc", True, "strict", 400),
    "short-write": ("short", False, "strict", 400),
    "short-read": ("short_read", False, "strict", 400),
    "short-read-direct": ("short_read", False, "strict-direct", 400),
    "eio-relaxed": ("eio", False, "relaxed", 400),
    "eio-direct": ("eio", False, "strict-direct", 400),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fault_sweep(tmp_path, crash_counts, small_writes, dirty_template, case):
    kind, sticky, durability, budget = CASES[case]
    template, base_expect = dirty_template
    config = {"durability": durability.split("-")[0], "io_threads": 1}
    if durability.endswith("direct"):
        config["io_mode"] = "direct"
    failures, stats = fault_sweep(
        tmp_path, fault_workload(), config, kind, budget=budget, seed=len(case), template=template, sticky=sticky, base_expect=base_expect
    )
    crash_counts(**stats)
    assert stats["fired"] > 0
    if not kind.startswith("short"):
        assert stats["raised"] > 0
    assert not failures, H.format_failures(failures)
