"""Mooncake Store bucket directories: read, check, repair and import them.

One module per job:

* :mod:`.wire`: the bytes of Mooncake's files: the protobuf codec of the
  bucket meta (:func:`decode_bucket_meta`, :func:`encode_bucket_meta`), file
  names (:func:`parse_file_name`) and keys (tenant prefix);
* :mod:`.scan`: :func:`scan_mooncake`, which checks a directory and reports
  each :class:`BrokenBucket`; it only reads;
* :mod:`.repair`: :func:`repair_mooncake`, which removes exactly the broken
  buckets' files that a scan reported;
* :mod:`.importer`: reading objects and :func:`import_mooncake`, which copies
  them into a kvbucket store and never writes to the source;
* :mod:`.detect`: :func:`detect_format`, which tells a kvbucket store from a
  Mooncake directory by what is in it.

The problem kinds a scan reports are :class:`kvbucket._core.problems.ProblemKind`,
shared with kvbucket's own checks.
"""

from .detect import FormatEvidence, detect_format, format_evidence, meta_kind
from .importer import ImportReport, SkippedObject, import_mooncake, iter_objects, read_bucket, read_object
from .repair import QUARANTINE_SUFFIX, RepairResult, repair_mooncake
from .scan import BrokenBucket, FileIdentity, MooncakeBucket, MooncakeScan, scan_mooncake
from .wire import (
    TENANT_SEPARATOR,
    BucketMetadata,
    MooncakeMetaError,
    ObjectMetadata,
    decode_bucket_meta,
    encode_bucket_meta,
    parse_file_name,
    source_key,
    split_tenant,
)

__all__ = [
    "MooncakeMetaError",
    "ObjectMetadata",
    "BucketMetadata",
    "decode_bucket_meta",
    "encode_bucket_meta",
    "parse_file_name",
    "TENANT_SEPARATOR",
    "split_tenant",
    "source_key",
    "FileIdentity",
    "BrokenBucket",
    "MooncakeBucket",
    "MooncakeScan",
    "scan_mooncake",
    "QUARANTINE_SUFFIX",
    "RepairResult",
    "repair_mooncake",
    "read_bucket",
    "read_object",
    "iter_objects",
    "SkippedObject",
    "ImportReport",
    "import_mooncake",
    "meta_kind",
    "FormatEvidence",
    "format_evidence",
    "detect_format",
]
