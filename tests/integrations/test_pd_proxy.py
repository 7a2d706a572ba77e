"""1P1D behind `kvshelf proxy`, all real: two `kvshelf serve` instances (prefill, decode), a
redis-server they share, and proxies over them, each its own process on loopback.

The prefill instance is also the reference: asked directly, it is a plain vLLM instance.
"""

import json
import os
import re
import sys
import threading
import time

import httpx
import pytest

from kvshelf.bench.redis_servers import RedisServer
from kvshelf.children import stop
from kvshelf.disagg.launch import (
    instance_argv,
    instance_env,
    new_instance,
    proxy_argv,
    running,
    start_process,
    wait_healthy,
)
from kvshelf.ports import free_port

MAX_TOKENS = 12
ADMIN_KEY = "proxy-admin-key-for-tests"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("pd-proxy")
    redis = RedisServer(work).start()
    instances = [new_instance("prefill"), new_instance("decode")]
    try:
        with running(instances, work / "logs", "push", redis.url, memory_size="1GiB",
                     vllm_args=["--max-model-len", "2048"]) as live:
            yield live, redis, work
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def texts(corpus_ids):
    from transformers import AutoTokenizer

    from kvshelf.models import bundled_model_dir

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    return [tokenizer.decode(corpus_ids[900 * index : 900 * index + 600]) for index in range(8)]


def complete(url: str, prompt: str, **fields) -> httpx.Response:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0} | fields
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response


def text_of(response: httpx.Response) -> str:
    return response.json()["choices"][0]["text"]


def metric(url: str, name: str, **labels) -> float:
    """The sum of a Prometheus counter's samples that carry `labels`."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = re.match(rf"{re.escape(name)}(?:\{{(.*)\}})? ([0-9.e+-]+)$", line)
        if match and all(f'{key}="{value}"' in (match.group(1) or "") for key, value in labels.items()):
            total += float(match.group(2))
    return total


def by_source(url: str) -> dict[str, float]:
    return {source: metric(url, "vllm:prompt_tokens_by_source_total", source=source)
            for source in ("local_compute", "external_kv_transfer")}


@pytest.fixture
def proxy(setup):
    """A proxy of its own over the module's instances: `proxy(channel=..., routing=..., instances=...)`."""
    live, _, work = setup
    started = []

    def start(channel="push", routing="kv-aware", colocated=False):
        instances = live.instances
        if colocated:
            instances = [type(instance)("both", instance.port, instance.lookup_address) for instance in instances]
        port = free_port()
        env = dict(os.environ, KVSHELF_PROXY_ADMIN_KEY=ADMIN_KEY)
        process = start_process(proxy_argv(port, instances, channel, routing), work / f"proxy-{port}", env)
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process, work / f"proxy-{port}", timeout_s=60)
        return url

    yield start
    for process in started:
        stop(process)


def test_pushed_kv_gives_the_tokens_of_a_single_instance(setup, texts):
    live, _, _ = setup
    prefill, decode = live.instances
    before = by_source(decode.url)
    received_before = metric(decode.url, "vllm:kvshelf_received_chunks_total")
    # First through the proxy: asked first, the prefill instance would write the prompt's KV through
    # to Redis, where the decode instance could find it before the push (sent after the step) lands.
    answer = complete(live.proxy_url, texts[0])
    after = by_source(decode.url)
    assert text_of(answer) == text_of(complete(prefill.url, texts[0]))
    assert answer.headers["x-kvshelf-instance"] == decode.url
    prompt_tokens = answer.json()["usage"]["prompt_tokens"]
    # The decode instance computed only the last prompt token; the rest came from the prefill instance.
    assert after["local_compute"] - before["local_compute"] == 1
    assert after["external_kv_transfer"] - before["external_kv_transfer"] == prompt_tokens - 1
    assert metric(decode.url, "vllm:kvshelf_received_chunks_total") > received_before


