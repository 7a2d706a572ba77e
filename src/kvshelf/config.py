"""One typed configuration, read once from a YAML file, `KVSHELF_*` variables and keywords.

Later sources win: defaults < file < environment < keywords. Keys are dotted paths
(`memory.size`); in the environment they are upper-cased with `_` for `.`
(`KVSHELF_MEMORY_SIZE`). Every error names the key and says how to fix it.

    chunk_size: 256                  # tokens per chunk, 1..1048576
    writer_queue_size: 64
    tier_backoff_s: 5                # seconds a failed tier rests, 0..86400
    memory: {size: 2GiB, pin_size: 512MiB}   # pinned prefixes: at most pin_size (default size / 4)
    disk: {path: ~/.cache/kvshelf/disk, size: 20GiB, codec: raw,     # omit for no disk tier
           mode: private}           # or group: a directory shared by a unix group (0770)
    redis: {url: "redis://host:6379/0", password: secret, ttl_s: 86400}   # omit for no redis tier
    pd: {receive_address: "tcp://0.0.0.0:5600", inbox_size: 2GiB}   # prefill/decode transfer
    lookup_address: "tcp://0.0.0.0:5700"                             # for a KV-aware router
    transfer: {mode: async,          # or sync: vLLM loads and saves inside the engine's step
               prefetch: true,       # promote a lookup's lower-tier hits to memory at once
               load_or_recompute: true}   # claim only the prefix that loads faster than it computes
    admission: {min_tokens: 0, min_sightings: 1}   # store prompts this long, from their Nth sighting
    metrics: {trace: false,          # each request's kvshelf story as a JSON line (logger kvshelf.trace)
              otlp_endpoint: "http://collector:4318/v1/traces",  # and as OpenTelemetry spans
              max_tenants: 32}       # per-tenant series; later tenants are counted as "other"
    admin: {address: "127.0.0.1:8101", key: <KVSHELF_ADMIN_KEY>}  # the admin API, /metrics, /dashboard
    security:
      key_file: /etc/kvshelf/secret.key   # or key: <32+ random characters> (KVSHELF_SECURITY_KEY),
                                          # or key: none (no authentication); default
                                          # $KVSHELF_HOME/secret.key, created on first use
      encrypt: false                      # true: encrypt chunks at rest on disk and in Redis

Numbers must be finite and in range; true/false is never taken for a number.
"""

import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvshelf.codecs import CODECS
from kvshelf.errors import ConfigError

CONFIG_FILE_ENV = "KVSHELF_CONFIG"
# Keys of a connector's settings (connector_config) that are not kvshelf config keys.
CONFIG_FILE_KEY = "config_file"
MODEL_ID_KEY = "model_id"
# KVSHELF_* variables that are not configuration keys: the config file, the home directory, and
# `kvshelf proxy`'s keys (read by the proxy, which also reads this configuration for security.*).
NON_CONFIG_ENV = {CONFIG_FILE_ENV, "KVSHELF_HOME", "KVSHELF_PROXY_API_KEY", "KVSHELF_PROXY_ADMIN_KEY"}
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
KEY_NONE = "none"  # security.key: none turns authentication off
MIN_KEY_CHARS = 32
KEY_FILE_NAME = "secret.key"
# disk.mode -> the mode of the directories kvshelf creates for disk.path.
DISK_DIRECTORY_MODES = {"private": 0o700, "group": 0o2770}  # as the disk tier keeps them (setgid: files take the group)
Parser = Callable[[str, Any], Any]


@dataclass(frozen=True)
class MemoryConfig:
    size_bytes: int = 2 * 2**30
    pin_bytes: int | None = None  # what pinned prefixes may hold (never evicted); None: a quarter of size_bytes

    @property
    def pin_budget_bytes(self) -> int:
        return self.size_bytes // 4 if self.pin_bytes is None else self.pin_bytes


@dataclass(frozen=True)
class DiskConfig:
    path: Path
    size_bytes: int = 20 * 2**30
    codec: str = "raw"  # or "auto": see codec_budget_ms
    codec_budget_ms: float = 100.0  # with codec auto: the load time per chunk to stay within
    mode: str = "private"  # or "group": the directory is shared by the owner's unix group


