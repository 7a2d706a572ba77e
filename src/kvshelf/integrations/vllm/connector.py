"""KVShelfConnector: kvshelf as a vLLM KV connector (KVConnectorBase_V1).

    --kv-transfer-config '{"kv_connector": "KVShelfConnector",
                           "kv_connector_module_path": "kvshelf.integrations.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"chunk_size": 256, "disk.path": "/var/cache/kvshelf"}}'

vLLM makes one instance per role: the scheduler's asks how many prompt tokens the shelf holds
and plans each step; each worker's copies chunks between the shelf and its paged KV cache.

For prefill/decode disaggregation, run the prefill instance with "kv_role": "kv_producer" and
the decode instance with "kv_consumer" (see scheduler.py); a decode instance that accepts
pushed KV sets "pd.receive_address". "lookup_address" lets a KV-aware router (`kvshelf proxy`)
ask how much of a prompt this instance holds.
"""

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
from vllm.platforms import current_platform
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvshelf.admin import AdminAPI, AdminServer, AdminTarget
from kvshelf.codecs import CODECS
from kvshelf.config import AdminConfig, connector_config
from kvshelf.integrations.vllm.context import EngineFacts, engine_facts, with_window_storage
from kvshelf.integrations.vllm.events import KVShelfKVEvents, SchedulerEvents, worker_events
from kvshelf.integrations.vllm.lookup import LookupClient, LookupServer, RoutingLookupServer, lookup_address
from kvshelf.integrations.vllm.plan import StepPlan
from kvshelf.integrations.vllm.scheduler import HAND_OVER_WAITS, Role, SchedulerSide
from kvshelf.integrations.vllm.stats import KVShelfPromMetrics, KVShelfStats
from kvshelf.integrations.vllm.worker import WorkerSide
from kvshelf.layout import KVLayout
from kvshelf.security import Keyring
from kvshelf.shelf import Shelf
from kvshelf.shelf.codec_choice import AUTO

logger = logging.getLogger(__name__)
LOOKUP_TIMEOUT_S = 5.0


def cpu_attention_isa(vllm_config: Any, facts: EngineFacts) -> str | None:
    """The instruction set vLLM's CPU attention kernel uses (it decides the cache layout); None off the CPU."""
    if not current_platform.is_cpu():
        return None
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(vllm_config.model_config.dtype, facts.block_size, facts.base_namespace.layout.head_dim,
                         vllm_config.cache_config.cache_dtype)


def refuse_unloadable_attention(vllm_config: Any) -> None:
    """vLLM's reference CPU MLA backend (no AMX) cannot prefill with cached context: the CPU
    platform turns prefix caching off for it, and KV a connector loads is ignored by its prefill,
    so a hit would give wrong output. Refused at start-up instead."""
    if current_platform.is_cpu() and vllm_config.model_config.use_mla and not torch.cpu._is_amx_tile_supported():
        raise ValueError(
            "kvshelf cannot load KV into vLLM's reference CPU MLA backend: its prefill ignores cached context "
            "(vLLM turns prefix caching off for MLA on CPUs without AMX), so a hit would give wrong output; run this "
            "model without --kv-transfer-config here, or on a GPU or an AMX CPU"
        )


def admin_server(shelf: Shelf, admin: AdminConfig, vllm_config: Any, facts: EngineFacts, tp_rank: int) -> AdminServer:
    """The admin API of this rank's shelf, on admin.address's port + the rank."""
    base = dataclasses.replace(facts.base_namespace, tp_rank=tp_rank)
    tokenizer_name = vllm_config.model_config.tokenizer
    tokenizers = []

    def tokenize(text: str) -> list[int]:  # as vLLM tokenizes a completion prompt (special tokens added)
        if not tokenizers:
            from transformers import AutoTokenizer

            tokenizers.append(AutoTokenizer.from_pretrained(tokenizer_name))
        return tokenizers[0](text).input_ids

    target = AdminTarget(shelf, lambda salt: dataclasses.replace(base, cache_salt=salt), tokenize, admin.engine_url,
                         os.environ.get("VLLM_API_KEY"),
                         {"name": f"{vllm_config.model_config.served_model_name} rank {tp_rank}",
                          "model_id": base.model_id, "tp_rank": tp_rank, "tp_size": base.tp_size})
    host, _, port = admin.address.rpartition(":")
    return AdminServer(AdminAPI(target, admin.key).app(), host, int(port) + tp_rank)


# Where vLLM's hit-source metrics put each tier's hits.
HIT_SOURCES = {"memory": CacheHitSource.HOST, "disk": CacheHitSource.DISK, "inbox": CacheHitSource.P2P,
               "redis": CacheHitSource.EXTERNAL_UNSPECIFIED}


@dataclass
class KVShelfMetadata(KVConnectorMetadata):
    plan: StepPlan


