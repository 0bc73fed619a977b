"""``python -m kvbucket``: the ``kvbucket`` command (see :mod:`kvbucket.cli`)."""

from .cli import main

main()