@dataclass(frozen=True)
class RedisConfig:
    """A shared Redis, or a Redis Cluster reached through `urls` as seed nodes."""

    urls: tuple[str, ...]  # redis:// or rediss:// (TLS); user and password may be in the URL
    cluster: bool = False
    username: str | None = None  # override the URL's; the password is best kept out of the URL
    password: str | None = field(default=None, repr=False)  # never printed
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


TRANSFER_MODES = ("async", "sync")


@dataclass(frozen=True)
class TransferConfig:
    """How the vLLM connector moves KV: off the engine's step (async) or inside it (sync)."""

    mode: str = "async"
    prefetch: bool = True  # on a lookup hit in a lower tier, promote those chunks to memory at once
    load_or_recompute: bool = True  # claim only the prefix that loads faster than vLLM computes it


@dataclass(frozen=True)
class MetricsConfig:
    """What the shelf tells operators beyond its counters (kvshelf.metrics, kvshelf.trace)."""

    enabled: bool = True  # False: the plain counters only (no histograms, tenants, TTFT or traces)
    trace: bool = False  # each request's story as one JSON line on the kvshelf.trace logger
    otlp_endpoint: str | None = None  # and as OpenTelemetry spans to this OTLP/HTTP collector
    max_tenants: int = 32  # tenants with labels of their own; later ones are counted as "other"


@dataclass(frozen=True)
class AdminConfig:
    """The admin API (kvshelf.admin) a vLLM worker serves: stats, namespaces, clear, pin, warm,
    inspect, /metrics and /dashboard. Off unless `address` is set."""

    address: str | None = None  # host:port; tensor-parallel rank r listens on port + r
    key: str | None = field(default=None, repr=False)  # required with an address; never printed
    engine_url: str | None = None  # the engine's OpenAI server, for warming a prefix by computing it


@dataclass(frozen=True)
class AdmissionConfig:
    """Which prompts are stored: one-off prompts must not evict the useful ones."""

    min_tokens: int = 0  # shorter prompts are not stored
    min_sightings: int = 1  # a prefix is stored from its Nth sighting on (1: at once)


@dataclass(frozen=True)
class SecurityConfig:
    """The deployment secret that authenticates chunks and messages: exactly one of `key` (the
    secret itself), `key_file` (a file holding it) or `disabled` (security.key: none, no
    authentication). Only the default key file is created on first use (`create_key_file`): a
    configured one that is missing is an error, never a fresh key no other instance shares."""

    key: str | None = field(default=None, repr=False)  # never printed: repr=False, and no message quotes it
    key_file: Path | None = None
    disabled: bool = False
    encrypt: bool = False  # encrypt chunks at rest in the disk and redis tiers
    create_key_file: bool = False  # True for the default $KVSHELF_HOME/secret.key only

    def __post_init__(self) -> None:
        num_sources = (self.key is not None) + (self.key_file is not None) + self.disabled
        if num_sources == 0:
            raise ConfigError("SecurityConfig needs one of key, key_file, or disabled=True (security.key: none)")
        if num_sources > 1:
            raise ConfigError(
                "security.key and security.key_file are both set (KVSHELF_SECURITY_KEY counts as security.key); "
                "set only one: the secret itself, the file that holds it, or security.key: none"
            )
        if self.key is not None and len(self.key.strip()) < MIN_KEY_CHARS:
            raise ConfigError(
                f"security.key is shorter than {MIN_KEY_CHARS} characters; use at least {MIN_KEY_CHARS} random "
                "characters (e.g. `openssl rand -hex 32`), or set security.key_file to a file holding the secret"
            )
        if self.encrypt and self.disabled:
            raise ConfigError(
                "security.encrypt: true needs a secret but security.key is none; remove security.key: none "
                "(a key file is then created under KVSHELF_HOME), or set security.encrypt: false"
            )


def default_home(environ: Mapping[str, str]) -> Path:
    """$KVSHELF_HOME, or ~/.cache/kvshelf: the bundled model's conversion and the default key file."""
    return Path(environ.get("KVSHELF_HOME") or Path.home() / ".cache" / "kvshelf")


def _default_security() -> SecurityConfig:
    # A ShelfConfig built in code, not by load_config, is secured by the same default key file.
    return SecurityConfig(key_file=default_home(os.environ) / KEY_FILE_NAME, create_key_file=True)


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
    security: SecurityConfig = field(default_factory=_default_security)
    transfer: TransferConfig = TransferConfig()
    admission: AdmissionConfig = AdmissionConfig()
    metrics: MetricsConfig = MetricsConfig()
    admin: AdminConfig = AdminConfig()

    @property
    def listeners(self) -> dict[str, str]:
        """The addresses this instance's own servers listen on, by config key."""
        return _listeners(self.pd, self.lookup_address, self.admin)


