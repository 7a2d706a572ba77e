"""The tier interface: a batched key -> value store with a byte budget.

The memory tier holds tensors; lower tiers hold framed bytes, which they are given as parts
(header, payload) to write one after the other and hand back as one buffer. Tiers know
nothing of codecs or engines; the tier stack encodes, verifies and promotes.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from kvshelf.keys import ChunkKey

Value = TypeVar("Value")
# A stored object as buffers to write in order; the object is their concatenation.
Parts = Sequence[bytes | memoryview]


def parts_bytes(parts: Parts) -> int:
    return sum(memoryview(part).nbytes for part in parts)


@dataclass(slots=True)
class TierCounters:
    """What a tier did; read by the shelf's stats and Prometheus metrics."""

    num_evictions: int = 0
    evicted_bytes: int = 0
    # Failures the tier absorbed itself (a cluster node down while the others serve).
    num_errors: int = 0
    num_rejected_writes: int = 0  # chunks the store refused (full, and not allowed to evict)


class Tier(ABC, Generic[Value]):
    name: str
    shared = False  # True: every instance reads the same store (so it says nothing about where KV is)
    # Chunks per get_many when a load reads many: the stack verifies one group while reading the next.
    # None: all at once (a tier whose reads cost nothing to overlap).
    read_group_chunks: int | None = None
    pinned_bytes = 0  # chunks kept whatever comes (the memory tier's pins)

    def __init__(self, capacity_bytes: int) -> None:
        self.counters = TierCounters()
        self._capacity_bytes = capacity_bytes
        self._used_bytes = 0  # kept up to date by the subclass under its lock
        # Told (tier name, keys) of chunks stored, and of chunks the tier itself dropped (evicted,
        # expired, cleared): the shelf's KV cache events. Called outside the tier's lock, quickly.
        self.on_stored: Callable[[str, Sequence[ChunkKey]], None] | None = None
        self.on_removed: Callable[[str, Sequence[ChunkKey]], None] | None = None

    def _note_stored(self, keys: Sequence[ChunkKey]) -> None:
        """Subclasses call this for keys newly stored by put_many."""
        if keys and self.on_stored is not None:
            self.on_stored(self.name, keys)

    def _note_removed(self, keys: Sequence[ChunkKey]) -> None:
        """Subclasses call this for keys they drop on their own (eviction, expiry, clear), not for `delete`."""
        if keys and self.on_removed is not None:
            self.on_removed(self.name, keys)

    def _note_changes(self, stored: Sequence[ChunkKey], removed: Sequence[ChunkKey]) -> None:
        """A put_many's net change, for a batch that evicted as it stored: a key stored and then evicted
        by a later chunk of the batch is left out of both, so the order of the two reports cannot matter."""
        both = set(stored) & set(removed)
        self._note_removed([key for key in removed if key not in both])
        self._note_stored([key for key in stored if key not in both])

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    @abstractmethod
    def contains_prefix(self, keys: Sequence[ChunkKey]) -> int:
        """How many leading `keys` this tier holds."""

    def contains_each(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether the tier holds each of `keys`; tiers with a cheaper batched check override this."""
        return [self.contains_prefix([key]) == 1 for key in keys]

    @abstractmethod
    def get_many(
        self, keys: Sequence[ChunkKey], into: Callable[[int], memoryview] | None = None
    ) -> list[Value | None]:
        """Values of `keys`, None where missing. Raises TierUnavailable if the tier fails.

        `into(num_bytes)`: a writable buffer of that size (in the memory tier's arena, faulted in
        already) for a byte tier to read a value into; a tier whose values are in memory already
        ignores it."""

    @abstractmethod
    def put_many(self, items: Sequence[tuple[ChunkKey, Value]]) -> None:
        """Store `items`, evicting as needed. Raises TierUnavailable if the tier fails."""

    @abstractmethod
    def delete(self, keys: Sequence[ChunkKey]) -> None: ...

    def discard(self, keys: Sequence[ChunkKey]) -> None:
        """Delete `keys` on an operator's request, reported like an eviction (KV cache events)."""
        self.delete(keys)
        self._note_removed(keys)

    def clear(self) -> None:
        """Drop every chunk this tier holds for this deployment (vLLM's reset_prefix_cache with
        reset_external), reporting them through `_note_removed`. Optional: a shared tier may decline."""

    def clear_model(self, description: dict, namespace_ids: Sequence[str] = ()) -> None:
        """A shared tier's part of a reset: drop the chunks of one model's namespaces (any tenant
        salt or adapter; `description` is a namespace's public description) and of `namespace_ids`,
        leaving other models' KV to the instances that use it. Optional."""

    def list_keys(self) -> list[ChunkKey]:
        """Every key the tier holds: a router's starting picture, kept up to date by the tier's
        events. Optional: a tier that cannot list its keys cheaply (a shared store) answers []."""
        return []

    def refresh_usage(self) -> None:
        """Bring `used_bytes`, `capacity_bytes` and counters up to date before they are read. Optional."""

    def note_namespace(self, namespace_id: str, description: dict) -> None:
        """Record what a namespace id means (its public description: no salt), for tools that list
        stored chunks. Optional."""

    def close(self) -> None:
        """Release resources. Optional."""
