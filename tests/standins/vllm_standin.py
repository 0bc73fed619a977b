"""Small stand-ins for the vLLM 0.33 names a secondary tier meets.

They follow vLLM's documented signatures (``vllm/v1/kv_offload/base.py`` and
``vllm/v1/kv_offload/tiering/base.py``) and the call pattern of vLLM's own
``tests/v1/kv_offload/tiering/test_fs_tier.py``: a spec object, a
``memoryview`` over page-aligned host memory shaped ``(num_chunks, ...)``,
``TransferJob`` s with ``chunk_ids`` as a numpy array, and
``drain_jobs()`` followed by ``get_finished_jobs()``. Written for the tests;
no vLLM code is copied. :func:`installed` puts them into ``sys.modules``
under vLLM's module names so that ``kvbucket.integrations.vllm`` subclasses
the stand-in ABC.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import types
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np

from standins.modules import imported_against, module

MODULE = "kvbucket.integrations.vllm"

OffloadKey = bytes


def make_offload_key(block_hash: bytes, group_idx: int) -> OffloadKey:
    """A block hash followed by the 4-byte big-endian KV-cache group index."""
    return block_hash + group_idx.to_bytes(4, "big", signed=False)


def get_offload_block_hash(key: OffloadKey) -> bytes:
    """The block hash of an OffloadKey (what vLLM's connector publishes in BlockStored/BlockRemoved)."""
    return key[:-4]


class LookupResult(enum.Enum):
    HIT = 1
    HIT_PENDING = 2
    RETRY = 3
    MISS = 4


class Medium(enum.Enum):
    GPU = "GPU"
    CPU = "CPU"
    STORAGE = "STORAGE"


class Locality(enum.Enum):
    LOCAL = "LOCAL"
    REMOTE = "REMOTE"


@dataclass
class OffloadingEvent:
    """Blocks stored to (``removed=False``) or removed from a tier."""

    keys: list[OffloadKey]
    medium: Medium
    removed: bool
    locality: Locality | None = None


@dataclass
class ReqContext:
    req_id: str
    kv_transfer_params: dict[str, Any] | None = None


@dataclass
class RequestOffloadingContext:
    preferences: dict[str, Any] = field(default_factory=dict)


@dataclass
class TransferJob:
    job_id: int
    keys: Collection[OffloadKey]
    chunk_ids: np.ndarray
    is_promotion: bool
    req_context: ReqContext
    submit_time: float = 0.0


@dataclass
class JobResult:
    job_id: int
    success: bool
    successful_keys: Collection[OffloadKey] | None = None
    transfer_time: float | None = None
    transfer_bytes: int | None = None


class SecondaryTierManager(ABC):
    """The abstract tier: the methods vLLM's tiering manager calls."""

    medium: ClassVar[Medium | None] = None
    tolerates_off_thread_polling: ClassVar[bool] = False

    def __init__(
        self, offloading_spec: Any, primary_kv_view: memoryview, tier_type: str, backpressure_detector: Any = None
    ) -> None:
        self._offloading_spec = offloading_spec
        self._primary_kv_view = primary_kv_view
        self.tier_type = tier_type
        self.backpressure_detector = backpressure_detector

    @abstractmethod
    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult: ...

    @abstractmethod
    def submit_store(self, job_metadata: TransferJob) -> None: ...

    @abstractmethod
    def submit_load(self, job_metadata: TransferJob) -> None: ...

    @abstractmethod
    def get_finished_jobs(self) -> Iterable[JobResult]: ...

    @abstractmethod
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext: ...

    @abstractmethod
    def drain_jobs(self) -> None: ...

    def has_pending_work(self) -> bool:
        return False

    def take_events(self) -> Iterable[OffloadingEvent]:
        return ()

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        return None

    def on_request_finished(self, req_context: ReqContext) -> None:
        return None

    def shutdown(self) -> None:
        return None


@dataclass(frozen=True)
class OffloadingCounterMetadata:
    documentation: str
    labelnames: tuple[str, ...] = ()


@dataclass(frozen=True)
class OffloadingGaugeMetadata:
    documentation: str
    labelnames: tuple[str, ...] = ()


class OffloadingConnectorStats:
    """vLLM's self-describing stats payload: ``{"types": {name: type}, "data": {name: {labels: value}}}``."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {"types": {}, "data": {}}

    def increase_counter(self, counter_name: str, counter_increase_value: float = 1, labelvalues: tuple[str, ...] = ()) -> None:
        self.data["types"].setdefault(counter_name, "counter")
        values = self.data["data"].setdefault(counter_name, {})
        values[labelvalues] = values.get(labelvalues, 0) + counter_increase_value

    def set_gauge(self, gauge_name: str, gauge_value: float, labelvalues: tuple[str, ...] = ()) -> None:
        self.data["types"].setdefault(gauge_name, "gauge")
        self.data["data"].setdefault(gauge_name, {})[labelvalues] = gauge_value

    def is_empty(self) -> bool:
        return not self.data["data"]


@contextlib.contextmanager
def installed() -> Iterator[types.ModuleType]:
    """Install the stand-ins as ``vllm.*`` and (re)import the tier module against them."""
    offload, metrics = "vllm.v1.kv_offload", "vllm.distributed.kv_transfer.kv_connector.v1.offloading"
    base = module(
        f"{offload}.base",
        LookupResult=LookupResult, Medium=Medium, ReqContext=ReqContext, RequestOffloadingContext=RequestOffloadingContext,
        OffloadingCounterMetadata=OffloadingCounterMetadata, OffloadingGaugeMetadata=OffloadingGaugeMetadata,
        make_offload_key=make_offload_key, get_offload_block_hash=get_offload_block_hash,
        Locality=Locality, OffloadingEvent=OffloadingEvent,
    )
    tiering = module(f"{offload}.tiering.base", SecondaryTierManager=SecondaryTierManager, JobResult=JobResult, TransferJob=TransferJob)
    parents = ["vllm", "vllm.v1", offload, f"{offload}.tiering", *(metrics.rsplit(".", n)[0] for n in range(4, 0, -1)), metrics]
    modules = {name: module(name) for name in parents}
    modules.update({base.__name__: base, tiering.__name__: tiering})
    modules[f"{metrics}.metrics"] = module(f"{metrics}.metrics", OffloadingConnectorStats=OffloadingConnectorStats)
    with imported_against(modules, MODULE) as tier_module:
        yield tier_module


CTX = ReqContext(req_id="test")


def make_spec(
    *, rank: int = 0, tp_size: int = 1, model: str = "test-model", dtype: str = "float32", kv_cache_events: bool = False
) -> SimpleNamespace:
    """An offloading spec with the fields a tier reads (``config.parallel.rank``, ...,
    ``kv_events_config.enable_kv_cache_events``: vLLM's KV cache events on or off)."""
    parallel = SimpleNamespace(rank=rank, world_size=tp_size, tp_size=tp_size, pp_size=1, pcp_size=1, dcp_size=1)
    config = SimpleNamespace(
        model=SimpleNamespace(name=model, dtype=dtype),
        cache=SimpleNamespace(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=parallel,
    )
    kv_events_config = SimpleNamespace(enable_kv_cache_events=kv_cache_events)
    return SimpleNamespace(config=config, blocks_per_chunk=1, kv_events_config=kv_events_config)


def primary_memory(num_chunks: int, chunk_bytes: int) -> np.ndarray:
    """Page-aligned float32 host memory shaped ``(num_chunks, chunk_bytes // 4)``, zeroed."""
    raw = np.zeros(num_chunks * chunk_bytes + mmap.PAGESIZE, dtype=np.uint8)
    shift = -raw.ctypes.data % mmap.PAGESIZE
    return raw[shift : shift + num_chunks * chunk_bytes].view(np.float32).reshape(num_chunks, chunk_bytes // 4)


def key(n: int, group: int = 0) -> OffloadKey:
    return make_offload_key(n.to_bytes(8, "big"), group)


def make_job(job_id: int, keys: list[OffloadKey], chunk_ids: list[int] | None = None, is_promotion: bool = False) -> TransferJob:
    ids = list(range(len(keys))) if chunk_ids is None else chunk_ids
    return TransferJob(job_id, keys, np.array(ids, dtype=np.int64), is_promotion, CTX)


def drain(tier: Any) -> list[JobResult]:
    """What vLLM's reset path does: wait for every job, then collect the results."""
    tier.drain_jobs()
    return list(tier.get_finished_jobs())