def _listeners(pd: PDConfig, lookup_address: str | None, admin: AdminConfig) -> dict[str, str]:
    named = {"pd.receive_address": pd.receive_address, "lookup_address": lookup_address, "admin.address": admin.address}
    return {name: address for name, address in named.items() if address is not None}


_ANY_HOST = {"0.0.0.0", "::", "*"}


def check_listeners(listeners: Mapping[str, str]) -> None:
    """Refuse two servers of one instance on one TCP port (host:port or tcp://host:port; a wildcard
    host takes the port on every address). Both might bind, and each connection would then reach
    whichever took it: a health check once waited forever on a port a lookup server had."""
    seen: dict[str, tuple[str, int]] = {}
    for name, address in listeners.items():
        if address.startswith("ipc://"):
            continue
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        host = host.strip("[]")
        for other, (other_host, other_port) in seen.items():
            if int(port) == other_port and (host == other_host or {host, other_host} & _ANY_HOST):
                raise ConfigError(f"{other} ({listeners[other]}) and {name} ({address}) are one port: "
                                  "give each server of an instance a port of its own")
        seen[name] = (host, int(port))


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
    return _build(values, default_home(environ))


def connector_config(extra_config: Mapping[str, Any]) -> ShelfConfig:
    """The configuration from an engine connector's settings (vLLM's `kv_connector_extra_config`):
    `config_file`, plus any kvshelf key (`chunk_size`, `memory.size` or `memory_size`, `disk.path`, ...)
    overriding the file and the environment. `model_id` is the connector's, not a config key."""
    overrides = {
        key.replace(".", "_"): value
        for key, value in extra_config.items()
        if key not in (CONFIG_FILE_KEY, MODEL_ID_KEY)
    }
    return load_config(extra_config.get(CONFIG_FILE_KEY), **overrides)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror}; check the path ({CONFIG_FILE_ENV})"
        ) from exc
    except yaml.YAMLError as exc:
        # Not `str(exc)` nor chained: PyYAML quotes the offending line, which may hold security.key.
        raise ConfigError(f"config file {path} is not valid YAML{_yaml_error_place(exc)}; fix the file") from None
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


