"""The Shelf: the engine-agnostic API (lookup / load / save) over a tier stack.

Engines see only this class. KV crosses it in the canonical shape
(layers, 2, tokens, kv_heads, head_dim), on the CPU.
"""

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvshelf.codecs import CODECS
from kvshelf.codecs.framing import Expected
from kvshelf.config import RedisConfig, ShelfConfig, load_config
from kvshelf.errors import ConfigError, TierUnavailable
from kvshelf.keys import Chunking, ChunkKey, MMHashes, Namespace, Prompt, chunk_keys
from kvshelf.layout import KVLayout
from kvshelf.metrics import ShelfCounters, ShelfMetrics
from kvshelf.security import Keyring
from kvshelf.shelf.admission import Admission
from kvshelf.shelf.codec_choice import CodecChoice
from kvshelf.shelf.cost import LoadCostModel
from kvshelf.shelf.events import ChunkEvents
from kvshelf.shelf.misses import ChunkHistory
from kvshelf.shelf.stack import LowerTier, Prefix, TierStack
from kvshelf.shelf.writer import BackgroundWriter
from kvshelf.tiers.disk import DiskTier
from kvshelf.tiers.inbox import InboxTier
from kvshelf.tiers.memory import MemoryTier
from kvshelf.tiers.redis import RedisTier
from kvshelf.trace import Phase, Tracer, now_ns

logger = logging.getLogger(__name__)


def connect_redis(tier: RedisTier) -> None:
    """Connect `tier`; failing, raise ConfigError (on_start_failure: error) or TierUnavailable (warn)."""
    try:
        tier.connect()
    except TierUnavailable as exc:
        if tier.config.on_start_failure == "warn":
            raise
        tier.close()
        raise ConfigError(f"redis tier: {exc}; or set redis.on_start_failure: warn to start without it") from exc


@dataclass(slots=True)
class LoadResult:
    num_tokens: int  # tokens in `chunks`, which hold tokens [start, start + num_tokens)
    # Each (layers, 2, chunk_size, kv_heads, head_dim), the last possibly a shorter tail; shared
    # with the memory tier: read, never modify.
    chunks: list[torch.Tensor]
    start: int = 0

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    def kv(self) -> torch.Tensor | None:
        """All loaded tokens as one tensor (layers, 2, num_tokens, kv_heads, head_dim), or None."""
        return torch.cat(self.chunks, dim=2) if self.chunks else None


