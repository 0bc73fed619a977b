"""``python -m kvbucket``: the ``kvbucket`` command (see :mod:`kvbucket.tools.cli`)."""

from .tools.cli import main

main()