def _yaml_error_place(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "syntax error"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else ""


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


def _build(values: dict[str, Any], home: Path) -> ShelfConfig:
    parsed = {key: KEYS[key](key, value) for key, value in values.items() if value is not None}
    memory_names = {"size": "size_bytes", "pin_size": "pin_bytes"}
    memory = MemoryConfig(**{name: parsed[f"memory.{key}"] for key, name in memory_names.items()
                             if f"memory.{key}" in parsed})
    _check_fits_ram(memory.size_bytes)
    if memory.pin_budget_bytes > memory.size_bytes:
        raise ConfigError(f"memory.pin_size ({memory.pin_budget_bytes} bytes) must not exceed memory.size "
                          f"({memory.size_bytes} bytes): pinned chunks live in the memory tier")
    for section in ("disk", "redis"):
        if f"{section}.codec_budget_ms" in parsed and parsed.get(f"{section}.codec") != "auto":
            raise ConfigError(f"{section}.codec_budget_ms only applies to {section}.codec: auto; set both or neither")
    pd_names = {"receive_address": "receive_address", "inbox_size": "inbox_size_bytes",
                "inbox_ttl_s": "inbox_ttl_s", "push_to": "push_to", "push_timeout_s": "push_timeout_s"}
    pd = PDConfig(**{name: parsed[f"pd.{key}"] for key, name in pd_names.items() if f"pd.{key}" in parsed})
    top_keys = ("chunk_size", "writer_queue_size", "tier_backoff_s", "lookup_address")
    top = {key: parsed[key] for key in top_keys if key in parsed}
    transfer = TransferConfig(**_section(parsed, "transfer"))
    admission = AdmissionConfig(**_section(parsed, "admission"))
    metrics = MetricsConfig(**_section(parsed, "metrics"))
    if not metrics.enabled and (metrics.trace or metrics.otlp_endpoint):
        raise ConfigError("metrics.trace and metrics.otlp_endpoint need metrics.enabled: true")
    admin = AdminConfig(**_section(parsed, "admin"))
    if admin.address is not None and admin.key is None:
        raise ConfigError("admin.address needs admin.key (or KVSHELF_ADMIN_KEY): the admin API clears and pins "
                          "the cache, so it never runs open; choose a long random key")
    check_listeners(_listeners(pd, top.get("lookup_address"), admin))
    redis, security = _redis(parsed), _security(parsed, home)
    disk = _disk(parsed)  # last: it creates disk.path, which a refused config should not leave behind
    return ShelfConfig(memory=memory, disk=disk, redis=redis, pd=pd, security=security, transfer=transfer,
                       admission=admission, metrics=metrics, admin=admin, **top)


def _section(parsed: dict[str, Any], section: str) -> dict[str, Any]:
    """The parsed keys of `section` whose names are its dataclass's fields."""
    return {key.removeprefix(f"{section}."): value for key, value in parsed.items() if key.startswith(f"{section}.")}


def _disk(parsed: dict[str, Any]) -> DiskConfig | None:
    if "disk.path" not in parsed:
        _check_section_enabled(parsed, "disk", "path")
        return None
    disk_fields = {"size_bytes": parsed.get("disk.size"), "codec": parsed.get("disk.codec"),
                   "codec_budget_ms": parsed.get("disk.codec_budget_ms"), "mode": parsed.get("disk.mode")}
    disk = DiskConfig(parsed["disk.path"], **{k: v for k, v in disk_fields.items() if v is not None})
    _check_writable(disk.path, disk.mode)
    _check_fits_disk(disk)
    return disk


def _redis(parsed: dict[str, Any]) -> RedisConfig | None:
    if "redis.url" not in parsed:
        _check_section_enabled(parsed, "redis", "url")
        return None
    redis_fields = {name: parsed[f"redis.{name}"] for name in _REDIS_FIELDS if f"redis.{name}" in parsed}
    redis = RedisConfig(parsed["redis.url"], **redis_fields)
    if len(redis.urls) > 1 and not redis.cluster:
        raise ConfigError(
            f"redis.url lists {len(redis.urls)} URLs; several URLs are the seed nodes of a Redis Cluster: "
            "set redis.cluster: true, or give one URL"
        )
    return redis


def _security(parsed: dict[str, Any], home: Path) -> SecurityConfig:
    key, key_file = parsed.get("security.key"), parsed.get("security.key_file")
    disabled = key == KEY_NONE
    default = key is None and key_file is None
    if default:
        key_file = home / KEY_FILE_NAME  # created by kvshelf.security on first use, not here
    return SecurityConfig(key=None if disabled else key, key_file=key_file, disabled=disabled,
                          encrypt=parsed.get("security.encrypt", False), create_key_file=default)


def _check_section_enabled(parsed: dict[str, Any], section: str, enabling_key: str) -> None:
    """A section's other keys mean nothing without the key that turns the tier on."""
    orphans = sorted(key for key in parsed if key.startswith(f"{section}."))
    if orphans:
        name = f"{section}.{enabling_key}"
        raise ConfigError(
            f"{', '.join(orphans)} set but {name} is not; set {name} "
            f"(KVSHELF_{name.upper().replace('.', '_')}) to enable the {section} tier"
        )


def _finite_number(key: str, value: Any, expected: str) -> float:
    """A finite number from YAML or from an environment string like '5'. YAML reads `yes` and
    `true` as booleans, and a boolean is never taken for 1."""
    number = math.nan
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            pass
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be {expected}, got {value!r}")
    return number


def _whole_number(unit: str, low: int, high: int) -> Parser:
    expected = f"a whole number of {unit} between {low} and {high}"

    def parse(key: str, value: Any) -> int:
        number = _finite_number(key, value, expected)
        if not number.is_integer() or not low <= number <= high:
            raise ConfigError(f"{key} must be {expected}, got {value!r}")
        return int(number)

    return parse


def _number(unit: str, low: float, high: float = math.inf, *, low_allowed: bool = True, why: str = "") -> Parser:
    """A parser of finite numbers from `low` (or above it) to `high`; `why` explains the bound."""
    expected = f"a finite number of {unit}{_range_words(low, high, low_allowed)}{why}"

    def parse(key: str, value: Any) -> float:
        number = _finite_number(key, value, expected)
        if number < low or number > high or (number == low and not low_allowed):
            raise ConfigError(f"{key} must be {expected}, got {value!r}")
        return number

    return parse


def _range_words(low: float, high: float, low_allowed: bool) -> str:
    if high == math.inf:
        return f", at least {low:g}" if low_allowed else f", larger than {low:g}"
    if low_allowed:
        return f" between {low:g} and {high:g}"
    return f", larger than {low:g} and at most {high:g}"


def _size(key: str, value: Any) -> int:
    """Bytes from 1073741824, '1GiB', '512 MB', '1.5gb'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value) if isinstance(value, str) else None
    size_bytes: int | float = 0
    if isinstance(value, int) and not isinstance(value, bool):
        size_bytes = value
    elif isinstance(value, float):
        size_bytes = value
    elif match and match.group(2).lower() in _SIZE_UNITS:
        # A long digit string overflows to inf: refused below, never int(inf).
        size_bytes = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if isinstance(size_bytes, float):
        size_bytes = int(size_bytes) if math.isfinite(size_bytes) else 0
    if size_bytes <= 0:
        raise ConfigError(
            f"{key} must be a finite size larger than zero, like 512MiB or 2GB or a number of bytes, got {value!r}"
        )
    return size_bytes


def _path(key: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{key} must be a directory path, got {value!r}")
    if not str(value).strip():
        raise ConfigError(f"{key} must be a directory path, got an empty string")
    return Path(str(value)).expanduser()


def _file_path(key: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"{key} must be the path of a file, got {value!r}")
    return Path(value).expanduser()


def _boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if str(value).strip().lower() not in words:
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return words[str(value).strip().lower()]


def _text(key: str, value: Any) -> str:
    # A YAML `yes` is True, not the text "True": ask for quotes rather than guess.
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value):
        raise ConfigError(f"{key} must be a non-empty string (quote it in YAML), got {value!r}")
    return str(value)


def _secret_text(key: str, value: Any) -> str:
    """A string only (YAML reads 0123 as the number 83) and the message never quotes the value."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty string (quote it in YAML), got a {type(value).__name__}")
    return value


