"""kvshelf's chunk events as vLLM KV cache events, so routers can follow what kvshelf holds.

Each worker turns what its shelf's tiers stored and dropped (kvshelf.shelf.events) into vLLM's
BlockStored and BlockRemoved once a step (`worker_events`, for get_kv_connector_kv_cache_events);
vLLM gathers every worker's into the scheduler's connector (`SchedulerEvents`: added from
update_connector_output, taken by take_events), which vLLM publishes with its own events when it
runs with --kv-events-config.

What an event says:
- block_hashes: the chunks' keys (their digests). Keyed with the deployment secret, they tell a
  reader without it nothing of the prompt; token_ids is always empty, and no salt, namespace or
  model name appears. A holder of the secret (`kvshelf proxy`) computes a prompt's keys and looks
  them up.
- block_size: chunk_size (a prompt's partial last chunk, its tail, holds fewer tokens).
- parent_block_hash: the previous chunk's key where the shelf knows it (ChunkEvents.note_chain).
- medium: vLLM's own names, as llm-d reads them: "CPU" for the memory tier and the inbox,
  "STORAGE" for disk and Redis. locality: "LOCAL", or "REMOTE" for the shared Redis. ownership
  (vLLM: the secondary tier that made the event): "kvshelf-<tier>", which tells the tiers apart.
- No AllBlocksCleared: it names no medium, and vLLM sends it for its own GPU cache on the same
  stream, so a reader could not tell whose cache was emptied. A kvshelf reset sends BlockRemoved
  for each chunk it drops.

Tensor parallelism: each rank stores its shard under keys of its own (the namespace holds the
rank), so no event is common to all workers. vLLM merges the workers' events into the first
worker's object; where LMCache keeps only the events every worker sent, `KVShelfKVEvents` keeps
them all, and a reader checks each rank's keys.
"""

from collections import deque
from collections.abc import Callable, Sequence

from vllm.distributed.kv_events import (
    MEDIUM_CPU,
    MEDIUM_STORAGE,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVConnectorKVEvents,
)

from kvshelf.disagg.kv_index import OWNERSHIP_PREFIX
from kvshelf.keys import ChunkKey
from kvshelf.shelf import Shelf
from kvshelf.shelf.events import STORED, ChunkEvent

MEDIUMS = {"memory": MEDIUM_CPU, "inbox": MEDIUM_CPU, "disk": MEDIUM_STORAGE, "redis": MEDIUM_STORAGE}
LOCAL, REMOTE = "LOCAL", "REMOTE"
MAX_PENDING_EVENTS = 1 << 16  # events the scheduler keeps until take_events; beyond, the oldest go


def ownership(tier: str) -> str:
    return OWNERSHIP_PREFIX + tier


def to_vllm_events(records: Sequence[ChunkEvent], chunk_size: int,
                   parent_of: Callable[[ChunkKey], ChunkKey | None]) -> list[KVCacheEvent]:
    """One BlockStored per run of chained keys stored, one BlockRemoved per record of keys dropped."""
    events: list[KVCacheEvent] = []
    for record in records:
        where = {"medium": MEDIUMS.get(record.tier), "locality": REMOTE if record.shared else LOCAL,
                 "ownership": ownership(record.tier)}
        if record.kind != STORED:
            events.append(BlockRemoved(block_hashes=[key.digest for key in record.keys], **where))
            continue
        for run in _chained_runs(record.keys, parent_of):
            parent = parent_of(run[0])
            events.append(BlockStored(
                block_hashes=[key.digest for key in run], parent_block_hash=parent.digest if parent else None,
                token_ids=[], block_size=chunk_size, lora_id=None, lora_name=None, **where,
            ))
    return events


def _chained_runs(keys: Sequence[ChunkKey], parent_of: Callable[[ChunkKey], ChunkKey | None]) -> list[list[ChunkKey]]:
    """`keys` split where a key does not follow the one before it."""
    runs: list[list[ChunkKey]] = []
    for key in keys:
        if runs and parent_of(key) == runs[-1][-1]:
            runs[-1].append(key)
        else:
            runs.append([key])
    return runs


class KVShelfKVEvents(KVConnectorKVEvents):
    """The events of one step, from one worker or, once vLLM merged them, from all."""

    def __init__(self, events: Sequence[KVCacheEvent] = (), num_workers: int = 1) -> None:
        self._events = list(events)
        self._num_workers = num_workers

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._events.extend(events)

    def aggregate(self) -> "KVShelfKVEvents":
        """All events stay: each rank's chunks have keys of their own, so none is common to every worker."""
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._num_workers += count

    def get_all_events(self) -> list[KVCacheEvent]:
        return list(self._events)

    def get_number_of_workers(self) -> int:
        return self._num_workers

    def clear_events(self) -> None:
        self._events.clear()
        self._num_workers = 1

    def __repr__(self) -> str:
        return f"<KVShelfKVEvents workers={self._num_workers} events={len(self._events)}>"


def worker_events(shelf: Shelf) -> KVShelfKVEvents | None:
    """What the shelf's tiers stored and dropped since the last call, as vLLM events; None if nothing."""
    events = to_vllm_events(shelf.events.take(), shelf.chunk_size, shelf.events.parent_of)
    return KVShelfKVEvents(events) if events else None


class SchedulerEvents:
    """The scheduler's side: the workers' events as vLLM hands them over, kept until taken.
    Bounded: the oldest go first (counted in `num_dropped`) if take_events is not called."""

    def __init__(self, max_events: int = MAX_PENDING_EVENTS) -> None:
        self._events: deque[KVCacheEvent] = deque(maxlen=max_events)
        self.num_dropped = 0

    def add(self, kv_cache_events: KVConnectorKVEvents | None) -> None:
        """From update_connector_output: `connector_output.kv_cache_events` (another connector's are ignored)."""
        if not isinstance(kv_cache_events, KVShelfKVEvents):
            return
        for event in kv_cache_events.get_all_events():
            if len(self._events) == self._events.maxlen:
                self.num_dropped += 1
            self._events.append(event)

    def take(self) -> list[KVCacheEvent]:
        """For take_events: every event added since the last take, oldest first."""
        events = list(self._events)
        self._events.clear()
        return events
