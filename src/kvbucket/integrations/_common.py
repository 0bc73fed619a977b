"""Helpers shared by the serving-engine adapters.

* :func:`import_engine` imports the names an adapter builds on from its
  engine; an adapter takes :mod:`~kvbucket.integrations._standins`' names
  instead when it returns None (the one way every adapter runs without its
  engine installed).
* :func:`store_options` maps an engine's configuration dict onto
  :class:`~kvbucket.BucketConfig` fields (sizes may be written ``"200G"``)
  and refuses keys that no one reads; :func:`option` reads an adapter's own
  key. Both parse values as the environment and TOML files are parsed
  (:class:`~kvbucket.config.Setting`).
* :func:`open_store` opens one store directory, with environment defaults
  (``KVBUCKET_*``) under the engine's settings and a hint on lock conflicts.
* :func:`hint_loads` has the store read ahead what an engine's lookup found
  (``prefetch_on_lookup``).
* :func:`pointer_view` turns a raw host pointer into a ``memoryview``
  (engines hand out ``(ptr, size)`` pairs for zero-copy I/O).
* :func:`load_each` loads a batch, and key by key when the batch fails.
* :func:`loaded_keys` reads the outcome of an asynchronous load
  (:meth:`~kvbucket.BucketStore.submit_load`), logging each failed key.
* :class:`AllDone` calls back once every future of a job has resolved.
* :func:`metrics_endpoint` reads the ``metrics_port``/``metrics_addr``
  settings; :func:`start_metrics` serves the store's Prometheus metrics there.
* :func:`shut_down` closes what an adapter opened, in dependency order.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import logging
import os
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import fields
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import BucketConfig, Setting, check_known_keys, coerce_field
from ..errors import InvalidArgument, KeyNotFound, KvBucketError, StoreLocked

if TYPE_CHECKING:
    from .._core.loads import LoadHandle
    from ..metrics import MetricsServer
    from ..pipeline import OffloadQueue
    from ..store import BucketStore

__all__ = [
    "import_engine",
    "STORE_FIELDS",
    "store_options",
    "option",
    "open_store",
    "hint_loads",
    "pointer_view",
    "load_each",
    "loaded_keys",
    "AllDone",
    "safe_component",
    "METRICS_KEYS",
    "metrics_endpoint",
    "start_metrics",
    "shut_down",
]

_SKIPPED_FIELDS = {"path", "readonly"}
STORE_FIELDS: frozenset[str] = frozenset(f.name for f in fields(BucketConfig)) - _SKIPPED_FIELDS
"""BucketConfig fields an engine configuration may set directly."""

T = TypeVar("T")

log = logging.getLogger(__name__)


def import_engine(paths: Mapping[str, str | Sequence[str]], *, catch: tuple[type[Exception], ...] = (ImportError,)) -> SimpleNamespace | None:
    """The engine's names, or None when any one of them cannot be imported.

    ``paths`` maps each name to ``"module:attribute"`` (or to several, the
    first that imports wins). All or nothing, so an adapter never mixes an
    engine's classes with stand-ins. ``catch`` names the errors that mean
    "not importable here" (an engine that fails to import on this host may
    raise more than ImportError); any other error propagates.
    """
    not_there: tuple[type[Exception], ...] = (AttributeError, *catch)
    found: dict[str, Any] = {}
    for name, candidates in paths.items():
        for path in (candidates,) if isinstance(candidates, str) else candidates:
            module_name, _, attribute = path.partition(":")
            try:
                value = getattr(importlib.import_module(module_name), attribute)
            except not_there as exc:
                log.debug("%s is not importable (%s)", path, exc)
                continue
            found[name] = value
            break
        else:
            return None
    return SimpleNamespace(**found)


def store_options(
    params: Mapping[str, Any], source: str, aliases: Mapping[str, str] | None = None, *, own: Collection[str] = ()
) -> dict[str, Any]:
    """The BucketConfig keyword arguments found in an engine's config dict.

    ``aliases`` maps engine-specific names to field names (for example
    SGLang's HiCacheFile ``max_size`` to ``max_physical_bytes``); a field's
    own name wins over an alias. ``own`` names every other key the engine or
    the adapter reads; any key outside fields, aliases and ``own`` raises
    :class:`InvalidArgument` naming the closest known key (a typo must not
    silently leave a setting at its default). ``source`` names the config
    in errors.
    """
    check_known_keys(params, {*STORE_FIELDS, *(aliases or {}), *own}, source)
    options: dict[str, Any] = {}
    for alias, name in (aliases or {}).items():
        if params.get(alias) not in (None, ""):
            options[name] = coerce_field(name, params[alias], f"{source} key {alias!r}")
    for name in STORE_FIELDS:
        if params.get(name) is not None:
            options[name] = coerce_field(name, params[name], source)
    return options


def option(params: Mapping[str, Any], key: str, setting: Setting, default: T, source: str) -> Any:
    """``params[key]`` parsed by ``setting``, or ``default`` when absent or None."""
    value = params.get(key)
    return default if value is None else setting.coerce(value, key, source)


METRICS_KEYS = frozenset({"metrics_port", "metrics_addr"})
"""Adapter config keys of the metrics endpoint (off unless ``metrics_port`` is set)."""

_PORT = Setting("count")


def metrics_endpoint(params: Mapping[str, Any], source: str, offset: int = 0) -> tuple[int, str] | None:
    """``(port, addr)`` of the metrics endpoint, None when ``metrics_port`` is unset.

    The port is ``metrics_port + offset`` (adapters pass the rank, so every
    rank of a node gets its own port) unless ``metrics_port`` is 0 (any free
    port). ``metrics_addr`` defaults to loopback. Raises
    :class:`InvalidArgument` for a bad value, before anything is opened.
    """
    base = option(params, "metrics_port", _PORT, None, source)
    if base is None:
        return None
    from ..metrics import check_endpoint  # prometheus_client loads only when metrics are asked for

    addr = params.get("metrics_addr") or "127.0.0.1"
    port = base + offset if base else 0
    try:
        check_endpoint(port, addr)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{source}: {exc} (metrics_port={base!r}, rank offset {offset})") from None
    return port, addr


def start_metrics(endpoint: tuple[int, str] | None, store: BucketStore, queue: OffloadQueue | None = None) -> MetricsServer | None:
    """Serve ``store``'s metrics at ``endpoint`` (a :class:`~kvbucket.metrics.MetricsServer`), or None.

    Called last while an adapter is built: when serving fails, ``queue`` and
    ``store`` are closed (the adapter does not exist) and the error is re-raised.
    """
    if endpoint is None:
        return None
    from ..metrics import serve_metrics

    try:
        return serve_metrics(store, endpoint[0], endpoint[1], queue=queue)
    except BaseException:
        if queue is not None:
            queue.close()
        store.close()
        raise


def shut_down(
    store: BucketStore, *, queue: OffloadQueue | None = None, pool: Executor | None = None, metrics_server: MetricsServer | None = None
) -> None:
    """Stop serving metrics, write everything ``queue`` holds staged, let
    ``pool``'s tasks finish, then close ``store``: each step before the
    store it uses goes away."""
    if metrics_server is not None:
        metrics_server.close()
    if queue is not None:
        queue.close()
    if pool is not None:
        pool.shutdown(wait=True)
    store.close()


def open_store(path: str | os.PathLike[str], options: Mapping[str, Any], *, readonly: bool = False) -> BucketStore:
    """Open the store at ``path``: ``KVBUCKET_*`` env defaults, ``options`` win.

    A lock conflict is re-raised as :class:`StoreLocked` naming the path and
    the adapter setting that gives each process its own directory.
    """
    from ..store import BucketStore  # the store module is heavy; import on use

    config = BucketConfig.from_env(**{**options, "path": os.fspath(path), "readonly": readonly})
    try:
        return BucketStore.open(config)
    except StoreLocked as exc:
        raise StoreLocked(
            f"{exc} -- {os.fspath(path)!r} has a writer already; give each engine "
            "process (rank) its own directory (keep the default per-rank sub-directories, "
            "or set a distinct storage_path per instance)"
        ) from exc


def hint_loads(store: BucketStore, keys: Sequence[str], what: str) -> None:
    """Have ``store`` read ``keys`` ahead (:meth:`~kvbucket.BucketStore.prefetch`),
    unless its ``prefetch_on_lookup`` is off. Returns at once; a hint that
    fails (the store closing) is logged, never raised: it is only a hint."""
    if not keys or not store.config.prefetch_on_lookup:
        return
    try:
        store.prefetch(keys)
    except KvBucketError as exc:
        log.debug("%s: prefetch hint of %d keys failed: %s", what, len(keys), exc)


@functools.lru_cache(maxsize=256)
def _ubyte_array(size: int) -> type[ctypes.Array[ctypes.c_ubyte]]:
    """``c_ubyte * size``, cached: ctypes builds a new type on every ``*``."""
    return ctypes.c_ubyte * size


def pointer_view(ptr: int, size: int) -> memoryview:
    """A writable byte view of ``size`` bytes of host memory at address ``ptr``.

    The caller guarantees that the memory stays allocated while the view is
    used (engines keep their host pools alive for the process lifetime).
    """
    if not isinstance(ptr, int) or ptr <= 0:
        raise InvalidArgument(f"invalid host pointer {ptr!r}")
    if not isinstance(size, int) or size <= 0:
        raise InvalidArgument(f"invalid buffer size {size!r} at pointer {ptr:#x}")
    return memoryview(_ubyte_array(size).from_address(ptr)).cast("B")


def load_each(load: Callable[[dict[str, T]], Iterable[str]], dests: Mapping[str, T], errors: tuple[type[Exception], ...], what: str) -> set[str]:
    """The keys of ``dests`` that ``load`` filled: all at once, else key by key.

    ``load(batch)`` fills the buffers of ``batch`` and returns the keys it
    found, or raises one of ``errors``; then each key is loaded on its own,
    so a failing key (a corrupt object, a wrong buffer size) never fails the
    others. Failures are logged, prefixed with ``what``.
    """
    if not dests:
        return set()
    try:
        return set(load(dict(dests)))
    except errors as exc:
        log.warning("%s: batched load of %d keys failed (%s); loading key by key", what, len(dests), exc)
    loaded: set[str] = set()
    for key, dest in dests.items():
        try:
            loaded.update(load({key: dest}))
        except errors as exc:
            log.warning("%s: loading %r failed: %s", what, key, exc)
    return loaded


def loaded_keys(handle: LoadHandle, what: str) -> set[str]:
    """The keys of a done ``handle`` that loaded. Each failed key is logged,
    prefixed with ``what``: a key no longer stored at debug level (evicted
    since its lookup: a miss), any other failure as a warning."""
    for key, error in handle.errors().items():
        log.log(logging.DEBUG if isinstance(error, KeyNotFound) else logging.WARNING, "%s: loading %r failed: %s", what, key, error)
    return set(handle.loaded())


class AllDone:
    """Calls ``done(failed)`` once every future it was given has resolved.

    ``failed`` is the set of keys whose future raised. Futures resolve on
    other threads; ``done`` runs on the thread that resolves the last one
    (at once, on the caller's, when there are none).
    """

    def __init__(self, futures: Mapping[str, Future[None]], done: Callable[[set[str]], None]) -> None:
        self._lock = threading.Lock()
        self._left = len(futures)
        self._failed: set[str] = set()
        self._done = done
        if not futures:
            done(set())
        for key, future in futures.items():
            future.add_done_callback(functools.partial(self._resolved, key))

    def _resolved(self, key: str, future: Future[None]) -> None:
        with self._lock:
            if future.exception() is not None:
                self._failed.add(key)
            self._left -= 1
            last = self._left == 0
        if last:
            self._done(self._failed)


def safe_component(text: str) -> str:
    """``text`` made safe as one path component (``/`` and odd characters become ``-``)."""
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in text)
    return cleaned.strip(".") or "default"
