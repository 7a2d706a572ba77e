"""What a shelf did, as plain counters (for `stats()`) and as Prometheus metrics (same numbers).

Each shelf has its own CollectorRegistry, so several shelves in one process never collide;
`Shelf.metrics.registry` is what an exporter serves (the admin API's `/metrics`, kvshelf.admin);
vLLM's own `/metrics` gets the plain counters as `vllm:kvshelf_*` (integrations/vllm/stats.py).

Label values are bounded: tiers and miss reasons are fixed sets, and tenants are the keyed tags
of their cache_salt (`Keyring.salt_tag`, never the salt), the first `max_tenants` seen each with
its own label and every later one under "other", so no tenant's traffic can grow the series
without bound and a counter never moves from one label to another.
"""

import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvshelf.tiers.base import Tier

LATENCY_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
MAX_STARTED_REQUESTS = 4096  # requests looked up whose first token is still to come
AGE_BUCKETS_S = (1, 10, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400)
NO_TENANT = "none"  # requests without a cache_salt
OTHER_TENANTS = "other"

# Why prompt tokens kvshelf was asked for were not supplied. A lookup names the reason of its
# first missing chunk; a load names why a chunk the lookup found could not be loaded after all.
MISS_REASONS = {
    "not_stored": "never stored, as far as this instance remembers",
    "evicted": "stored once, since evicted or cleared",
    "expired": "stored once, and past the Redis tier's ttl_s since",
    "corrupt": "dropped when it failed verification",
    "foreign": "written by another kvshelf version (left alone)",
    "tier_down": "a tier that may hold it was down or backing off",
    "slower": "held, but loading it was estimated slower than computing it (load or recompute)",
    "partial_chunk": "the prompt's last, partial chunk (only whole chunks are stored)",
}


def _by_name() -> defaultdict[str, int]:
    return defaultdict(int)


@dataclass(slots=True)
class TenantCounters:
    lookup_tokens: int = 0
    hit_tokens: int = 0
    stored_bytes: int = 0


@dataclass(slots=True)
class ShelfCounters:
    lookup_tokens: int = 0
    hit_tokens: int = 0
    dropped_writes: int = 0
    hit_tokens_by_tier: defaultdict[str, int] = field(default_factory=_by_name)  # the tier each hit chunk was in
    miss_tokens: defaultdict[str, int] = field(default_factory=_by_name)  # by reason (MISS_REASONS), but "slower"
    loaded_tokens: int = 0  # tokens handed to an engine (prefetches not counted)
    saved_prefill_s: float = 0.0  # what computing the loaded tokens would have taken, as the cost model estimates
    loaded_bytes: defaultdict[str, int] = field(default_factory=_by_name)
    stored_bytes: defaultdict[str, int] = field(default_factory=_by_name)
    corrupt_chunks: defaultdict[str, int] = field(default_factory=_by_name)  # failed checks: deleted
    foreign_chunks: defaultdict[str, int] = field(default_factory=_by_name)  # another version's: left alone
    tier_errors: defaultdict[str, int] = field(default_factory=_by_name)
    skipped_ops: defaultdict[str, int] = field(default_factory=_by_name)  # while a failed tier backs off
    load_refused_tokens: int = 0  # held tokens left to compute: loading them was estimated slower (shelf.cost)
    store_refused_chunks: defaultdict[str, int] = field(default_factory=_by_name)  # by admission rule
    tenants: dict[str, TenantCounters] = field(default_factory=dict)  # by tenant label (see ShelfMetrics.tenant)

    @property
    def miss_tokens_total(self) -> int:
        return self.lookup_tokens - self.hit_tokens

    def misses_by_reason(self) -> dict[str, int]:
        return {reason: self.load_refused_tokens if reason == "slower" else self.miss_tokens[reason]
                for reason in MISS_REASONS}


