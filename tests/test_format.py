"""The meta encoding and the file-name rules (docs/FORMAT.md)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbucket._core.format import (
    ALIGNMENT,
    BucketMeta,
    FileKind,
    MetaRecord,
    aligned_layout,
    decode_meta,
    encode_meta,
    packed_layout,
    parse_name,
)
from kvbucket.errors import CorruptionError

keys = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)


@st.composite
def metas(draw: st.DrawFn) -> BucketMeta:
    names = draw(st.lists(keys, min_size=1, max_size=30, unique=True))
    sizes = [draw(st.integers(0, 1 << 20)) for _ in names]
    aligned = draw(st.booleans())
    offsets, length = (aligned_layout if aligned else packed_layout)(sizes)
    crcs = [draw(st.integers(0, 2**32 - 1)) for _ in names]
    bucket_id = draw(st.integers(0, 2**63 - 1))
    return BucketMeta(bucket_id, length, aligned, [MetaRecord(k, o, s, c) for k, o, s, c in zip(names, offsets, sizes, crcs)])


@given(metas())
@settings(max_examples=200, deadline=None)
def test_meta_round_trip(meta: BucketMeta) -> None:
    assert decode_meta(encode_meta(meta), meta.bucket_id) == meta


@given(metas(), st.data())
@settings(max_examples=200, deadline=None)
def test_any_single_byte_change_or_truncation_is_detected(meta: BucketMeta, data: st.DataObject) -> None:
    raw = bytearray(encode_meta(meta))
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(CorruptionError):
        decode_meta(bytes(raw[:cut]), meta.bucket_id)
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptionError):
        decode_meta(bytes(raw), meta.bucket_id)


def test_meta_for_another_bucket_is_rejected() -> None:
    raw = encode_meta(BucketMeta(5, 1, False, [MetaRecord("a", 0, 1, 0)]))
    with pytest.raises(CorruptionError, match="records bucket 5"):
        decode_meta(raw, 6)


def test_layouts() -> None:
    assert packed_layout([3, 0, 5]) == ([0, 3, 3], 8)
    assert aligned_layout([3, 0, ALIGNMENT + 1]) == ([0, ALIGNMENT, ALIGNMENT], 3 * ALIGNMENT)


@pytest.mark.parametrize(
    "name, parsed",
    [
        ("0.bucket", (0, FileKind.DATA)),
        ("17.meta", (17, FileKind.META)),
        ("17.meta.tmp", (17, FileKind.TMP)),
        ("9007199254740991.bucket", (2**53 - 1, FileKind.DATA)),
        ("9007199254740992.bucket", None),  # above the largest id handed out
        ("9223372036854775807.bucket", None),
        ("9223372036854775808.bucket", None),
        ("05.meta", None),
        ("-1.bucket", None),
        ("+1.bucket", None),
        ("1.bucket.tmp", None),
        ("12.meta.tmp.bak", None),
        ("x.bucket", None),
        ("1.BUCKET", None),
        ("LOCK", None),
        ("１.meta", None),  # noqa: RUF001 - a fullwidth digit is not a bucket id
        ("7.bucket\n", None),
    ],
)
def test_parse_name(name: str, parsed: object) -> None:
    assert parse_name(name) == parsed
