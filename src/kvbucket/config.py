"""Store configuration: one dataclass, validated on open.

A configuration comes from keyword arguments, a TOML file
(:meth:`BucketConfig.from_file`) or the environment
(:meth:`BucketConfig.from_env`): ``KVBUCKET_<FIELD>`` for every field, and the
``MOONCAKE_OFFLOAD_*`` names where Mooncake has a setting that means the same.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from .errors import InvalidArgument
from .format import MAX_BUCKET_KEYS

__all__ = ["BucketConfig", "parse_size"]

MiB = 1 << 20

Durability = Literal["strict", "relaxed"]
EvictionPolicy = Literal["none", "fifo", "lru"]
IOMode = Literal["buffered", "direct"]
PhysicalScope = Literal["directory", "store"]

# Mooncake's environment names for the fields that mean the same thing.
MOONCAKE_ENV = {
    "path": "MOONCAKE_OFFLOAD_FILE_STORAGE_PATH",
    "bucket_size_limit": "MOONCAKE_OFFLOAD_BUCKET_SIZE_LIMIT_BYTES",
    "bucket_keys_limit": "MOONCAKE_OFFLOAD_BUCKET_KEYS_LIMIT",
    "max_total_size": "MOONCAKE_OFFLOAD_BUCKET_MAX_TOTAL_SIZE",
    "max_physical_bytes": "MOONCAKE_OFFLOAD_BUCKET_MAX_PHYSICAL_BYTES",
    "eviction_policy": "MOONCAKE_OFFLOAD_BUCKET_EVICTION_POLICY",
    "total_keys_limit": "MOONCAKE_OFFLOAD_TOTAL_KEYS_LIMIT",
    "eviction_high_watermark": "MOONCAKE_OFFLOAD_DISK_EVICTION_HIGH_WATERMARK_RATIO",
    "eviction_low_watermark": "MOONCAKE_OFFLOAD_DISK_EVICTION_LOW_WATERMARK_RATIO",
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "durability": ("strict", "relaxed"),
    "eviction_policy": ("none", "fifo", "lru"),
    "io_mode": ("buffered", "direct"),
    "physical_scope": ("directory", "store"),
}

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}


def parse_size(text: str) -> int:
    """Parse ``"4096"``, ``"256MiB"``, ``"1G"`` or ``"2tb"`` into bytes (powers of 1024)."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (use e.g. 1048576, 256MiB or 1G)")
    return int(match.group(1)) << _SIZE_SHIFT[match.group(2).lower()]


