"""The inbox: framed chunks pushed by a prefill instance, waiting for their request.

A bounded buffer on the decode instance. A chunk leaves it when its request loads it (it is
promoted to the memory tier then) or when it has waited `ttl_s`: KV whose request never
arrives is dropped, not kept. A push that does not fit is refused, so the sender backs off.
Chunks arriving are reported stored; chunks leaving (handed over, expired, cleared) removed.
"""

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

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
            expired = self._expire()
            count = next((count for count, key in enumerate(keys) if key not in self._blobs), len(keys))
        self._note_removed(expired)
        return count

    def get_many(
        self, keys: Sequence[ChunkKey], into: Callable[[int], memoryview] | None = None
    ) -> list[bytes | memoryview | None]:
        """Hand over and remove: a chunk read from the inbox lives on in the memory tier. With `into`
        (the memory tier's arena), each is copied into `into(its size)`, where it will stay."""
        with self._lock:
            expired = self._expire()
            found = [self._blobs.pop(key, None) for key in keys]
            self._used_bytes -= sum(len(entry[1]) for entry in found if entry is not None)
        self._note_removed(expired + [key for key, entry in zip(keys, found) if entry is not None])
        blobs = [entry[1] if entry is not None else None for entry in found]
        return blobs if into is None else [_copied(blob, into) if blob is not None else None for blob in blobs]

    def offer(self, num_bytes: int) -> bool:
        """Whether `num_bytes` more fit now."""
        with self._lock:
            expired = self._expire()
            fits = self._used_bytes + num_bytes <= self._capacity_bytes
        self._note_removed(expired)
        return fits

    def put_many(self, items: Sequence[tuple[ChunkKey, Parts]]) -> None:
        """Store what fits; a chunk that does not is left out (check `offer` first to refuse a push)."""
        stored = []
        with self._lock:
            expired = self._expire()
            for key, parts in items:
                size_bytes = parts_bytes(parts)
                held = self._blobs.get(key)
                if self._used_bytes - (len(held[1]) if held else 0) + size_bytes > self._capacity_bytes:
                    self.counters.num_rejected_writes += 1
                    continue
                self._remove(key)
                self._blobs[key] = (time.monotonic() + self.ttl_s, b"".join(parts))
                self._used_bytes += size_bytes
                if held is None:
                    stored.append(key)
        self._note_removed(expired)
        self._note_stored(stored)

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._remove(key)

    def refresh_usage(self) -> None:
        """Drop what expired, so stats show it gone."""
        with self._lock:
            expired = self._expire()
        self._note_removed(expired)

    def clear(self) -> None:
        with self._lock:
            cleared = list(self._blobs)
            self._blobs.clear()
            self._used_bytes = 0
        self._note_removed(cleared)

    def list_keys(self) -> list[ChunkKey]:
        with self._lock:
            return list(self._blobs)

    def _remove(self, key: ChunkKey) -> None:
        entry = self._blobs.pop(key, None)
        if entry is not None:
            self._used_bytes -= len(entry[1])

    def _expire(self) -> list[ChunkKey]:
        """Drop chunks past their time (under the lock); returns their keys, to report once it is released."""
        now = time.monotonic()
        expired = []
        while self._blobs:
            key, (expires_s, blob) = next(iter(self._blobs.items()))
            if expires_s > now:
                break
            del self._blobs[key]
            self._used_bytes -= len(blob)
            self.counters.num_evictions += 1
            self.counters.evicted_bytes += len(blob)
            expired.append(key)
        return expired

    def close(self) -> None:
        with self._lock:
            self._blobs.clear()
            self._used_bytes = 0


def _copied(blob: bytes, into: Callable[[int], memoryview]) -> memoryview:
    buffer = into(len(blob))
    buffer[:] = blob
    return buffer
