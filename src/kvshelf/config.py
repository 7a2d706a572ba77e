"""One typed configuration, read once from a YAML file, `KVSHELF_*` variables and keywords.

Later sources win: defaults < file < environment < keywords. Keys are dotted paths
(`memory.size`); in the environment they are upper-cased with `_` for `.`
(`KVSHELF_MEMORY_SIZE`). Every error names the key and says how to fix it.

    chunk_size: 256
    writer_queue_size: 64
    memory: {size: 2GiB}
    disk: {path: ~/.cache/kvshelf/disk, size: 20GiB, codec: raw}   # omit for no disk tier
    redis: {url: "redis://:secret@host:6379/0", ttl_s: 86400}       # omit for no redis tier
    pd: {receive_address: "tcp://0.0.0.0:5600", inbox_size: 2GiB}   # prefill/decode transfer
    lookup_address: "tcp://0.0.0.0:5700"                             # for a KV-aware router
"""

import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvshelf.codecs import CODECS
from kvshelf.errors import ConfigError

CONFIG_FILE_ENV = "KVSHELF_CONFIG"
# KVSHELF_* variables that are not configuration keys.
NON_CONFIG_ENV = {CONFIG_FILE_ENV, "KVSHELF_HOME"}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


@dataclass(frozen=True)
class MemoryConfig:
    size_bytes: int = 2 * 2**30


@dataclass(frozen=True)
class DiskConfig:
    path: Path
    size_bytes: int = 20 * 2**30
    codec: str = "raw"  # or "auto": see codec_budget_ms
    codec_budget_ms: float = 100.0  # with codec auto: the load time per chunk to stay within


@dataclass(frozen=True)
class RedisConfig:
    """A shared Redis, or a Redis Cluster reached through `urls` as seed nodes."""

    urls: tuple[str, ...]  # redis:// or rediss:// (TLS); user and password may be in the URL
    cluster: bool = False
    username: str | None = None  # override the URL's; the password is best kept out of the URL
    password: str | None = None
    codec: str = "raw"
    codec_budget_ms: float = 100.0
    ttl_s: float | None = None  # expiry of each chunk, refreshed by every read; None: Redis's eviction only
    connect_timeout_s: float = 1.0
    timeout_s: float = 1.0  # per socket operation; a slower Redis counts as failed
    on_start_failure: str = "error"  # or "warn": log, and keep retrying the tier in the background
    key_prefix: str = "kvshelf"


@dataclass(frozen=True)
class PDConfig:
    """Prefill/decode disaggregation: how KV moves from a prefill instance to a decode instance."""

    # Decode side: where to accept pushed KV (tcp://host:port); None: receive nothing directly.
    receive_address: str | None = None
    inbox_size_bytes: int = 2**30  # pushed KV waiting for its request; a full inbox refuses pushes
    inbox_ttl_s: float = 60.0  # pushed KV whose request has not come by then is dropped
    # Prefill side: where to push when a request does not say (kv_transfer_params.kvshelf.push_to);
    # None: through the shared tiers only.
    push_to: str | None = None
    push_timeout_s: float = 5.0  # a push not done by then is given up; the decode side recomputes


