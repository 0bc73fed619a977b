"""Fixtures shared by the store tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvbucket import BucketStore


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path) -> Iterator[BucketStore]:
    with BucketStore.open(store_dir) as opened:
        yield opened


@pytest.fixture
def foreground_eviction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores opened by the test default to ``background_eviction=False``.

    For tests that pin down foreground eviction step by step: a background
    evictor woken by each commit would race their assertions. Background
    eviction has its own tests (tests/test_background_eviction.py).
    """
    open_store = BucketStore.open.__func__  # type: ignore[attr-defined]

    def open_foreground(cls: type[BucketStore], *args: object, **fields: object) -> BucketStore:
        fields.setdefault("background_eviction", False)
        return open_store(cls, *args, **fields)

    monkeypatch.setattr(BucketStore, "open", classmethod(open_foreground))
