"""Checks of the arguments of the public methods: keys, mappings and numbers.

Every public method that takes keys or a mapping validates it here before it
touches the store, so a wrong type gets :class:`InvalidArgument` naming the
method, never a ``TypeError``/``AttributeError`` from deep inside, and never
a silently wrong answer (a ``str`` is iterable: taken as a list of keys it
would be its one-character substrings).

Lookups (``exists``, ``batch_exists``, ``batch_query``) only need each key to
be a ``str``: a ``str`` that could never be stored (empty, too long) is simply
not found. Everything else applies :func:`~kvbucket._core.format.check_key` in full.

A count or a limit is a whole number (:func:`check_int`) and a duration or
a ratio a finite number (:func:`check_number`); a bool is neither (Python
takes ``True`` as 1, which no one means). Every such error reads
``<name> must be <what>; got <value>``, worded by :func:`whole_number` and
:func:`number_range`, which the configuration parser uses too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeGuard

from ..errors import InvalidArgument
from .format import check_key

__all__ = [
    "check_lookup_key",
    "lookup_keys",
    "key_list",
    "key_mapping",
    "key_value_pairs",
    "is_int",
    "is_number",
    "whole_number",
    "number_range",
    "check_int",
    "check_number",
]

_ONE_VALUE = (str, bytes, bytearray, memoryview)
"""Iterable, but one key (or one value), never a collection of keys."""


def check_lookup_key(key: object) -> None:
    """Raise :class:`InvalidArgument` unless ``key`` is a ``str``."""
    if not isinstance(key, str):
        raise InvalidArgument(f"keys must be str; got {type(key).__name__} {key!r:.60}")


def lookup_keys(keys: object, method: str) -> Sequence[str]:
    """``keys`` as a list or tuple of ``str`` (the hot path of ``batch_exists``
    and ``batch_query``: one pass over the key types at C speed; a key is
    checked one by one only when some key is not exactly a ``str``)."""
    collection = _check_collection(keys, method)
    checked = collection if isinstance(collection, (list, tuple)) else list(collection)
    if set(map(type, checked)) - {str}:
        for key in checked:
            check_lookup_key(key)
    return checked  # type: ignore[return-value]  # every key is a str: checked above


def key_list(keys: object, method: str) -> list[str]:
    """``keys`` as a list, each one passing :func:`~kvbucket._core.format.check_key`."""
    return [check_key(key) for key in _check_collection(keys, method)]


def key_mapping(mapping: object, method: str) -> Mapping[str, Any]:
    """``mapping`` itself, once it is a mapping whose keys pass :func:`~kvbucket._core.format.check_key`."""
    if not isinstance(mapping, Mapping):
        raise InvalidArgument(f"{method} takes a mapping (for example a dict) keyed by str keys; got {type(mapping).__name__} {mapping!r:.60}")
    for key in mapping:
        check_key(key)
    return mapping


def key_value_pairs(objects: object, method: str) -> Iterator[tuple[Any, Any]]:
    """The ``(key, value)`` pairs of a mapping or of an iterable of 2-tuples;
    the keys are left to the caller to check."""
    if isinstance(objects, Mapping):
        yield from objects.items()
        return
    if isinstance(objects, _ONE_VALUE) or not isinstance(objects, Iterable):
        raise InvalidArgument(f"{method} takes a mapping or an iterable of (key, value) pairs; got {type(objects).__name__} {objects!r:.60}")
    for item in objects:
        if not isinstance(item, tuple) or len(item) != 2:
            raise InvalidArgument(f"{method}: each object must be a (key, value) pair; got {item!r:.60}")
        yield item


def _check_collection(keys: object, method: str) -> Iterable[object]:
    """``keys``, once it is a collection of keys (not one key)."""
    if isinstance(keys, _ONE_VALUE):
        raise InvalidArgument(f"{method} takes a collection of keys, not one {type(keys).__name__} ({keys!r:.60}); pass [key]")
    if not isinstance(keys, Iterable):
        raise InvalidArgument(f"{method} takes a collection (for example a list) of str keys; got {type(keys).__name__} {keys!r:.60}")
    return keys


def is_int(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an int and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is a finite int or float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def whole_number(minimum: int, maximum: int | None = None) -> str:
    """What a whole number from ``minimum`` (to ``maximum``) is called in errors."""
    return f"a whole number >= {minimum}" if maximum is None else f"a whole number from {minimum} to {maximum}"


def number_range(minimum: float, maximum: float | None = None) -> str:
    """What a finite number from ``minimum`` (to ``maximum``) is called in errors."""
    return f"a number >= {minimum:g}" if maximum is None else f"a number from {minimum:g} to {maximum:g}"


def check_int(value: object, name: str, minimum: int = 0, maximum: int | None = None) -> int:
    """``value``, once it is an int (not a bool) from ``minimum`` to ``maximum``
    (inclusive); else :class:`InvalidArgument` naming ``name``."""
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        raise InvalidArgument(f"{name} must be {whole_number(minimum, maximum)}; got {value!r:.60}")
    return value


def check_number(value: object, name: str, minimum: float = 0.0, maximum: float | None = None) -> float:
    """``value`` as a float, once it is a finite int or float (not a bool) from
    ``minimum`` to ``maximum`` (inclusive); else :class:`InvalidArgument` naming ``name``."""
    if not is_number(value) or value < minimum or (maximum is not None and value > maximum):
        raise InvalidArgument(f"{name} must be {number_range(minimum, maximum)}; got {value!r:.60}")
    return float(value)
