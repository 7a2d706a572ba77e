"""`kvshelf bench tier-hits`: prompts' hits from the memory tier, the disk tier and Redis, in a fresh process.

A hit is `Shelf.load` of a ~1.9k-token prompt of the bundled model's KV (30 layers, 3 KV heads,
head_dim 64, float32: 88 MB) and, as the vLLM worker does next, scattering it into a paged KV
cache laid out as vLLM's CPU backend lays it (blocks of 128 tokens, allocated and touched before
the first hit, as vLLM's is). As in a serving process, every disk and Redis hit is a prompt this
process has not loaded before, which then stays in the memory tier (promoted), and the memory
hit is one prompt loaded before the rounds. Disk is read from the page cache (written just
before). Rounds interleave the three sources; the first round is reported apart (the process is
fresh), the others as medians, with ratios against the memory hit. Page faults taken by the
loading thread (the reads land there; the decode thread only verifies a raw chunk) count first
touches of fresh memory, whatever else the machine is doing: times on a busy machine vary, they
do not.

Only the public Shelf API and the paged-cache copy are used, so this file also measures an older
kvshelf: `PYTHONPATH=<old>/src python src/kvshelf/bench/tier_hits.py`.
"""

import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvshelf.bench.redis_servers import RedisServer
from kvshelf.config import load_config
from kvshelf.integrations.vllm.paged import PagedKV, block_views
from kvshelf.keys import Namespace
from kvshelf.layout import KVLayout
from kvshelf.shelf import Shelf

BUNDLED_LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64)  # SmolLM2-135M, float32
CHUNK_SIZE = 256
BLOCK_SIZE = 128  # vLLM's CPU backend
SOURCES = ("memory", "disk", "redis")
SECRET = "tier-hits-benchmark-secret-of-32-characters"


def run_tier_hits(num_tokens: int = 1900, rounds: int = 7) -> dict:
    if num_tokens < 1 or rounds < 2:
        raise ValueError(f"tier-hits needs --tokens of at least 1 and --rounds of at least 2 (the first round is "
                         f"reported apart from the warm ones); got {num_tokens} and {rounds}")
    namespace = Namespace("tier-hits@1", BUNDLED_LAYOUT)
    kv = torch.randn(BUNDLED_LAYOUT.shape(num_tokens))
    # Prompts differ in their first token: each has keys of its own (the same KV is fine).
    prompts = {source: [[10_000 * index + source_index, *range(1, num_tokens)] for index in range(rounds)]
               for source_index, source in enumerate(("disk", "redis"), start=1)}
    prompts["memory"] = [[0, *range(1, num_tokens)]] * rounds
    paged = _paged_cache(1 - (-num_tokens // BLOCK_SIZE))  # and the null block
    with tempfile.TemporaryDirectory() as work, RedisServer(Path(work) / "redis") as server:
        common = {"chunk_size": CHUNK_SIZE, "security_key": SECRET}
        # A generous socket timeout: writing 2 x `rounds` prompts to Redis at once takes a while on a busy machine.
        redis = {"redis_url": server.url, "redis_timeout_s": 60}
        writer = Shelf(load_config(environ={}, disk_path=f"{work}/disk", **redis, **common))
        for tokens in [prompts["memory"][0], *prompts["disk"], *prompts["redis"]]:
            writer.save_chunks(tokens, namespace, lambda index: kv[:, :, index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE],
                               tail=True)
        writer.flush()
        writer.close()
        shelves = {"disk": Shelf(load_config(environ={}, disk_path=f"{work}/disk", **common)),
                   "redis": Shelf(load_config(environ={}, **redis, **common))}
        shelves["memory"] = shelves["disk"]
        shelves["memory"].load(prompts["memory"][0], namespace, num_tokens, tail=True)  # now in its memory tier
        samples: dict[str, dict[str, list[float]]] = {source: {"load": [], "hit": [], "faults": []}
                                                      for source in SOURCES}
        for round_index in range(rounds):
            for source in _rotated(SOURCES, round_index):
                tokens = prompts[source][round_index]
                load_s, hit_s, num_faults = _hit(shelves[source], source, tokens, namespace, paged, kv)
                samples[source]["load"].append(load_s * 1000)
                samples[source]["hit"].append(hit_s * 1000)
                samples[source]["faults"].append(num_faults)
        for shelf in (shelves["disk"], shelves["redis"]):
            shelf.close()
    first = {source: {kind: values[0] for kind, values in by_kind.items()} for source, by_kind in samples.items()}
    warm = {source: {kind: statistics.median(values[1:]) for kind, values in by_kind.items()}
            for source, by_kind in samples.items()}
    return {
        "kvshelf": str(Path(sys.modules["kvshelf"].__file__).parent),
        "num_tokens": num_tokens,
        "kv_mb": kv.nbytes / 1e6,
        "rounds": rounds,
        "first": first,  # load and hit in ms, page faults of the loading thread
        "warm": warm,
        "warm_vs_memory": {source: {kind: warm[source][kind] / warm["memory"][kind] for kind in ("load", "hit")}
                           for source in ("disk", "redis")},
    }


def _rotated(sources: tuple[str, ...], by: int) -> tuple[str, ...]:
    by %= len(sources)
    return sources[by:] + sources[:by]


def _paged_cache(num_blocks: int) -> PagedKV:
    """A CPU-layout paged cache: per layer (blocks, kv_heads, block_size, 2 * head_dim), touched."""
    layout = BUNDLED_LAYOUT
    caches = [torch.zeros(num_blocks, layout.num_kv_heads, BLOCK_SIZE, 2 * layout.head_dim)
              for _ in range(layout.num_layers)]
    return PagedKV([block_views(cache, layout.head_dim, cpu_layout=True) for cache in caches])


def _hit(shelf: Shelf, source: str, tokens: list[int], namespace: Namespace, paged: PagedKV,
         kv: torch.Tensor) -> tuple[float, float, int]:
    """Seconds to load the prompt from `source`, and to load and scatter it into the paged cache; the
    page faults this thread took while loading."""
    gc.collect()
    faults_before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    started_s = time.perf_counter()
    loaded = shelf.load(tokens, namespace, len(tokens), tail=True)
    loaded_s = time.perf_counter()
    num_faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults_before
    block_ids = list(range(1, 1 - (-len(tokens) // BLOCK_SIZE)))  # block 0 stands for vLLM's null block
    for index, chunk in enumerate(loaded.chunks):
        first_block = index * CHUNK_SIZE // BLOCK_SIZE
        paged.scatter(chunk, (block_ids[first_block:],), first_token=0, num_tokens=chunk.shape[2])
    done_s = time.perf_counter()
    if loaded.num_tokens != len(tokens) or not torch.equal(loaded.kv(), kv):
        raise RuntimeError(f"the {source} hit loaded {loaded.num_tokens} tokens, or other KV than was saved")
    return loaded_s - started_s, done_s - started_s, num_faults


if __name__ == "__main__":
    print(json.dumps(run_tier_hits(), indent=2))