@dataclass(frozen=True)
class ShelfConfig:
    chunk_size: int = 256
    writer_queue_size: int = 64
    tier_backoff_s: float = 5.0
    memory: MemoryConfig = MemoryConfig()
    disk: DiskConfig | None = None
    redis: RedisConfig | None = None
    pd: PDConfig = PDConfig()
    # Where a KV-aware router asks how much of a prompt this instance holds (tcp://host:port).
    lookup_address: str | None = None


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
) -> ShelfConfig:
    """The configuration from `path` (or $KVSHELF_CONFIG), `environ` (default os.environ), and `overrides`.

    Overrides use `_` for the section dot: `load_config(memory_size="1GiB", disk_path="/tmp/kv")`.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = path or environ.get(CONFIG_FILE_ENV)
    if path:
        values.update(_read_file(Path(path)))
    values.update(_read_env(environ))
    values.update(_read_overrides(overrides))
    return _build(values)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror}; check the path ({CONFIG_FILE_ENV})"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, like `chunk_size: 256`")
    flat: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": inner_value for inner, inner_value in value.items()})
        elif value is None and any(name.startswith(f"{key}.") for name in KEYS):
            continue  # `disk:` with nothing under it: the section is off
        else:
            flat[str(key)] = value
    return _known(flat, f"in {path}")


def _read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    by_env_name = {"KVSHELF_" + key.upper().replace(".", "_"): key for key in KEYS}
    values = {}
    for name, value in environ.items():
        if not name.startswith("KVSHELF_") or name in NON_CONFIG_ENV:
            continue
        if name not in by_env_name:
            raise ConfigError(f"unknown environment variable {name}; known: {', '.join(sorted(by_env_name))}")
        values[by_env_name[name]] = value
    return values


def _read_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    by_argument = {key.replace(".", "_"): key for key in KEYS}
    unknown = sorted(set(overrides) - set(by_argument))
    if unknown:
        raise ConfigError(f"unknown config keyword(s) {', '.join(unknown)}; known: {', '.join(sorted(by_argument))}")
    return {by_argument[name]: value for name, value in overrides.items()}


def _known(values: dict[str, Any], where: str) -> dict[str, Any]:
    for key in values:
        if key not in KEYS:
            raise ConfigError(f"unknown config key {key!r} {where}; known keys: {', '.join(sorted(KEYS))}")
    return values


def _build(values: dict[str, Any]) -> ShelfConfig:
    parsed = {key: KEYS[key](key, value) for key, value in values.items() if value is not None}
    memory = MemoryConfig(**({"size_bytes": parsed["memory.size"]} if "memory.size" in parsed else {}))
    _check_fits_ram(memory.size_bytes)
    disk = None
    if "disk.path" in parsed:
        disk_fields = {"size_bytes": parsed.get("disk.size"), "codec": parsed.get("disk.codec"),
                       "codec_budget_ms": parsed.get("disk.codec_budget_ms")}
        disk = DiskConfig(parsed["disk.path"], **{k: v for k, v in disk_fields.items() if v is not None})
        _check_writable(disk.path)
        _check_fits_disk(disk)
    else:
        _check_section_enabled(parsed, "disk", "path")
    redis = None
    if "redis.url" in parsed:
        redis_fields = {name: parsed[f"redis.{name}"] for name in _REDIS_FIELDS if f"redis.{name}" in parsed}
        redis = RedisConfig(parsed["redis.url"], **redis_fields)
        if len(redis.urls) > 1 and not redis.cluster:
            raise ConfigError(
                f"redis.url lists {len(redis.urls)} URLs; several URLs are the seed nodes of a Redis Cluster: "
                "set redis.cluster: true, or give one URL"
            )
    else:
        _check_section_enabled(parsed, "redis", "url")
    for section in ("disk", "redis"):
        if f"{section}.codec_budget_ms" in parsed and parsed.get(f"{section}.codec") != "auto":
            raise ConfigError(f"{section}.codec_budget_ms only applies to {section}.codec: auto; set both or neither")
    pd_names = {"receive_address": "receive_address", "inbox_size": "inbox_size_bytes",
                "inbox_ttl_s": "inbox_ttl_s", "push_to": "push_to", "push_timeout_s": "push_timeout_s"}
    pd = PDConfig(**{field: parsed[f"pd.{key}"] for key, field in pd_names.items() if f"pd.{key}" in parsed})
    top_keys = ("chunk_size", "writer_queue_size", "tier_backoff_s", "lookup_address")
    top = {key: parsed[key] for key in top_keys if key in parsed}
    return ShelfConfig(memory=memory, disk=disk, redis=redis, pd=pd, **top)


def _check_section_enabled(parsed: dict[str, Any], section: str, enabling_key: str) -> None:
    """A section's other keys mean nothing without the key that turns the tier on."""
    orphans = sorted(key for key in parsed if key.startswith(f"{section}."))
    if orphans:
        name = f"{section}.{enabling_key}"
        raise ConfigError(
            f"{', '.join(orphans)} set but {name} is not; set {name} "
            f"(KVSHELF_{name.upper().replace('.', '_')}) to enable the {section} tier"
        )