def _security_key(key: str, value: Any) -> str:
    """The secret, or 'none'; its length is checked by SecurityConfig."""
    if not isinstance(value, str):
        raise ConfigError(
            f"{key} must be a string of at least {MIN_KEY_CHARS} random characters (quote it in YAML) "
            f"or none, got a {type(value).__name__}"
        )
    return KEY_NONE if value.strip().lower() == KEY_NONE else value


def _disk_mode(key: str, value: Any) -> str:
    if not isinstance(value, str) or value not in DISK_DIRECTORY_MODES:
        raise ConfigError(
            f"{key} must be 'private' (only this user reads the cache) or 'group' (the directory's unix group "
            f"shares it), got {value!r}"
        )
    return value


def _redis_urls(key: str, value: Any) -> tuple[str, ...]:
    """One URL, or the seed nodes of a cluster as a list or a comma-separated string."""
    urls = [str(url).strip() for url in (value if isinstance(value, list) else str(value).split(","))]
    for url in urls:
        if not url.startswith(("redis://", "rediss://")):
            shown = re.sub(r"//[^/@]*@", "//***@", url)  # the URL may hold a password
            raise ConfigError(
                f"{key} must be redis://[user:password@]host:port[/db] or rediss://... (TLS), got {shown!r}"
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


def _matching(pattern: str, form: str) -> Parser:
    """A parser of text matching `pattern` (described to the user as `form`)."""

    def parse(key: str, value: Any) -> str:
        text = str(value).strip()
        if not re.fullmatch(pattern, text):
            raise ConfigError(f"{key} must be {form}, got {value!r}")
        return text

    return parse


_zmq_address = _matching(r"tcp://[^\s:/]+:\d{1,5}|ipc://\S+", "tcp://host:port (or ipc://path)")
_http_url = _matching(r"https?://\S+", "an http:// or https:// URL")


def _host_port(key: str, value: Any) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"[^\s:/]+:\d{1,5}", text) or not 0 < int(text.rpartition(":")[2]) < 65536:
        raise ConfigError(f"{key} must be host:port (e.g. 127.0.0.1:8101), got {value!r}")
    return text


def _transfer_mode(key: str, value: Any) -> str:
    if value not in TRANSFER_MODES:
        raise ConfigError(f"{key} must be one of {', '.join(TRANSFER_MODES)}, got {value!r}")
    return value


