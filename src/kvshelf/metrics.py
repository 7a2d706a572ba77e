"""What a shelf did, as plain counters (for `stats()`) and as Prometheus metrics (same numbers).

Each shelf has its own CollectorRegistry, so several shelves in one process never collide;
`Shelf.metrics.registry` is what an exporter serves.
"""

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvshelf.tiers.base import Tier

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _by_name() -> defaultdict[str, int]:
    return defaultdict(int)


@dataclass(slots=True)
class ShelfCounters:
    lookup_tokens: int = 0
    hit_tokens: int = 0
    dropped_writes: int = 0
    loaded_bytes: defaultdict[str, int] = field(default_factory=_by_name)
    stored_bytes: defaultdict[str, int] = field(default_factory=_by_name)
    corrupt_chunks: defaultdict[str, int] = field(default_factory=_by_name)  # failed checks: deleted
    foreign_chunks: defaultdict[str, int] = field(default_factory=_by_name)  # another version's: left alone
    tier_errors: defaultdict[str, int] = field(default_factory=_by_name)
    skipped_ops: defaultdict[str, int] = field(default_factory=_by_name)  # while a failed tier backs off
    load_refused_tokens: int = 0  # held tokens left to compute: loading them was estimated slower (shelf.cost)
    store_refused_chunks: defaultdict[str, int] = field(default_factory=_by_name)  # by admission rule

    @property
    def miss_tokens(self) -> int:
        return self.lookup_tokens - self.hit_tokens


class ShelfMetrics:
    def __init__(self, counters: ShelfCounters, tiers: Sequence[Tier]) -> None:
        self.counters = counters
        self._tiers = tiers
        self.registry = CollectorRegistry()
        self.registry.register(_CounterCollector(self))
        self.load_seconds = Histogram(
            "kvshelf_load_seconds",
            "Time to load a prefix's KV from the tiers",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "kvshelf_store_seconds",
            "Time to encode and write chunks to a lower tier",
            ["tier"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )

    def snapshot(self) -> dict:
        counters = self.counters
        for tier in self._tiers:
            tier.refresh_usage()
        return {
            "lookup_tokens": counters.lookup_tokens,
            "hit_tokens": counters.hit_tokens,
            "miss_tokens": counters.miss_tokens,
            "dropped_writes": counters.dropped_writes,
            "load_refused_tokens": counters.load_refused_tokens,
            "store_refused_chunks": dict(counters.store_refused_chunks),
            "tiers": {
                tier.name: {
                    "used_bytes": tier.used_bytes,
                    "capacity_bytes": tier.capacity_bytes,
                    "loaded_bytes": counters.loaded_bytes[tier.name],
                    "stored_bytes": counters.stored_bytes[tier.name],
                    "evictions": tier.counters.num_evictions,
                    "corrupt_chunks": counters.corrupt_chunks[tier.name],
                    "foreign_chunks": counters.foreign_chunks[tier.name],
                    "errors": counters.tier_errors[tier.name] + tier.counters.num_errors,
                    "skipped": counters.skipped_ops[tier.name],
                    "rejected_writes": tier.counters.num_rejected_writes,
                }
                for tier in self._tiers
            },
        }


class _CounterCollector(Collector):
    """Reads the plain counters at scrape time, so stats() and /metrics never disagree."""

    def __init__(self, metrics: ShelfMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator:
        counters = self._metrics.counters
        tokens = CounterMetricFamily("kvshelf_lookup_tokens", "Prompt tokens looked up, by result", labels=["result"])
        tokens.add_metric(["hit"], counters.hit_tokens)
        tokens.add_metric(["miss"], counters.miss_tokens)
        yield tokens
        yield CounterMetricFamily(
            "kvshelf_dropped_writes",
            "Chunk writes dropped (writer queue full, or a tier down or failing)",
            value=counters.dropped_writes,
        )
        yield CounterMetricFamily(
            "kvshelf_load_refused_tokens",
            "Held prompt tokens computed instead of loaded, as loading them was estimated slower",
            value=counters.load_refused_tokens,
        )
        refused = CounterMetricFamily(
            "kvshelf_store_refused_chunks", "Chunks not stored, by the admission rule that refused them",
            labels=["rule"],
        )
        for rule, num_chunks in sorted(counters.store_refused_chunks.items()):
            refused.add_metric([rule], num_chunks)
        yield refused
        per_tier = {
            "loaded_bytes": CounterMetricFamily(
                "kvshelf_loaded_bytes", "Bytes of KV read from a tier", labels=["tier"]
            ),
            "stored_bytes": CounterMetricFamily("kvshelf_stored_bytes", "Bytes written to a tier", labels=["tier"]),
            "evictions": CounterMetricFamily("kvshelf_evictions", "Chunks evicted from a tier", labels=["tier"]),
            "corrupt_chunks": CounterMetricFamily(
                "kvshelf_corrupt_chunks", "Stored chunks that failed verification", labels=["tier"]
            ),
            "foreign_chunks": CounterMetricFamily(
                "kvshelf_foreign_chunks", "Stored chunks another kvshelf version wrote (left alone)", labels=["tier"]
            ),
            "errors": CounterMetricFamily("kvshelf_tier_errors", "Failed tier operations", labels=["tier"]),
            "skipped": CounterMetricFamily(
                "kvshelf_tier_skipped", "Operations skipped while a failed tier backs off", labels=["tier"]
            ),
            "rejected_writes": CounterMetricFamily(
                "kvshelf_tier_rejected_writes", "Chunks a full tier refused to store", labels=["tier"]
            ),
            "used_bytes": GaugeMetricFamily("kvshelf_tier_used_bytes", "Bytes a tier holds", labels=["tier"]),
            "capacity_bytes": GaugeMetricFamily("kvshelf_tier_capacity_bytes", "A tier's byte budget", labels=["tier"]),
        }
        for tier_name, tier_stats in self._metrics.snapshot()["tiers"].items():
            for stat_name, family in per_tier.items():
                family.add_metric([tier_name], tier_stats[stat_name])
        yield from per_tier.values()
