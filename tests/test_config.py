"""BucketConfig: validation, environment variables, config files."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from kvbucket import BucketConfig, BucketStore, OffloadQueue
from kvbucket.config import parse_size
from kvbucket.errors import InvalidArgument
from kvbucket.integrations._common import store_options
from kvbucket.metrics import check_endpoint


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
    [
        ("KVBUCKET_BUCKET_KEYS_LIMIT", "many"),
        ("MOONCAKE_OFFLOAD_BUCKET_SIZE_LIMIT_BYTES", "1.5G"),
        ("KVBUCKET_QUARANTINE", "perhaps"),
        ("KVBUCKET_EVICTION_HIGH_WATERMARK", "high"),
    ],
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
    with pytest.raises(InvalidArgument, match="'bucket_size' \\(did you mean 'bucket_size_limit'\\?\\)"):
        BucketConfig.from_file(path)
    with pytest.raises(InvalidArgument, match="cannot read"):
        BucketConfig.from_file(tmp_path / "missing.toml")


def test_validation_normalises_case() -> None:
    config = BucketConfig(path="x", eviction_policy="LRU", durability="Strict", io_mode="DIRECT").validated()
    assert (config.eviction_policy, config.durability, config.io_mode) == ("lru", "strict", "direct")


# -- one parser for every source -------------------------------------------------
def from_each_source(tmp_path: Path, name: str, text: str) -> dict[str, Any]:
    """Field ``name`` given as ``text`` by each source, read back from the validated config."""
    toml = tmp_path / "kv.toml"
    toml.write_text(f'path = "/x"\n{name} = "{text}"\n')
    configs = {
        "python": BucketConfig(path="/x", **{name: text}),
        "env": BucketConfig.from_env({f"KVBUCKET_{name.upper()}": text}, path="/x"),
        "toml": BucketConfig.from_file(toml),
        "adapter": BucketConfig(path="/x", **store_options({name: text}, "an engine config")),
    }
    return {source: getattr(config.validated(), name) for source, config in configs.items()}


@pytest.mark.parametrize(
    "name, text, value",
    [
        ("max_physical_bytes", "200G", 200 << 30),
        ("bucket_size_limit", " 64MiB ", 64 << 20),
        ("bucket_keys_limit", "64", 64),
        ("verify_checksums", "off", False),
        ("quarantine", "Yes", True),
        ("eviction_policy", "FIFO", "fifo"),
        ("eviction_high_watermark", "0.99", 0.99),
        ("group_max_delay_s", "0.5", 0.5),
    ],
)
def test_every_source_reads_a_value_alike(tmp_path: Path, name: str, text: str, value: object) -> None:
    assert from_each_source(tmp_path, name, text) == dict.fromkeys(["python", "env", "toml", "adapter"], value)


@pytest.mark.parametrize(
    "name, text",
    [("verify_checksums", "ture"), ("max_physical_bytes", "lots"), ("total_keys_limit", "1.5"), ("io_threads", "0"), ("durability", "sometimes")],
)
def test_every_source_refuses_a_bad_value_naming_source_and_setting(tmp_path: Path, name: str, text: str) -> None:
    var = f"KVBUCKET_{name.upper()}"
    toml = tmp_path / "kv.toml"
    toml.write_text(f'{name} = "{text}"\n')
    attempts = {
        f"^{name} must be": lambda: BucketConfig(path="/x", **{name: text}).validated(),
        f"environment variable {var}: {name} must be": lambda: BucketConfig.from_env({var: text}),
        f"config file .*kv.toml.*: {name} must be": lambda: BucketConfig.from_file(toml),
        f"an engine config: {name} must be": lambda: store_options({name: text}, "an engine config"),
    }
    for message, attempt in attempts.items():
        with pytest.raises(InvalidArgument, match=message):
            attempt()


def test_a_bad_boolean_is_refused_alike_from_the_environment_and_an_engine_config() -> None:
    """The environment and the adapters once parsed booleans apart: an
    engine config's ``"ture"`` read as False where the environment refused it."""
    with pytest.raises(InvalidArgument) as from_env:
        BucketConfig.from_env({"KVBUCKET_VERIFY_CHECKSUMS": "ture"}, path="/x")
    with pytest.raises(InvalidArgument) as from_engine:
        store_options({"verify_checksums": "ture"}, "an engine config")
    env_message, engine_message = str(from_env.value), str(from_engine.value)
    assert env_message.startswith("environment variable KVBUCKET_VERIFY_CHECKSUMS: ")
    assert engine_message.startswith("an engine config: ")
    refusal = "verify_checksums must be True or False"
    assert env_message.partition(": ")[2] == engine_message.partition(": ")[2]
    assert engine_message.partition(": ")[2].startswith(refusal) and engine_message.endswith("got 'ture'")