def _positive_int(key: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a whole number, got {value!r}") from None
    if number <= 0 or number != float(value):
        raise ConfigError(f"{key} must be a positive whole number, got {value!r}")
    return number


def _non_negative_float(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number of seconds, got {value!r}") from None
    if number < 0:
        raise ConfigError(f"{key} must not be negative, got {value!r}")
    return number


def _size(key: str, value: Any) -> int:
    """Bytes from 1073741824, '1GiB', '512 MB', '1.5gb'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS or isinstance(value, bool):
        raise ConfigError(f"{key} must be a size like 512MiB or 2GB or a number of bytes, got {value!r}")
    size_bytes = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size_bytes <= 0:
        raise ConfigError(f"{key} must be larger than zero, got {value!r}")
    return size_bytes


def _path(key: str, value: Any) -> Path:
    if not str(value).strip():
        raise ConfigError(f"{key} must be a directory path, got an empty string")
    return Path(str(value)).expanduser()


def _positive_float(key: str, value: Any) -> float:
    number = _non_negative_float(key, value)
    if number == 0:
        raise ConfigError(f"{key} must be larger than zero, got {value!r}")
    return number


def _boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if str(value).strip().lower() not in words:
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return words[str(value).strip().lower()]


def _text(key: str, value: Any) -> str:
    if not isinstance(value, (str, int)) or not str(value):
        raise ConfigError(f"{key} must be a non-empty string, got {value!r}")
    return str(value)


def _redis_urls(key: str, value: Any) -> tuple[str, ...]:
    """One URL, or the seed nodes of a cluster as a list or a comma-separated string."""
    urls = [str(url).strip() for url in (value if isinstance(value, list) else str(value).split(","))]
    for url in urls:
        if not url.startswith(("redis://", "rediss://")):
            raise ConfigError(
                f"{key} must be redis://[user:password@]host:port[/db] or rediss://... (TLS), got {url!r}"
            )
    return tuple(urls)


def _on_start_failure(key: str, value: Any) -> str:
    if value not in ("error", "warn"):
        raise ConfigError(
            f"{key} must be 'error' (refuse to start) or 'warn' (start without the tier, retry it later), "
            f"got {value!r}"
        )
    return value


def _key_prefix(key: str, value: Any) -> str:
    text = _text(key, value)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        raise ConfigError(f"{key} may hold letters, digits, '_', '.' and '-' only, got {value!r}")
    return text


def _zmq_address(key: str, value: Any) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"tcp://[^\s:/]+:\d{1,5}|ipc://\S+", text):
        raise ConfigError(f"{key} must be tcp://host:port (or ipc://path), got {value!r}")
    return text


def _codec(key: str, value: Any) -> str:
    if value not in CODECS and value != "auto":
        raise ConfigError(f"{key} must be auto or one of {sorted(CODECS)}, got {value!r}")
    return value


def _check_fits_ram(size_bytes: int) -> None:
    ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if size_bytes > ram_bytes:
        raise ConfigError(
            f"memory.size is {size_bytes / 2**30:.1f} GiB but this machine has {ram_bytes / 2**30:.1f} GiB of RAM; "
            "lower memory.size"
        )


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"disk.path {path} is not a writable directory ({exc.strerror}); choose another disk.path"
        ) from exc


def _check_fits_disk(disk: DiskConfig) -> None:
    total_bytes = shutil.disk_usage(disk.path).total
    if disk.size_bytes > total_bytes:
        raise ConfigError(
            f"disk.size is {disk.size_bytes / 2**30:.1f} GiB but the filesystem of {disk.path} holds "
            f"{total_bytes / 2**30:.1f} GiB; lower disk.size"
        )


# Every key, with its parser; a section's keys are `section.key`.
KEYS = {
    "chunk_size": _positive_int,
    "writer_queue_size": _positive_int,
    "tier_backoff_s": _non_negative_float,
    "memory.size": _size,
    "disk.path": _path,
    "disk.size": _size,
    "disk.codec": _codec,
    "disk.codec_budget_ms": _positive_float,
    "redis.url": _redis_urls,
    "redis.cluster": _boolean,
    "redis.username": _text,
    "redis.password": _text,
    "redis.codec": _codec,
    "redis.codec_budget_ms": _positive_float,
    "redis.ttl_s": _positive_float,
    "redis.connect_timeout_s": _positive_float,
    "redis.timeout_s": _positive_float,
    "redis.on_start_failure": _on_start_failure,
    "redis.key_prefix": _key_prefix,
    "pd.receive_address": _zmq_address,
    "pd.inbox_size": _size,
    "pd.inbox_ttl_s": _positive_float,
    "pd.push_to": _zmq_address,
    "pd.push_timeout_s": _positive_float,
    "lookup_address": _zmq_address,
}
_REDIS_FIELDS = [key.removeprefix("redis.") for key in KEYS if key.startswith("redis.") and key != "redis.url"]
