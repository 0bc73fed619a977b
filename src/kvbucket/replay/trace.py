"""Reading KV-cache access traces (the Mooncake trace format).

One JSON object per line, in arrival order::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 2354]}

``timestamp`` is the arrival time in milliseconds; ``input_length`` and
``output_length`` are token counts; ``hash_ids`` is the prompt as a chain of
block ids: two requests share a prefix exactly when their lists share a
leading run of ids. Files may be compressed with xz or gzip (recognised by
their first bytes, whatever their name). Blank lines are skipped; any other
malformed line raises :class:`~kvbucket.errors.InvalidTrace` naming it.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
from dataclasses import dataclass
from importlib import resources
from typing import IO, Any

from .._core.arguments import is_int
from ..errors import InvalidTrace

__all__ = ["Request", "Trace", "read_trace", "default_trace_path", "DEFAULT_TRACE_NAME"]

DEFAULT_TRACE_NAME = "mooncake_synthetic.jsonl.xz"
"""The trace shipped in the package (kvbucket/traces/README.md says where it comes from)."""

_XZ_MAGIC = b"\xfd7zXZ\x00"
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Request:
    """One request of a trace."""

    timestamp_ms: int
    """Arrival time in milliseconds from the start of the trace."""
    input_length: int
    """Prompt tokens."""
    output_length: int
    """Generated tokens."""
    hash_ids: tuple[int, ...]
    """The prompt as a chain of block ids."""


@dataclass(frozen=True)
class Trace:
    """A whole trace, in arrival order."""

    name: str
    requests: tuple[Request, ...]

    @property
    def block_references(self) -> int:
        """Blocks summed over every request's chain."""
        return sum(len(r.hash_ids) for r in self.requests)

    @property
    def distinct_blocks(self) -> int:
        """Different block ids in the whole trace."""
        return len({block for r in self.requests for block in r.hash_ids})

    @property
    def duration_s(self) -> float:
        """Seconds from the first arrival to the last (at least one millisecond)."""
        if not self.requests:
            return 0.001
        return max(self.requests[-1].timestamp_ms - self.requests[0].timestamp_ms, 1) / 1000

    def head(self, count: int) -> Trace:
        """The first ``count`` requests."""
        return Trace(f"{self.name}[:{count}]", self.requests[:count])


def default_trace_path() -> str:
    """Path of the trace shipped in the package."""
    return str(resources.files("kvbucket").joinpath("traces", DEFAULT_TRACE_NAME))


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a whole trace file (plain, xz or gzip JSONL).

    Raises :class:`~kvbucket.errors.InvalidTrace` for a malformed line, a
    damaged compressed stream or a trace without requests, and
    :class:`OSError` when the file cannot be opened.
    """
    name = os.fspath(path)
    requests: list[Request] = []
    try:
        with _open_text(name) as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    requests.append(_parse_line(line, name, number))
    except (lzma.LZMAError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise InvalidTrace(f"{name}: cannot decompress or decode the trace ({exc}); is it a JSONL, .xz or .gz file?") from exc
    if not requests:
        raise InvalidTrace(f"{name}: the trace has no requests (expected one JSON object per line)")
    return Trace(os.path.basename(name), tuple(requests))


def _open_text(path: str) -> IO[str]:
    """Open ``path`` for reading text, decompressing by its magic bytes."""
    with open(path, "rb") as probe:
        magic = probe.read(len(_XZ_MAGIC))
    if magic.startswith(_XZ_MAGIC):
        return io.TextIOWrapper(lzma.open(path, "rb"), encoding="utf-8")
    if magic.startswith(_GZIP_MAGIC):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _parse_line(line: str, path: str, number: int) -> Request:
    """One request, or :class:`InvalidTrace` saying what is wrong with the line."""
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidTrace(f"{where}: not a JSON object ({exc.msg}); each line must be one request") from exc
    if not isinstance(record, dict):
        raise InvalidTrace(f"{where}: expected a JSON object, got {type(record).__name__}")
    hash_ids = record.get("hash_ids")
    if not isinstance(hash_ids, list) or not all(is_int(h) for h in hash_ids):
        raise InvalidTrace(f"{where}: 'hash_ids' must be a list of integers; got {_short(hash_ids)}")
    return Request(
        timestamp_ms=_number(record, "timestamp", where),
        input_length=_number(record, "input_length", where),
        output_length=_number(record, "output_length", where),
        hash_ids=tuple(hash_ids),
    )


def _number(record: dict[str, Any], field: str, where: str) -> int:
    value = record.get(field)
    if not is_int(value) or value < 0:
        raise InvalidTrace(f"{where}: {field!r} must be an integer >= 0; got {_short(value)}")
    return int(value)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

