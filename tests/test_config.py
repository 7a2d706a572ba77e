import os
import re
from pathlib import Path

import pytest

from kvshelf import ConfigError, load_config
from kvshelf.config import SecurityConfig

SECRET = "0123456789abcdef" * 4  # 64 characters, as `openssl rand -hex 32` gives
BACKOFF_RANGE = "tier_backoff_s must be a finite number of seconds between 0 and 86400"


def test_defaults_without_any_source():
    config = load_config(environ={})
    assert config.chunk_size == 256 and config.disk is None and config.memory.size_bytes == 2 * 2**30
    assert (config.tier_backoff_s, config.security.encrypt, config.security.disabled) == (5.0, False, False)


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
        ({"chunk_size": 0}, "chunk_size must be a whole number of tokens between 1 and 1048576, got 0"),
        ({"chunk_size": "many"}, "chunk_size must be a whole number of tokens between 1 and 1048576, got 'many'"),
        ({"chunk_size": 2.5}, "chunk_size must be a whole number of tokens between 1 and 1048576, got 2.5"),
        ({"chunk_size": 1_048_577}, "chunk_size must be a whole number of tokens between 1 and 1048576"),
        ({"chunk_size": True}, "chunk_size must be a whole number of tokens between 1 and 1048576, got True"),
        ({"chunk_size": "yes"}, "chunk_size must be a whole number of tokens between 1 and 1048576, got 'yes'"),
        ({"chunk_size": float("nan")}, "chunk_size must be a whole number of tokens between 1 and 1048576, got nan"),
        ({"chunk_size": 10**400}, "chunk_size must be a whole number of tokens between 1 and 1048576"),
        ({"writer_queue_size": False}, "writer_queue_size must be a whole number of chunks between 1 and 1000000"),
        ({"writer_queue_size": 1_000_001}, "writer_queue_size must be a whole number of chunks between 1 and 1000000"),
        ({"tier_backoff_s": float("nan")}, BACKOFF_RANGE + ", got nan"),
        ({"tier_backoff_s": "inf"}, BACKOFF_RANGE + ", got 'inf'"),
        ({"tier_backoff_s": 86401}, BACKOFF_RANGE + ", got 86401"),
        ({"tier_backoff_s": True}, BACKOFF_RANGE + ", got True"),
        ({"redis_url": "redis://h:1", "redis_ttl_s": 0.0001}, "redis.ttl_s must be a finite number of seconds, "
         "at least 1 (a shorter expiry drops chunks before they are read; leave it unset for Redis's own eviction), "
         "got 0.0001"),
        ({"redis_url": "redis://h:1", "redis_ttl_s": "infinity"}, "redis.ttl_s must be a finite number of seconds"),
        ({"redis_url": "redis://h:1", "redis_timeout_s": 0}, "redis.timeout_s must be a finite number of seconds, "
         "larger than 0 and at most 3600, got 0"),
        ({"redis_url": "redis://h:1", "redis_connect_timeout_s": 3601}, "redis.connect_timeout_s must be a finite "
         "number of seconds, larger than 0 and at most 3600, got 3601"),
        ({"redis_url": "redis://h:1", "redis_codec": "auto", "redis_codec_budget_ms": "nan"},
         "redis.codec_budget_ms must be a finite number of milliseconds, larger than 0, got 'nan'"),
        ({"pd_push_timeout_s": float("inf")}, "pd.push_timeout_s must be a finite number of seconds, larger than 0 "
         "and at most 3600, got inf"),
        ({"pd_inbox_ttl_s": 0}, "pd.inbox_ttl_s must be a finite number of seconds, larger than 0, got 0"),
        ({"pd_inbox_ttl_s": -1.5}, "pd.inbox_ttl_s must be a finite number of seconds, larger than 0, got -1.5"),
        ({"memory_size": "lots"}, "memory.size must be a finite size larger than zero, like 512MiB or 2GB or a number"),
        ({"memory_size": "12 parsecs"}, "memory.size must be a finite size larger than zero"),
        ({"memory_size": "0GiB"}, "memory.size must be a finite size larger than zero"),
        ({"memory_size": "1e400"}, "memory.size must be a finite size larger than zero, like 512MiB or 2GB or a "
         "number of bytes, got '1e400'"),
        ({"memory_size": "nan"}, "memory.size must be a finite size larger than zero"),
        ({"memory_size": float("inf")}, "memory.size must be a finite size larger than zero"),
        ({"memory_size": "9" * 400 + "GiB"}, "memory.size must be a finite size larger than zero"),
        ({"memory_size": True}, "memory.size must be a finite size larger than zero"),
        ({"pd_inbox_size": float("nan")}, "pd.inbox_size must be a finite size larger than zero"),
        ({"disk_path": "TMP", "disk_size": "1e400"}, "disk.size must be a finite size larger than zero"),
        ({"memory_size": "64TiB"}, "lower memory.size"),
        ({"disk_path": ""}, "disk.path must be a directory path"),
        ({"disk_path": "/proc/kvshelf"}, "disk.path /proc/kvshelf is not a writable directory"),
        ({"disk_path": "TMP", "disk_size": "1000TB"}, "lower disk.size"),
        ({"disk_path": "TMP", "disk_codec": "gzip"}, "disk.codec must be auto or one of"),
        ({"disk_size": "1GiB"}, "set disk.path"),
        ({"disk_path": "TMP", "disk_codec_budget_ms": 50}, "only applies to disk.codec: auto"),
        ({"writer_queue_size": -1}, "writer_queue_size must be a whole number of chunks between 1 and 1000000"),
        ({"tier_backoff_s": -1}, BACKOFF_RANGE + ", got -1"),
        ({"disk_path": "TMP", "disk_mode": "public"}, "disk.mode must be 'private' (only this user reads the cache) "
         "or 'group' (the directory's unix group shares it), got 'public'"),
        ({"disk_mode": "group"}, "set disk.path"),
        ({"security_key": "short"}, "security.key is shorter than 32 characters; use at least 32 random characters "
         "(e.g. `openssl rand -hex 32`), or set security.key_file"),
        ({"security_key": ""}, "security.key is shorter than 32 characters"),
        ({"security_key": SECRET, "security_key_file": "TMP"}, "security.key and security.key_file are both set"),
        ({"security_key": "none", "security_key_file": "TMP"}, "security.key and security.key_file are both set"),
        ({"security_key": "none", "security_encrypt": True}, "security.encrypt: true needs a secret but security.key "
         "is none; remove security.key: none"),
        ({"security_key": 12345}, "security.key must be a string of at least 32 random characters"),
        ({"security_encrypt": "maybe"}, "security.encrypt must be true or false"),
        ({"chunk_sise": 256}, "unknown config keyword"),
        ({"pd_receive_address": "tcp://127.0.0.1:5600", "lookup_address": "tcp://127.0.0.1:5600"},
         "pd.receive_address (tcp://127.0.0.1:5600) and lookup_address (tcp://127.0.0.1:5600) are one port: give "
         "each server of an instance a port of its own"),
        ({"lookup_address": "tcp://0.0.0.0:5700", "admin_address": "127.0.0.1:5700", "admin_key": SECRET},
         "lookup_address (tcp://0.0.0.0:5700) and admin.address (127.0.0.1:5700) are one port"),
        ({"pd_receive_address": "tcp://0.0.0.0:5600", "admin_address": "10.0.0.2:5600", "admin_key": SECRET},
         "are one port"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(source, message, tmp_path):
    source = {key: str(tmp_path) if value == "TMP" else value for key, value in source.items()}
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(environ={}, **source)


def test_yaml_nan_booleans_and_tiny_ttl_are_refused(tmp_path):
    path = tmp_path / "kvshelf.yaml"
    for text, message in [
        ("tier_backoff_s: .nan\n", BACKOFF_RANGE + ", got nan"),
        ("tier_backoff_s: .inf\n", BACKOFF_RANGE + ", got inf"),
        ("chunk_size: yes\n", "chunk_size must be a whole number of tokens between 1 and 1048576, got True"),
        ("chunk_size: true\n", "chunk_size must be a whole number of tokens between 1 and 1048576, got True"),
        ("redis: {url: 'redis://h:1', ttl_s: 0.0001}\n", "redis.ttl_s must be a finite number of seconds, at least 1"),
        ("redis: {url: 'redis://h:1', password: yes}\n", "redis.password must be a non-empty string (quote it"),
        ("memory: {size: 1.0e+400}\n", "memory.size must be a finite size larger than zero"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(path, environ={})


def test_servers_of_an_instance_may_share_a_port_number_only_on_distinct_hosts():
    config = load_config(environ={}, pd_receive_address="tcp://10.0.0.1:5600", lookup_address="tcp://10.0.0.2:5600",
                         admin_address="127.0.0.1:5600", admin_key=SECRET)
    assert set(config.listeners) == {"pd.receive_address", "lookup_address", "admin.address"}


def test_numbers_from_environment_strings():
    environ = {"KVSHELF_CHUNK_SIZE": "64", "KVSHELF_WRITER_QUEUE_SIZE": " 8 ", "KVSHELF_TIER_BACKOFF_S": "5",
               "KVSHELF_REDIS_URL": "redis://h:1", "KVSHELF_REDIS_TTL_S": "1", "KVSHELF_REDIS_TIMEOUT_S": "3600",
               "KVSHELF_PD_INBOX_TTL_S": "0.5", "KVSHELF_MEMORY_SIZE": "1.5GiB"}
    config = load_config(environ=environ)
    assert (config.chunk_size, config.writer_queue_size, config.tier_backoff_s) == (64, 8, 5.0)
    assert (config.redis.ttl_s, config.redis.timeout_s, config.pd.inbox_ttl_s) == (1.0, 3600.0, 0.5)
    assert config.memory.size_bytes == 3 * 2**29


def test_range_ends_are_accepted():
    config = load_config(environ={}, chunk_size=1_048_576, writer_queue_size=1_000_000, tier_backoff_s=0)
    assert (config.chunk_size, config.writer_queue_size, config.tier_backoff_s) == (1_048_576, 1_000_000, 0.0)
    assert load_config(environ={}, chunk_size=256.0).chunk_size == 256


def test_security_defaults_to_a_key_file_under_kvshelf_home(tmp_path):
    home = tmp_path / "home"
    config = load_config(environ={"KVSHELF_HOME": str(home)})
    assert config.security == SecurityConfig(key=None, key_file=home / "secret.key", disabled=False, encrypt=False,
                                             create_key_file=True)
    assert not home.exists()  # kvshelf.security creates the file on first use, not the config


def test_security_default_home_is_the_user_cache():
    config = load_config(environ={})
    assert config.security.key_file == Path.home() / ".cache" / "kvshelf" / "secret.key"


def test_security_key_from_environment(tmp_path):
    config = load_config(environ={"KVSHELF_HOME": str(tmp_path), "KVSHELF_SECURITY_KEY": SECRET,
                                  "KVSHELF_SECURITY_ENCRYPT": "true"})
    assert config.security == SecurityConfig(key=SECRET, key_file=None, disabled=False, encrypt=True)


def test_security_key_file_from_file(tmp_path):
    path = tmp_path / "kvshelf.yaml"
    path.write_text("security:\n  key_file: ~/kvshelf.key\n  encrypt: true\n")
    config = load_config(path, environ={"KVSHELF_HOME": str(tmp_path)})
    assert config.security == SecurityConfig(key_file=Path.home() / "kvshelf.key", encrypt=True)


def test_security_key_none_opts_out():
    config = load_config(environ={"KVSHELF_SECURITY_KEY": "none"})
    assert config.security == SecurityConfig(key=None, key_file=None, disabled=True, encrypt=False)


def test_key_in_file_and_environment_conflicts(tmp_path):
    path = tmp_path / "kvshelf.yaml"
    path.write_text(f"security: {{key_file: {tmp_path / 'k'}}}\n")
    with pytest.raises(ConfigError, match="KVSHELF_SECURITY_KEY counts as security.key"):
        load_config(path, environ={"KVSHELF_SECURITY_KEY": SECRET})


def test_secrets_never_printed(tmp_path):
    config = load_config(environ={"KVSHELF_SECURITY_KEY": SECRET, "KVSHELF_REDIS_URL": "redis://h:1",
                                  "KVSHELF_REDIS_PASSWORD": "hunter2-password"})
    assert SECRET not in repr(config) and "hunter2-password" not in repr(config)
    short_key = "s3cret-but-short"
    with pytest.raises(ConfigError) as refused:
        load_config(environ={"KVSHELF_SECURITY_KEY": short_key})
    assert short_key not in str(refused.value)
    path = tmp_path / "kvshelf.yaml"
    path.write_text(f"security:\n  key: {SECRET}: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line 2") as refused:
        load_config(path, environ={})
    assert SECRET not in str(refused.value) and refused.value.__cause__ is None and refused.value.__suppress_context__
    with pytest.raises(ConfigError) as refused:
        load_config(environ={}, redis_url="http://user:hunter2-password@h:1")
    assert "hunter2-password" not in str(refused.value) and "http://***@h:1" in str(refused.value)


@pytest.mark.parametrize(("mode", "leaf_mode", "parent_mode"), [("private", 0o700, 0o700), ("group", 0o2770, 0o750)])
def test_disk_directories_created_closed(tmp_path, mode, leaf_mode, parent_mode):
    path = tmp_path / "cache" / "disk"
    old_umask = os.umask(0o022)  # the common umask, which would turn 0770 into 0750
    try:
        config = load_config(environ={}, disk_path=str(path), disk_size="1KiB", disk_mode=mode)
    finally:
        os.umask(old_umask)
    assert config.disk.mode == mode
    assert (path.stat().st_mode & 0o7777, path.parent.stat().st_mode & 0o7777) == (leaf_mode, parent_mode)
    assert sorted(path.iterdir()) == []  # the probe is gone


def test_existing_disk_directory_keeps_its_mode(tmp_path):
    path = tmp_path / "disk"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    assert load_config(environ={}, disk_path=str(path), disk_size="1KiB").disk.mode == "private"
    assert path.stat().st_mode & 0o7777 == 0o755


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "kvshelf.yaml"
    path.write_text("memory:\n  sise: 1GiB\n")
    with pytest.raises(ConfigError, match="unknown config key 'memory.sise'"):
        load_config(path, environ={})


def test_unknown_environment_variable():
    with pytest.raises(ConfigError, match="KVSHELF_CHUNKSIZE"):
        load_config(environ={"KVSHELF_CHUNKSIZE": "256"})


def test_the_proxys_own_variables_are_not_config_keys():
    """`kvshelf proxy` reads this configuration (security.*) beside its own KVSHELF_PROXY_* keys."""
    from kvshelf.disagg.proxy import ADMIN_KEY_ENV, API_KEY_ENV

    config = load_config(environ={API_KEY_ENV: "client-key", ADMIN_KEY_ENV: "admin-key", "KVSHELF_CHUNK_SIZE": "64"})
    assert config.chunk_size == 64


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


def test_only_the_default_key_file_is_made_on_first_use(tmp_path):
    """A configured key file that is missing is an error: a fresh key would share nothing with the fleet."""
    from kvshelf.security import Keyring

    with pytest.raises(ConfigError, match="missing.key does not exist"):
        Keyring.from_config(load_config(environ={}, security_key_file=str(tmp_path / "missing.key")).security)
    default = load_config(environ={"KVSHELF_HOME": str(tmp_path / "home")}).security
    assert Keyring.from_config(default).keyed and (tmp_path / "home" / "secret.key").stat().st_mode & 0o777 == 0o600


def test_a_connectors_settings_name_a_file_and_override_it_with_dotted_or_underscored_keys(tmp_path):
    from kvshelf.config import connector_config

    path = tmp_path / "kvshelf.yaml"
    path.write_text("chunk_size: 128\nmemory:\n  size: 1GiB\n")
    config = connector_config({"config_file": str(path), "model_id": "my-model@rev", "memory.size": "2GiB",
                               "writer_queue_size": 8})
    assert (config.chunk_size, config.memory.size_bytes, config.writer_queue_size) == (128, 2 * 2**30, 8)
    with pytest.raises(ConfigError, match="unknown config keyword"):
        connector_config({"chunk_sise": 128})
