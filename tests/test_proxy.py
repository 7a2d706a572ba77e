"""The proxy before stand-in vLLM instances: real aiohttp apps and ZeroMQ lookup endpoints on loopback."""

import argparse
import asyncio
import dataclasses
import json
import socket
import uuid
from contextlib import AsyncExitStack

import aiohttp
import numpy as np
import pytest
import zmq
import zmq.asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kvshelf.disagg.kv_index import InstanceIndex, Resync
from kvshelf.disagg.proxy import (
    KV_INDEXES,
    PROXY,
    SPEC_FORM,
    Instance,
    ProxyConfig,
    add_proxy_arguments,
    build_app,
    config_from_args,
    decode_request,
    kvshelf_params_of,
    parse_instance,
    prefill_request,
)
from kvshelf.keys import Namespace
from kvshelf.ports import sign_push_to
from kvshelf.security import Keyring
from tests.conftest import LAYOUT

TOKEN_IDS = [101, 7, 8, 9]  # what every stand-in's /tokenize answers
NO_HEALTH_ROUNDS = 3600.0  # only the round at start-up runs during a test
ADMIN_KEY = "operators-only"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
KEYRING = Keyring(b"the proxy tests' deployment secret")  # the proxy's and its instances' lookup ports'
DECODE_KV = "tcp://127.0.0.1:5999"


class FakeInstance:
    """A stand-in for vLLM: canned answers, every request kept as (path, JSON body)."""

    def __init__(self, name: str, completion_status: int = 200, hangs_up: bool = False) -> None:
        self.name = name
        self.num_events, self.event_gap_s = 2, 0.0  # a stream's events, and the pause before each after the first
        self.breaks_off = False  # a stream's connection drops after its first event
        self.completion_status = completion_status
        self.hangs_up = hangs_up  # on completions, while its health checks pass
        self.requests: list[tuple[str, dict]] = []
        self.second_event_allowed = asyncio.Event()  # a stream holds its second event back until then
        self.second_event_allowed.set()
        self.transfer_params: dict | None = None  # kv_transfer_params in a non-streamed answer (a prefill's)
        self.lookup: FakeLookup | None = None
        self.app = web.Application()
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_post("/tokenize", self._tokenize)
        self.app.router.add_post("/v1/completions", self._completion)
        self.app.router.add_post("/v1/chat/completions", self._completion)

    def events(self) -> list[bytes]:
        return [f'data: {{"text": "{index}", "from": "{self.name}"}}\n\n'.encode() for index in range(self.num_events)]

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    async def _tokenize(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, await request.json()))
        return web.json_response({"tokens": TOKEN_IDS, "count": len(TOKEN_IDS)})

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((request.path, body))
        if self.hangs_up:
            request.transport.close()
            return web.Response()
        if self.completion_status != 200:
            return web.json_response({"error": "boom"}, status=self.completion_status)
        if not body.get("stream"):
            answer = {"text": f"answer from {self.name}"}
            return web.json_response(answer if self.transfer_params is None
                                     else {**answer, "kv_transfer_params": self.transfer_params})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        first, *later = self.events()
        await response.write(first)
        if self.breaks_off:
            request.transport.close()
            return response
        await self.second_event_allowed.wait()
        for event in later:
            await asyncio.sleep(self.event_gap_s)
            await response.write(event)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


class FakeLookup:
    """A kvshelf routing-lookup endpoint holding `held_tokens` of every prompt; keeps the questions.
    A CURVE server with the deployment's server key, as kvshelf's (which also checks the client's key)."""

    def __init__(self, context: zmq.asyncio.Context, held_tokens: int) -> None:
        self.held_tokens = held_tokens
        self.questions: list[tuple[dict, list[int]]] = []
        self.socket = context.socket(zmq.REP)
        self.socket.curve_secretkey = KEYRING.curve_keys("server")[1]
        self.socket.curve_server = True
        self.socket.bind("tcp://127.0.0.1:*")
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            header, token_bytes = await self.socket.recv_multipart()
            self.questions.append((json.loads(header), np.frombuffer(token_bytes, dtype="<i4").tolist()))
            await self.socket.send(str(self.held_tokens).encode())

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.socket.close(linger=0)


