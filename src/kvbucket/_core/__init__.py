"""The storage engine inside BucketStore.

On-disk format, the I/O seam, the commit protocol, recovery, the index and
the machinery the store composes. Not a public API: names here may change
between releases.
"""
