"""Store admission: which computed chunks are worth storing, so one-off prompts do not evict useful ones.

Two rules (config `admission.*`): a prompt shorter than `min_tokens` is not stored, and a chunk
is stored from the `min_sightings`-th time it is offered for storing on. A chunk key names its
chunk and everything before it, so counting per chunk key counts each prefix: a system prompt
shared by many requests is stored once it has been seen N times, the one-off question after it
is not. What is stored is always a leading run of the offered chunks (a later chunk is useless
without the ones before it).

Sightings are counted where computed chunks are offered for storing (`Shelf.save_chunks`), not
at lookups: every engine offers each chunk it computed once per request, while lookups also come
from routers' probes and from every tensor-parallel rank, and a lookup that hits needs no
admission at all. Counts are per process: N sightings spread over instances sharing a Redis
each count on their own instance.

The counter is a count-min sketch (`SightingSketch`): a fixed 2 MiB however many distinct
prompts go by, no allocation per sighting, and every count halved after each HALVE_EVERY
sightings, so a prefix must be seen N times within roughly the last 32k-64k chunk sightings.
A collision can only over-count (store a chunk early), never refuse one seen N times. An LRU
dict of exact counts would cost ~170 bytes per tracked chunk, and a burst of one-off prompts
would flush the counts of the recurring prefixes: the very pattern admission is for.
"""

import threading
from collections.abc import Sequence

import numpy as np

from kvshelf.config import AdmissionConfig
from kvshelf.keys import ChunkKey
from kvshelf.metrics import ShelfCounters

MIN_TOKENS, MIN_SIGHTINGS = "min_tokens", "min_sightings"  # the rules, as counted in metrics
SKETCH_ROWS = 4
SKETCH_WIDTH = 1 << 18  # counters per row
HALVE_EVERY = 1 << 15  # sightings between two halvings of every count
MAX_COUNT = np.iinfo(np.uint16).max


class SightingSketch:
    """How often each chunk key has been seen lately: a count-min sketch with conservative update."""

    def __init__(self, width: int = SKETCH_WIDTH, halve_every: int = HALVE_EVERY) -> None:
        if width & (width - 1):
            raise ValueError(f"the sketch's width must be a power of two, got {width}")
        self._counts = np.zeros((SKETCH_ROWS, width), dtype=np.uint16)
        self._rows = np.arange(SKETCH_ROWS)[:, None]
        self._halve_every = halve_every
        self._num_since_halving = 0
        self._lock = threading.Lock()

    def add(self, digests: Sequence[bytes]) -> np.ndarray:
        """Count a sighting of each digest; each one's count, this sighting included."""
        # Chunk keys are keyed blake3 digests, uniformly random: four 32-bit words of each are four hashes.
        words = np.frombuffer(b"".join(digest[: 4 * SKETCH_ROWS] for digest in digests), dtype="<u4")
        columns = (words.reshape(-1, SKETCH_ROWS) & (self._counts.shape[1] - 1)).T  # (rows, digests)
        with self._lock:
            cells = self._counts[self._rows, columns]
            counts = np.minimum(cells.min(axis=0).astype(np.int64) + 1, MAX_COUNT)
            # Conservative update: raise only the cells below the new count, which over-counts least.
            self._counts[self._rows, columns] = np.maximum(cells, counts)
            self._num_since_halving += len(digests)
            if self._num_since_halving >= self._halve_every:
                self._counts >>= 1
                self._num_since_halving = 0
        return counts


class Admission:
    """Decides which offered chunks a shelf stores, and counts the ones it refuses."""

    def __init__(self, config: AdmissionConfig, counters: ShelfCounters) -> None:
        self.config = config
        self._counters = counters
        for rule in (MIN_TOKENS, MIN_SIGHTINGS):  # both series exist from the start
            counters.store_refused_chunks[rule] += 0
        self._sketch = SightingSketch() if config.min_sightings > 1 else None

    def admitted(self, keys: Sequence[ChunkKey], num_prompt_tokens: int) -> int:
        """How many leading chunks of `keys` (a prompt's chunks offered for storing, in order) to
        store; counts this sighting of each. `num_prompt_tokens`: the whole prompt's length."""
        if num_prompt_tokens < self.config.min_tokens:
            self._counters.store_refused_chunks[MIN_TOKENS] += len(keys)
            return 0
        if self._sketch is None or not keys:
            return len(keys)
        seen_enough = self._sketch.add([key.digest for key in keys]) >= self.config.min_sightings
        num_admitted = len(keys) if seen_enough.all() else int(np.argmin(seen_enough))
        self._counters.store_refused_chunks[MIN_SIGHTINGS] += len(keys) - num_admitted
        return num_admitted