class Cluster:
    """Stand-in instances on free loopback ports and a proxy before them; everything stops on exit."""

    async def __aenter__(self) -> "Cluster":
        self._stack = AsyncExitStack()
        self._zmq = zmq.asyncio.Context()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._stack.aclose()
        self._zmq.destroy(linger=0)

    async def instance(self, name: str, held_tokens: int | None = None, kv: str | None = None,
                       completion_status: int = 200, hangs_up: bool = False) -> FakeInstance:
        fake = FakeInstance(name, completion_status, hangs_up)
        server = await self._stack.enter_async_context(TestServer(fake.app, host="127.0.0.1"))
        options = [str(server.make_url("/"))]
        if held_tokens is not None:
            fake.lookup = FakeLookup(self._zmq, held_tokens)
            self._stack.push_async_callback(fake.lookup.close)
            options.append(f"lookup={fake.lookup.address}")
        if kv is not None:
            options.append(f"kv={kv}")
        fake.instance = parse_instance(",".join(options))
        fake.url = fake.instance.url
        return fake

    async def proxy(self, **config) -> TestClient:
        config = ProxyConfig(**{"health_interval_s": NO_HEALTH_ROUNDS, "admin_key": ADMIN_KEY, **config})
        app = build_app(config, KEYRING)
        return await self._stack.enter_async_context(TestClient(TestServer(app, host="127.0.0.1")))


async def read_stats(proxy: TestClient) -> dict:
    answer = await proxy.get("/proxy/stats", headers=ADMIN)
    assert answer.status == 200
    return await answer.json()


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dead_instance() -> Instance:
    """An instance on a loopback port where nothing listens."""
    return Instance(f"http://127.0.0.1:{unused_port()}")


# -- instance specs and configuration --


def test_parse_instance():
    assert parse_instance("http://10.0.0.1:8100") == Instance("http://10.0.0.1:8100")
    spec = " http://a:1/ , kv=tcp://b:3 ,lookup=tcp://c:2, events=tcp://c:4"
    assert parse_instance(spec) == Instance("http://a:1", lookup="tcp://c:2", kv="tcp://b:3", events="tcp://c:4")


@pytest.mark.parametrize(
    "spec, complaint",
    [
        ("a:8000", "'a:8000' is not http://host:port"),
        ("http://a", "'http://a' is not http://host:port"),
        ("http://a:port", "'http://a:port' is not http://host:port"),
        ("http://a:1/v1", "'http://a:1/v1' is not http://host:port"),
        ("http://a:1,lookup=a:2", "'a:2' is not tcp://host:port"),
        ("http://a:1,kv=tcp://a", "'tcp://a' is not tcp://host:port"),
        ("http://a:1,cache=tcp://a:2", "unknown or repeated option 'cache=tcp://a:2'"),
        ("http://a:1,kv=tcp://a:2,kv=tcp://a:3", "unknown or repeated option 'kv=tcp://a:3'"),
        ("http://a:1,events=tcp://a:2", "events= needs lookup= too"),
    ],
)
def test_a_bad_instance_spec_says_what_is_wrong_and_the_expected_form(spec, complaint):
    with pytest.raises(ValueError) as raised:
        parse_instance(spec)
    assert complaint in str(raised.value)
    assert SPEC_FORM in str(raised.value) or "add lookup=tcp://host:port" in str(raised.value)


@pytest.mark.parametrize(
    "config, complaint",
    [
        ({"prefill": (Instance("http://p:1"),), "decode": (Instance("http://d:1"),), "channel": "push"},
         "--channel push needs kv=tcp://host:port on every --decode; missing on ['http://d:1']"),
        ({"instances": (Instance("http://i:1"),), "decode": (Instance("http://d:1"),)}, "not both"),
        ({"prefill": (Instance("http://p:1"),)}, "at least one --prefill and one --decode"),
        ({}, "at least one --prefill and one --decode"),
        ({"instances": (Instance("http://i:1"), Instance("http://i:1"))}, "each instance URL may be given once"),
        ({"instances": (Instance("http://i:1"),), "routing": "random"}, "--routing must be one of"),
        ({"instances": (Instance("http://i:1"),), "kv_index": "guess"}, "--kv-index one of ('events', 'ask')"),
        ({"instances": (Instance("http://i:1"),), "timeout_s": 0}, "must be positive"),
    ],
)
def test_a_bad_config_says_how_to_fix_it(config, complaint):
    with pytest.raises(ValueError) as raised:
        ProxyConfig(**config)
    assert complaint in str(raised.value)


