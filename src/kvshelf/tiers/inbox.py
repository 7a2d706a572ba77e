"""The inbox: framed chunks pushed by a prefill instance, waiting for their request.

A bounded buffer on the decode instance. A chunk leaves it when its request loads it (it is
promoted to the memory tier then) or when it has waited `ttl_s`: KV whose request never
arrives is dropped, not kept. A push that does not fit is refused, so the sender backs off.
"""

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from kvshelf.keys import ChunkKey
from kvshelf.tiers.base import Parts, Tier, parts_bytes


class InboxTier(Tier[bytes]):
    name = "inbox"

    def __init__(self, capacity_bytes: int, ttl_s: float) -> None:
        super().__init__(capacity_bytes)
        self.ttl_s = ttl_s
        self._blobs: OrderedDict[ChunkKey, tuple[float, bytes]] = OrderedDict()  # oldest arrival first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._blobs)

    def contains_prefix(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            self._expire()
            for count, key in enumerate(keys):
                if key not in self._blobs:
                    return count
            return len(keys)

    def get_many(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        """Hand over and remove: a chunk read from the inbox lives on in the memory tier."""
        with self._lock:
            self._expire()
            found = [self._blobs.pop(key, None) for key in keys]
            self._used_bytes -= sum(len(entry[1]) for entry in found if entry is not None)
            return [entry[1] if entry is not None else None for entry in found]

    def offer(self, num_bytes: int) -> bool:
        """Whether `num_bytes` more fit now."""
        with self._lock:
            self._expire()
            return self._used_bytes + num_bytes <= self._capacity_bytes

    def put_many(self, items: Sequence[tuple[ChunkKey, Parts]]) -> None:
        """Store what fits; a chunk that does not is left out (check `offer` first to refuse a push)."""
        with self._lock:
            self._expire()
            for key, parts in items:
                size_bytes = parts_bytes(parts)
                held = self._blobs.get(key)
                if self._used_bytes - (len(held[1]) if held else 0) + size_bytes > self._capacity_bytes:
                    self.counters.num_rejected_writes += 1
                    continue
                self._remove(key)
                self._blobs[key] = (time.monotonic() + self.ttl_s, b"".join(parts))
                self._used_bytes += size_bytes

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._remove(key)

    def refresh_usage(self) -> None:
        """Drop what expired, so stats show it gone."""
        with self._lock:
            self._expire()

    def _remove(self, key: ChunkKey) -> None:
        entry = self._blobs.pop(key, None)
        if entry is not None:
            self._used_bytes -= len(entry[1])

    def _expire(self) -> None:
        now = time.monotonic()
        while self._blobs:
            key, (expires_s, blob) = next(iter(self._blobs.items()))
            if expires_s > now:
                return
            del self._blobs[key]
            self._used_bytes -= len(blob)
            self.counters.num_evictions += 1
            self.counters.evicted_bytes += len(blob)

    def close(self) -> None:
        with self._lock:
            self._blobs.clear()
            self._used_bytes = 0