@dataclass(frozen=True)
class BucketConfig:
    """Everything that configures a :class:`~kvbucket.BucketStore`.

    Sizes are in bytes; a limit of 0 means unlimited.
    """

    path: str | os.PathLike[str] = ""
    """The store directory; created (with parents) on open when missing."""
    readonly: bool = False
    """Open for reading only: never locks, writes or deletes anything."""
    durability: Durability = "strict"
    """``strict``: a returned ``batch_offload`` survives power loss.
    ``relaxed``: no fsyncs; survives a process crash, not a power cut."""
    verify_checksums: bool = True
    """Verify each object's CRC32C on every read."""
    quarantine: bool = False
    """Move files that recovery rejects to ``quarantine/`` instead of deleting them."""
    bucket_size_limit: int = 256 * MiB
    """Most value bytes per bucket (a lone larger object still gets a bucket)."""
    bucket_keys_limit: int = 500
    """Most objects per bucket."""
    max_total_size: int = 0
    """Most logical bytes (value bytes of live objects)."""
    max_physical_bytes: int = 0
    """Most allocated bytes in the directory (``st_blocks * 512``, as ``du`` counts)."""
    physical_scope: PhysicalScope = "directory"
    """What ``max_physical_bytes`` counts: ``directory`` everything in the
    directory, as ``du`` does (foreign files too); ``store`` only the store's
    own files (buckets, metas, ``LOCK``, ``quarantine/``, the directory itself)."""
    total_keys_limit: int = 0
    """Most live objects."""
    eviction_policy: EvictionPolicy = "lru"
    """What a write that does not fit does: ``none`` refuses it; ``fifo`` and
    ``lru`` evict whole buckets, oldest written or least recently used first."""
    eviction_high_watermark: float = 0.9
    """Default ``high`` of :meth:`~kvbucket.BucketStore.evict_to_watermark`."""
    eviction_low_watermark: float = 0.8
    """Default ``low`` of :meth:`~kvbucket.BucketStore.evict_to_watermark`."""
    group_max_delay_s: float = 5.0
    """How long :meth:`~kvbucket.BucketStore.group_for_offload` may carry a
    partial bucket before emitting it anyway (0 disables the time flush)."""
    io_threads: int = 8
    """Threads that read objects of one ``batch_load`` in parallel."""
    io_mode: IOMode = "buffered"
    """``buffered`` goes through the page cache; ``direct`` uses O_DIRECT."""

    def validated(self) -> BucketConfig:
        """Return a normalised copy, or raise :class:`InvalidArgument` naming the bad field."""
        changes: dict[str, Any] = {}
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            lowered = value.lower() if isinstance(value, str) else value
            if lowered not in choices:
                raise InvalidArgument(f"{name} must be one of {', '.join(choices)}; got {value!r}")
            changes[name] = lowered
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise InvalidArgument("path must name the store directory")
        for name in ("bucket_size_limit", "bucket_keys_limit", "io_threads"):
            _require_int(name, getattr(self, name), minimum=1)
        if self.bucket_keys_limit > MAX_BUCKET_KEYS:
            raise InvalidArgument(f"bucket_keys_limit must be at most {MAX_BUCKET_KEYS}; got {self.bucket_keys_limit!r}")
        for name in ("max_total_size", "max_physical_bytes", "total_keys_limit"):
            _require_int(name, getattr(self, name), minimum=0)
        for name in ("readonly", "verify_checksums", "quarantine"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument(f"{name} must be True or False; got {getattr(self, name)!r}")
        self._validate_ratios()
        return dataclasses.replace(self, path=Path(self.path), **changes)

    def _validate_ratios(self) -> None:
        high, low = self.eviction_high_watermark, self.eviction_low_watermark
        for name, value in (("eviction_high_watermark", high), ("eviction_low_watermark", low)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise InvalidArgument(f"{name} must be a ratio in (0, 1]; got {value!r}")
        if low > high:
            raise InvalidArgument(f"eviction_low_watermark ({low}) exceeds eviction_high_watermark ({high})")
        delay = self.group_max_delay_s
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
            raise InvalidArgument(f"group_max_delay_s must be a number >= 0; got {delay!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> BucketConfig:
        """Build a configuration from ``KVBUCKET_*`` and ``MOONCAKE_OFFLOAD_*`` variables.

        ``KVBUCKET_<FIELD>`` wins over the Mooncake name; keyword ``overrides``
        win over both. A malformed value raises :class:`InvalidArgument`
        naming the variable.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            for var in (f"KVBUCKET_{field.name.upper()}", MOONCAKE_ENV.get(field.name)):
                if var is not None and var in environ:
                    values[field.name] = _coerce(field.name, environ[var], var)
                    break
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> BucketConfig:
        """Read a TOML file whose top-level keys (or ``[kvbucket]`` table) are field names."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(f"cannot read config file {os.fspath(path)!r}: {exc}") from exc
        table = document.get("kvbucket", document)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise InvalidArgument(f"unknown field(s) in {os.fspath(path)!r}: {', '.join(unknown)}")
        values = {k: _coerce(k, v, f"{os.fspath(path)}:{k}") if isinstance(v, str) else v for k, v in table.items()}
        values.update(overrides)
        return cls(**values)


_FIELD_TYPES = {f.name: f.type for f in fields(BucketConfig)}


def _coerce(name: str, text: str, source: str) -> Any:
    """Turn the text of an environment variable into the field's type."""
    kind = _FIELD_TYPES[name]
    try:
        if kind == "bool":
            return _parse_bool(text)
        if kind == "int":
            return parse_size(text)
        if kind == "float":
            return float(text)
    except ValueError as exc:
        raise InvalidArgument(f"{source}={text!r} is not valid for {name}: {exc}") from exc
    return text


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false, yes/no, on/off or 1/0")


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(f"{name} must be an integer >= {minimum}; got {value!r}")
