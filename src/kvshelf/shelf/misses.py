"""Why a chunk is missing: what this shelf remembers of the chunks it stored and dropped.

A store cannot say why it lacks a key, so the shelf keeps a bounded record (`MAX_REMEMBERED`
keys, least recently used go first) of the chunks it stored or loaded, when, and the ones it
dropped as corrupt. A chunk missing from every tier is then: corrupt if it was dropped as such;
expired if it was last used longer ago than the Redis tier's ttl_s; evicted (or cleared) if it was
stored at all; and otherwise not stored, as far as this instance knows (another instance may have
stored it in a shared tier that has since lost it).
"""

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from kvshelf.keys import ChunkKey

MAX_REMEMBERED = 1 << 16  # ~10 MB of keys at most
STORED, CORRUPT = "stored", "corrupt"


class ChunkHistory:
    def __init__(self, ttl_s: float | None, max_keys: int = MAX_REMEMBERED) -> None:
        """`ttl_s`: the Redis tier's expiry (refreshed by every read), None without one."""
        self._ttl_s = ttl_s
        self._max_keys = max_keys
        self._keys: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def note_used(self, keys: Iterable[ChunkKey]) -> None:
        """`keys` were stored or read just now."""
        self._note(keys, STORED)

    def note_corrupt(self, keys: Iterable[ChunkKey]) -> None:
        self._note(keys, CORRUPT)

    def _note(self, keys: Iterable[ChunkKey], state: str) -> None:
        now_s = time.monotonic()
        with self._lock:
            for key in keys:
                self._keys[key.digest] = (state, now_s)
                self._keys.move_to_end(key.digest)
            while len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)

    def reason(self, key: ChunkKey) -> str:
        """Why `key`, missing from every tier, is missing: a kvshelf.metrics.MISS_REASONS name."""
        with self._lock:
            state, used_s = self._keys.get(key.digest, (None, 0.0))
        if state is None:
            return "not_stored"
        if state == CORRUPT:
            return "corrupt"
        if self._ttl_s is not None and time.monotonic() - used_s > self._ttl_s:
            return "expired"
        return "evicted"
