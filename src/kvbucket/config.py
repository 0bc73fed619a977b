"""Store configuration: one dataclass, validated on open.

A configuration comes from keyword arguments, a TOML file
(:meth:`BucketConfig.from_file`) or the environment
(:meth:`BucketConfig.from_env`): ``KVBUCKET_<FIELD>`` for every field, and the
``MOONCAKE_OFFLOAD_*`` names where Mooncake has a setting that means the same.
Every source's values, and those of the engine adapters' configs, go through
one parser (:class:`Setting`): ``"200G"`` is a size and ``"ture"`` is an error
wherever they are written.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from ._core.arguments import is_int, is_number, number_range, whole_number
from ._core.format import MAX_BUCKET_KEYS
from .errors import InvalidArgument

__all__ = ["BucketConfig", "Setting", "FIELD_SETTINGS", "coerce_field", "check_known_keys", "parse_size"]

MiB = 1 << 20

Durability = Literal["strict", "relaxed"]
EvictionPolicy = Literal["none", "fifo", "lru", "2q"]
IOMode = Literal["auto", "buffered", "direct"]
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
    "eviction_policy": ("none", "fifo", "lru", "2q"),
    "io_mode": ("auto", "buffered", "direct"),
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
    eviction_policy: EvictionPolicy = "2q"
    """What a write that does not fit does: ``none`` refuses it; ``fifo``,
    ``lru`` and ``2q`` evict whole buckets: oldest written first, least
    recently used first, or 2Q (buckets written and never read leave first;
    see :mod:`kvbucket.policy.eviction`)."""
    eviction_high_watermark: float = 0.995
    """Usage ratio (of the fullest limit) above which the background evictor
    runs; default ``high`` of :meth:`~kvbucket.BucketStore.evict_to_watermark`.
    Close to 1 by default: a cache's hits grow with the bytes it keeps, and
    space left free between the watermarks holds no blocks (on a real
    KV-cache trace, 0.9/0.8 cost 5-12% of the hits that 0.995/0.985 keep)."""
    eviction_low_watermark: float = 0.985
    """Usage ratio the background evictor evicts down to; default ``low`` of
    :meth:`~kvbucket.BucketStore.evict_to_watermark`. The gap to the high
    watermark is the room writes find free without evicting."""
    background_eviction: bool = True
    """A writer with an eviction policy and a limit evicts on a background
    thread, from above ``eviction_high_watermark`` down to
    ``eviction_low_watermark``, so writes rarely wait for eviction (a write
    that does not fit still evicts in the foreground)."""
    lookup_lease_s: float = 5.0
    """How long :meth:`~kvbucket.BucketStore.lookup` protects the buckets of
    the keys it found from eviction (until they are loaded, released or this
    many seconds pass); 0 disables leases."""
    group_max_delay_s: float = 5.0
    """How long :meth:`~kvbucket.BucketStore.group_for_offload` may carry a
    partial bucket before emitting it anyway (0 disables the time flush)."""
    io_threads: int = 8
    """Load threads: objects read in parallel, across every load in flight.
    Eight loaded 1 MiB objects cold as fast as sixteen on the disk measured
    (docs/BENCHMARKS.md); raise it for small objects on a faster device."""
    load_queue_depth: int = 64
    """Most load batches in flight (submitted and not yet done); a
    :meth:`~kvbucket.BucketStore.submit_load` beyond it waits for one to
    finish (or raises :class:`~kvbucket.errors.CapacityExceeded` after its
    ``timeout``)."""
    io_mode: IOMode = "auto"
    """``buffered``: every read and write goes through the page cache, and
    buckets are packed. ``direct``: every read and write uses O_DIRECT, and
    buckets are aligned (each value padded to 4 KiB); the open fails when
    the file system refuses O_DIRECT. ``auto``: reads go through the page
    cache (faster cold at 64 KiB and at 1 MiB, and cached data is reused);
    each new bucket is written aligned with O_DIRECT when the file system
    accepts O_DIRECT, every object size is a multiple of 4 KiB (no padding:
    no space lost) and the mean object size is at least 128 KiB
    (``kvbucket._core.write_mode.AUTO_DIRECT_MIN_OBJECT``), and packed and
    buffered otherwise. Measured with durable offloads into 256 MiB
    buckets, the store's O_DIRECT writes over its buffered ones: 0.89x at
    64 KiB, 1.13x at 128 KiB, 1.2x at 512 KiB and 1 MiB. A store may hold
    buckets of both layouts; any mode reads both."""
    prefetch_on_lookup: bool = True
    """The engine adapters hint the store to read ahead
    (:meth:`~kvbucket.BucketStore.prefetch`) the blocks an engine's lookup
    found, so they are on their way into the page cache before the engine
    loads them (nothing with ``io_mode="direct"``)."""
    budget_path: str | os.PathLike[str] = ""
    """A budget file shared by several store directories on one file system
    (one per rank): their physical usage together stays within
    ``budget_bytes``. Empty: no shared budget. Readonly stores ignore it."""
    budget_bytes: int = 0
    """The shared budget's size. The first member creates the budget file
    with it; 0 takes the size the file records. A different size is applied
    only when no other member is running."""

    def validated(self) -> BucketConfig:
        """Return a typed, normalised copy, or raise :class:`InvalidArgument` naming the bad field.

        Every field goes through :func:`coerce_field`, so a Python value is
        read as the same text would be from the environment or a file
        (``max_physical_bytes="200G"``, ``eviction_policy="LRU"``).
        """
        values = {f.name: coerce_field(f.name, getattr(self, f.name)) for f in fields(self)}
        high, low = values["eviction_high_watermark"], values["eviction_low_watermark"]
        if low > high:
            raise InvalidArgument(f"eviction_low_watermark ({low}) exceeds eviction_high_watermark ({high})")
        if values["budget_bytes"] and not os.fspath(values["budget_path"]):
            raise InvalidArgument("budget_bytes needs budget_path: name the budget file the store directories share")
        if values["bucket_keys_limit"] > MAX_BUCKET_KEYS:
            raise InvalidArgument(f"bucket_keys_limit must be at most {MAX_BUCKET_KEYS}; got {values['bucket_keys_limit']!r}")
        return dataclasses.replace(self, **values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> BucketConfig:
        """Build a configuration from ``KVBUCKET_*`` and ``MOONCAKE_OFFLOAD_*`` variables.

        ``KVBUCKET_<FIELD>`` wins over the Mooncake name; keyword ``overrides``
        win over both. A malformed or empty value raises
        :class:`InvalidArgument` naming the variable; a ``KVBUCKET_*`` name
        that is close to a setting's but is none (a typo) is reported with a
        warning naming the setting it resembles.
        """
        environ = os.environ if environ is None else environ
        _warn_misspelt(environ)
        values: dict[str, Any] = {}
        for field in fields(cls):
            if field.name in overrides:  # the override wins: the variable is not read
                continue
            for var in (f"{_ENV_PREFIX}{field.name.upper()}", MOONCAKE_ENV.get(field.name)):
                if var is not None and var in environ:
                    values[field.name] = _from_env_text(field.name, environ[var], var)
                    break
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> BucketConfig:
        """Read a TOML file whose top-level keys (or ``[kvbucket]`` table) are field names."""
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(f"cannot read config file {os.fspath(path)!r}: {exc}") from exc
        table = document.get("kvbucket", document)
        check_known_keys(table, FIELD_SETTINGS, f"config file {os.fspath(path)!r}")
        values = {k: coerce_field(k, v, f"config file {os.fspath(path)!r}") for k, v in table.items()}
        values.update(overrides)
        return cls(**values)


# -- one parser for every source of a setting ---------------------------------
SettingKind = Literal["bool", "size", "count", "number", "ratio", "choice", "path", "optional_path"]


@dataclass(frozen=True)
class Setting:
    """How the raw value of one setting becomes its typed value.

    A raw value is text (an environment variable, a value of an engine's
    JSON config), a TOML value or a Python value; text is parsed the same
    way whatever its source.

    * ``bool``: True/False, or ``true/false``, ``yes/no``, ``on/off``, ``1/0``.
    * ``size``: bytes as an int, or text with a binary unit (``256MiB``, ``200G``).
    * ``count``: an int, or its decimal text.
    * ``number``: a finite int or float, or its text.
    * ``ratio``: a number in (0, 1].
    * ``choice``: one of ``choices`` (any case).
    * ``path``: a non-empty ``str`` or path object; becomes a :class:`~pathlib.Path`.
    * ``optional_path``: the same, or empty (``""`` or None: not set), which stays ``""``.

    ``minimum`` is the least value of a size, count or number (inclusive).
    An integral float (JSON and YAML write ``1e9``) is taken as a size or count.
    """

    kind: SettingKind
    minimum: float = 0
    choices: tuple[str, ...] = ()

    def coerce(self, value: object, name: str, source: str | None = None) -> Any:
        """The typed value of setting ``name`` from ``value``.

        Raises :class:`InvalidArgument` naming ``source`` (where the value
        came from: a variable, a file, an engine's config) and the setting,
        with what the setting accepts.
        """
        try:
            return _PARSERS[self.kind](self, value)
        except ValueError as exc:
            where = name if source is None else f"{source}: {name}"
            raise InvalidArgument(f"{where} must be {exc}; got {value!r}") from None


def _parse_bool(setting: Setting, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise ValueError("True or False (as text: true/false, yes/no, on/off or 1/0)")


def _parse_size_value(setting: Setting, value: object) -> int:
    return _parse_whole(setting, value, parse_size, f"a size in bytes >= {setting.minimum:g} (e.g. 1048576, 256MiB or 200G)")


def _parse_count(setting: Setting, value: object) -> int:
    return _parse_whole(setting, value, _decimal, whole_number(int(setting.minimum)))


def _parse_whole(setting: Setting, value: object, parse_text: Callable[[str], int], what: str) -> int:
    """An int of at least ``setting.minimum`` from an int, an integral float or text."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = parse_text(value)
        except ValueError:
            raise ValueError(what) from None
    if not is_int(value) or value < setting.minimum:
        raise ValueError(what)
    return value


def _decimal(text: str) -> int:
    if not _COUNT_RE.match(text):
        raise ValueError(f"not a whole number: {text!r}")
    return int(text)


def _parse_number(setting: Setting, value: object) -> float:
    what = number_range(setting.minimum)
    number = _finite(value, what)
    if number < setting.minimum:
        raise ValueError(what)
    return number


def _parse_ratio(setting: Setting, value: object) -> float:
    what = "a ratio in (0, 1]"
    number = _finite(value, what)
    if not 0 < number <= 1:
        raise ValueError(what)
    return number


def _finite(value: object, what: str) -> float:
    """A finite float from an int, a float or text (bools are not numbers)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(what) from None
    if not is_number(value):
        raise ValueError(what)
    return float(value)


def _parse_choice(setting: Setting, value: object) -> str:
    lowered = value.strip().lower() if isinstance(value, str) else None
    if lowered is None or lowered not in setting.choices:
        raise ValueError(f"one of {', '.join(setting.choices)}")
    return lowered


def _parse_path(setting: Setting, value: object) -> Path:
    if isinstance(value, (str, os.PathLike)) and os.fspath(value):
        return Path(value)
    raise ValueError("a directory path")


def _parse_optional_path(setting: Setting, value: object) -> Path | str:
    if value is None or (isinstance(value, (str, os.PathLike)) and not os.fspath(value)):
        return ""
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise ValueError("a file path, or empty for none")


_PARSERS: dict[str, Callable[[Setting, object], Any]] = {
    "bool": _parse_bool,
    "size": _parse_size_value,
    "count": _parse_count,
    "number": _parse_number,
    "ratio": _parse_ratio,
    "choice": _parse_choice,
    "path": _parse_path,
    "optional_path": _parse_optional_path,
}

_COUNT_RE = re.compile(r"^\s*\d+\s*$")

# Integer fields that hold bytes (they take units); the other integer fields are counts.
_SIZE_FIELDS = frozenset({"bucket_size_limit", "max_total_size", "max_physical_bytes", "budget_bytes"})
# Integer fields where 0 means nothing rather than unlimited.
_POSITIVE_FIELDS = frozenset({"bucket_size_limit", "bucket_keys_limit", "io_threads", "load_queue_depth"})


def _field_setting(name: str, annotation: object) -> Setting:
    """The :class:`Setting` of a field, from its name and annotation."""
    if name == "path":
        return Setting("path")
    if name == "budget_path":
        return Setting("optional_path")
    if name in _CHOICES:
        return Setting("choice", choices=_CHOICES[name])
    if annotation == "bool":
        return Setting("bool")
    if annotation == "int":
        return Setting("size" if name in _SIZE_FIELDS else "count", minimum=1 if name in _POSITIVE_FIELDS else 0)
    if annotation == "float":
        return Setting("ratio") if name.endswith("_watermark") else Setting("number")
    raise TypeError(f"BucketConfig.{name}: no setting parser for a field of type {annotation}")


FIELD_SETTINGS: dict[str, Setting] = {f.name: _field_setting(f.name, f.type) for f in fields(BucketConfig)}
"""The parser of every :class:`BucketConfig` field."""


def coerce_field(name: str, value: object, source: str | None = None) -> Any:
    """The typed value of :class:`BucketConfig` field ``name`` (see :class:`Setting`)."""
    return FIELD_SETTINGS[name].coerce(value, name, source)


def check_known_keys(keys: Iterable[str], known: Iterable[str], where: str) -> None:
    """Raise :class:`InvalidArgument` listing the keys not in ``known``, each
    with the known key it most resembles (a typo must not be ignored)."""
    known = sorted(known)
    unknown = sorted(set(keys) - set(known))
    if not unknown:
        return
    described = [f"{key!r}{_did_you_mean(key, known)}" for key in unknown]
    raise InvalidArgument(f"unknown key(s) in {where}: {', '.join(described)}; known keys: {', '.join(known)}")


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _from_env_text(name: str, text: str, var: str) -> Any:
    """The typed value of field ``name`` from the text of environment variable ``var``."""
    if not text.strip():
        raise InvalidArgument(f"environment variable {var} is empty; set it to a value for {name}, or unset it")
    return coerce_field(name, text, f"environment variable {var}")


_ENV_PREFIX = "KVBUCKET_"


def _warn_misspelt(environ: Mapping[str, str]) -> None:
    """Warn about each ``KVBUCKET_*`` variable that is no setting's but resembles one.

    Names are compared without the prefix, so that other tools' variables
    (``KVBUCKET_SOAK_SECONDS``) resemble nothing and pass unreported.
    """
    settings = {name.upper(): name for name in FIELD_SETTINGS}
    for var in environ:
        upper = var.upper()
        if not upper.startswith(_ENV_PREFIX) or (var == upper and upper[len(_ENV_PREFIX) :] in settings):
            continue
        close = difflib.get_close_matches(upper[len(_ENV_PREFIX) :], settings, n=1)
        if close:
            warnings.warn(
                f"environment variable {var} is not a kvbucket setting and is ignored; "
                f"did you mean {_ENV_PREFIX}{close[0]} (setting {settings[close[0]]})?",
                UserWarning,
                stacklevel=3,
            )