def _codec(key: str, value: Any) -> str:
    if not isinstance(value, str) or (value not in CODECS and value != "auto"):
        raise ConfigError(f"{key} must be auto or one of {sorted(CODECS)}, got {value!r}")
    return value


def _check_fits_ram(size_bytes: int) -> None:
    ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if size_bytes > ram_bytes:
        raise ConfigError(
            f"memory.size is {size_bytes / 2**30:.1f} GiB but this machine has {ram_bytes / 2**30:.1f} GiB of RAM; "
            "lower memory.size"
        )


def _check_writable(path: Path, mode: str) -> None:
    try:
        _make_directories(path, DISK_DIRECTORY_MODES[mode])
        probe = path / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"disk.path {path} is not a writable directory ({exc.strerror}); choose another disk.path"
        ) from exc


def _make_directories(path: Path, mode: int) -> None:
    """Create `path` and its missing parents so that a fresh cache is never world-readable.

    Parents get the same mode less group write: the group may pass through, only the owner may
    rename what lies inside. Existing directories are left as they are."""
    missing = []
    for directory in (path, *path.parents):
        if directory.exists():
            break
        missing.append(directory)
    for directory in reversed(missing):
        directory_mode = mode if directory == path else mode & 0o750
        try:
            directory.mkdir(directory_mode)
        except FileExistsError:
            continue  # made meanwhile by another process: not ours to change
        os.chmod(directory, directory_mode)  # mkdir's mode is cut by the umask (0770 -> 0750 under 022)


def _check_fits_disk(disk: DiskConfig) -> None:
    total_bytes = shutil.disk_usage(disk.path).total
    if disk.size_bytes > total_bytes:
        raise ConfigError(
            f"disk.size is {disk.size_bytes / 2**30:.1f} GiB but the filesystem of {disk.path} holds "
            f"{total_bytes / 2**30:.1f} GiB; lower disk.size"
        )


# Every key, with its parser; a section's keys are `section.key`.
_TIMEOUT = _number("seconds", 0, 3600, low_allowed=False)
_CODEC_BUDGET = _number("milliseconds", 0, low_allowed=False)
KEYS: dict[str, Parser] = {
    "chunk_size": _whole_number("tokens", 1, 1_048_576),
    "writer_queue_size": _whole_number("chunks", 1, 1_000_000),
    "tier_backoff_s": _number("seconds", 0, 86400),
    "memory.size": _size,
    "memory.pin_size": _size,
    "disk.path": _path,
    "disk.size": _size,
    "disk.codec": _codec,
    "disk.codec_budget_ms": _CODEC_BUDGET,
    "disk.mode": _disk_mode,
    "redis.url": _redis_urls,
    "redis.cluster": _boolean,
    "redis.username": _text,
    "redis.password": _secret_text,
    "redis.codec": _codec,
    "redis.codec_budget_ms": _CODEC_BUDGET,
    # Redis expires keys by the millisecond; under a second chunks would expire before they are read.
    "redis.ttl_s": _number("seconds", 1, why=" (a shorter expiry drops chunks before they are read; "
                                             "leave it unset for Redis's own eviction)"),
    "redis.connect_timeout_s": _TIMEOUT,
    "redis.timeout_s": _TIMEOUT,
    "redis.on_start_failure": _on_start_failure,
    "redis.key_prefix": _key_prefix,
    "pd.receive_address": _zmq_address,
    "pd.inbox_size": _size,
    "pd.inbox_ttl_s": _number("seconds", 0, low_allowed=False),
    "pd.push_to": _zmq_address,
    "pd.push_timeout_s": _TIMEOUT,
    "lookup_address": _zmq_address,
    "security.key": _security_key,
    "security.key_file": _file_path,
    "security.encrypt": _boolean,
    "transfer.mode": _transfer_mode,
    "transfer.prefetch": _boolean,
    "transfer.load_or_recompute": _boolean,
    "admission.min_tokens": _whole_number("tokens", 0, 1 << 30),
    "admission.min_sightings": _whole_number("sightings", 1, 1000),
    "metrics.enabled": _boolean,
    "metrics.trace": _boolean,
    "metrics.otlp_endpoint": _http_url,
    "metrics.max_tenants": _whole_number("tenants", 1, 10_000),
    "admin.address": _host_port,
    "admin.key": _secret_text,
    "admin.engine_url": _http_url,
}
_REDIS_FIELDS = [key.removeprefix("redis.") for key in KEYS if key.startswith("redis.") and key != "redis.url"]
