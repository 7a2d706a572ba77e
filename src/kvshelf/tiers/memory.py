"""The memory tier: chunk tensors in the arena (kvshelf.tiers.arena), evicted least-recently-used.

Its byte budget is the arena. Chunks get there three ways, none of them through fresh memory:
- a load from a lower tier reads each stored object into `read_buffer` and decodes into
  `allocate` (a raw chunk stays a view of the object it was read into), then stores the chunk;
- a caller that makes a chunk (a save gathering KV out of an engine) may gather into `allocate`;
- any other tensor is copied into the arena when stored.
Making room in the arena evicts least-recently-used chunks; an evicted chunk's memory is reused
once nothing holds it any more, so a chunk handed out stays valid for as long as it is held.
"""

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from kvshelf.keys import ChunkKey
from kvshelf.tiers.arena import Arena, buffer_address, fresh_buffer
from kvshelf.tiers.base import Tier


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class MemoryTier(Tier[torch.Tensor]):
    """Never holds more than `capacity_bytes` (each chunk rounded up to the arena's ALIGN_BYTES): a
    chunk larger than the whole budget is not stored. `prefault`: see Arena."""

    name = "memory"

    def __init__(self, capacity_bytes: int, prefault: bool = True) -> None:
        super().__init__(capacity_bytes)
        self.arena = Arena(capacity_bytes, prefault)
        # Oldest first; a hit moves a key to the end. Pinned chunks are apart, never evicted.
        self._chunks: OrderedDict[ChunkKey, torch.Tensor] = OrderedDict()
        self._pinned: dict[ChunkKey, torch.Tensor] = {}
        self.pinned_bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._chunks) + len(self._pinned)

    def contains_prefix(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            for count, key in enumerate(keys):
                if key not in self._chunks and key not in self._pinned:
                    return count
            return len(keys)

    def get_many(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        with self._lock:
            values = [self._chunks.get(key, self._pinned.get(key)) for key in keys]
            for key in keys:
                if key in self._chunks:
                    self._chunks.move_to_end(key)
            return values

    # --- pinning: chunks kept whatever comes, within a budget ---

    def pin(self, keys: Sequence[ChunkKey], budget_bytes: int) -> int:
        """Pin the leading `keys` this tier holds, as long as the pinned bytes stay within
        `budget_bytes`; returns how many of the leading keys are pinned now."""
        with self._lock:
            for count, key in enumerate(keys):
                if key in self._pinned:
                    continue
                chunk = self._chunks.get(key)
                if chunk is None or self.pinned_bytes + tensor_bytes(chunk) > budget_bytes:
                    return count
                self._pinned[key] = self._chunks.pop(key)
                self.pinned_bytes += tensor_bytes(chunk)
            return len(keys)

    def unpin(self, keys: Sequence[ChunkKey]) -> int:
        """Unpin `keys` (they become the most recently used); returns how many were pinned."""
        with self._lock:
            count = 0
            for key in keys:
                chunk = self._pinned.pop(key, None)
                if chunk is not None:
                    self.pinned_bytes -= tensor_bytes(chunk)
                    self._chunks[key] = chunk
                    count += 1
            return count

    # --- memory in the arena, for chunks about to be stored here ---

    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in the arena, evicting least-recently-used chunks to make room; a
        plain tensor if the arena cannot hold it (the chunk will not be stored)."""
        evicted: list[ChunkKey] = []
        tensor = self._allocate(shape, dtype, evicted)
        self._note_removed(evicted)
        return tensor

    def read_buffer(self, num_bytes: int, aligned_at: int = 0) -> memoryview:
        """A writable buffer in the arena for a lower tier to read a stored object into (verified and
        decoded there; a raw chunk is then a view of it), its byte `aligned_at` (where the payload
        starts) aligned. Evicts like `allocate`; plain memory if the arena cannot hold it."""
        evicted: list[ChunkKey] = []
        buffer = self._arena_buffer(num_bytes, aligned_at, evicted) if num_bytes else None
        self._note_removed(evicted)
        return buffer if buffer is not None else fresh_buffer(num_bytes)

    def release(self, buffer: torch.Tensor | memoryview | bytes) -> None:
        """Give back `buffer`'s arena memory now: a read that failed verification, a chunk that failed
        to decode. Only for a buffer nothing reads again; one outside the arena is left to the GC."""
        self.arena.release(buffer_address(buffer))

    def _allocate(self, shape: Sequence[int], dtype: torch.dtype, evicted: list[ChunkKey]) -> torch.Tensor:
        num_bytes = math.prod(shape) * dtype.itemsize
        buffer = self._arena_buffer(num_bytes, 0, evicted) if num_bytes else None
        if buffer is None:
            return torch.empty(tuple(shape), dtype=dtype)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(tuple(shape))

    def _arena_buffer(self, num_bytes: int, aligned_at: int, evicted: list[ChunkKey]) -> memoryview | None:
        """Arena memory, evicting chunks (their keys appended to `evicted`) until it fits; None if it cannot."""
        with self._lock:
            buffer = self.arena.allocate(num_bytes, aligned_at)
            # An evicted chunk's memory comes back when nothing else holds it: usually at once.
            while buffer is None and self._chunks and self.arena.can_hold(num_bytes, aligned_at):
                evicted.append(self._evict_oldest())
                buffer = self.arena.allocate(num_bytes, aligned_at)
        return buffer

    # --- storing ---

    def put_many(self, items: Sequence[tuple[ChunkKey, torch.Tensor]]) -> None:
        """Store `items`: tensors in the arena as they are, others copied into it."""
        stored: list[ChunkKey] = []
        evicted: list[ChunkKey] = []
        try:
            for key, tensor in items:
                size_bytes = tensor_bytes(tensor)
                if size_bytes > self._capacity_bytes:
                    continue
                if size_bytes and not self.arena.owns(tensor.data_ptr()):
                    tensor = self._copied_in(tensor, evicted)
                    if tensor is None:
                        self.counters.num_rejected_writes += 1  # the arena is full of chunks others still hold
                        continue
                with self._lock:
                    is_new = key not in self._chunks and key not in self._pinned
                    evicted += self._put(key, tensor, size_bytes)
                    is_new = is_new and key in self._chunks
                if is_new:
                    stored.append(key)
        finally:
            self._note_changes(stored, evicted)

    def _copied_in(self, tensor: torch.Tensor, evicted: list[ChunkKey]) -> torch.Tensor | None:
        """A copy of `tensor` in the arena (copied outside the lock); None if the arena cannot hold it."""
        copy = self._allocate(tensor.shape, tensor.dtype, evicted)
        if not self.arena.owns(copy.data_ptr()):
            return None
        return copy.copy_(tensor)

    def _put(self, key: ChunkKey, tensor: torch.Tensor, size_bytes: int) -> list[ChunkKey]:
        """Store under the lock; returns the keys evicted to keep within the budget."""
        if key in self._pinned:
            return []
        self._remove(key)
        evicted = []
        while self._used_bytes + size_bytes > self._capacity_bytes:
            if not self._chunks:  # the rest is pinned: not stored
                self.counters.num_rejected_writes += 1
                return evicted
            evicted.append(self._evict_oldest())
        self._chunks[key] = tensor
        self._used_bytes += size_bytes
        return evicted

    def _evict_oldest(self) -> ChunkKey:
        """Under the lock. No reference to the chunk outlives this call, so its memory can be reused."""
        key, chunk = self._chunks.popitem(last=False)
        size_bytes = tensor_bytes(chunk)
        self._used_bytes -= size_bytes
        self.counters.num_evictions += 1
        self.counters.evicted_bytes += size_bytes
        return key

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._remove(key)

    def _remove(self, key: ChunkKey) -> None:
        tensor = self._chunks.pop(key, None)
        if tensor is None and (tensor := self._pinned.pop(key, None)) is not None:
            self.pinned_bytes -= tensor_bytes(tensor)
        if tensor is not None:
            self._used_bytes -= tensor_bytes(tensor)

    def list_keys(self) -> list[ChunkKey]:
        with self._lock:
            return [*self._chunks, *self._pinned]

    def clear(self) -> None:
        """Drop every chunk, pinned ones too (a reset means the KV may no longer be right)."""
        with self._lock:
            keys = [*self._chunks, *self._pinned]
            self._chunks.clear()
            self._pinned.clear()
            self._used_bytes = self.pinned_bytes = 0
        self._note_removed(keys)

    def close(self) -> None:
        """Free the chunks now: a closed shelf should give its RAM back at once (the arena goes with
        the last chunk still held elsewhere)."""
        with self._lock:
            self._chunks.clear()
            self._pinned.clear()
            self._used_bytes = self.pinned_bytes = 0
        self.arena.close()
