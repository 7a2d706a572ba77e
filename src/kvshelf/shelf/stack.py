"""The tier stack: memory on top, byte tiers below; read top-down, promote to memory.

Lower tiers are guarded: a tier that raises TierUnavailable is skipped for a back-off
period (a circuit breaker), so a dead store costs one failure, not one per request. Reads and
writes have a breaker each: a full disk stops writes, not reads of what it holds.
Objects that fail verification (authentication, framing, shape) are deleted from their tier
and counted; objects a newer kvshelf wrote are counted as foreign and left alone. To the
caller both are simply missing.
"""

import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kvshelf.codecs import CODECS_BY_ID, codec_id_of, frame_parts, unframe
from kvshelf.codecs.framing import HEADER_BYTES, Expected
from kvshelf.errors import CorruptChunk, ForeignChunk, TierUnavailable
from kvshelf.keys import ChunkKey, Namespace
from kvshelf.metrics import ShelfMetrics
from kvshelf.security import Keyring
from kvshelf.shelf.codec_choice import CodecChoice
from kvshelf.shelf.misses import ChunkHistory
from kvshelf.threads import unpin_thread
from kvshelf.tiers.base import Parts, Tier, parts_bytes
from kvshelf.tiers.memory import MemoryTier, tensor_bytes

logger = logging.getLogger(__name__)

WRITE_GROUP_BYTES = 64 * 2**20
READ, WRITE = "read", "write"


@dataclass(slots=True)
class LowerTier:
    tier: Tier
    codecs: CodecChoice
    receives_writes: bool = True  # False: filled from elsewhere (the inbox of pushed KV)
    authenticated: bool = False  # True: every chunk's tag was checked as it arrived (the inbox)
    # Per direction (READ, WRITE): until when the breaker keeps it off.
    down_until_s: dict[str, float] = field(default_factory=lambda: {READ: 0.0, WRITE: 0.0})

    def is_up(self, direction: str) -> bool:
        return time.monotonic() >= self.down_until_s[direction]

    def back_off(self, until_s: float, directions: Sequence[str] = (READ, WRITE)) -> None:
        for direction in directions:
            self.down_until_s[direction] = until_s


@dataclass(slots=True)
class Prefix:
    """What a load got: the leading chunks, their bytes by the tier each came from, and why the
    chunk after them could not be had (None: none was missing)."""

    chunks: list[torch.Tensor]
    bytes_by_tier: defaultdict[str, int]
    miss_reason: str | None = None


