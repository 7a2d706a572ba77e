"""kvshelf's counters in vLLM's own stats: the periodic log line and its Prometheus `/metrics`.

Each worker reports what changed since its last report; vLLM sums the workers' reports and
hands them to KVShelfPromMetrics, which adds them to counters named `vllm:kvshelf_*`.
"""

from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import Counter
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from kvshelf.disagg.transfer import TransferCounters
from kvshelf.metrics import MISS_REASONS, TIER_METRICS
from kvshelf.shelf import Shelf

# What each counter means; tier-specific ones (TIER_METRICS) are reported per tier ("disk_loaded_bytes").
DESCRIPTIONS = {
    "lookup_tokens": "Prompt tokens kvshelf was asked about",
    "hit_tokens": "Prompt tokens kvshelf could supply",
    "load_failed_tokens": "Tokens promised but not loadable (recomputed by vLLM)",
    "load_refused_tokens": "Held tokens computed instead: loading them was estimated slower (load or recompute)",
    "store_refused_chunks": "Chunks not stored by the admission policy",
    "dropped_writes": "Chunk writes dropped (writer queue full, or a tier down or failing)",
    "pushed_chunks": "Chunks pushed to a decode instance (prefill/decode disaggregation)",
    "pushed_bytes": "Bytes pushed to a decode instance",
    "push_failures": "Pushes to a decode instance given up (it recomputes)",
    "push_ms": "Milliseconds spent pushing KV to decode instances",
    "received_chunks": "Chunks pushed here by a prefill instance",
    "refused_chunks": "Pushed chunks refused because the inbox was full",
    "received_corrupt_chunks": "Pushed chunks refused because they failed authentication",
    "loaded_tokens": "Prompt tokens whose KV was loaded into vLLM",
} | {f"miss_tokens_{reason}": f"Prompt tokens not supplied: {why}" for reason, why in MISS_REASONS.items()}


def flat_counters(shelf: Shelf, load_failed_tokens: int, transfers: TransferCounters) -> dict[str, int]:
    """The shelf's and the transfers' cumulative counters, one flat name each."""
    stats = shelf.stats()
    flat = {name: stats[name] for name in ("lookup_tokens", "hit_tokens", "dropped_writes", "load_refused_tokens",
                                           "loaded_tokens")}
    flat.update({f"miss_tokens_{reason}": tokens for reason, tokens in stats["misses_by_reason"].items()})
    flat["store_refused_chunks"] = sum(stats["store_refused_chunks"].values())
    flat["load_failed_tokens"] = load_failed_tokens
    flat.update(asdict(transfers))
    for tier_name, tier_stats in stats["tiers"].items():
        for name in ("hit_tokens", "loaded_bytes", "stored_bytes", "evictions", "corrupt_chunks", "foreign_chunks",
                     "errors", "skipped", "rejected_writes"):
            flat[f"{tier_name}_{name}"] = tier_stats[name]
    return flat


def description(name: str) -> str:
    tier, _, stat = name.partition("_")
    return DESCRIPTIONS.get(name) or f"{TIER_METRICS[stat][1]} ({tier})"


@dataclass
class KVShelfStats(KVConnectorStats):
    """Counter increments since the last report (data: name -> increment)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: value for name, value in self.data.items() if value}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KVShelfPromMetrics(KVConnectorPromMetrics):
    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict,
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, dict[int, Counter]] = {}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, increment in transfer_stats_data.items():
            if increment:
                self._counter(name, engine_idx).inc(increment)

    def _counter(self, name: str, engine_idx: int) -> Counter:
        if name not in self._counters:
            counter = self._counter_cls(
                name=f"vllm:kvshelf_{name}", documentation=description(name), labelnames=self._labelnames
            )
            self._counters[name] = {
                engine: counter.labels(*values) for engine, values in self.per_engine_labelvalues.items()
            }
        return self._counters[name][engine_idx]