class Shelf:
    def __init__(self, config: ShelfConfig | None = None) -> None:
        self.config = config or ShelfConfig()
        self.chunk_size = self.config.chunk_size
        self.chunking = Chunking(self.chunk_size)
        self.keyring = Keyring.from_config(self.config.security)
        lower = []
        self.inbox: InboxTier | None = None
        if self.config.pd.receive_address is not None:
            self.inbox = InboxTier(self.config.pd.inbox_size_bytes, self.config.pd.inbox_ttl_s)
            # The receiver authenticates every pushed chunk before it enters the inbox (disagg.transfer).
            lower.append(LowerTier(self.inbox, CodecChoice.of("raw", None), receives_writes=False, authenticated=True))
        if self.config.disk is not None:
            disk = DiskTier(self.config.disk.path, self.config.disk.size_bytes, self.config.disk.mode)
            lower.append(LowerTier(disk, CodecChoice.of(self.config.disk.codec, self.config.disk.codec_budget_ms)))
        if self.config.redis is not None:
            lower.append(self._connect_redis(self.config.redis))
        counters = ShelfCounters()
        self.metrics = ShelfMetrics(counters, self.config.metrics.max_tenants, self.config.metrics.enabled)
        history = ChunkHistory(self.config.redis.ttl_s if self.config.redis is not None else None)
        self._stack = TierStack(MemoryTier(self.config.memory.size_bytes), lower, self.metrics,
                                self.config.tier_backoff_s, self.keyring, history)
        self.metrics.tiers = self._stack.tiers
        # What the tiers store and drop: KV cache events, and how long chunks live.
        self.events = ChunkEvents(self._stack.tiers, on_dropped_age=self._note_dropped_age)
        self.tracer = Tracer(self.config.metrics.trace, self.config.metrics.otlp_endpoint)
        self.cost = LoadCostModel({slot.tier.name: slot.codecs for slot in self._stack.lower}, counters)
        self.admission = Admission(self.config.admission, counters)
        self._descriptions: dict[str, dict] = {}  # namespace id -> public description, of namespaces saved here
        self._writer = BackgroundWriter(self.config.writer_queue_size, on_drop=self._count_dropped_write)
        self._closed = False

    def _connect_redis(self, config: RedisConfig) -> LowerTier:
        """The redis tier; one that cannot be reached is an error, or with on_start_failure=warn a
        tier that starts out backing off and is tried again after each back-off period."""
        codecs = CodecChoice.of(config.codec, config.codec_budget_ms)
        slot = LowerTier(RedisTier(config, self.config.tier_backoff_s), codecs)
        try:
            connect_redis(slot.tier)
        except TierUnavailable as exc:
            logger.warning("kvshelf: redis tier: %s; starting without it, retrying every %.1f s",
                           exc, self.config.tier_backoff_s)
            slot.back_off(time.monotonic() + self.config.tier_backoff_s)
        return slot

    @classmethod
    def from_config(cls, path: str | None = None, **overrides: Any) -> "Shelf":
        """A shelf configured from a YAML file, KVSHELF_* variables and keywords (see kvshelf.config)."""
        return cls(load_config(path, **overrides))

    def chunk_keys(
        self, token_ids: Sequence[int], namespace: Namespace, mm_hashes: MMHashes = (), tail: bool = False
    ) -> list[ChunkKey]:
        """The keys of `token_ids`' chunks in this deployment (see kvshelf.keys.chunk_keys)."""
        return chunk_keys(token_ids, namespace, self.chunk_size, mm_hashes, tail, keyring=self.keyring)

    def lookup(
        self,
        token_ids: Sequence[int],
        namespace: Namespace,
        mm_hashes: MMHashes = (),
        tail: bool = False,
        probe: bool = False,
    ) -> int:
        """How many leading tokens are available: a multiple of chunk_size, or with `tail` all of
        `token_ids` when their trailing partial chunk was stored too (see `save_chunks`).

        `mm_hashes` are (token position, content hash) of multimodal inputs, as in `chunk_keys`.
        A `probe` (a router asking where to send a prompt) counts only this instance's own tiers,
        since a shared one serves every instance alike, and is left out of the hit statistics.
        """
        located = self.locate(Prompt(token_ids, namespace, mm_hashes), tail, probe)
        return self.chunking.prefix_tokens(len(located), len(token_ids))

    def locate(self, prompt: Prompt, tail: bool = True, probe: bool = False, request_id: str | None = None
               ) -> list[str]:
        """The tier (its name) holding each of the prompt's leading chunks that the shelf holds,
        counting a stored tail with `tail`; a `probe` is as in `lookup`. `request_id`: the lookup
        goes into that request's trace (kvshelf.trace)."""
        started_ns = now_ns()
        keys = self.chunk_keys(prompt.token_ids, prompt.namespace, prompt.mm_hashes, tail)
        located = self._stack.locate_prefix(keys, shared=not probe)
        if not probe:
            self._count_lookup(prompt, keys, located, request_id, started_ns)
        return located

    def _count_lookup(self, prompt: Prompt, keys: list[ChunkKey], located: list[str], request_id: str | None,
                      started_ns: int) -> None:
        counters, num_tokens = self.metrics.counters, len(prompt)
        hit_tokens = self.chunking.prefix_tokens(len(located), num_tokens)
        counters.lookup_tokens += num_tokens
        counters.hit_tokens += hit_tokens
        for index, tier in enumerate(located):
            counters.hit_tokens_by_tier[tier] += self.chunking.tokens_in(index, num_tokens)
        # Tokens of chunks that have keys but no tier holds, and those of a partial last chunk no key names.
        keyed_tokens = self.chunking.prefix_tokens(len(keys), num_tokens)
        reason = self._stack.missing_reason(keys[len(located)]) if len(located) < len(keys) else None
        if reason == "not_stored" and len(located) == self.chunking.floor(num_tokens) // self.chunk_size:
            reason = "partial_chunk"  # a tail's key, and only a prefill instance stores tails
        if reason is not None:
            counters.miss_tokens[reason] += keyed_tokens - hit_tokens
        if keyed_tokens < num_tokens:
            counters.miss_tokens["partial_chunk"] += num_tokens - keyed_tokens
            reason = reason or "partial_chunk"
        tenant_label = self._tenant_label(prompt.namespace)
        tenant = self.metrics.tenant(tenant_label)
        tenant.lookup_tokens += num_tokens
        tenant.hit_tokens += hit_tokens
        if request_id is not None:
            self.metrics.request_started(request_id)
        trace = self.tracer.trace(request_id)
        if trace is not None:
            trace.tenant, trace.prompt_tokens, trace.hit_tokens, trace.miss_reason = (
                tenant_label or "none", num_tokens, hit_tokens, reason)
            trace.lookup_chunks = dict(Counter(located))
            trace.phases["lookup"].append(Phase(started_ns, now_ns(), {"hit_tokens": hit_tokens, "miss_reason": reason,
                                                                      "chunks": trace.lookup_chunks}))

    def _tenant_label(self, namespace: Namespace) -> str | None:
        if namespace.cache_salt is None or not self.metrics.enabled:
            return None
        return self.keyring.salt_tag(namespace.cache_salt)

    def holds(self, prompt: Prompt, num_tokens: int) -> bool:
        """Whether the shelf holds the prompt's first `num_tokens` (a stored tail counts); not counted
        in the statistics (a load waiting for KV still on its way asks this repeatedly)."""
        keys = self.chunk_keys(prompt.token_ids, prompt.namespace, prompt.mm_hashes, tail=True)
        needed = keys[: self.chunking.count(num_tokens)]
        return len(self._stack.locate_prefix(needed)) == len(needed)

    def load(
        self,
        token_ids: Sequence[int],
        namespace: Namespace,
        upto: int,
        mm_hashes: MMHashes = (),
        start: int = 0,
        tail: bool = False,
        request_id: str | None = None,
        prefetch: bool = False,
    ) -> LoadResult:
        """KV of tokens [start, upto), or of fewer if some chunk is missing or damaged.

        `start` is rounded down to a multiple of chunk_size, and so is `upto` unless `tail`: then
        a stored tail of `token_ids` (the whole prompt) is loaded too, and the result may hold
        tokens beyond `upto` up to the chunk's end. A caller that already holds the first tokens'
        KV (an engine's own prefix cache) passes `start` to skip reading them. Loaded chunks are
        promoted to memory. A `prefetch` only promotes them: it is not counted as KV handed to an
        engine. `request_id`: the load goes into that request's trace.
        """
        started_ns, started_s = now_ns(), time.perf_counter()
        first_chunk = start // self.chunk_size
        if tail:
            num_chunks = self.chunking.count(upto)
            keys = self.chunk_keys(token_ids, namespace, mm_hashes, tail)[first_chunk:num_chunks]
        else:
            keys = self.chunk_keys(token_ids[:upto], namespace, mm_hashes)[first_chunk:]
        num_tokens = len(token_ids)  # a stored tail is the prompt's last, partial chunk
        expected = [Expected(namespace.layout, self.chunking.tokens_in(index, num_tokens))
                    for index in range(first_chunk, first_chunk + len(keys))]
        prefix = self._stack.get_prefix(keys, expected)
        seconds = time.perf_counter() - started_s
        result = LoadResult(sum(chunk.shape[2] for chunk in prefix.chunks), prefix.chunks,
                            first_chunk * self.chunk_size)
        if not prefetch:
            self.metrics.prompt_load_seconds.observe(seconds)
            wanted_end = self.chunking.prefix_tokens(first_chunk + len(keys), num_tokens)
            self._count_load(result, prefix, wanted_end, seconds, request_id, started_ns)
        return result

    def _count_load(self, result: LoadResult, prefix: Prefix, wanted_end: int, seconds: float,
                    request_id: str | None, started_ns: int) -> None:
        counters = self.metrics.counters
        counters.loaded_tokens += result.num_tokens
        saved_s = self.cost.prefill_s(result.start, result.num_tokens)
        counters.saved_prefill_s += saved_s or 0.0
        if prefix.miss_reason is not None:
            counters.miss_tokens[prefix.miss_reason] += wanted_end - result.end
        trace = self.tracer.trace(request_id)
        if trace is not None:
            trace.loaded_tokens += result.num_tokens
            for tier, num_bytes in prefix.bytes_by_tier.items():
                trace.loaded_bytes[tier] = trace.loaded_bytes.get(tier, 0) + num_bytes
            trace.load_s += seconds
            trace.load_miss_reason = trace.load_miss_reason or prefix.miss_reason
            trace.phases["load"].append(Phase(started_ns, now_ns(), {
                "tokens": result.num_tokens, "bytes": dict(prefix.bytes_by_tier), "miss_reason": prefix.miss_reason,
                "saved_prefill_s": saved_s}))

    def save(
        self, token_ids: Sequence[int], kv: torch.Tensor, namespace: Namespace, start: int = 0, mm_hashes: MMHashes = ()
    ) -> int:
        """Store the full chunks of `kv`, which holds tokens [start, start + kv tokens) of `token_ids`.

        Chunks are copied, so the caller may reuse `kv`. See `save_chunks`.
        """
        self._check_kv(kv, namespace)

        def chunk_at(index: int) -> torch.Tensor:
            part = kv[:, :, index * self.chunk_size : (index + 1) * self.chunk_size]
            return self.chunk_memory(namespace, part.shape[2]).copy_(part)

        return self.save_chunks(token_ids[: start + kv.shape[2]], namespace, chunk_at, start, mm_hashes)

    def save_chunks(
        self,
        token_ids: Sequence[int],
        namespace: Namespace,
        chunk_at: Callable[[int], torch.Tensor],
        start: int = 0,
        mm_hashes: MMHashes = (),
        tail: bool = False,
        num_prompt_tokens: int | None = None,
        admit: bool = True,
        request_id: str | None = None,
    ) -> int:
        """Store the full chunks of `token_ids` from token `start` (a multiple of chunk_size), and
        with `tail` the trailing partial chunk too.

        The admission policy (`admission.*`) may store fewer, judging the whole prompt's length
        (`num_prompt_tokens`, default len(token_ids)); `admit=False` stores all (a hand-over).

        `chunk_at(i)` returns the i-th of those chunks, (layers, 2, chunk_size, kv_heads, head_dim)
        (the tail: its own length of tokens), as a tensor the shelf keeps: as it is when it lies in
        the memory tier's arena (`chunk_memory`), else copied there; it is called only for chunks
        the memory tier lacks. Returns at once: chunks go to memory now and
        to lower tiers in the background. Returns how many chunks were new to memory.
        `request_id`: the save goes into that request's trace.
        """
        started_ns = now_ns()
        if start % self.chunk_size:
            raise ValueError(f"start must be a multiple of chunk_size {self.chunk_size}, got {start}")
        first_chunk = start // self.chunk_size
        chain = self.chunk_keys(token_ids, namespace, mm_hashes, tail)
        if chain and chain[0].namespace_id not in self._descriptions:
            self._descriptions[chain[0].namespace_id] = namespace.public_description(self.keyring)
        self.events.note_chain(chain)  # so that KV events name each stored chunk's parent
        keys = chain[first_chunk:]
        if admit:
            keys = keys[: self.admission.admitted(keys, num_prompt_tokens or len(token_ids))]
        if not keys:
            return 0
        items: list[tuple[ChunkKey, torch.Tensor]] = []
        new_items = []
        for index, (key, held) in enumerate(zip(keys, self._stack.memory.get_many(keys))):
            if held is None:
                held = chunk_at(index)
                self._check_kv(held, namespace, self.chunking.tokens_in(first_chunk + index, len(token_ids)))
                new_items.append((key, held))
            items.append((key, held))
        self._stack.memory.put_many(new_items)
        self._stack.history.note_used(keys)
        new_bytes = sum(chunk.nbytes for _, chunk in new_items)
        self.metrics.counters.stored_bytes[self._stack.memory.name] += new_bytes
        self.metrics.tenant(self._tenant_label(namespace)).stored_bytes += new_bytes
        if self._stack.lower:
            self._writer.submit(lambda: self._stack.write_lower(items, namespace))
        trace = self.tracer.trace(request_id)
        if trace is not None:
            trace.stored_chunks += len(new_items)
            trace.stored_bytes += new_bytes
            trace.phases["save"].append(Phase(started_ns, now_ns(), {"chunks": len(new_items), "bytes": new_bytes}))
        return len(new_items)

    def check_layout(self, layout: KVLayout) -> None:
        """Refuse, at start-up, a tier codec set by name that cannot store `layout` (with `auto`
        the ladder skips such codecs)."""
        for slot in self._stack.lower:
            unfit = [codec.name for codec in slot.codecs.codecs if not codec.takes(layout)]
            if unfit and slot.codecs.budget_s is None:
                fits = sorted(name for name, codec in CODECS.items() if codec.takes(layout))
                raise ConfigError(f"kvshelf: {slot.tier.name}.codec {unfit[0]} cannot store this model's {layout.kind} "
                                 f"KV ({layout.planes} plane(s) per layer); set {slot.tier.name}.codec to auto or one "
                                 f"of {', '.join(fits)}")

    def chunk_memory(self, namespace: Namespace, num_tokens: int) -> torch.Tensor:
        """Room for a chunk of `num_tokens` of `namespace` in the memory tier's arena, for an engine to
        copy its KV into and hand to `save_chunks` (which then stores it without another copy)."""
        return self._stack.memory.allocate(namespace.layout.shape(num_tokens), namespace.layout.torch_dtype)

    def held_nearby(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether each key is in memory or in the inbox: what a pushing prefill instance may skip."""
        in_memory = [chunk is not None for chunk in self._stack.memory.get_many(keys)]
        if self.inbox is None:
            return in_memory
        return [held or self.inbox.contains_prefix([key]) == 1 for key, held in zip(keys, in_memory)]

    def pin(self, prompt: Prompt) -> int:
        """Keep the prompt's stored chunks in memory whatever traffic comes (never evicted), reading
        those below memory up first, as far as `memory.pin_size` allows; returns the leading tokens
        pinned now (0: nothing stored, or no pin budget left). A stored tail is not pinned."""
        keys = self.chunk_keys(prompt.token_ids, prompt.namespace, prompt.mm_hashes)
        expected = [Expected(prompt.namespace.layout, self.chunk_size)] * len(keys)
        held = self._stack.get_prefix(keys, expected).chunks
        pinned = self._stack.memory.pin(keys[: len(held)], self.config.memory.pin_budget_bytes)
        return pinned * self.chunk_size

    def unpin(self, prompt: Prompt) -> int:
        """Let the prompt's chunks be evicted again; returns how many of its tokens were pinned."""
        keys = self.chunk_keys(prompt.token_ids, prompt.namespace, prompt.mm_hashes)
        return self._stack.memory.unpin(keys) * self.chunk_size

    def whereabouts(self, prompt: Prompt) -> list[dict]:
        """Per chunk of the prompt (a stored tail included): its tokens and the tiers holding it. Not
        counted in the statistics; a tier that cannot be asked now is left out."""
        keys = self.chunk_keys(prompt.token_ids, prompt.namespace, prompt.mm_hashes, tail=True)
        holders: list[list[str]] = [[] for _ in keys]
        for tier in self._stack.tiers:
            try:
                held = tier.contains_each(keys)
            except TierUnavailable as exc:
                logger.warning("kvshelf: could not ask the %s tier: %s", tier.name, exc)
                continue
            for tiers, is_held in zip(holders, held):
                if is_held:
                    tiers.append(tier.name)
        return [{"tokens": list(self.chunking.span(index, len(prompt))), "tiers": tiers}
                for index, tiers in enumerate(holders)]

    def namespaces(self) -> dict[str, dict]:
        """Per namespace id this instance's own tiers hold chunks of: its chunks per tier, and its
        public description (no salt) where this process saved to it (None otherwise)."""
        held: dict[str, dict] = {}
        for tier in self._stack.tiers:
            for key in tier.list_keys():  # a shared tier lists none
                entry = held.setdefault(key.namespace_id, {"description": self._descriptions.get(key.namespace_id),
                                                           "chunks": {}})
                entry["chunks"][tier.name] = entry["chunks"].get(tier.name, 0) + 1
        return held

    def drop(self, namespace_id: str | None = None, prompt: Prompt | None = None) -> dict[str, int]:
        """Drop one namespace's chunks (by id), or one prompt's, from every tier, shared ones too;
        returns how many each tier held (a Redis namespace: its stored objects). Queued writes run first."""
        if (namespace_id is None) == (prompt is None):
            raise ValueError("drop takes a namespace id or a prompt")
        self.flush()
        if prompt is not None:
            prompt_keys = self.chunk_keys(prompt.token_ids, prompt.namespace, prompt.mm_hashes, tail=True)
        dropped = {}
        for tier in self._stack.tiers:
            try:
                if prompt is None and tier.shared:
                    dropped[tier.name] = tier.clear(namespace_id)
                    continue
                keys = prompt_keys if prompt is not None else [key for key in tier.list_keys()
                                                               if key.namespace_id == namespace_id]
                dropped[tier.name] = sum(tier.contains_each(keys))
                tier.discard(keys)
            except TierUnavailable as exc:
                logger.warning("kvshelf: could not drop chunks from the %s tier: %s", tier.name, exc)
        return dropped

    def _check_kv(self, kv: torch.Tensor, namespace: Namespace, num_tokens: int | None = None) -> None:
        layout = namespace.layout
        expected = layout.shape(num_tokens if num_tokens is not None else kv.shape[2] if kv.dim() == 5 else -1)
        if tuple(kv.shape) != expected or kv.dtype != layout.torch_dtype:
            raise ValueError(
                f"kv must be (layers, planes, tokens, kv_heads, head_dim) = {expected} of {layout.dtype} "
                f"for this namespace, got {tuple(kv.shape)} of {kv.dtype}"
            )

    def _count_dropped_write(self) -> None:
        self.metrics.counters.dropped_writes += 1

    def _note_dropped_age(self, tier_name: str, age_s: float) -> None:
        self.metrics.evicted_age_seconds.labels(tier_name).observe(age_s)

    def stats(self) -> dict:
        stats = self.metrics.snapshot()
        stats["pin_budget_bytes"] = self.config.memory.pin_budget_bytes
        return stats

    def clear(self, model: Namespace | None = None) -> bool:
        """Reset (vLLM's reset_prefix_cache with reset_external, as after a weight update): empty this
        instance's own tiers, memory, inbox and disk (every chunk under disk.path this process knows
        of, see DiskTier); True if all went. A shared tier (Redis) holds the fleet's KV: it drops
        only `model`'s, every namespace of the same model, layout, rank and engine extras whatever
        its tenant salt or adapter (what this instance could load again), and keeps other models';
        without `model` it is left alone. Queued writes run first, so that none lands after."""
        self.flush()
        cleared = True
        for tier in self._stack.tiers:
            try:
                if not tier.shared:
                    tier.clear()
                elif model is not None:
                    plain = dataclasses.replace(model, cache_salt=None, lora_id=None)  # its description may be gone
                    tier.clear_model(model.public_description(self.keyring), [plain.id(self.keyring)])
            except TierUnavailable as exc:
                logger.warning("kvshelf: could not empty the %s tier: %s", tier.name, exc)
                cleared = False
        return cleared

    def flush(self) -> None:
        """Wait until background writes have finished (for tests, benchmarks and shutdown)."""
        self._writer.flush()

    def close(self) -> None:
        """Finish queued writes and release the tiers. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        self._stack.close()
        self.tracer.close()

    def __enter__(self) -> "Shelf":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
