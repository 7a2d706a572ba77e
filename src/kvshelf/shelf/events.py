"""What a shelf's tiers stored and dropped: the raw material of KV cache events.

`ChunkEvents` listens to every tier of a shelf (`Tier.on_stored`, `Tier.on_removed`) and keeps
what they report, in order, until someone takes it; vLLM's connector turns the records into vLLM
KV cache events every step (integrations/vllm/events.py). The records are bounded: when nobody
takes them (an engine publishing no events, a shelf used on its own) the oldest go first, counted
in `num_dropped_keys`. Records name chunks by key only, never by tokens, salts or namespaces.

`held_keys` is the other half of a router's picture: what the instance's own tiers hold now (not
a shared Redis), which the events then keep up to date.

A chunk key chains its predecessor's (kvshelf.keys), but a key alone does not say which key it
follows: `note_chain(keys)`, for a prompt's keys in order, remembers the key before each (for a
bounded number of recent keys), so that events can name a chunk's parent.
"""

import functools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from kvshelf.keys import ChunkKey
from kvshelf.tiers.base import Tier

STORED, REMOVED = "stored", "removed"
MAX_RECORDED_KEYS = 1 << 16  # keys held in records not yet taken; beyond, the oldest records go
MAX_PARENTS = 1 << 16  # recent keys whose parent is remembered
MAX_AGED_KEYS = 1 << 18  # keys whose storing time is remembered, to tell their age when dropped


@dataclass(frozen=True, slots=True)
class ChunkEvent:
    kind: str  # STORED or REMOVED
    tier: str  # the tier's name: memory, disk, redis or inbox
    shared: bool  # the tier is shared by every instance (Redis), see Tier.shared
    keys: tuple[ChunkKey, ...]


class ChunkEvents:
    """`on_dropped_age(tier name, seconds)`: told how long each chunk an instance's own tier stored
    lived when the tier drops it (evicted, expired or cleared)."""

    def __init__(self, tiers: Sequence[Tier], max_keys: int = MAX_RECORDED_KEYS,
                 on_dropped_age: Callable[[str, float], None] | None = None) -> None:
        self._tiers = list(tiers)
        self._on_dropped_age = on_dropped_age
        self._stored_at: OrderedDict[tuple[str, ChunkKey], float] = OrderedDict()
        self._max_keys = max_keys
        self._records: deque[ChunkEvent] = deque()
        self._num_keys = 0
        self.num_dropped_keys = 0
        self._parents: OrderedDict[ChunkKey, ChunkKey] = OrderedDict()
        self._lock = threading.Lock()
        for tier in self._tiers:
            tier.on_stored = functools.partial(self._record, STORED, tier.shared)
            tier.on_removed = functools.partial(self._record, REMOVED, tier.shared)

    def _record(self, kind: str, shared: bool, tier_name: str, keys: Sequence[ChunkKey]) -> None:
        if not shared and self._on_dropped_age is not None:
            self._note_ages(kind, tier_name, keys)
        with self._lock:
            self._records.append(ChunkEvent(kind, tier_name, shared, tuple(keys)))
            self._num_keys += len(keys)
            while self._num_keys > self._max_keys:
                dropped = self._records.popleft()
                self._num_keys -= len(dropped.keys)
                self.num_dropped_keys += len(dropped.keys)

    def _note_ages(self, kind: str, tier_name: str, keys: Sequence[ChunkKey]) -> None:
        now_s = time.monotonic()
        ages = []
        with self._lock:
            for key in keys:
                if kind == STORED:
                    self._stored_at[tier_name, key] = now_s
                elif (stored_s := self._stored_at.pop((tier_name, key), None)) is not None:
                    ages.append(now_s - stored_s)
            while len(self._stored_at) > MAX_AGED_KEYS:
                self._stored_at.popitem(last=False)
        for age_s in ages:
            self._on_dropped_age(tier_name, age_s)

    def take(self) -> list[ChunkEvent]:
        """The records since the last take, oldest first."""
        with self._lock:
            records = list(self._records)
            self._records.clear()
            self._num_keys = 0
        return records

    def note_chain(self, keys: Sequence[ChunkKey]) -> None:
        """`keys` are one prompt's chunk keys in order: each is the parent of the next."""
        with self._lock:
            for parent, key in pairwise(keys):
                self._parents[key] = parent
                self._parents.move_to_end(key)
            while len(self._parents) > MAX_PARENTS:
                self._parents.popitem(last=False)

    def parent_of(self, key: ChunkKey) -> ChunkKey | None:
        """The key of the chunk before `key`'s, if a recent `note_chain` said; else None."""
        with self._lock:
            return self._parents.get(key)

    def held_keys(self) -> dict[str, list[ChunkKey]]:
        """Per tier of this instance's own (not shared), every key it holds now (see Tier.list_keys)."""
        return {tier.name: tier.list_keys() for tier in self._tiers if not tier.shared}
