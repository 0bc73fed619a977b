"""The exceptions kvbucket raises.

Every error derives from :class:`KvBucketError`, so ``except KvBucketError``
catches everything the store raises on purpose. Messages name the key or the
bucket involved and, where there is one, what the caller can do about it.
"""

from __future__ import annotations

__all__ = [
    "KvBucketError",
    "KeyNotFound",
    "KeyExists",
    "SizeMismatch",
    "CapacityExceeded",
    "CorruptionError",
    "StoreLocked",
    "StoreClosed",
    "InvalidArgument",
    "ReadOnlyStore",
    "StorageIOError",
    "ForeignDirectory",
    "MooncakeDirectory",
    "ForeignEntry",
    "InvalidTrace",
]


class KvBucketError(Exception):
    """Base class of every error raised by kvbucket."""


class KeyNotFound(KvBucketError, KeyError):
    """A key (or bucket id) is not in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "key not found"


class KeyExists(KvBucketError):
    """A key is already stored, or appears twice in one batch."""


class SizeMismatch(KvBucketError):
    """A destination buffer's size differs from the stored object's size."""


class CapacityExceeded(KvBucketError):
    """A write does not fit within the configured limits."""


class CorruptionError(KvBucketError):
    """Stored bytes fail their checksum; the bytes are never returned."""


class StoreLocked(KvBucketError):
    """Another process holds the writer lock of the store directory."""


class StoreClosed(KvBucketError):
    """The store was closed; open it again to use it."""


class InvalidArgument(KvBucketError, ValueError):
    """An argument (key, value, buffer, configuration field) is invalid."""


class InvalidTrace(InvalidArgument):
    """A replay trace file is malformed; the message names the file and line."""


class ReadOnlyStore(KvBucketError):
    """A write was attempted through a store opened with ``readonly=True``."""


class StorageIOError(KvBucketError, OSError):
    """An operating-system I/O error (EIO, ENOSPC, ...) while reading or writing.

    ``errno`` and ``strerror`` are those of the underlying :class:`OSError`,
    which is also chained as ``__cause__``.
    """

    def __init__(self, message: str, cause: OSError) -> None:
        OSError.__init__(self, cause.errno, message)
        self.cause = cause

    def __str__(self) -> str:
        return str(self.strerror)


class ForeignDirectory(InvalidArgument):
    """The directory holds files named like a store's that kvbucket cannot
    tell are its own (no kvbucket ``LOCK``, no kvbucket meta): a writer
    refuses it rather than delete another program's files. Nothing on disk
    was changed."""


class MooncakeDirectory(ForeignDirectory):
    """The directory is a Mooncake offload directory; copy it into a store
    with ``kvbucket import --from-mooncake`` instead of opening it."""


class ForeignEntry(ForeignDirectory):
    """An entry the store must own (``LOCK``, ``quarantine/``) is something
    else: a link, a directory on another device, another program's file."""
