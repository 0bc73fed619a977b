"""BucketConfig: validation, environment variables, config files."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbucket import BucketConfig
from kvbucket.config import parse_size
from kvbucket.errors import InvalidArgument


def test_defaults() -> None:
    config = BucketConfig(path="/tmp/x").validated()
    assert config.bucket_size_limit == 256 << 20
    assert config.bucket_keys_limit == 500
    assert config.durability == "strict"
    assert config.verify_checksums is True


@pytest.mark.parametrize("text, value", [("4096", 4096), ("256MiB", 256 << 20), ("1G", 1 << 30), ("2tb", 2 << 40), (" 3 k ", 3072)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_from_env_reads_every_field_and_mooncake_names() -> None:
    env = {
        "MOONCAKE_OFFLOAD_FILE_STORAGE_PATH": "/mc/path",
        "MOONCAKE_OFFLOAD_BUCKET_SIZE_LIMIT_BYTES": "1048576",
        "MOONCAKE_OFFLOAD_BUCKET_KEYS_LIMIT": "64",
        "MOONCAKE_OFFLOAD_BUCKET_MAX_TOTAL_SIZE": "10G",
        "MOONCAKE_OFFLOAD_BUCKET_EVICTION_POLICY": "FIFO",
        "KVBUCKET_DURABILITY": "relaxed",
        "KVBUCKET_VERIFY_CHECKSUMS": "no",
        "KVBUCKET_IO_THREADS": "4",
        "KVBUCKET_GROUP_MAX_DELAY_S": "0.5",
    }
    config = BucketConfig.from_env(env).validated()
    assert str(config.path) == "/mc/path"
    assert config.bucket_size_limit == 1 << 20
    assert config.bucket_keys_limit == 64
    assert config.max_total_size == 10 << 30
    assert config.eviction_policy == "fifo"
    assert config.durability == "relaxed"
    assert config.verify_checksums is False
    assert config.io_threads == 4
    assert config.group_max_delay_s == 0.5


def test_kvbucket_names_win_and_overrides_win_over_both() -> None:
    env = {"MOONCAKE_OFFLOAD_FILE_STORAGE_PATH": "/mc", "KVBUCKET_PATH": "/kv", "KVBUCKET_BUCKET_KEYS_LIMIT": "7"}
    assert str(BucketConfig.from_env(env).path) == "/kv"
    assert BucketConfig.from_env(env, bucket_keys_limit=9).bucket_keys_limit == 9


@pytest.mark.parametrize(
    "variable, text",
    [("KVBUCKET_BUCKET_KEYS_LIMIT", "many"), ("MOONCAKE_OFFLOAD_BUCKET_SIZE_LIMIT_BYTES", "1.5G"), ("KVBUCKET_QUARANTINE", "perhaps"), ("KVBUCKET_EVICTION_HIGH_WATERMARK", "high")],
)
def test_malformed_env_names_the_variable(variable: str, text: str) -> None:
    with pytest.raises(InvalidArgument, match=variable):
        BucketConfig.from_env({variable: text})


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "kv.toml"
    path.write_text('[kvbucket]\npath = "/data/kv"\nbucket_size_limit = "64MiB"\neviction_policy = "lru"\nio_threads = 2\n')
    config = BucketConfig.from_file(path).validated()
    assert (str(config.path), config.bucket_size_limit, config.io_threads) == ("/data/kv", 64 << 20, 2)


def test_from_file_rejects_unknown_fields(tmp_path: Path) -> None:
    path = tmp_path / "kv.toml"
    path.write_text('path = "/x"\nbucket_size = 5\n')
    with pytest.raises(InvalidArgument, match="bucket_size"):
        BucketConfig.from_file(path)
    with pytest.raises(InvalidArgument, match="cannot read"):
        BucketConfig.from_file(tmp_path / "missing.toml")


def test_validation_normalises_case() -> None:
    config = BucketConfig(path="x", eviction_policy="LRU", durability="Strict", io_mode="DIRECT").validated()
    assert (config.eviction_policy, config.durability, config.io_mode) == ("lru", "strict", "direct")
