"""Real vLLM engines sharing KV through a real redis-server, and surviving its death.

One module-wide scenario: a reference engine without kvshelf; engine A with a memory tier of
one chunk over Redis (no disk), during whose run Redis is killed mid-batch and later started
again, empty; then engine B, a fresh process that shares nothing with A but Redis.
"""

import time

import pytest

from kvshelf.bench.redis_servers import RedisServer
from tests.integrations.vllm_runner import engine_results, run_engine, start_engine, wait_for

CHUNK_SIZE = 128
BACKOFF_S = 1.0


def prompt(corpus_ids, start):
    return corpus_ids[start : start + 300]  # 2 full chunks and a tail


@pytest.fixture(scope="module")
def prompts(corpus_ids):
    return {name: prompt(corpus_ids, 400 * index) for index, name in enumerate("p1 p2 p3 p4 p5 p6 p7".split())}


@pytest.fixture(scope="module")
def scenario(prompts, tmp_path_factory, vllm_alone):
    work = tmp_path_factory.mktemp("vllm-redis")
    barriers = work / "barriers"
    barriers.mkdir()
    server = RedisServer(work).start()
    try:
        reference = dict(zip(prompts, vllm_alone([{"prompt_token_ids": ids} for ids in prompts.values()])))
        # A chunk of the bundled model is 5.6 MiB: the memory tier holds one, so hits come from Redis.
        extra_config = {"chunk_size": CHUNK_SIZE, "redis.url": server.url, "memory.size": "6MiB",
                        "tier_backoff_s": BACKOFF_S, "model_id": "smollm2-test"}

        def request(name, salt=None):
            return {"prompt_token_ids": prompts[name]} | ({"cache_salt": salt} if salt else {})

        engine_a = start_engine(extra_config, [
            request("p1"),
            request("p1"),
            {"barrier": "kill"},
            {"batch": [request("p2"), request("p3"), request("p4"), request("p1")]},  # Redis dies during it
            request("p5"),
            {"barrier": "restart"},
            request("p6"),
            request("p6"),
            request("p7", "tenant-a"),
        ], barriers)
        wait_for(barriers / "kill.reached")
        (barriers / "kill.go").touch()
        time.sleep(1.5)  # the batch's prefill takes several seconds on this CPU
        server.kill()
        wait_for(barriers / "restart.reached")
        server.start()  # same port, nothing in it
        time.sleep(BACKOFF_S + 0.5)
        (barriers / "restart.go").touch()
        results_a = engine_results(engine_a)
        keys_after_restart = server.client().dbsize()
        engine_b = run_engine(extra_config, [request("p6"), request("p7", "tenant-b"), request("p7", "tenant-a")])
    finally:
        server.stop()
    names = ["p1", "p1 again", "p2", "p3", "p4", "p1 in batch", "p5", "p6", "p6 again", "p7 a"]
    return {"reference": reference, "a": dict(zip(names, results_a)), "b": engine_b,
            "keys_after_restart": keys_after_restart}


def test_hits_from_redis_match_vllm_alone(scenario):
    first, again = scenario["a"]["p1"], scenario["a"]["p1 again"]
    assert first["num_cached_tokens"] == 0
    assert again["num_cached_tokens"] == 2 * CHUNK_SIZE
    assert first["output_ids"] == again["output_ids"] == scenario["reference"]["p1"]["output_ids"]


def test_every_request_succeeds_with_correct_output_while_redis_dies(scenario):
    for name in ("p2", "p3", "p4", "p5"):
        assert scenario["a"][name]["output_ids"] == scenario["reference"][name]["output_ids"], name
    assert scenario["a"]["p1 in batch"]["output_ids"] == scenario["reference"]["p1"]["output_ids"]


def test_hits_resume_after_redis_restarts_without_restarting_the_engine(scenario):
    assert scenario["keys_after_restart"] > 0
    cold, warm = scenario["a"]["p6"], scenario["a"]["p6 again"]
    assert cold["num_cached_tokens"] == 0
    assert warm["num_cached_tokens"] == 2 * CHUNK_SIZE
    assert warm["output_ids"] == cold["output_ids"] == scenario["reference"]["p6"]["output_ids"]


def test_a_second_engine_sharing_only_redis_hits(scenario):
    hit = scenario["b"][0]
    assert hit["num_cached_tokens"] == 2 * CHUNK_SIZE
    assert hit["output_ids"] == scenario["reference"]["p6"]["output_ids"]


def test_tenants_sharing_redis_never_hit_each_other(scenario):
    other_tenant, same_tenant = scenario["b"][1], scenario["b"][2]
    assert other_tenant["num_cached_tokens"] == 0
    assert same_tenant["num_cached_tokens"] == 2 * CHUNK_SIZE
    assert other_tenant["output_ids"] == same_tenant["output_ids"] == scenario["reference"]["p7"]["output_ids"]
