"""The README's examples run as written: every ```python block, in order, in
one fresh directory, after writing each ```toml block that starts with a
``# FILENAME`` comment to that file."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)


def blocks(language: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block of ``language``."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def test_readme_has_the_examples_it_promises() -> None:
    code = "\n".join(body for _, body in blocks("python"))
    for call in ("batch_offload", "batch_load", "recovery_report", "group_for_offload", "BucketConfig.from_file", "OffloadQueue", "submit_load"):
        assert call in code, call
    assert "import numpy" not in code  # numpy is not a dependency


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith(("KVBUCKET_", "MOONCAKE_"))]:
        monkeypatch.delenv(key)
    for _, body in blocks("toml"):
        first = body.splitlines()[0]
        if first.startswith("# "):
            (tmp_path / first[2:].strip()).write_text(body)
    for line, body in blocks("python"):
        try:
            exec(compile(body, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
        except Exception as exc:
            raise AssertionError(f"the python block at README.md line {line} fails: {exc!r}") from exc
    out = capsys.readouterr().out
    assert "key 'no-such-page' is not stored" in out
    assert "214748364800 67108864" in out
    assert "exceeds bucket_size_limit=8388608" in out and "3 buckets" in out
    assert "64 objects stored" in out
    assert "loaded ['page-1']" in out and "['nope']" in out
    assert "kvbucket_store_open{store=\"kv/metrics-demo\"} 1.0" in out