class ShelfMetrics:
    """The counters, the latency histograms, and the tenant labels of one shelf.

    `tiers` is set by the shelf once its tier stack exists."""

    def __init__(self, counters: ShelfCounters, max_tenants: int = 32, enabled: bool = True) -> None:
        """`enabled` False: histograms, tenants and TTFT are not kept (their calls cost nothing)."""
        self.counters = counters
        self.tiers: Sequence[Tier] = ()
        self.enabled = enabled
        self._max_tenants = max_tenants
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.registry.register(_CounterCollector(self))

        def histogram(name: str, documentation: str, labels: Sequence[str] = ("tier",),
                      buckets: Sequence[float] = LATENCY_BUCKETS_S) -> Histogram | _Unobserved:
            if not enabled:
                return _Unobserved()
            return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)

        self.lookup_seconds = histogram("kvshelf_lookup_seconds", "Time to ask a tier which chunks it holds")
        self.load_seconds = histogram("kvshelf_load_seconds", "Time to read a load's chunks from a tier")
        self.decode_seconds = histogram("kvshelf_decode_seconds", "Time to verify and decode a chunk read from a tier")
        self.store_seconds = histogram("kvshelf_store_seconds", "Time to encode and write chunks to a lower tier")
        self.prompt_load_seconds = histogram("kvshelf_prompt_load_seconds", "Time to load a prompt's KV, all tiers",
                                             labels=())
        self.ttft_seconds = histogram("kvshelf_ttft_seconds", "Time from kvshelf's lookup of a request to the end "
                                      "of the engine step computing its first token, by whether kvshelf "
                                      "supplied KV (hit)", labels=("hit",), buckets=TTFT_BUCKETS_S)
        self._started: OrderedDict[str, float] = OrderedDict()  # request id -> when looked up
        self.evicted_age_seconds = histogram("kvshelf_evicted_age_seconds",
                                             "How long chunks this process stored lived before their tier dropped "
                                             "them (evicted, or cleared)", buckets=AGE_BUCKETS_S)

    def request_started(self, request_id: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._started[request_id] = time.perf_counter()
            while len(self._started) > MAX_STARTED_REQUESTS:
                self._started.popitem(last=False)

    def first_token(self, request_id: str, hit: bool) -> None:
        """The engine step computing the request's first token has ended."""
        with self._lock:
            started_s = self._started.pop(request_id, None)
        if started_s is not None:
            self.ttft_seconds.labels("true" if hit else "false").observe(time.perf_counter() - started_s)

    def ttft_summary(self) -> dict[str, dict[str, float]]:
        """Per hit ("true", "false"): how many first tokens were timed, and their seconds in all."""
        summary = {"true": {"count": 0, "sum_s": 0.0}, "false": {"count": 0, "sum_s": 0.0}}
        if not self.enabled:
            return summary
        for family in self.ttft_seconds.collect():
            for sample in family.samples:
                hit = sample.labels.get("hit")
                if sample.name.endswith("_count"):
                    summary[hit]["count"] = int(sample.value)
                elif sample.name.endswith("_sum"):
                    summary[hit]["sum_s"] = sample.value
        return summary

    def tenant(self, salt_tag: str | None) -> TenantCounters:
        """The counters of the tenant whose cache_salt has keyed tag `salt_tag` (None: no salt)."""
        if not self.enabled:
            return TenantCounters()  # counted nowhere
        label = NO_TENANT if salt_tag is None else salt_tag
        tenants = self.counters.tenants
        found = tenants.get(label)
        if found is not None:
            return found
        with self._lock:
            if label not in tenants and len(tenants) >= self._max_tenants:
                label = OTHER_TENANTS
            return tenants.setdefault(label, TenantCounters())

    def snapshot(self) -> dict:
        counters = self.counters
        for tier in self.tiers:
            tier.refresh_usage()
        return {
            "lookup_tokens": counters.lookup_tokens,
            "hit_tokens": counters.hit_tokens,
            "miss_tokens": counters.miss_tokens_total,
            "misses_by_reason": counters.misses_by_reason(),
            "loaded_tokens": counters.loaded_tokens,
            "saved_prefill_s": counters.saved_prefill_s,
            "dropped_writes": counters.dropped_writes,
            "load_refused_tokens": counters.load_refused_tokens,
            "store_refused_chunks": dict(counters.store_refused_chunks),
            "tenants": {label: {"lookup_tokens": tenant.lookup_tokens, "hit_tokens": tenant.hit_tokens,
                                "stored_bytes": tenant.stored_bytes}
                        for label, tenant in sorted(counters.tenants.items())},
            "tiers": {
                tier.name: {
                    "used_bytes": tier.used_bytes,
                    "capacity_bytes": tier.capacity_bytes,
                    "pinned_bytes": tier.pinned_bytes,
                    "hit_tokens": counters.hit_tokens_by_tier[tier.name],
                    "loaded_bytes": counters.loaded_bytes[tier.name],
                    "stored_bytes": counters.stored_bytes[tier.name],
                    "evictions": tier.counters.num_evictions,
                    "corrupt_chunks": counters.corrupt_chunks[tier.name],
                    "foreign_chunks": counters.foreign_chunks[tier.name],
                    "errors": counters.tier_errors[tier.name] + tier.counters.num_errors,
                    "skipped": counters.skipped_ops[tier.name],
                    "rejected_writes": tier.counters.num_rejected_writes,
                }
                for tier in self.tiers
            },
        }


class _Unobserved:
    """A histogram that keeps nothing (metrics.enabled: false)."""

    def labels(self, *values: str) -> "_Unobserved":
        return self

    def observe(self, value: float) -> None:
        pass


# Per-tier statistics of `ShelfMetrics.snapshot` -> (metric, description, kind).
TIER_METRICS = {
    "hit_tokens": ("kvshelf_tier_hit_tokens", "Prompt tokens a lookup found, by the tier holding them", "counter"),
    "loaded_bytes": ("kvshelf_loaded_bytes", "Bytes of KV read from a tier", "counter"),
    "stored_bytes": ("kvshelf_stored_bytes", "Bytes written to a tier", "counter"),
    "evictions": ("kvshelf_evictions", "Chunks evicted from a tier", "counter"),
    "corrupt_chunks": ("kvshelf_corrupt_chunks", "Stored chunks that failed verification", "counter"),
    "foreign_chunks": ("kvshelf_foreign_chunks", "Stored chunks another kvshelf version wrote (left alone)", "counter"),
    "errors": ("kvshelf_tier_errors", "Failed tier operations", "counter"),
    "skipped": ("kvshelf_tier_skipped", "Operations skipped while a failed tier backs off", "counter"),
    "rejected_writes": ("kvshelf_tier_rejected_writes", "Chunks a full tier refused to store", "counter"),
    "used_bytes": ("kvshelf_tier_used_bytes", "Bytes a tier holds", "gauge"),
    "capacity_bytes": ("kvshelf_tier_capacity_bytes", "A tier's byte budget", "gauge"),
    "pinned_bytes": ("kvshelf_tier_pinned_bytes", "Bytes of pinned chunks a tier holds (never evicted)", "gauge"),
}


class _CounterCollector(Collector):
    """Reads the plain counters at scrape time, so stats() and /metrics never disagree."""

    def __init__(self, metrics: ShelfMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator:
        snapshot = self._metrics.snapshot()
        tokens = CounterMetricFamily("kvshelf_lookup_tokens", "Prompt tokens looked up, by result", labels=["result"])
        tokens.add_metric(["hit"], snapshot["hit_tokens"])
        tokens.add_metric(["miss"], snapshot["miss_tokens"])
        yield tokens
        misses = CounterMetricFamily("kvshelf_miss_tokens", "Prompt tokens asked for and not supplied, by reason: "
                                     + "; ".join(f"{name}: {why}" for name, why in MISS_REASONS.items()),
                                     labels=["reason"])
        for reason, num_tokens in snapshot["misses_by_reason"].items():
            misses.add_metric([reason], num_tokens)
        yield misses
        yield CounterMetricFamily("kvshelf_loaded_tokens", "Prompt tokens whose KV was loaded into an engine",
                                  value=snapshot["loaded_tokens"])
        yield CounterMetricFamily("kvshelf_saved_prefill_seconds", "Estimated seconds of prefill the loaded tokens "
                                  "would have taken to compute (the load's own time is kvshelf_prompt_load_seconds)",
                                  value=snapshot["saved_prefill_s"])
        yield CounterMetricFamily(
            "kvshelf_dropped_writes",
            "Chunk writes dropped (writer queue full, or a tier down or failing)",
            value=snapshot["dropped_writes"],
        )
        yield CounterMetricFamily(
            "kvshelf_load_refused_tokens",
            "Held prompt tokens computed instead of loaded, as loading them was estimated slower",
            value=snapshot["load_refused_tokens"],
        )
        refused = CounterMetricFamily(
            "kvshelf_store_refused_chunks", "Chunks not stored, by the admission rule that refused them",
            labels=["rule"],
        )
        for rule, num_chunks in sorted(snapshot["store_refused_chunks"].items()):
            refused.add_metric([rule], num_chunks)
        yield refused
        tenant_tokens = CounterMetricFamily(
            "kvshelf_tenant_lookup_tokens", "Prompt tokens looked up per tenant (a keyed hash of its cache_salt), "
            "by result", labels=["tenant", "result"])
        tenant_bytes = CounterMetricFamily("kvshelf_tenant_stored_bytes",
                                           "Bytes of KV stored in memory per tenant", labels=["tenant"])
        for label, tenant in snapshot["tenants"].items():
            tenant_tokens.add_metric([label, "hit"], tenant["hit_tokens"])
            tenant_tokens.add_metric([label, "miss"], tenant["lookup_tokens"] - tenant["hit_tokens"])
            tenant_bytes.add_metric([label], tenant["stored_bytes"])
        yield tenant_tokens
        yield tenant_bytes
        families = {stat: (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, text, labels=["tier"])
                    for stat, (name, text, kind) in TIER_METRICS.items()}
        for tier_name, tier_stats in snapshot["tiers"].items():
            for stat, family in families.items():
                family.add_metric([tier_name], tier_stats[stat])
        yield from families.values()
