"""What a check of a bucket directory reports: problem kinds, problems, foreign entries.

One :class:`ProblemKind` names every problem that recovery, ``kvbucket fsck``
and the Mooncake scanner report, each with its one-line description; a
:class:`Problem` is one entry of ``fsck``'s report, a :class:`ForeignFile`
one directory entry that is not the engine's (listed, never touched).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from enum import Enum

__all__ = ["ProblemKind", "Problem", "ForeignFile", "entry_type"]


class ProblemKind(str, Enum):
    """A kind of problem in a bucket directory; the value is its name in JSON.

    The first nine occur in kvbucket stores, the first four also in Mooncake
    directories, the last three only there.
    """

    _value_: str
    description: str
    """What the kind means, in a few words (the ``description`` in JSON)."""

    def __new__(cls, value: str, description: str) -> ProblemKind:
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member

    def __str__(self) -> str:
        return self._value_

    ORPHAN_DATA = ("orphan_data", "data file without meta")
    META_WITHOUT_DATA = ("meta_without_data", "meta without data file")
    INVALID_META = ("invalid_meta", "meta unreadable or invalid")
    SHORT_DATA = ("short_data", "data file shorter than recorded")
    LONG_DATA = ("long_data", "data file longer than recorded")
    EMPTY_BUCKET = ("empty_bucket", "meta lists no objects")
    TEMPORARY = ("temporary", "temporary file")
    SUPERSEDED_KEYS = ("superseded_keys", "keys also stored by a newer bucket")
    CORRUPT_OBJECT = ("corrupt_object", "object fails its checksum")
    LIST_LENGTH_MISMATCH = ("list_length_mismatch", "meta lists disagree in length")
    OBJECT_PAST_END = ("object_past_end", "object reaches past the end of the data file")
    KEY_MISMATCH = ("key_mismatch", "stored key differs from the meta")


@dataclass(frozen=True)
class Problem:
    """One problem of a check's report.

    ``files`` are the names a repair removes and ``bytes`` their size; a
    ``corrupt_object`` names its ``key``, ``superseded_keys`` its ``keys``.
    ``dropped_keys`` are the keys a repair drops, where the meta names them;
    ``salvaged`` marks a short or long data file whose verified objects a
    repair keeps (rewriting the meta; ``files`` is then empty).
    """

    kind: ProblemKind
    bucket: int
    files: tuple[str, ...]
    bytes: int
    detail: str
    key: str | None = None
    keys: tuple[str, ...] | None = None
    dropped_keys: tuple[str, ...] = ()
    salvaged: bool = False

    def to_json(self) -> dict[str, object]:
        """The JSON form: the fields, ``description`` after ``kind``, and the
        optional ones only when they say something."""
        out: dict[str, object] = {
            "kind": self.kind.value,
            "description": self.kind.description,
            "bucket": self.bucket,
            "files": list(self.files),
            "bytes": self.bytes,
            "detail": self.detail,
        }
        if self.key is not None:
            out["key"] = self.key
        if self.keys is not None:
            out["keys"] = list(self.keys)
        if self.dropped_keys:
            out["dropped_keys"] = list(self.dropped_keys)
        if self.salvaged:
            out["salvaged"] = True
        return out


@dataclass(frozen=True, slots=True)
class ForeignFile:
    """A directory entry that is not the engine's; listed, never touched."""

    name: str
    bytes: int
    type: str
    """``file``, ``dir``, ``symlink`` or ``other`` (see :func:`entry_type`)."""

    def to_json(self) -> dict[str, object]:
        """The JSON form: ``name``, ``bytes``, ``type``."""
        return {"name": self.name, "bytes": self.bytes, "type": self.type}


def entry_type(mode: int) -> str:
    """``file``, ``dir``, ``symlink`` or ``other`` for an ``lstat`` mode."""
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"
