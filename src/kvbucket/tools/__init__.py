"""The programs: the ``kvbucket`` command, directory checks, the benchmark and the demo."""
