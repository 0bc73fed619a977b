"""The cache policy: which buckets to evict, and how objects are grouped into buckets.

Pure logic over bucket records, so a simulator can drive it without files.
"""
