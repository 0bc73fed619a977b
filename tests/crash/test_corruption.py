"""Corruption (issue 2, item 5).

Truncated metas (at every byte offset), truncated and extended data files,
flipped bytes in data and meta files, metas that verify but point at the
wrong bytes, garbage files with the store's names, and foreign files beside
them: ``open()`` never crashes, never serves wrong bytes (``CorruptionError``
or a missing key instead), never deletes or changes a foreign file.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

import crash_harness as H
from kvbucket import BucketStore
from kvbucket._core.format import BucketMeta, MetaRecord, decode_meta, encode_meta
from kvbucket.errors import CorruptionError

FOREIGN_FILES = {
    "05.meta": b"foreign: leading zero",
    "00.bucket": b"foreign",
    "x.bucket": b"foreign",
    "12.meta.tmp.bak": b"foreign",
    "-1.bucket": b"foreign",
    "1.META": b"foreign",
    "1.bucket.tmp": b"foreign",
    "1.meta ": b"foreign: trailing space",
    " 1.meta": b"foreign: leading space",
    "9223372036854775808.meta": b"foreign: id above 2**63-1",
    "99999999999999999999.bucket": b"foreign: 20 digits",
    "\uff11.meta": b"foreign: fullwidth digit",
    "\u0661.bucket": b"foreign: arabic-indic digit",
    "LOCK.old": b"foreign",
    "notes.txt": b"an operator's notes",
}


def add_foreign(path: str, outside: str) -> None:
    for name, data in FOREIGN_FILES.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    # a directory and a symlink that carry our names: not regular files, so foreign
    os.makedirs(os.path.join(path, "70.bucket", "inner"))
    with open(os.path.join(path, "70.bucket", "inner", "keep"), "wb") as f:
        f.write(b"inside a directory named like a data file")
    os.makedirs(os.path.join(path, "80.meta.tmp"))
    os.makedirs(outside, exist_ok=True)
    target = os.path.join(outside, "target")
    with open(target, "wb") as f:
        f.write(b"a file outside the store, reached through a symlink")
    os.symlink(target, os.path.join(path, "90.meta"))
    os.symlink(target, os.path.join(path, "90.bucket"))


def outside_snapshot(outside: str) -> bytes:
    with open(os.path.join(outside, "target"), "rb") as f:
        return f.read()


@pytest.fixture
def template(tmp_path):
    """A closed store with three buckets and foreign neighbours; returns
    (path, {bucket_id: [keys]})."""
    path = str(tmp_path / "template")
    buckets = {}
    with BucketStore.open(path) as store:
        for b, sizes in enumerate(((5000, 1, 0, 4096), (9000, 4097), (12288,))):
            keys = [H.make_key(f"c{b}.{i}", s) for i, s in enumerate(sizes)]
            buckets[store.batch_offload({k: H.value_for(k) for k in keys})] = keys
    add_foreign(path, str(tmp_path / "outside"))
    return path, buckets


def expect(buckets: dict, gone: set[int] = frozenset(), maybe: set[int] = frozenset()) -> H.Expectation:
    exp = H.Expectation(max_acked_id=max(buckets))
    for b, keys in buckets.items():
        target = exp.gone if b in gone else exp.maybe if b in maybe else exp.live
        target.update(keys)
    return exp


def run_case(tmp_path, template_path: str, mutate, exp: H.Expectation, *, corruption_ok=False, post_ops=True, config=None):
    work = str(tmp_path / "work")
    if os.path.lexists(work):
        shutil.rmtree(work)
    shutil.copytree(template_path, work, symlinks=True)
    mutate(work)
    outside = outside_snapshot(str(tmp_path / "outside"))
    res = H.check_recovered(work, exp, config=config or {}, corruption_ok=corruption_ok, post_ops=post_ops)
    if outside_snapshot(str(tmp_path / "outside")) != outside:
        res.failures.append("a file outside the store, behind a symlink named like ours, changed")
    if not os.path.isfile(os.path.join(work, "70.bucket", "inner", "keep")):
        res.failures.append("a directory named like a data file lost its content")
    return res


def test_truncated_meta_every_offset(tmp_path, template, crash_counts):
    path, buckets = template
    targets = list(buckets) if H.FULL else [min(buckets)]
    failures, cases = [], 0
    for b in targets:
        size = os.path.getsize(os.path.join(path, f"{b}.meta"))
        for cut in range(size):
            res = run_case(tmp_path, path, lambda w, b=b, cut=cut: os.truncate(os.path.join(w, f"{b}.meta"), cut), expect(buckets, gone={b}))
            cases += 1
            if res.failures:
                failures.append((f"{b}.meta truncated to {cut} of {size} bytes", res.failures))
    crash_counts(truncated_metas=cases)
    assert not failures, H.format_failures(failures)


def salvaged(path: str, buckets: dict, b: int, cut: int) -> H.Expectation:
    """After bucket ``b``'s data file is cut to ``cut`` bytes: the objects
    wholly inside the cut stay (their bytes verify), the others are gone."""
    with open(os.path.join(path, f"{b}.meta"), "rb") as f:
        meta = decode_meta(f.read(), b)
    exp = expect(buckets, gone={b})
    inside = {r.key for r in meta.records if r.offset + r.size <= cut}
    exp.gone -= inside
    exp.live |= inside
    return exp


def test_truncated_or_extended_data_file(tmp_path, template, crash_counts):
    """A cut keeps the objects before it, an extension keeps them all."""
    path, buckets = template
    failures, cases = [], 0
    for b in buckets:
        size = os.path.getsize(os.path.join(path, f"{b}.bucket"))
        cuts = sorted({0, 1, size // 2, size - 1} | (set(range(0, size, 512)) if H.FULL else set()))
        for cut in cuts:
            res = run_case(tmp_path, path, lambda w, b=b, cut=cut: os.truncate(os.path.join(w, f"{b}.bucket"), cut), salvaged(path, buckets, b, cut))
            cases += 1
            if res.failures:
                failures.append((f"{b}.bucket truncated to {cut} of {size}", res.failures))

        def extend(w: str, b: int = b) -> None:
            with open(os.path.join(w, f"{b}.bucket"), "ab") as f:
                f.write(b"\xee" * 100)

        res = run_case(tmp_path, path, extend, expect(buckets))
        cases += 1
        if res.failures:
            failures.append((f"{b}.bucket extended by 100 bytes", res.failures))
    crash_counts(data_file_cases=cases)
    assert not failures, H.format_failures(failures)


def flip(path: str, offset: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def test_flipped_data_bytes(tmp_path, template, crash_counts):
    """A flipped byte inside an object's range makes that object raise
    CorruptionError naming key and bucket (batch_get and batch_load); the
    other objects still read back exact."""
    path, buckets = template
    rng = random.Random(5)
    failures, cases = [], 0
    with BucketStore.open(path, readonly=True) as store:
        layout = {b: store.batch_query(keys) for b, keys in buckets.items()}
    for b, keys in buckets.items():
        size = os.path.getsize(os.path.join(path, f"{b}.bucket"))
        edges = {o + d for m in layout[b].values() for o in (m.offset, m.offset + m.size) for d in (-1, 0, 1)}
        if H.FULL:  # every object's edges and every 7th byte
            offsets = sorted(o for o in edges | set(range(0, size, 7)) if 0 <= o < size)
        else:
            candidates = {0, size - 1} | set(rng.sample(range(size), min(size, 12))) | set(rng.sample(sorted(edges), 6))
            offsets = sorted(o for o in candidates if 0 <= o < size)
        for off in offsets:
            work = str(tmp_path / "work")
            if os.path.lexists(work):
                shutil.rmtree(work)
            shutil.copytree(path, work, symlinks=True)
            flip(os.path.join(work, f"{b}.bucket"), off, 1 << (off % 8))
            cases += 1
            problems = []
            with BucketStore.open(work) as store:
                if store.recovery_report.removed_files:
                    problems.append(f"recovery removed {store.recovery_report.removed_files} for a flipped data byte")
                hit = [k for k in keys if layout[b][k].offset <= off < layout[b][k].offset + layout[b][k].size]
                for k in keys:
                    problems += _read_one(store, k, b, corrupt=k in hit)
                if hit:
                    try:
                        store.batch_get(keys)
                        problems.append(f"batch_get of the whole bucket {b} returned despite corrupt {hit[0]!r}")
                    except CorruptionError:
                        pass
            if problems:
                failures.append((f"{b}.bucket byte {off} flipped", problems))
    crash_counts(flipped_data_bytes=cases)
    assert not failures, H.format_failures(failures)


def _read_one(store, key: str, bucket: int, corrupt: bool) -> list[str]:
    problems = []
    buf = bytearray(len(H.value_for(key)))
    for how in ("batch_get", "batch_load"):
        try:
            if how == "batch_get":
                got = store.batch_get([key])[key]
            else:
                store.batch_load({key: buf})
                got = bytes(buf)
        except CorruptionError as exc:
            if not corrupt:
                problems.append(f"{how}({key!r}) raised {exc!r} for an intact object")
            elif key not in str(exc) or str(bucket) not in str(exc):
                problems.append(f"CorruptionError does not name key and bucket: {exc}")
            continue
        if got != H.value_for(key):
            problems.append(f"{how}({key!r}) served WRONG BYTES")
        elif corrupt:
            problems.append(f"{how}({key!r}) returned although its bytes were flipped")
    return problems


def test_flipped_meta_bytes(tmp_path, template, crash_counts):
    path, buckets = template
    b = min(buckets)
    size = os.path.getsize(os.path.join(path, f"{b}.meta"))
    failures, cases = [], 0
    offsets = range(size) if H.FULL else range(0, size, 3)
    for off in offsets:
        for mask in (0x01, 0xFF) if H.FULL else (1 << (off % 8),):
            res = run_case(
                tmp_path, path, lambda w, off=off, mask=mask: flip(os.path.join(w, f"{b}.meta"), off, mask), expect(buckets, gone={b}), post_ops=False
            )
            cases += 1
            if res.failures:
                failures.append((f"{b}.meta byte {off} ^ {mask:#x}", res.failures))
    crash_counts(flipped_meta_bytes=cases)
    assert not failures, H.format_failures(failures)


def _rewrite_meta(path: str, b: int, change) -> None:
    meta_path = os.path.join(path, f"{b}.meta")
    with open(meta_path, "rb") as f:
        meta = decode_meta(f.read(), b)
    new = change(meta)
    with open(meta_path, "wb") as f:
        f.write(encode_meta(new))


def test_valid_meta_pointing_at_wrong_bytes(tmp_path, template):
    """A meta that verifies but records the wrong place or checksum (a bug, or
    another tool): reads raise CorruptionError, never return the wrong bytes."""
    path, buckets = template
    b = min(buckets)

    def swap_offsets(meta: BucketMeta) -> BucketMeta:
        # the 4096-byte object now points at the start of the 5000-byte one
        r = meta.records
        recs = [*r[:3], MetaRecord(r[3].key, r[0].offset, r[3].size, r[3].crc)]
        return BucketMeta(meta.bucket_id, meta.data_length, meta.aligned, recs)

    def shift_first(meta: BucketMeta) -> BucketMeta:
        r = meta.records
        return BucketMeta(meta.bucket_id, meta.data_length, meta.aligned, [MetaRecord(r[0].key, 1, r[0].size, r[0].crc), *r[1:]])

    def wrong_crc(meta: BucketMeta) -> BucketMeta:
        r = meta.records
        return BucketMeta(meta.bucket_id, meta.data_length, meta.aligned, [MetaRecord(r[0].key, r[0].offset, r[0].size, r[0].crc ^ 1), *r[1:]])

    def past_the_end(meta: BucketMeta) -> BucketMeta:
        r = meta.records
        return BucketMeta(meta.bucket_id, meta.data_length, meta.aligned, [MetaRecord(r[0].key, meta.data_length, r[0].size + 1, r[0].crc), *r[1:]])

    def shrink_first(meta: BucketMeta) -> BucketMeta:
        r = meta.records
        return BucketMeta(meta.bucket_id, meta.data_length, meta.aligned, [MetaRecord(r[0].key, r[0].offset, r[0].size - 1, r[0].crc), *r[1:]])

    failures = []
    # (name, change, fate of the bucket's keys, whether reads must detect it):
    # overlapping or out-of-order records may be rejected at open (keys gone)
    # or loaded and caught by the object checksum; a structurally valid meta
    # with a wrong checksum or size must be caught on read.
    for name, change, fate, must_detect in (
        ("swap offsets", swap_offsets, "maybe", False),
        ("shift first", shift_first, "maybe", False),
        ("wrong crc", wrong_crc, "maybe", True),
        ("shrunk size", shrink_first, "maybe", True),
        ("past the end", past_the_end, "gone", False),
    ):
        exp = expect(buckets, **{fate: {b}})
        res = run_case(tmp_path, path, lambda w, change=change: _rewrite_meta(w, b, change), exp, corruption_ok=True, post_ops=False)
        if must_detect and not res.corruption_detected:
            res.failures.append("no CorruptionError for a valid meta that points at the wrong bytes")
        if res.failures:
            failures.append((name, res.failures))
    assert not failures, H.format_failures(failures)


def test_meta_of_another_bucket(tmp_path, template):
    """A valid meta copied under another id (with its data file) is rejected."""
    path, buckets = template
    b = min(buckets)
    new = max(buckets) + 5

    def copy(w: str) -> None:
        shutil.copy(os.path.join(w, f"{b}.meta"), os.path.join(w, f"{new}.meta"))
        shutil.copy(os.path.join(w, f"{b}.bucket"), os.path.join(w, f"{new}.bucket"))

    exp = expect(buckets)
    exp.max_acked_id = new  # the copied id counts as used
    res = run_case(tmp_path, path, copy, exp)
    assert not res.failures, res.failures
    assert res.removed_files == 2


def test_garbage_with_our_names(tmp_path, template, crash_counts):
    """Random bytes under every kind of our names, alone and in pairs."""
    path, buckets = template
    rng = random.Random(9)
    top = max(buckets) + 100  # clear of the lookalike entries 70..90
    failures, cases = [], 0
    b_tmp = min(buckets)
    for round_ in range(20 if H.FULL else 5):
        def garbage(w: str) -> None:
            for j, suffixes in enumerate(((".meta",), (".bucket",), (".meta.tmp",), (".meta", ".bucket"), (".meta", ".bucket", ".meta.tmp"))):
                for suffix in suffixes:
                    size = rng.choice((0, 1, 39, 40, 44, 100, 4096))
                    with open(os.path.join(w, f"{top + 1 + j}{suffix}"), "wb") as f:
                        f.write(rng.randbytes(size))
            with open(os.path.join(w, f"{b_tmp}.meta.tmp"), "wb") as f:  # a tmp beside a valid pair
                f.write(rng.randbytes(64))

        exp = expect(buckets)
        exp.max_acked_id = top + 5
        res = run_case(tmp_path, path, garbage, exp)
        cases += 1
        if res.failures:
            failures.append((f"garbage round {round_}", res.failures))
    crash_counts(garbage_rounds=cases)
    assert not failures, H.format_failures(failures)


def test_quarantine_keeps_rejected_files(tmp_path, template):
    """quarantine=True moves rejected files aside, byte-identical, and a later
    open leaves the quarantine folder alone."""
    path, buckets = template
    b = min(buckets)
    work = str(tmp_path / "work")
    shutil.copytree(path, work, symlinks=True)
    os.truncate(os.path.join(work, f"{b}.meta"), 10)
    with open(os.path.join(work, f"{b}.bucket"), "rb") as f:
        data = f.read()
    with BucketStore.open(work, quarantine=True) as store:
        assert sorted(store.recovery_report.removed_files) == sorted([f"{b}.meta", f"{b}.bucket"])
        assert not any(store.exists(k) for k in buckets[b])
    qdir = os.path.join(work, "quarantine")
    with open(os.path.join(qdir, f"{b}.bucket"), "rb") as f:
        assert f.read() == data
    before = sorted(os.listdir(qdir))
    res = H.check_recovered(work, expect(buckets, gone={b}), config={"quarantine": True})
    assert not res.failures, res.failures
    assert sorted(os.listdir(qdir)) == before


def test_readonly_open_of_a_damaged_directory_changes_nothing(tmp_path, template):
    path, buckets = template
    b = min(buckets)
    work = str(tmp_path / "work")
    shutil.copytree(path, work, symlinks=True)
    os.truncate(os.path.join(work, f"{max(buckets)}.bucket"), 3)
    flip(os.path.join(work, f"{b}.meta"), 20)
    with open(os.path.join(work, f"{max(buckets) + 1}.bucket"), "wb") as f:
        f.write(b"orphan")
    listing = {n: os.path.getsize(os.path.join(work, n)) for n in os.listdir(work)}
    with BucketStore.open(work, readonly=True) as store:
        for keys in buckets.values():
            for k in keys:
                if store.exists(k):
                    assert store.batch_get([k])[k] == H.value_for(k)
        assert not any(store.exists(k) for k in buckets[b] + buckets[max(buckets)])
    assert {n: os.path.getsize(os.path.join(work, n)) for n in os.listdir(work)} == listing


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_new_bucket_ids_skip_lookalike_entries(tmp_path, kind):
    """A symlink or directory that carries the next bucket's name is foreign
    (never touched), so the id allocator must step over it: the next
    batch_offload must not fail on an existing name."""
    path = str(tmp_path / "store")
    with BucketStore.open(path) as store:
        store.batch_offload({"a": b"a" * 10})
        nxt = max(store.bucket_ids()) + 1
    entry = os.path.join(path, f"{nxt}.bucket")
    if kind == "symlink":
        os.symlink(os.path.join(str(tmp_path), "elsewhere"), entry)
    else:
        os.makedirs(entry)
    with BucketStore.open(path) as store:
        bucket = store.batch_offload({"b": b"b" * 10})
        assert bucket != nxt and store.batch_get(["b"]) == {"b": b"b" * 10}
    assert os.path.islink(entry) if kind == "symlink" else os.path.isdir(entry)
