"""kvbucket: crash-safe bucketed SSD storage for LLM KV-cache blocks.

>>> from kvbucket import BucketStore
>>> with BucketStore.open("/tmp/kv") as store:          # doctest: +SKIP
...     bucket_id = store.batch_offload({"page-0": b"..."})
...     store.batch_get(["page-0"])
"""

from . import errors as _errors
from ._core.index import ObjectMeta
from ._core.loads import LoadHandle
from ._core.recovery import RecoveryReport
from .config import BucketConfig
from .errors import *  # noqa: F403 - every public error, so `from kvbucket import KeyNotFound` works
from .pipeline import OffloadQueue
from .store import BucketStore, StoreStats

__all__ = ["BucketStore", "BucketConfig", "LoadHandle", "ObjectMeta", "OffloadQueue", "RecoveryReport", "StoreStats", *_errors.__all__]
__version__ = "0.1.0"

import logging as _logging

# A library stays quiet unless the application configures logging.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
