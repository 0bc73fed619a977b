"""The installed kvbucket version, as the programs report it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["installed_version"]


def installed_version() -> str:
    """The installed kvbucket version, or ``"dev"`` when kvbucket is not
    installed (running from a checkout)."""
    try:
        return version("kvbucket")
    except PackageNotFoundError:
        return "dev"