class TierStack:
    def __init__(
        self, memory: MemoryTier, lower: Sequence[LowerTier], metrics: ShelfMetrics, backoff_s: float,
        keyring: Keyring, history: ChunkHistory,
    ) -> None:
        self.memory = memory
        self.lower = list(lower)
        self._metrics = metrics
        self._counters = metrics.counters
        self.history = history
        self._backoff_s = backoff_s
        self._keyring = keyring
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="kvshelf-verify", initializer=unpin_thread)

    @property
    def tiers(self) -> list[Tier]:
        return [self.memory, *(slot.tier for slot in self.lower)]

    def locate_prefix(self, keys: Sequence[ChunkKey], shared: bool = True) -> list[str]:
        """The name of the tier holding each of the leading keys available in the union of the tiers
        (the first tier from the top that holds it); without `shared`, of this instance's own tiers only."""
        lower = [slot for slot in self.lower if shared or not slot.tier.shared]
        located: list[str] = []
        progressed = True
        while progressed and len(located) < len(keys):
            progressed = False
            found = self._timed_lookup(self.memory, self.memory.contains_prefix, keys[len(located):])
            located += [self.memory.name] * found
            for slot in lower:
                found = self._timed_lookup(slot.tier, self._guarded, slot, READ, 0, slot.tier.contains_prefix,
                                           keys[len(located):])
                located += [slot.tier.name] * found
                progressed = progressed or found > 0
        return located

    def _timed_lookup(self, tier: Tier, lookup: Callable[..., int], *args: Any) -> int:
        started_s = time.perf_counter()
        found = lookup(*args)
        self._metrics.lookup_seconds.labels(tier.name).observe(time.perf_counter() - started_s)
        return found

    def missing_reason(self, key: ChunkKey) -> str:
        """Why `key`, which no tier holds, is missing (a kvshelf.metrics.MISS_REASONS name): a lower
        tier whose reads back off may hold it."""
        if any(not slot.is_up(READ) for slot in self.lower):
            return "tier_down"
        return self.history.reason(key)

    def get_prefix(self, keys: Sequence[ChunkKey], expected: Sequence[Expected]) -> Prefix:
        """Chunks of the longest leading run of `keys` that can be read and verified; `expected[i]`
        is what the i-th must be."""
        started_s = time.perf_counter()
        chunks = self.memory.get_many(keys)
        self._metrics.load_seconds.labels(self.memory.name).observe(time.perf_counter() - started_s)
        sources = [self.memory.name if chunk is not None else None for chunk in chunks]
        reasons: dict[int, str] = {}  # why a chunk could not be read, by index
        for slot in self.lower:
            missing = [index for index, chunk in enumerate(chunks) if chunk is None]
            if not missing:
                break
            started_s = time.perf_counter()
            found = self._read(slot, [keys[index] for index in missing], [expected[index] for index in missing])
            self._metrics.load_seconds.labels(slot.tier.name).observe(time.perf_counter() - started_s)
            for index, chunk in zip(missing, found):
                if isinstance(chunk, str):
                    reasons.setdefault(index, chunk)
                elif chunk is not None:
                    chunks[index], sources[index] = chunk, slot.tier.name
            # Read and decoded into the memory tier's arena: stored there without a copy.
            self.memory.put_many([(keys[index], chunks[index]) for index in missing if chunks[index] is not None])
        prefix = Prefix([], defaultdict(int))
        for index, (chunk, source) in enumerate(zip(chunks, sources)):
            if chunk is None:
                prefix.miss_reason = reasons.get(index) or self.missing_reason(keys[index])
                break
            prefix.chunks.append(chunk)
            prefix.bytes_by_tier[source] += tensor_bytes(chunk)
        self._counters.loaded_bytes[self.memory.name] += prefix.bytes_by_tier[self.memory.name]
        self.history.note_used(keys[: len(prefix.chunks)])
        return prefix

    def _read(self, slot: LowerTier, keys: list[ChunkKey], expected: list[Expected]) -> list[torch.Tensor | str | None]:
        """Read `keys` group by group (the tier's `read_group_chunks`), each group verified and decoded
        on the verifier thread while the next one is read: the MAC's cost hides behind the reading.
        Per key: the chunk, None if missing, or why it could not be used ("corrupt", "foreign").

        Objects are read into the memory tier's arena (memory faulted in already, a payload where a
        raw chunk can stay); one that fails verification gives its memory back at once."""
        group_size = slot.tier.read_group_chunks or len(keys)
        read_buffer = functools.partial(self.memory.read_buffer, aligned_at=HEADER_BYTES)
        all_blobs = []
        pending = []
        for start in range(0, len(keys), group_size):
            group = keys[start : start + group_size]
            started_s = time.perf_counter()
            blobs = self._guarded(slot, READ, [None] * len(group), slot.tier.get_many, group, read_buffer)
            slot.codecs.note_read(sum(len(blob) for blob in blobs if blob is not None), time.perf_counter() - started_s)
            group_expected = expected[start : start + group_size]
            all_blobs += blobs
            pending.append(self._verifier.submit(self._unframe_each, slot, group, blobs, group_expected))
        chunks: list[torch.Tensor | str | None] = []
        corrupt_keys = []
        outcomes = (outcome for future in pending for outcome in future.result())
        for key, blob, outcome in zip(keys, all_blobs, outcomes):
            if isinstance(outcome, CorruptChunk):
                self.memory.release(blob)
            if isinstance(outcome, ForeignChunk):
                logger.info("kvshelf: leaving chunk %s in %s alone: %s", key.hex, slot.tier.name, outcome)
                self._counters.foreign_chunks[slot.tier.name] += 1
            elif isinstance(outcome, CorruptChunk):
                logger.warning("kvshelf: dropping damaged chunk %s from %s: %s", key.hex, slot.tier.name, outcome)
                self._counters.corrupt_chunks[slot.tier.name] += 1
                corrupt_keys.append(key)
            elif outcome is not None:
                chunk, blob_bytes, codec_id, decode_s = outcome
                slot.codecs.note_decoded(codec_id, chunk.nbytes, decode_s)
                self._metrics.decode_seconds.labels(slot.tier.name).observe(decode_s)
                self._counters.loaded_bytes[slot.tier.name] += blob_bytes
            chunks.append(outcome[0] if isinstance(outcome, tuple)
                          else "foreign" if isinstance(outcome, ForeignChunk)
                          else "corrupt" if isinstance(outcome, CorruptChunk) else None)
        if corrupt_keys:
            self.history.note_corrupt(corrupt_keys)
            self._guarded(slot, WRITE, None, slot.tier.delete, corrupt_keys)
        return chunks

    def _unframe_each(
        self, slot: LowerTier, keys: Sequence[ChunkKey], blobs: Sequence[Any], expected: Sequence[Expected]
    ) -> list[tuple[torch.Tensor, int, int, float] | CorruptChunk | None]:
        """Per blob: (chunk, stored bytes, codec id, decode seconds), the CorruptChunk it raised, or
        None if missing; chunks are decoded into the memory tier's arena. Runs on the verifier
        thread; the caller counts."""
        outcomes: list[tuple[torch.Tensor, int, int, float] | CorruptChunk | None] = []
        for key, blob, expect in zip(keys, blobs, expected):
            if blob is None:
                outcomes.append(None)
                continue
            started_s = time.perf_counter()
            try:
                chunk = unframe(blob, key.digest, self._keyring, CODECS_BY_ID, expect, slot.authenticated, self.memory)
            except CorruptChunk as exc:
                outcomes.append(exc)
                continue
            outcomes.append((chunk, len(blob), codec_id_of(blob), time.perf_counter() - started_s))
        return outcomes

    def write_lower(self, items: Sequence[tuple[ChunkKey, torch.Tensor]], namespace: Namespace) -> None:
        """Encode and write `items` to every lower tier that lacks them (runs on the writer thread)."""
        for slot in self.lower:
            if not slot.receives_writes:
                continue
            started_s = time.perf_counter()
            if self._guarded(slot, WRITE, False, self._write, slot, items, namespace) is False:
                self._counters.dropped_writes += 1
            else:
                self._metrics.store_seconds.labels(slot.tier.name).observe(time.perf_counter() - started_s)

    def _write(self, slot: LowerTier, items: Sequence[tuple[ChunkKey, torch.Tensor]], namespace: Namespace) -> bool:
        held = slot.tier.contains_each([key for key, _ in items])
        new_items = [item for item, is_held in zip(items, held) if not is_held]
        if not new_items:
            return True
        slot.tier.note_namespace(namespace.id(self._keyring), namespace.public_description(self._keyring))
        # Framed in groups of about WRITE_GROUP_BYTES: a long prompt's chunks are never all copied
        # at once, and each group's buffers are reused for the next, not freshly faulted in.
        group: list[tuple[ChunkKey, Parts]] = []
        group_bytes = 0
        for index, (key, chunk) in enumerate(new_items):
            codec = slot.codecs.choose(chunk.nbytes, namespace.layout)
            parts = frame_parts(chunk, key.digest, codec, self._keyring, self._keyring.encrypt_at_rest,
                                namespace.layout)
            slot.codecs.note_encoded(codec, chunk.nbytes, parts_bytes(parts))
            group.append((key, parts))
            group_bytes += parts_bytes(parts)
            if group_bytes >= WRITE_GROUP_BYTES or index == len(new_items) - 1:
                slot.tier.put_many(group)
                self._counters.stored_bytes[slot.tier.name] += group_bytes
                group, group_bytes = [], 0
        return True

    def _guarded(
        self, slot: LowerTier, direction: str, fallback: Any, operation: Callable[..., Any], *args: Any
    ) -> Any:
        """`operation(*args)` on a tier, unless its `direction` (READ or WRITE) is backing off; a
        failure starts that direction's back-off.

        Either way the caller gets `fallback`: reads miss, writes are dropped, and both are counted.
        """
        if not slot.is_up(direction):
            self._counters.skipped_ops[slot.tier.name] += 1
            return fallback
        try:
            return operation(*args)
        except TierUnavailable as exc:
            logger.warning("kvshelf: %s tier failed to %s, skipping its %ss for %.1f s: %s",
                           slot.tier.name, direction, direction, self._backoff_s, exc)
            self._counters.tier_errors[slot.tier.name] += 1
            slot.back_off(time.monotonic() + self._backoff_s, [direction])
            return fallback

    def close(self) -> None:
        self._verifier.shutdown()
        for tier in self.tiers:
            tier.close()