def test_config_from_command_line_and_environment():
    parser = argparse.ArgumentParser()
    add_proxy_arguments(parser)
    args = parser.parse_args(
        ["--prefill", "http://p:1,lookup=tcp://p:2", "--decode", "http://d:1,kv=tcp://d:3", "--decode", "http://e:1,kv=tcp://e:3",
         "--channel", "push", "--routing", "round-robin", "--kv-index", "ask"]
    )
    environ = {"KVSHELF_PROXY_API_KEY": "sesame", "KVSHELF_PROXY_ADMIN_KEY": "admin"}
    config = config_from_args(args, environ=environ)
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert config.prefill == (Instance("http://p:1", lookup="tcp://p:2"),)
    assert [instance.kv for instance in config.decode] == ["tcp://d:3", "tcp://e:3"]
    assert (config.channel, config.routing, config.kv_index) == ("push", "round-robin", "ask")
    assert (config.api_key, config.admin_key) == ("sesame", "admin")
    assert (config.health_interval_s, config.timeout_s) == (2.0, 600.0)
    colocated = parser.parse_args(["--instance", "http://i:1", "--api-key", "k", "--admin-key", "a"])
    from_options = config_from_args(colocated, environ={})
    assert (from_options.api_key, from_options.admin_key, from_options.kv_index) == ("k", "a", "events")


# -- the proxy at work --


@pytest.mark.parametrize("channel, kvshelf_params", [
    ("tier", {}), ("push", {"push_to": DECODE_KV, "push_to_sig": sign_push_to(KEYRING, DECODE_KV)})])
def test_disaggregated_sends_a_one_token_prefill_then_the_request_to_decode(channel, kvshelf_params):
    asyncio.run(_disaggregated(channel, kvshelf_params))


async def _disaggregated(channel: str, kvshelf_params: dict) -> None:
    async with Cluster() as cluster:
        prefill = await cluster.instance("prefill")
        decode = await cluster.instance("decode", kv=DECODE_KV)
        proxy = await cluster.proxy(prefill=(prefill.instance,), decode=(decode.instance,), channel=channel)
        body = {"model": "m", "prompt": "hello there", "max_tokens": 20, "n": 1}
        answer = await proxy.post("/v1/completions", json=body)
        assert answer.status == 200
        assert await answer.json() == {"text": "answer from decode"}
        assert (answer.headers["x-kvshelf-prefill"], answer.headers["x-kvshelf-instance"]) == (prefill.url, decode.url)
        one_token = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": {"kvshelf": kvshelf_params}}
        assert prefill.requests == [
            ("/tokenize", {"model": "m", "prompt": "hello there"}),
            ("/v1/completions", one_token),
        ]
        assert decode.requests == [("/v1/completions", body)]


def test_a_stream_is_relayed_event_by_event():
    asyncio.run(_streaming())


async def _streaming() -> None:
    async with Cluster() as cluster:
        prefill = await cluster.instance("prefill")
        decode = await cluster.instance("decode")
        proxy = await cluster.proxy(prefill=(prefill.instance,), decode=(decode.instance,), routing="round-robin")
        body = {"model": "m", "prompt": "hi", "max_tokens": 5, "stream": True}
        body["stream_options"] = {"include_usage": True}
        decode.second_event_allowed.clear()
        answer = await proxy.post("/v1/completions", json=body)
        assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/event-stream")
        first, second = decode.events()
        # The decode instance sends its second event only once the client has the first.
        assert await asyncio.wait_for(answer.content.readuntil(b"\n\n"), timeout=10) == first
        decode.second_event_allowed.set()
        assert await answer.content.read() == second + b"data: [DONE]\n\n"
        one_token = {"model": "m", "prompt": "hi", "max_tokens": 1, "stream": False, "n": 1,
                     "kv_transfer_params": {"kvshelf": {}}}
        assert prefill.requests == [("/v1/completions", one_token)]
        assert decode.requests == [("/v1/completions", body)]


