from pathlib import Path

import pytest

from kvshelf import ConfigError, load_config


def test_defaults_without_any_source():
    config = load_config(environ={})
    assert config.chunk_size == 256 and config.disk is None and config.memory.size_bytes == 2 * 2**30


def test_file_env_and_keywords_in_order(tmp_path):
    path = tmp_path / "kvshelf.yaml"
    path.write_text(f"chunk_size: 128\nmemory:\n  size: 1GiB\ndisk:\n  path: {tmp_path / 'd'}\n  size: 2GB\n")
    config = load_config(path, environ={"KVSHELF_CHUNK_SIZE": "64"}, writer_queue_size=8)
    assert (config.chunk_size, config.writer_queue_size) == (64, 8)
    assert config.memory.size_bytes == 2**30
    assert config.disk.path == tmp_path / "d" and config.disk.size_bytes == 2 * 10**9 and config.disk.codec == "raw"


def test_config_file_named_by_environment(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text("chunk_size: 32\n")
    assert load_config(environ={"KVSHELF_CONFIG": str(path)}).chunk_size == 32


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"chunk_size": 0}, "chunk_size must be a positive whole number"),
        ({"chunk_size": "many"}, "chunk_size must be a whole number"),
        ({"chunk_size": 2.5}, "chunk_size must be a positive whole number"),
        ({"memory_size": "lots"}, "memory.size must be a size like"),
        ({"memory_size": "12 parsecs"}, "memory.size must be a size like"),
        ({"memory_size": "0GiB"}, "memory.size must be larger than zero"),
        ({"memory_size": "64TiB"}, "lower memory.size"),
        ({"disk_path": ""}, "disk.path must be a directory path"),
        ({"disk_path": "/proc/kvshelf"}, "disk.path /proc/kvshelf is not a writable directory"),
        ({"disk_path": "TMP", "disk_size": "1000TB"}, "lower disk.size"),
        ({"disk_path": "TMP", "disk_codec": "gzip"}, "disk.codec must be auto or one of"),
        ({"disk_size": "1GiB"}, "set disk.path"),
        ({"disk_path": "TMP", "disk_codec_budget_ms": 50}, "only applies to disk.codec: auto"),
        ({"writer_queue_size": -1}, "writer_queue_size must be a positive whole number"),
        ({"tier_backoff_s": -1}, "tier_backoff_s must not be negative"),
        ({"chunk_sise": 256}, "unknown config keyword"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(source, message, tmp_path):
    source = {key: str(tmp_path) if value == "TMP" else value for key, value in source.items()}
    with pytest.raises(ConfigError, match=message):
        load_config(environ={}, **source)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "kvshelf.yaml"
    path.write_text("memory:\n  sise: 1GiB\n")
    with pytest.raises(ConfigError, match="unknown config key 'memory.sise'"):
        load_config(path, environ={})


def test_unknown_environment_variable():
    with pytest.raises(ConfigError, match="KVSHELF_CHUNKSIZE"):
        load_config(environ={"KVSHELF_CHUNKSIZE": "256"})


@pytest.mark.parametrize("text", ["chunk_size: [1", "- a list\n- of things\n"])
def test_unreadable_file(tmp_path, text):
    path = tmp_path / "kvshelf.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path, environ={})


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Path("/nonexistent/kvshelf.yaml"), environ={})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
