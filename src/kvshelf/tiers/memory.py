"""The memory tier: chunk tensors in RAM, evicted least-recently-used by bytes."""

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from kvshelf.keys import ChunkKey
from kvshelf.tiers.base import Tier


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class MemoryTier(Tier[torch.Tensor]):
    """Never holds more than `capacity_bytes`: a chunk larger than the whole budget is not stored."""

    name = "memory"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        # Oldest first; a hit moves a key to the end.
        self._chunks: OrderedDict[ChunkKey, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._chunks)

    def contains_prefix(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            for count, key in enumerate(keys):
                if key not in self._chunks:
                    return count
            return len(keys)

    def get_many(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        with self._lock:
            values = [self._chunks.get(key) for key in keys]
            for key, value in zip(keys, values):
                if value is not None:
                    self._chunks.move_to_end(key)
            return values

    def put_many(self, items: Sequence[tuple[ChunkKey, torch.Tensor]]) -> None:
        with self._lock:
            for key, tensor in items:
                self._put(key, tensor)

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._remove(key)

    def _put(self, key: ChunkKey, tensor: torch.Tensor) -> None:
        size_bytes = tensor_bytes(tensor)
        if size_bytes > self._capacity_bytes:
            return
        self._remove(key)
        while self._used_bytes + size_bytes > self._capacity_bytes:
            _, evicted = self._chunks.popitem(last=False)
            self._used_bytes -= tensor_bytes(evicted)
            self.counters.num_evictions += 1
            self.counters.evicted_bytes += tensor_bytes(evicted)
        self._chunks[key] = tensor
        self._used_bytes += size_bytes

    def _remove(self, key: ChunkKey) -> None:
        tensor = self._chunks.pop(key, None)
        if tensor is not None:
            self._used_bytes -= tensor_bytes(tensor)

    def close(self) -> None:
        """Free the chunks now: a closed shelf should give its RAM back at once."""
        with self._lock:
            self._chunks.clear()
            self._used_bytes = 0