class KVShelfConnector(KVConnectorBase_V1, SupportsHMA):
    """SupportsHMA: vLLM keeps its hybrid KV cache allocator on (sliding-window layers keep only
    their window); the connector copies each layer through its own group's block table."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        refuse_unloadable_attention(vllm_config)
        extra_config = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        config = connector_config(extra_config)
        # Sliding-window layers stored with their window only, where the tiers' codecs can take that.
        fixed_codecs = [CODECS[tier.codec] for tier in (config.disk, config.redis) if tier and tier.codec != AUTO]
        facts = with_window_storage(engine_facts(vllm_config, kv_cache_config, extra_config), config.chunk_size,
                                    fixed_codecs)
        self._base_namespace = facts.base_namespace  # a reset drops this model's KV from a shared Redis too
        if config.chunk_size % facts.block_size:
            raise ValueError(
                f"kvshelf chunk_size {config.chunk_size} is not a multiple of vLLM's block_size {facts.block_size}; "
                f"set chunk_size to a multiple of {facts.block_size} in kv_connector_extra_config"
            )
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            # A chunk that fails to load is a cache miss: recompute it rather than fail the request.
            logger.info("kvshelf: setting kv_load_failure_policy to 'recompute'")
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        engine_id = self._kv_transfer_config.engine_id
        tp_size = facts.base_namespace.tp_size
        if tp_size > 1 and (config.pd.receive_address or config.pd.push_to):
            raise ValueError("kvshelf pushes KV between instances of tensor_parallel_size 1 only; with more, "
                             "unset pd.receive_address and pd.push_to and hand KV over through a shared tier (redis)")
        self._scheduler = self._worker = None
        self._lookup_client = None
        self._servers: list[LookupServer | RoutingLookupServer] = []
        if role == KVConnectorRole.SCHEDULER:
            # Verifies the proxy's push_to signatures, signs hand-overs, and guards the routing-lookup port.
            keyring = Keyring.from_config(config.security)
            self._lookup_client = LookupClient(engine_id, tp_size, LOOKUP_TIMEOUT_S)
            scheduler_role = Role.of(self._kv_transfer_config.kv_role, config.pd.push_to)
            self._scheduler = SchedulerSide(self._lookup_client.locate, config.chunk_size, facts, scheduler_role,
                                            keyring, background=config.transfer.mode == "async",
                                            hand_over_wait_s=HAND_OVER_WAITS * config.pd.push_timeout_s)
            if config.lookup_address is not None:
                client = LookupClient(engine_id, tp_size, LOOKUP_TIMEOUT_S)
                self._servers.append(RoutingLookupServer(config.lookup_address, facts.base_namespace,
                                                         config.chunk_size, client, keyring))
        else:
            tp_rank = get_tensor_model_parallel_rank()
            shelf = Shelf(config)
            self._worker = WorkerSide(shelf, facts, tp_rank, cpu_attention_isa(vllm_config, facts))
            self._servers.append(LookupServer(shelf, lookup_address(engine_id, tp_rank),
                                              on_located=self._worker.located))
            self._worker.hand_over.receive(facts.base_namespace.layout.bytes_per_token)
            if config.admin.address is not None:
                self._servers.append(admin_server(shelf, config.admin, vllm_config, facts, tp_rank))
        self._failed_request_ids: set[str] = set()
        events_config = vllm_config.kv_events_config
        # Workers send their shelf's events only when vLLM publishes them (--kv-events-config).
        self._publishes_events = bool(events_config and events_config.enable_kv_cache_events)
        self._events = SchedulerEvents()

    @property
    def kv_layout(self) -> KVLayout:
        """What one token's KV looks like as kvshelf stores it."""
        return self._base_namespace.layout

    # ---- scheduler side ----

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._scheduler.after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[CacheHitSource, int]:
        sources: dict[CacheHitSource, int] = {}
        for tier, num_tokens in self._scheduler.hit_sources(request, num_external_tokens).items():
            source = HIT_SOURCES.get(tier, CacheHitSource.EXTERNAL_UNSPECIFIED)
            sources[source] = sources.get(source, 0) + num_tokens
        return sources

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return KVShelfMetadata(self._scheduler.plan_step(scheduler_output))

    def update_connector_output(self, connector_output: Any) -> None:
        if connector_output.invalid_block_ids:
            self._scheduler.forget_failed_blocks(connector_output.invalid_block_ids)
        self._events.add(connector_output.kv_cache_events)

    def take_events(self) -> list[Any]:
        """kvshelf's KV cache events, for vLLM to publish with its own (see events.py)."""
        return self._events.take()

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Async: the blocks stay until the worker has copied the request's KV out (get_finished).
        return self._scheduler.finished(request)

    def request_finished_all_groups(
        self, request: Any, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.finished(request)

    def reset_cache(self) -> bool | None:
        """vLLM's reset_prefix_cache with reset_external: empty this instance's shelf."""
        return self._lookup_client.reset(self._base_namespace)

    # ---- worker side ----

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        self._worker.begin_step(kv_connector_metadata.plan)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._failed_request_ids = self._worker.load(self._get_connector_metadata().plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Synchronous loads finish in start_load_kv, before the forward pass."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Saving reads all layers at once in wait_for_save, after the forward pass wrote them."""

    def wait_for_save(self) -> None:
        self._worker.save(self._get_connector_metadata().plan, self._failed_request_ids)
        self._failed_request_ids = set()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker.finished(finished_req_ids)

    def get_kv_connector_kv_cache_events(self) -> KVShelfKVEvents | None:
        """What this worker's shelf stored and dropped since the last step, when vLLM publishes events."""
        if self._worker is None or not self._publishes_events:
            return None
        return worker_events(self._worker.shelf)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_failed_block_ids()

    def get_kv_connector_stats(self) -> KVShelfStats | None:
        if self._worker is None:
            return None
        stats = KVShelfStats(self._worker.counters_since_last_report())
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVShelfStats:
        return KVShelfStats(dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls, vllm_config: Any, metric_types: dict, labelnames: list[str], per_engine_labelvalues: dict
    ) -> KVShelfPromMetrics:
        return KVShelfPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        """Close the lookup and transfer channels, finish queued transfers and disk writes."""
        for server in self._servers:
            server.close()
        if self._worker is not None:
            self._worker.close()
            self._worker.shelf.close()
        if self._lookup_client is not None:
            self._lookup_client.close()
