"""Prefill/decode disaggregation between two real vLLM engines: a kv_producer and a kv_consumer.

One module-wide scenario over a real redis-server. The producer prefills each prompt (one
output token) and hands its KV over: pushed to the consumer's inbox, or through Redis, or, when
the push fails, through Redis after all; last, with Redis dead, the KV is lost. The consumer
then serves every prompt in full and must match vLLM alone, computing only what was not handed
over.
"""


import pytest

from kvshelf import load_config
from kvshelf.bench.redis_servers import RedisServer
from kvshelf.ports import free_port, sign_push_to
from kvshelf.security import Keyring
from tests.integrations.vllm_runner import engine_results, start_engine, wait_for

CHUNK_SIZE = 128
PROMPT_TOKENS = 300  # 2 full chunks and a tail of 44


@pytest.fixture(scope="module")
def scenario(corpus_ids, tmp_path_factory, vllm_alone):
    work = tmp_path_factory.mktemp("vllm-pd")
    barriers = work / "barriers"
    barriers.mkdir()
    prompts = {name: corpus_ids[400 * index : 400 * index + PROMPT_TOKENS]
               for index, name in enumerate(["pushed", "through redis", "push failed", "lost"])}
    receive_address = f"tcp://127.0.0.1:{free_port()}"
    nobody = f"tcp://127.0.0.1:{free_port()}"
    push_to = {"pushed": receive_address, "push failed": nobody}
    keyring = Keyring.from_config(load_config().security)  # the engines' key: the same default key file
    server = RedisServer(work).start()
    try:
        reference = vllm_alone([{"prompt_token_ids": ids} for ids in prompts.values()])
        common = {"chunk_size": CHUNK_SIZE, "redis.url": server.url, "model_id": "smollm2-test",
                  "tier_backoff_s": 60, "redis.timeout_s": 0.5}

        def handed_over(name):
            # As the proxy does: a destination in a request counts only when signed with the deployment key.
            address = push_to.get(name)
            params = {"kvshelf": {"push_to": address, "push_to_sig": sign_push_to(keyring, address)}} if address else {}
            return {"prompt_token_ids": prompts[name], "max_tokens": 1, "kv_transfer_params": params}

        def served(name):
            return {"prompt_token_ids": prompts[name]}

        producer = start_engine(
            common | {"pd.push_timeout_s": 1.0},
            [{"barrier": "produce"}, handed_over("pushed"), handed_over("through redis"),
             handed_over("push failed"), {"barrier": "kill"}, handed_over("lost")],
            barriers, kv_role="kv_producer",
        )
        consumer = start_engine(
            common | {"pd.receive_address": receive_address},
            [{"barrier": "consume"}, served("pushed"), served("through redis"), served("push failed"),
             {"barrier": "lost"}, served("lost")],
            barriers, kv_role="kv_consumer",
        )
        for name in ("produce", "consume"):
            wait_for(barriers / f"{name}.reached")
        (barriers / "produce.go").touch()
        wait_for(barriers / "kill.reached")
        (barriers / "consume.go").touch()
        wait_for(barriers / "lost.reached")
        server.kill()  # the last hand-over has nowhere to go, and the consumer nowhere to look
        (barriers / "kill.go").touch()
        producer_results = engine_results(producer)
        (barriers / "lost.go").touch()
        consumer_results = engine_results(consumer)
    finally:
        server.stop()
    return {"reference": dict(zip(prompts, reference)), "producer": dict(zip(prompts, producer_results)),
            "consumer": dict(zip(prompts, consumer_results))}


@pytest.mark.parametrize("name", ["pushed", "through redis", "push failed", "lost"])
def test_the_decode_instance_matches_vllm_alone(scenario, name):
    assert scenario["consumer"][name]["output_ids"] == scenario["reference"][name]["output_ids"]
    assert scenario["producer"][name]["output_ids"] == scenario["reference"][name]["output_ids"][:1]


@pytest.mark.parametrize("name", ["pushed", "through redis", "push failed"])
def test_the_decode_instance_computes_only_the_last_prompt_token(scenario, name):
    assert scenario["consumer"][name]["num_cached_tokens"] == PROMPT_TOKENS - 1


def test_a_lost_hand_over_is_recomputed(scenario):
    assert scenario["consumer"]["lost"]["num_cached_tokens"] == 0