def test_kv_aware_routing_picks_the_instance_holding_most_and_goes_in_turn_on_ties():
    asyncio.run(_kv_aware())


async def _kv_aware() -> None:
    async with Cluster() as cluster:
        a = await cluster.instance("a", held_tokens=10)
        b = await cluster.instance("b", held_tokens=30)
        c = await cluster.instance("c")  # no lookup endpoint: holds nothing as far as routing knows
        proxy = await cluster.proxy(instances=(a.instance, b.instance, c.instance))

        async def served_by(body: dict, path: str = "/v1/completions") -> str:
            answer = await proxy.post(path, json=body)
            assert answer.status == 200
            return answer.headers["x-kvshelf-instance"]

        assert await served_by({"model": "m", "prompt": "doc", "cache_salt": "tenant-a"}) == b.url
        assert a.lookup.questions == b.lookup.questions == [({"cache_salt": "tenant-a"}, TOKEN_IDS)]
        a.lookup.held_tokens = 30
        assert [await served_by({"prompt": [5, 6, 7]}) for _ in range(2)] == [a.url, b.url]
        assert a.lookup.questions[-1] == ({"cache_salt": None}, [5, 6, 7])
        a.lookup.held_tokens = b.lookup.held_tokens = 0
        messages = [{"role": "user", "content": "hi"}]
        assert [await served_by({"model": "m", "messages": messages}, "/v1/chat/completions")
                for _ in range(3)] == [c.url, a.url, b.url]
        assert a.requests[-1] == ("/tokenize", {"model": "m", "messages": messages, "add_generation_prompt": True})

        stats = await read_stats(proxy)
        reasons = {"kv-aware": 1, "kv-aware-tie": 2, "no-hit": 3, "tokenize-failed": 0, "round-robin": 0}
        assert stats["decisions"] == reasons
        assert (stats["kv_aware_hits"], stats["kv_aware_fallbacks"]) == (3, 3)
        # 30 + 30 + 30 held tokens for the hits, 0 for the three misses
        assert (stats["held_tokens_total"], stats["held_tokens_mean"]) == (90, 15.0)
        assert stats["instances"][b.url] == {"role": "colocated", "healthy": True, "requests": 3, "failures": 0}


def test_a_silent_lookup_endpoint_counts_0_and_holds_nothing_up():
    asyncio.run(_silent_lookup())


async def _silent_lookup() -> None:
    async with Cluster() as cluster:
        a = await cluster.instance("a", held_tokens=10)
        b = await cluster.instance("b")
        silent_b = dataclasses.replace(b.instance, lookup=f"tcp://127.0.0.1:{unused_port()}")
        proxy = await cluster.proxy(instances=(silent_b, a.instance))
        for _ in range(2):
            answer = await proxy.post("/v1/completions", json={"prompt": [1, 2, 3]})
            assert answer.headers["x-kvshelf-instance"] == a.url


def test_failed_prefills_fall_back_to_the_decode_instance_and_a_failed_decode_is_retried():
    asyncio.run(_failures())