def test_streamed_answers_and_chat_match_too(setup, texts):
    live, _, _ = setup
    prefill, _ = live.instances
    reference = text_of(complete(prefill.url, texts[1]))
    with httpx.stream("POST", f"{live.proxy_url}/v1/completions", timeout=300, json={
        "model": "smollm2", "prompt": texts[1], "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": True,
    }) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: {")]
    assert "".join(json.loads(event)["choices"][0]["text"] for event in events) == reference
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": texts[2]}], "max_tokens": MAX_TOKENS,
            "temperature": 0.0}
    direct = httpx.post(f"{prefill.url}/v1/chat/completions", json=chat, timeout=300).json()
    proxied = httpx.post(f"{live.proxy_url}/v1/chat/completions", json=chat, timeout=300).json()
    assert proxied["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]


def test_kv_through_the_shared_redis(setup, texts, proxy):
    live, _, _ = setup
    prefill, decode = live.instances
    reference = text_of(complete(prefill.url, texts[3], cache_salt="tier-test"))
    url = proxy(channel="tier")
    before = by_source(decode.url)
    loaded_before = metric(decode.url, "vllm:kvshelf_redis_loaded_bytes_total")
    answer = complete(url, texts[3])
    after = by_source(decode.url)
    assert text_of(answer) == reference
    assert after["local_compute"] - before["local_compute"] == 1
    assert metric(decode.url, "vllm:kvshelf_redis_loaded_bytes_total") > loaded_before


def test_kv_aware_routing_sends_a_repeated_prompt_to_the_instance_holding_it(setup, texts, proxy):
    live, _, _ = setup
    prefill, decode = live.instances
    complete(prefill.url, texts[4])  # only the prefill instance saves: it now holds this prompt
    url = proxy(colocated=True)
    served_by = [complete(url, texts[4]).headers["x-kvshelf-instance"] for _ in range(3)]
    assert served_by == [prefill.url] * 3
    round_robin = proxy(colocated=True, routing="round-robin")
    assert {complete(round_robin, texts[4]).headers["x-kvshelf-instance"] for _ in range(2)} == {
        prefill.url, decode.url}
    stats = httpx.get(f"{url}/proxy/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()
    assert stats["kv_aware_hits"] >= 3


def routed_held_tokens(proxy_url: str, prompt: str) -> int:
    """The tokens of `prompt` the proxy's routing decision found held, for a request vLLM then
    refuses (temperature -1): the decision is counted, nothing is computed or saved."""
    stats_url, admin = f"{proxy_url}/proxy/stats", {"Authorization": f"Bearer {ADMIN_KEY}"}
    before = httpx.get(stats_url, headers=admin, timeout=10).json()["held_tokens_total"]
    answer = httpx.post(f"{proxy_url}/v1/completions", json={"model": "smollm2", "prompt": prompt, "max_tokens": 1,
                                                             "temperature": -1.0}, timeout=60)
    assert answer.status_code == 400, answer.text
    return httpx.get(stats_url, headers=admin, timeout=10).json()["held_tokens_total"] - before


def until(condition, what: str, patience_s: float = 120.0) -> None:
    """Wait for the event stream to arrive (a hang fails; time is not what is tested)."""
    deadline_s = time.monotonic() + patience_s
    while not condition():
        assert time.monotonic() < deadline_s, f"gave up waiting for {what}"
        time.sleep(0.2)


def test_kv_events_feed_the_proxys_index_as_asking_would_and_a_reset_empties_both(tmp_path, texts):
    """vLLM publishes kvshelf's chunks (--kv-events-config); a proxy following them (--kv-index
    events) routes as one asking the instance; `reset_prefix_cache?reset_external=true` empties both."""
    instance = new_instance("both")
    events_port = free_port()
    events_config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}"}
    argv = instance_argv(instance, "1GiB", None, ["--max-model-len", "2048", "--kv-events-config",
                                                  json.dumps(events_config)])
    env = {**instance_env(None), "VLLM_SERVER_DEV_MODE": "1"}  # for /reset_prefix_cache
    processes = [start_process(argv, tmp_path / "instance", env)]
    try:
        wait_healthy(instance.url, processes[0], tmp_path / "instance")
        proxies = {}
        for kv_index in ("events", "ask"):
            port = free_port()
            proxy_argv_ = [sys.executable, "-m", "kvshelf.cli", "proxy", "--port", str(port), "--kv-index", kv_index,
                           "--instance", f"{instance.spec},events=tcp://127.0.0.1:{events_port}"]
            log = tmp_path / f"proxy-{kv_index}"
            processes.append(start_process(proxy_argv_, log, dict(os.environ, KVSHELF_PROXY_ADMIN_KEY=ADMIN_KEY)))
            proxies[kv_index] = f"http://127.0.0.1:{port}"
            wait_healthy(proxies[kv_index], processes[-1], log, timeout_s=60)
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        until(lambda: httpx.get(f"{proxies['events']}/proxy/stats", headers=admin, timeout=10).json()[
            "kv_index"]["ready_instances"] == 1, "the proxy's index to start")
        document = texts[6]
        complete(instance.url, document)  # saved when its prefill ends
        complete(instance.url, texts[7][:50])  # the save's events go out with a later step
        held = routed_held_tokens(proxies["ask"], document)
        assert held > 0
        until(lambda: routed_held_tokens(proxies["events"], document) == held, "the index to learn the document")
        reset = httpx.post(f"{instance.url}/reset_prefix_cache", params={"reset_external": "true"}, timeout=300)
        assert reset.status_code == 200, reset.text
        complete(instance.url, texts[7][:60])  # the reset's events go out with a later step
        assert routed_held_tokens(proxies["ask"], document) == 0
        until(lambda: routed_held_tokens(proxies["events"], document) == 0, "the index to learn of the reset")
        stats = httpx.get(f"{proxies['events']}/proxy/stats", headers=admin, timeout=10).json()
        assert stats["kv_index"]["answers"]["ask"] == 0
    finally:
        for process in processes:
            stop(process)


def test_a_dead_prefill_instance_is_routed_around(setup, texts):
    """Last in the module: it kills the prefill instance."""
    live, _, _ = setup
    prefill, decode = live.instances
    references = [text_of(complete(prefill.url, text, cache_salt="reference")) for text in texts[5:8]]
    answers: list = [None] * 3

    def ask(index):
        try:
            answers[index] = complete(live.proxy_url, texts[5 + index])
        except AssertionError as exc:  # a non-200 answer
            answers[index] = exc

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    live.processes["prefill-0"].kill()
    for thread in threads:
        thread.join(timeout=300)
    for answer, reference in zip(answers, references):
        if isinstance(answer, httpx.Response):
            assert text_of(answer) == reference
            assert answer.headers["x-kvshelf-instance"] == decode.url
        else:
            assert "503" in str(answer)
    later = complete(live.proxy_url, texts[5])  # with the prefill instance gone, decode computes it all
    assert text_of(later) == references[0] and later.headers["x-kvshelf-prefill"] == "none"
