"""Tensor parallelism on vLLM's CPU backend (TP=2, one core per rank): each rank stores its shard
of a chunk under keys of its own, and a hit needs, and loads, both.

The references are the same engine's answers to prompts under a `cache_salt` no other request
uses: kvshelf holds nothing for them, so they are computed as vLLM alone computes them (TP=2
float32 sums in another order than TP=1: its own answers are the reference).
"""

from kvshelf.bench.compat import prompts
from kvshelf.inspection import inspect_store, open_store
from tests.integrations.vllm_runner import run_engine

CHUNK_SIZE = 64


def test_both_ranks_store_their_shards_and_both_hit(tmp_path):
    full, partial = (prompts()[name]["prompt_token_ids"] for name in ("full", "partial"))
    requests = [
        {"prompt_token_ids": full, "cache_salt": "reference-full"},
        {"prompt_token_ids": partial, "cache_salt": "reference-partial"},
        {"prompt_token_ids": full},  # cold
        {"prompt_token_ids": full},  # a hit: both ranks' shards
        {"prompt_token_ids": partial},  # a hit of its first 2 chunks
    ]
    extra_config = {"chunk_size": CHUNK_SIZE, "disk.path": str(tmp_path / "disk"), "model_id": "zoo-qwen2",
                    "memory.size": "64MiB"}
    results = run_engine(extra_config, requests, zoo_family="qwen2",
                         llm_args={"tensor_parallel_size": 2, "distributed_executor_backend": "mp",
                                   "block_size": 32, "max_model_len": 1024},
                         env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})  # a rank per core (one NUMA node here)
    reference_full, reference_partial, cold, hit, partial_hit = results
    assert cold == {"output_ids": reference_full["output_ids"], "num_cached_tokens": 0}
    assert hit == {"output_ids": reference_full["output_ids"], "num_cached_tokens": 3 * CHUNK_SIZE}
    assert partial_hit == {"output_ids": reference_partial["output_ids"], "num_cached_tokens": 2 * CHUNK_SIZE}
    store = open_store(str(tmp_path / "disk"))
    try:
        report = inspect_store(store)
    finally:
        store.close()
    ranks = {}  # tp_rank -> chunks of the unsalted prompts
    for namespace in report.namespaces.values():
        description = namespace.description
        if description["cache_salt_tag"] is None:
            assert description["tp_size"] == 2
            ranks[description["tp_rank"]] = namespace.num_chunks
    assert ranks == {0: 4, 1: 4}  # full's 3 chunks and partial's own third, under each rank's keys
