"""kvbucket.mooncake: the protobuf-wire codec, the directory scanner, repair and import.

Mooncake directories are built by tests/mooncake_writer.py, an encoder written
independently of the module under test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbucket import BucketStore
from kvbucket import mooncake as mc
from kvbucket.errors import CorruptionError, ForeignEntry, InvalidArgument
from mooncake_writer import MooncakeDir, bucket_metadata, stored_key, tree_digest, varint

# -- the codec -----------------------------------------------------------------

# data_size=11, keys=[b"ab"], metadatas=[(offset 0, key_size 2, data_size 9)]:
# field 1 varint 11; field 2 "ab"; field 3 {field 2 = 2, field 3 = 9} (offset 0 omitted).
GOLDEN = bytes([0x08, 0x0B, 0x12, 0x02, 0x61, 0x62, 0x1A, 0x04, 0x10, 0x02, 0x18, 0x09])


def test_golden_bytes_decode_and_encode() -> None:
    meta = mc.decode_bucket_meta(GOLDEN)
    assert meta == mc.BucketMetadata(11, [b"ab"], [mc.ObjectMetadata(0, 2, 9)])
    assert mc.encode_bucket_meta(meta) == GOLDEN
    assert bucket_metadata(11, [b"ab"], [(0, 2, 9)]) == GOLDEN


def test_multibyte_varints_and_empty_entries() -> None:
    raw = bucket_metadata(300, [b"", b"k"], [(0, 0, 0), (1 << 40, 1, 299)])
    meta = mc.decode_bucket_meta(raw)
    assert meta.data_size == 300
    assert meta.keys == [b"", b"k"]
    assert meta.metadatas == [mc.ObjectMetadata(0, 0, 0), mc.ObjectMetadata(1 << 40, 1, 299)]
    assert mc.encode_bucket_meta(meta) == raw


_objects = st.lists(
    st.tuples(st.binary(max_size=20), st.integers(0, 2**62), st.integers(0, 2**40), st.integers(0, 2**40)), max_size=8
)


@settings(max_examples=150, deadline=None)
@given(data_size=st.integers(0, 2**63 - 1), objects=_objects)
def test_roundtrip_against_independent_encoder(data_size: int, objects: list[tuple[bytes, int, int, int]]) -> None:
    keys = [o[0] for o in objects]
    records = [o[1:] for o in objects]
    raw = bucket_metadata(data_size, keys, records)
    meta = mc.decode_bucket_meta(raw)
    assert meta.data_size == data_size
    assert meta.keys == keys
    assert [(m.offset, m.key_size, m.data_size) for m in meta.metadatas] == records
    assert mc.encode_bucket_meta(meta) == raw


def test_unknown_fields_are_skipped() -> None:
    extra = varint(9 << 3) + varint(5) + varint(10 << 3 | 2) + varint(3) + b"xyz"
    extra += varint(11 << 3 | 1) + b"\x00" * 8 + varint(12 << 3 | 5) + b"\x00" * 4
    assert mc.decode_bucket_meta(GOLDEN + extra) == mc.decode_bucket_meta(GOLDEN)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x08", "truncated varint"),
        (b"\x08" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
        (b"\x08" + b"\xff" * 9 + b"\x7f", "exceeds 64 bits"),
        (b"\x12\x05ab", "past the end"),
        (b"\x0b", "wire type 3"),
        (b"\x0c", "wire type 4"),
        (b"\x0e", "wire type 6"),
        (b"\x0a\x00", "field 1 has wire type 2"),
        (b"\x10\x01", "field 2 has wire type 0"),
        (b"\x00\x01", "field number 0"),
        (b"\x08" + varint(-5), "negative data_size"),
        (b"\x1a\x02\x08" + b"\x01", None),  # valid: offset 1 (sanity check of the case below)
        (b"\x1a\x0b\x08" + varint(-1), "negative offset"),
        (b"\x49\x00\x00", "past the end"),  # fixed64 cut short
    ],
)
def test_malformed_metas_raise_typed_error(raw: bytes, message: str | None) -> None:
    if message is None:
        mc.decode_bucket_meta(raw)
        return
    with pytest.raises(mc.MooncakeMetaError, match=message) as info:
        mc.decode_bucket_meta(raw)
    assert isinstance(info.value, CorruptionError)


def test_truncation_at_every_byte_parses_or_raises_typed_error() -> None:
    raw = bucket_metadata(1234, [b"default\x00key-1", b"default\x00key-2"], [(0, 13, 600), (613, 13, 608)])
    outcomes = set()
    for length in range(len(raw)):
        try:
            mc.decode_bucket_meta(raw[:length])
            outcomes.add("parsed")
        except mc.MooncakeMetaError:
            outcomes.add("error")
    assert outcomes == {"parsed", "error"}  # field boundaries parse (as Mooncake's parser does)


def test_split_tenant() -> None:
    assert mc.split_tenant(b"default\x00abc") == (b"default", b"abc")
    assert mc.split_tenant(b"t\x00a\x00b") == (b"t", b"a\x00b")
    assert mc.split_tenant(b"plain") == (None, b"plain")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("0.bucket", ("0", "bucket")),
        ("1710000000.meta", ("1710000000", "meta")),
        ("007.meta", ("007", "meta")),
        ("1.meta.tmp", None),
        ("-1.bucket", None),
        ("1710000000-0.bucket", None),
        ("a.meta", None),
        ("1.BUCKET", None),
        ("1.bucket\n", None),
        ("LOCK", None),
    ],
)
def test_parse_name_is_exact(name: str, expected: tuple[str, str] | None) -> None:
    assert mc.parse_file_name(name) == expected


# -- scanning ------------------------------------------------------------------


def _objects(bucket_id: int, count: int = 3) -> dict[str | bytes, bytes]:
    return {f"key-{bucket_id}-{i}": os.urandom(50 + 37 * i) for i in range(count)}


@pytest.fixture
def damaged(tmp_path: Path) -> MooncakeDir:
    """A directory with one bucket broken in each way, two good ones, and foreign entries."""
    d = MooncakeDir(tmp_path / "mc")
    for bucket_id in range(1, 10):
        d.write_bucket(bucket_id, _objects(bucket_id))
    d.orphan_data(2)
    d.remove_data(3)
    d.garbage_meta(4)
    d.mismatched_lists(5)
    d.truncate_data(6, 120)
    d.flip_key_byte(7, 2)
    d.write_bucket(8, _objects(8), meta_data_size=10_000)
    d.write_bucket(10, _objects(10))
    d.garbage_meta(10, b"")  # an empty meta
    (d.root / "notes.txt").write_text("operator notes")
    (d.root / "11.bucket.tmp").write_bytes(b"x")
    (d.root / "12.bucket").mkdir()
    os.symlink("1.meta", d.root / "13.meta")
    return d


EXPECTED_KINDS = {
    2: "orphan_data",
    3: "meta_without_data",
    4: "invalid_meta",
    5: "list_length_mismatch",
    6: "object_past_end",
    7: "key_mismatch",
    8: "short_data",
    10: "invalid_meta",
}


def test_scan_reports_each_problem_once(damaged: MooncakeDir) -> None:
    before = tree_digest(damaged.root)
    scan = mc.scan_mooncake(damaged.root)
    assert {f.bucket: f.kind for f in scan.findings} == EXPECTED_KINDS
    assert [b.bucket_id for b in scan.buckets] == [1, 9]
    assert scan.valid_objects == 6
    assert scan.logical_bytes == sum(len(v) for b in (1, 9) for v in damaged.buckets[b].values.values())
    assert sorted(f.name for f in scan.foreign) == ["11.bucket.tmp", "12.bucket", "13.meta", "notes.txt"]
    assert {f.name: f.type for f in scan.foreign}["12.bucket"] == "dir"
    assert {f.name: f.type for f in scan.foreign}["13.meta"] == "symlink"
    assert tree_digest(damaged.root) == before


def test_scan_without_key_verification_misses_only_key_mismatch(damaged: MooncakeDir) -> None:
    scan = mc.scan_mooncake(damaged.root, verify_keys=False)
    assert {f.bucket: f.kind for f in scan.findings} == {k: v for k, v in EXPECTED_KINDS.items() if v != "key_mismatch"}


def test_key_size_disagreeing_with_key_is_a_key_mismatch(tmp_path: Path) -> None:
    d = MooncakeDir(tmp_path)
    b = d.write_bucket(1, {"a": b"12345"})
    d.meta_path(1).write_bytes(bucket_metadata(b.data_size, b.keys, [(0, b.objects[0][1] - 1, 6)]))
    (finding,) = mc.scan_mooncake(tmp_path).findings
    assert finding.kind == "key_mismatch"


def test_meta_with_no_objects_is_invalid(tmp_path: Path) -> None:
    d = MooncakeDir(tmp_path)
    d.write_bucket(1, {"a": b"1"})
    d.meta_path(1).write_bytes(bucket_metadata(5, [], []))
    (finding,) = mc.scan_mooncake(tmp_path).findings
    assert finding.kind == "invalid_meta"


def test_scan_of_a_file_raises_invalid_argument(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(InvalidArgument):
        mc.scan_mooncake(tmp_path / "f")


def test_dead_bytes_and_duplicate_keys(tmp_path: Path) -> None:
    d = MooncakeDir(tmp_path)
    d.write_bucket(1, {"a": b"1" * 10})
    d.write_bucket(2, {"a": b"1" * 10})
    with open(d.data_path(2), "ab") as f:
        f.write(b"trailing")
    scan = mc.scan_mooncake(tmp_path)
    assert not scan.findings
    assert scan.dead_bytes == len(b"trailing")
    assert scan.duplicate_keys == 1


# -- repair ----------------------------------------------------------------------


def test_repair_removes_exactly_the_broken_buckets(damaged: MooncakeDir) -> None:
    scan = mc.scan_mooncake(damaged.root)
    keep = {"1.bucket", "1.meta", "9.bucket", "9.meta", "notes.txt", "11.bucket.tmp", "12.bucket", "13.meta"}
    kept_before = {k: v for k, v in tree_digest(damaged.root).items() if k in keep}
    result = mc.repair_mooncake(scan)
    assert result.complete
    assert sorted(os.listdir(damaged.root)) == sorted(keep)
    assert {k: v for k, v in tree_digest(damaged.root).items() if k in keep} == kept_before
    assert result.freed_bytes == sum(f.bytes for f in scan.findings)
    assert not mc.scan_mooncake(damaged.root).findings


def test_repair_with_quarantine_moves_files_out_of_mooncakes_reach(damaged: MooncakeDir) -> None:
    scan = mc.scan_mooncake(damaged.root)
    orphan = (damaged.root / "2.bucket").read_bytes()
    result = mc.repair_mooncake(scan, quarantine=True)
    assert result.complete
    quarantined = sorted(os.listdir(damaged.root / "quarantine"))
    assert "2.bucket.quarantined" in quarantined
    assert all(name.endswith(".quarantined") and mc.parse_file_name(name) is None for name in quarantined)
    assert (damaged.root / "quarantine" / "2.bucket.quarantined").read_bytes() == orphan
    assert not mc.scan_mooncake(damaged.root).findings


def test_repair_leaves_a_file_that_changed_since_the_scan(tmp_path: Path) -> None:
    d = MooncakeDir(tmp_path)
    d.write_bucket(1, _objects(1))
    d.orphan_data(1)
    scan = mc.scan_mooncake(tmp_path)
    d.write_bucket(1, _objects(1, count=4))  # Mooncake finished the bucket meanwhile
    result = mc.repair_mooncake(scan)
    assert result.skipped == [("1.bucket", "changed since the scan")]
    assert not result.complete
    assert sorted(os.listdir(tmp_path)) == ["1.bucket", "1.meta"]


def test_repair_quarantine_refuses_a_linked_folder_and_never_replaces(tmp_path: Path) -> None:
    d = MooncakeDir(tmp_path / "mc")
    d.write_bucket(1, _objects(1))
    d.write_bucket(2, _objects(2))
    d.orphan_data(2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, d.root / "quarantine")
    with pytest.raises(ForeignEntry, match="quarantine"):
        mc.repair_mooncake(mc.scan_mooncake(d.root), quarantine=True)
    assert os.listdir(elsewhere) == [] and d.data_path(2).exists()
    os.unlink(d.root / "quarantine")
    (d.root / "quarantine").mkdir()
    (d.root / "quarantine" / "2.bucket.quarantined").write_bytes(b"earlier")
    result = mc.repair_mooncake(mc.scan_mooncake(d.root), quarantine=True)
    assert result.removed == ["2.bucket"]
    assert (d.root / "quarantine" / "2.bucket.quarantined").read_bytes() == b"earlier"
    assert (d.root / "quarantine" / "2.bucket.1.quarantined").exists()


# -- detection ---------------------------------------------------------------------


def test_detect_format(tmp_path: Path) -> None:
    assert mc.detect_format(tmp_path) == "none"  # empty: neither engine's
    d = MooncakeDir(tmp_path / "mc")
    d.write_bucket(1, _objects(1))
    assert mc.detect_format(d.root) == "mooncake"
    with BucketStore.open(tmp_path / "kv") as store:
        store.batch_offload({"a": b"1"})
    assert mc.detect_format(tmp_path / "kv") == "kvbucket"
    os.unlink(tmp_path / "kv" / "LOCK")
    assert mc.detect_format(tmp_path / "kv") == "kvbucket"  # by the meta's magic


def test_detect_format_reads_every_meta(tmp_path: Path) -> None:
    """Unreadable metas first in listing order do not hide the valid Mooncake ones."""
    d = MooncakeDir(tmp_path / "mc")
    for b in range(1, 37):
        d.write_bucket(b, _objects(b))
    unreadable = sorted(f"{b}.meta" for b in range(1, 37))[:20]
    for name in unreadable:
        d.garbage_meta(int(name.split(".")[0]))
    assert mc.detect_format(d.root) == "mooncake"
    evidence = mc.format_evidence(d.root)
    assert len(evidence.mooncake_metas) == 16 and not evidence.kvbucket_metas


def test_detect_format_is_unknown_without_telling_evidence(tmp_path: Path) -> None:
    d = MooncakeDir(tmp_path / "mc")
    for b in range(1, 4):
        d.write_bucket(b, _objects(b))
        d.garbage_meta(b)
    assert mc.detect_format(d.root) == "unknown"  # bucket files, but no meta tells whose
    with BucketStore.open(tmp_path / "kv") as store:
        store.batch_offload({"a": b"1"})
    d.write_bucket(9, _objects(9))
    os.replace(d.meta_path(9), tmp_path / "kv" / "9.meta")
    assert mc.detect_format(tmp_path / "kv") == "unknown"  # both engines' metas


# -- import --------------------------------------------------------------------------


def _source(tmp_path: Path) -> MooncakeDir:
    d = MooncakeDir(tmp_path / "src")
    d.write_bucket(1, _objects(1, 4))
    d.write_bucket(2, {"bin\x00ary": b"\x00\n\xff" * 100, "empty": b""})
    d.write_bucket(3, {"old-style": b"v" * 77}, tenant=None)
    return d


def test_import_copies_every_object_byte_for_byte(tmp_path: Path) -> None:
    src = _source(tmp_path)
    before = tree_digest(src.root)
    with BucketStore.open(tmp_path / "dst", bucket_keys_limit=2) as store:
        report = mc.import_mooncake(src.root, store)
        expected = {}
        for b in src.buckets.values():
            for raw, value in b.values.items():
                expected[mc.split_tenant(raw)[1].decode()] = value
        assert store.batch_get(list(expected)) == expected
        assert len(store.bucket_ids()) == report.buckets_written == 4  # 4 + 2 + 1 objects, at most 2 a bucket
    assert report.complete and report.imported == 7 and not report.skipped
    assert report.imported_bytes == sum(len(v) for v in expected.values())
    assert tree_digest(src.root) == before


def test_import_keep_tenant(tmp_path: Path) -> None:
    src = _source(tmp_path)
    with BucketStore.open(tmp_path / "dst") as store:
        mc.import_mooncake(src.root, store, keep_tenant=True)
        assert store.exists(stored_key("key-1-0").decode())
        assert store.exists("old-style")
        assert not store.exists("key-1-0")


def test_import_reports_what_it_skips(tmp_path: Path) -> None:
    d = MooncakeDir(tmp_path / "src")
    d.write_bucket(1, {"a": b"1", "": b"empty user key", b"\xff\xfe": b"not utf-8"})
    d.write_bucket(2, {"a": b"1"}, tenant="other")  # same user key, another tenant
    d.write_bucket(3, {"present": b"new"})
    d.write_bucket(4, {"lost": b"x"})
    d.orphan_data(4)
    with BucketStore.open(tmp_path / "dst") as store:
        store.batch_offload({"present": b"old"})
        report = mc.import_mooncake(d.root, store)
        assert store.batch_get(["a", "present"]) == {"a": b"1", "present": b"old"}
    reasons = {s.key: s.reason for s in report.skipped}
    assert reasons == {
        "default\x00": "empty user key",
        "default\x00\\xff\\xfe": "key is not valid UTF-8",
        "other\x00a": "duplicate key in source (an earlier copy was taken)",
        "default\x00present": "already in destination",
    }
    assert [(f.bucket, f.kind) for f in report.skipped_buckets] == [(4, "orphan_data")]
    assert report.imported == 1 and not report.complete