async def _failures() -> None:
    async with Cluster() as cluster:
        dead = dead_instance()
        hanging_up = await cluster.instance("hanging-up", hangs_up=True)
        failing_prefill = await cluster.instance("failing-prefill", completion_status=500)
        failing_decode = await cluster.instance("failing-decode", completion_status=503)
        decode = await cluster.instance("decode")
        prefill = (dead, hanging_up.instance, failing_prefill.instance)
        proxy = await cluster.proxy(prefill=prefill, decode=(failing_decode.instance, decode.instance))
        body = {"model": "m", "prompt": "hello", "max_tokens": 3}
        answer = await proxy.post("/v1/completions", json=body)
        assert answer.status == 200 and await answer.json() == {"text": "answer from decode"}
        assert (answer.headers["x-kvshelf-prefill"], answer.headers["x-kvshelf-instance"]) == ("none", decode.url)
        assert failing_decode.requests == decode.requests == [("/v1/completions", body)]
        stats = await read_stats(proxy)
        assert stats["instances"][dead.url]["healthy"] is False
        failures = {url: instance["failures"] for url, instance in stats["instances"].items()}
        failed = [hanging_up, failing_prefill, failing_decode, decode]
        assert [failures[instance.url] for instance in failed] == [1, 1, 1, 0]
        assert stats["prefill_fallbacks"] == 1


def test_without_a_healthy_decode_instance_the_answer_is_503():
    asyncio.run(_no_decode())


async def _no_decode() -> None:
    async with Cluster() as cluster:
        prefill = await cluster.instance("prefill")
        proxy = await cluster.proxy(prefill=(prefill.instance,), decode=(dead_instance(),))
        answer = await proxy.post("/v1/completions", json={"model": "m", "prompt": "hello"})
        assert answer.status == 503
        assert await answer.json() == {
            "error": {"message": "no healthy decode instance", "type": "service_unavailable", "code": 503}
        }
        health = await proxy.get("/health")
        assert health.status == 503
        assert await health.json() == {"healthy_instances": {"prefill": 1, "decode": 0}}


def test_an_api_key_guards_every_endpoint_but_health():
    asyncio.run(_api_key())


async def _api_key() -> None:
    async with Cluster() as cluster:
        instance = await cluster.instance("only")
        proxy = await cluster.proxy(instances=(instance.instance,), api_key="sesame")
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            answer = await proxy.get("/v1/models", headers=headers)
            assert answer.status == 401
            assert (await answer.json())["error"]["type"] == "authentication_error"
        assert (await proxy.get("/health")).status == 200
        key = {"Authorization": "Bearer sesame"}
        assert (await proxy.get("/proxy/stats", headers=key)).status == 401  # the admin key's alone
        models = await proxy.get("/v1/models", headers=key)
        assert await models.json() == {"data": [{"id": "m"}]}
        assert models.headers["x-kvshelf-instance"] == instance.url
        bad_json = await proxy.post("/v1/completions", data=b"{not json", headers=key)
        assert bad_json.status == 400
        assert (await bad_json.json())["error"]["type"] == "invalid_request_error"