def test_whole_number_arguments_are_refused_in_one_wording(tmp_path: Path) -> None:
    """A config field, an OffloadQueue argument and the metrics port: a bool is
    no whole number, and each refusal reads the same."""
    with BucketStore.open(tmp_path / "s", durability="relaxed") as store:
        attempts = {
            "io_threads must be a whole number >= 1; got True": lambda: BucketConfig(path="/x", io_threads=True).validated(),  # type: ignore[arg-type]
            "workers must be a whole number >= 1; got True": lambda: OffloadQueue(store, workers=True),
            "max_staged_bytes must be a whole number >= 1; got 0": lambda: OffloadQueue(store, max_staged_bytes=0),
            "metrics port (0: any free port) must be a whole number from 0 to 65535; got True": lambda: check_endpoint(True, "127.0.0.1"),
        }
        for message, attempt in attempts.items():
            with pytest.raises(InvalidArgument) as refused:
                attempt()
            assert str(refused.value) == message


def test_open_takes_sizes_with_units(tmp_path: Path) -> None:
    with BucketStore.open(tmp_path / "s", max_physical_bytes="200G", bucket_size_limit="1MiB", total_keys_limit="1000") as store:
        config = store.config
        assert (config.max_physical_bytes, config.bucket_size_limit, config.total_keys_limit) == (200 << 30, 1 << 20, 1000)
        assert store.stats().max_physical_bytes == 200 << 30


@pytest.mark.parametrize(
    "fields", [{"bucket_size_limit": True}, {"max_total_size": 1.5}, {"bucket_keys_limit": "1k"}, {"group_max_delay_s": float("inf")}]
)
def test_values_that_only_look_like_numbers_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument, match=next(iter(fields))):
        BucketConfig(path="/x", **fields).validated()  # type: ignore[arg-type]


def test_integral_floats_are_whole_numbers() -> None:
    config = BucketConfig(path="/x", max_total_size=1e9, bucket_keys_limit=64.0).validated()  # type: ignore[arg-type]
    assert (config.max_total_size, config.bucket_keys_limit) == (10**9, 64)
    assert isinstance(config.max_total_size, int)


@pytest.mark.parametrize(
    "variable, close",
    [
        ("KVBUCKET_MAX_PHYSICAL_BYTE", "KVBUCKET_MAX_PHYSICAL_BYTES"),
        ("KVBUCKET_DURABILTY", "KVBUCKET_DURABILITY"),
        ("kvbucket_path", "KVBUCKET_PATH"),
        ("KVBUCKET_EVICTION", "KVBUCKET_EVICTION_POLICY"),
    ],
)
def test_a_misspelt_variable_is_reported_with_the_close_match(variable: str, close: str) -> None:
    with pytest.warns(UserWarning, match=f"{variable} is not a kvbucket setting.*did you mean {close}"):
        config = BucketConfig.from_env({variable: "1"}, path="/x")
    assert config == BucketConfig(path="/x")  # the misspelt variable set nothing


def test_other_tools_variables_are_not_reported() -> None:
    env = {"KVBUCKET_SOAK_SECONDS": "5", "KVBUCKET_FULL_SWEEP": "1", "KVBUCKET_CRASH_REPORT": "r", "KVBUCKET_IO_THREADS": "2"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert BucketConfig.from_env(env, path="/x").io_threads == 2


@pytest.mark.parametrize(
    "variable", ["KVBUCKET_PATH", "KVBUCKET_MAX_PHYSICAL_BYTES", "KVBUCKET_VERIFY_CHECKSUMS", "MOONCAKE_OFFLOAD_BUCKET_EVICTION_POLICY"]
)
def test_an_empty_variable_is_named(variable: str) -> None:
    with pytest.raises(InvalidArgument, match=f"environment variable {variable} is empty"):
        BucketConfig.from_env({variable: " "})


def test_a_variable_an_override_replaces_is_not_read() -> None:
    env = {"KVBUCKET_PATH": "", "KVBUCKET_IO_THREADS": "many", "KVBUCKET_DURABILITY": "relaxed"}
    config = BucketConfig.from_env(env, path="/x", io_threads=3).validated()
    assert (str(config.path), config.io_threads, config.durability) == ("/x", 3, "relaxed")
