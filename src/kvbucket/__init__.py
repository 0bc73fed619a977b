"""kvbucket: crash-safe bucketed SSD storage for LLM KV-cache blocks.

>>> from kvbucket import BucketStore
>>> with BucketStore.open("/tmp/kv") as store:          # doctest: +SKIP
...     bucket_id = store.batch_offload({"page-0": b"..."})
...     store.batch_get(["page-0"])
"""

from .config import BucketConfig
from .errors import ForeignDirectory, ForeignEntry, MooncakeDirectory
from .index import ObjectMeta
from .recovery import RecoveryReport
from .pipeline import OffloadQueue
from .store import BucketStore, StoreStats

__all__ = [
    "BucketStore",
    "BucketConfig",
    "ForeignDirectory",
    "ForeignEntry",
    "MooncakeDirectory",
    "ObjectMeta",
    "OffloadQueue",
    "RecoveryReport",
    "StoreStats",
]
__version__ = "0.1.0"

import logging as _logging

# A library stays quiet unless the application configures logging.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