def test_the_prefill_request_asks_for_one_token_whatever_the_client_asked():
    body = {"model": "m", "prompt": "p", "max_tokens": 64, "min_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}, "n": 2, "max_completion_tokens": 64}
    request = prefill_request(body, {"push_to": "tcp://d:1"})
    assert request["max_tokens"] == request["max_completion_tokens"] == 1 and request["n"] == 1
    assert not request["stream"] and "stream_options" not in request and "min_tokens" not in request
    assert request["kv_transfer_params"] == {"kvshelf": {"push_to": "tcp://d:1"}}
    assert body["max_tokens"] == 64 and body["min_tokens"] == 8  # the client's own request is left as it was


def test_a_stream_longer_than_the_timeout_goes_on_while_its_events_keep_coming():
    asyncio.run(_long_stream())


async def _long_stream() -> None:
    async with Cluster() as cluster:
        prefill, decode = await cluster.instance("prefill"), await cluster.instance("decode")
        decode.num_events, decode.event_gap_s = 6, 0.2  # 1 s in all, each event within the 0.5 s timeout
        proxy = await cluster.proxy(prefill=(prefill.instance,), decode=(decode.instance,), timeout_s=0.5)
        answer = await proxy.post("/v1/completions", json={"model": "m", "prompt": "hi", "stream": True})
        assert await answer.content.read() == b"".join(decode.events()) + b"data: [DONE]\n\n"
        stats = await read_stats(proxy)
        assert stats["instances"][decode.url]["healthy"] and stats["instances"][decode.url]["failures"] == 0


def test_a_stream_that_breaks_off_reaches_the_client_broken_not_short():
    asyncio.run(_broken_stream())


async def _broken_stream() -> None:
    async with Cluster() as cluster:
        prefill, decode = await cluster.instance("prefill"), await cluster.instance("decode")
        decode.breaks_off = True
        proxy = await cluster.proxy(prefill=(prefill.instance,), decode=(decode.instance,))
        answer = await proxy.post("/v1/completions", json={"model": "m", "prompt": "hi", "stream": True})
        assert answer.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await answer.content.read()


# -- what the prefill instance says to the decode instance --


def test_the_prefill_answers_kvshelf_params_reach_the_decode_request():
    asyncio.run(_handed_over())


async def _handed_over() -> None:
    async with Cluster() as cluster:
        prefill = await cluster.instance("prefill")
        decode = await cluster.instance("decode")
        prefill.transfer_params = {"kvshelf": {"handed_over": 12, "handed_over_sig": "sig"}, "other": {"x": 1}}
        proxy = await cluster.proxy(prefill=(prefill.instance,), decode=(decode.instance,), routing="round-robin")
        body = {"model": "m", "prompt": "hi", "kv_transfer_params": {"kvshelf": {"mine": True}, "theirs": 2}}
        answer = await proxy.post("/v1/completions", json=body)
        assert await answer.json() == {"text": "answer from decode"}
        expected = {"kvshelf": {"mine": True, "handed_over": 12, "handed_over_sig": "sig"}, "theirs": 2}
        assert decode.requests == [("/v1/completions", {**body, "kv_transfer_params": expected})]


@pytest.mark.parametrize("payload, params", [
    (b'{"kv_transfer_params": {"kvshelf": {"handed_over": 4}}}', {"handed_over": 4}),
    (b'{"kv_transfer_params": null}', {}),
    (b'{"kv_transfer_params": {"kvshelf": [1]}}', {}),
    (b"[]", {}),
    (b"not json", {}),
])
def test_kvshelf_params_of_a_prefill_answer(payload, params):
    assert kvshelf_params_of(payload) == params
    assert decode_request({"prompt": "p"}, {}) == {"prompt": "p"}


# -- the event index --


def stored(tier: str, digests: list[bytes]) -> dict:
    return {"type": "BlockStored", "block_hashes": digests, "ownership": f"kvshelf-{tier}", "token_ids": []}


def removed(tier: str, digests: list[bytes]) -> dict:
    return {"type": "BlockRemoved", "block_hashes": digests, "ownership": f"kvshelf-{tier}"}


def test_an_instance_index_follows_its_own_tiers_and_starts_over_on_a_gap():
    index = InstanceIndex(Namespace("m", LAYOUT), chunk_size=4)
    a, b, c = (bytes([n]) * 32 for n in range(3))
    vllm_gpu_block = {"type": "BlockStored", "block_hashes": [c], "medium": "GPU"}
    index.apply(7, [stored("memory", [a, b]), stored("disk", [a]), stored("redis", [c]), vllm_gpu_block,
                    {"type": "AllBlocksCleared"}, "not an event", stored("disk", [b"short", 5])])
    assert index.held == {a: 0b011, b: 0b001}
    index.apply(8, [removed("memory", [a, b]), removed("inbox", [a])])
    assert index.held == {a: 0b010}
    assert index.held_chunks([[a, b], [a, c]]) == 1 and index.held_chunks([[b, a]]) == 0
    with pytest.raises(Resync):
        index.apply(10, [])
    with pytest.raises(Resync):
        index.apply(11, {"events": "not a list"})


def test_the_event_index_answers_as_asking_would_from_a_real_publisher(tmp_path):
    asyncio.run(_event_index(tmp_path))


PATIENCE_S = 60.0  # how long to wait for the index to catch up before failing (a hang, not a timing check)


async def until(condition, what: str) -> None:
    for _ in range(int(PATIENCE_S / 0.05)):
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


async def _event_index(tmp_path) -> None:
    from vllm.distributed.kv_events import KVEventBatch, ZmqEventPublisher

    from kvshelf import Shelf, load_config
    from kvshelf.integrations.vllm.events import SchedulerEvents, worker_events
    from kvshelf.integrations.vllm.lookup import LookupClient, LookupServer, RoutingLookupServer, lookup_address
    from kvshelf.ports import free_port
    from tests.conftest import CHUNK_SIZE, random_kv

    config = load_config(environ={}, chunk_size=CHUNK_SIZE, disk_path=str(tmp_path / "disk"),
                         security_key="the event index test's deployment secret")
    namespace = Namespace("index-model", LAYOUT)
    salted = dataclasses.replace(namespace, cache_salt="tenant")
    doc_a, doc_b = list(range(1000, 1014)), list(range(2000, 2010))
    with Shelf(config) as earlier:  # doc_a's full chunks are on disk before the proxy starts
        earlier.save(doc_a, random_kv(len(doc_a)), salted)
    shelf = Shelf(config)
    engine_id = f"index-{uuid.uuid4()}"
    lookup_address_tcp = f"tcp://127.0.0.1:{free_port()}"
    events_port = free_port()
    servers = [LookupServer(shelf, lookup_address(engine_id, 0)),
               RoutingLookupServer(lookup_address_tcp, namespace, CHUNK_SIZE, LookupClient(engine_id, 1, 5.0),
                                   shelf.keyring)]
    publisher = ZmqEventPublisher(0, endpoint=f"tcp://*:{events_port}")
    scheduler_events = SchedulerEvents()

    def step() -> None:
        """What vLLM does once a step: the workers' events to the scheduler, then published."""
        scheduler_events.add(worker_events(shelf))
        if events := scheduler_events.take():
            publisher.publish(KVEventBatch(ts=0.0, events=events))

    try:
        async with Cluster() as cluster:
            fake = await cluster.instance("indexed")
            spec = f"{fake.url},lookup={lookup_address_tcp},events=tcp://127.0.0.1:{events_port}"
            instance = parse_instance(spec)
            clients = {}
            for kv_index in KV_INDEXES:
                app = build_app(ProxyConfig(instances=(instance,), kv_index=kv_index, admin_key=ADMIN_KEY,
                                            health_interval_s=NO_HEALTH_ROUNDS), shelf.keyring)
                clients[kv_index] = await cluster._stack.enter_async_context(TestClient(TestServer(app)))
            proxies = {kv_index: client.app[PROXY] for kv_index, client in clients.items()}
            candidates = proxies["events"].pools["colocated"]

            async def held(kv_index: str, tokens: list[int], salt: str | None = "tenant") -> int:
                return (await proxies[kv_index].held_by(candidates, tokens, salt))[fake.url]

            async def ready() -> bool:
                return (await read_stats(clients["events"]))["kv_index"]["ready_instances"] == 1

            await until(ready, "the index to start")
            prompts = [doc_a, doc_a[:9], doc_a + [1], doc_b, doc_b[:8] + [5, 5], [7] * 3]
            # The index started from what the instance held (doc_a on disk); the salt is part of the key.
            assert [await held("events", prompt) for prompt in prompts] == [12, 8, 12, 0, 0, 0]
            assert await held("events", doc_a, None) == 0
            shelf.save(doc_b, random_kv(len(doc_b)), salted)
            step()

            async def index_has_doc_b() -> bool:
                return await held("events", doc_b) == 8

            await until(index_has_doc_b, "the index to learn doc_b")
            expected = [await held("ask", prompt) for prompt in prompts]
            assert expected == [12, 8, 12, 8, 8, 0]
            assert [await held("events", prompt) for prompt in prompts] == expected
            assert shelf.clear()
            step()

            async def index_emptied() -> bool:
                return await held("events", doc_a) == await held("events", doc_b) == 0

            await until(index_emptied, "the index to learn of the reset")
            assert [await held("ask", prompt) for prompt in prompts] == [0] * len(prompts)
            stats = await read_stats(clients["events"])
            assert stats["kv_index"]["answers"]["ask"] == 0 and stats["kv_index"]["mode"] == "events"
    finally:
        publisher.shutdown()
        for server in servers:
            server.close()
        shelf.close()
