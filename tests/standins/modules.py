"""Installing stand-in engine modules into ``sys.modules`` for a test."""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Iterator
from typing import Any


def module(name: str, **attrs: Any) -> types.ModuleType:
    """A module called ``name`` holding ``attrs``."""
    made = types.ModuleType(name)
    made.__dict__.update(attrs)
    return made


@contextlib.contextmanager
def imported_against(modules: dict[str, types.ModuleType | None], target: str) -> Iterator[types.ModuleType]:
    """Install ``modules``, (re)import ``target`` against them, and restore
    ``sys.modules`` exactly as it was afterwards."""
    saved = {name: sys.modules.get(name) for name in [*modules, target]}  # a None value blocks that import
    sys.modules.update(modules)
    sys.modules.pop(target, None)
    try:
        yield importlib.import_module(target)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def imported_without(engine: str, target: str) -> contextlib.AbstractContextManager[types.ModuleType]:
    """(Re)import ``target`` where ``engine`` cannot be imported, even if it is installed."""
    return imported_against({engine: None}, target)
