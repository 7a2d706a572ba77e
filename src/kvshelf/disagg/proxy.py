"""`kvshelf proxy`: one OpenAI-compatible endpoint in front of several vLLM instances.

Disaggregated (`--prefill` and `--decode`), a completion request goes:
  1. to a prefill instance chosen by the routing policy, cut to one token and with kv_transfer_params
     telling kvshelf where the KV goes: `push_to` the chosen decode instance's kv= address, or nowhere
     when a shared tier such as Redis holds it;
  2. then to a decode instance chosen in turn, which finds the prompt's KV and answers; its answer,
     streamed or not, goes back to the client. The request goes unchanged but for what the prefill
     instance's answer gave in `kv_transfer_params.kvshelf` (such as the tokens it is still handing
     over, signed), which the proxy merges into the request's `kv_transfer_params.kvshelf`.
Colocated (`--instance`), the chosen instance answers the whole request.

The proxy holds the deployment secret (kvshelf's `security.key`, `KVSHELF_SECURITY_KEY` or key
file, as the instances): with it, it reaches the instances' CURVE lookup ports (which answer no
one without it) and signs each `push_to` it hands a prefill instance (`push_to_sig`), since a
prefill instance pushes only to a destination so signed or to its own `pd.push_to`.

The prefill instance (or the colocated one) is chosen kv-aware: the prompt is tokenized once, the
proxy learns how many leading tokens of it every candidate's kvshelf holds, and the one holding the
most wins; ties and misses go in turn. With `--kv-index events` (the default) the proxy knows that
itself for every instance given events=: it follows the instance's vLLM KV cache events and
computes the prompt's chunk keys (see kvshelf.disagg.kv_index); it asks the others over ZeroMQ
(lookup=), as it asks every instance with `--kv-index ask`. Events are unauthenticated: a forged
one can only cost a slower answer, never a wrong one.

A failed prefill is retried on another prefill instance, and when none is left the decode instance
computes the prefill itself. A failed decode is retried while the client has not yet received a
byte. An instance that fails a request or a health check leaves the rotation until a health check
passes.

Who may call what: with --api-key, every endpoint but /health needs `Authorization: Bearer <key>`;
that key is the clients'. /proxy/stats is the operators': it needs the separate --admin-key
(`Bearer <admin key>`; the client key does not open it), and without an admin key configured it
answers 403 saying so. The stats are aggregates only (counts per routing reason; per instance its
requests, failures and health; held-token totals and means), never one request's routing, prompt,
held tokens or salt: one client must not learn from them what another sent.
"""

import argparse
import asyncio
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import zmq
import zmq.asyncio
from aiohttp import web

from kvshelf.admin import FleetAdmin, bearer_is
from kvshelf.config import load_config
from kvshelf.disagg.kv_index import EventIndex
from kvshelf.errors import ConfigError
from kvshelf.ports import secure_client, sign_push_to
from kvshelf.security import Keyring

logger = logging.getLogger(__name__)

ROUTINGS = ("kv-aware", "round-robin")
CHANNELS = ("tier", "push")
COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
API_KEY_ENV = "KVSHELF_PROXY_API_KEY"  # both in config.NON_CONFIG_ENV
ADMIN_KEY_ENV = "KVSHELF_PROXY_ADMIN_KEY"
STATS_PATH = "/proxy/stats"
SPEC_FORM = ("http://host:port[,lookup=tcp://host:port][,kv=tcp://host:port][,events=tcp://host:port]"
             "[,admin=http://host:port]")
KV_INDEXES = ("events", "ask")
INSTANCE_OPTIONS = {"lookup": ("tcp",), "kv": ("tcp",), "events": ("tcp",), "admin": ("http", "https")}
LOOKUP_TIMEOUT_S = 0.5
TOKENIZE_TIMEOUT_S = 10.0  # routing waits this long at most; then it goes in turn
HEALTH_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0
MAX_BODY_BYTES = 64 * 2**20  # long prompts and inline images exceed aiohttp's 1 MiB default
# Chat fields that change the prompt's tokens, so the tokenize call must see them too.
CHAT_TEMPLATE_FIELDS = ("tools", "chat_template", "chat_template_kwargs", "continue_final_message")
KV_AWARE_HITS = ("kv-aware", "kv-aware-tie")
KV_AWARE_FALLBACKS = ("no-hit", "tokenize-failed")


@dataclass(frozen=True)
class Instance:
    url: str
    lookup: str | None = None  # its kvshelf routing-lookup endpoint (ZeroMQ REP)
    kv: str | None = None  # a decode instance's kvshelf receive address, for the push channel
    events: str | None = None  # its vLLM KV cache event publisher (--kv-events-config endpoint), for the index
    admin: str | None = None  # its kvshelf admin API (admin.address), for the fleet's admin API and dashboard


def parse_instance(spec: str) -> Instance:
    """`SPEC_FORM` as an Instance."""
    url, *options = [part.strip() for part in spec.split(",")]
    addresses: dict[str, str] = {}
    for option in options:
        name, _, address = option.partition("=")
        if name not in INSTANCE_OPTIONS or name in addresses:
            raise ConfigError(f"instance {spec!r}: unknown or repeated option {option!r}; expected {SPEC_FORM}")
        addresses[name] = _address(spec, address, *INSTANCE_OPTIONS[name])
    if "events" in addresses and "lookup" not in addresses:
        raise ConfigError(f"instance {spec!r}: events= needs lookup= too (the proxy learns the instance's "
                          "namespace and what it holds there); add lookup=tcp://host:port")
    return Instance(_address(spec, url, "http", "https"), **addresses)


def _address(spec: str, address: str, *schemes: str) -> str:
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = None
    if parts.scheme not in schemes or not parts.hostname or port is None or parts.path.strip("/") or parts.query:
        raise ConfigError(f"instance {spec!r}: {address!r} is not {schemes[0]}://host:port; expected {SPEC_FORM}")
    return address.rstrip("/")


@dataclass(frozen=True)
class ProxyConfig:
    prefill: tuple[Instance, ...] = ()
    decode: tuple[Instance, ...] = ()
    instances: tuple[Instance, ...] = ()  # colocated mode: each answers whole requests
    routing: str = "kv-aware"
    channel: str = "tier"
    kv_index: str = "events"  # events: follow instances' KV events where given events=; ask: ask every time
    health_interval_s: float = 2.0
    timeout_s: float = 600.0
    api_key: str | None = None  # the clients'
    admin_key: str | None = None  # the operators': opens /proxy/stats

    def __post_init__(self) -> None:
        if self.admin_key is not None and self.admin_key == self.api_key:
            raise ConfigError("--admin-key must differ from --api-key: every client holds the API key, "
                              "and the admin key opens /proxy/stats; choose another admin key")
        if self.instances and (self.prefill or self.decode):
            raise ConfigError("give either --instance (colocated) or --prefill and --decode (disaggregated), not both")
        if not self.instances and not (self.prefill and self.decode):
            raise ConfigError("give at least one --prefill and one --decode (or --instance, to serve colocated)")
        if self.routing not in ROUTINGS or self.channel not in CHANNELS or self.kv_index not in KV_INDEXES:
            raise ConfigError(f"--routing must be one of {ROUTINGS}, --channel one of {CHANNELS} and --kv-index "
                              f"one of {KV_INDEXES}")
        if self.health_interval_s <= 0 or self.timeout_s <= 0:
            raise ConfigError("--health-interval and --timeout must be positive numbers of seconds")
        urls = [instance.url for pool in self.pools.values() for instance in pool]
        if len(set(urls)) != len(urls):
            raise ConfigError(f"each instance URL may be given once, got {urls}")
        missing_kv = [instance.url for instance in self.decode if instance.kv is None]
        if self.channel == "push" and missing_kv:
            raise ConfigError(f"--channel push needs kv=tcp://host:port on every --decode; missing on {missing_kv}")

    @property
    def pools(self) -> dict[str, tuple[Instance, ...]]:
        if self.instances:
            return {"colocated": self.instances}
        return {"prefill": self.prefill, "decode": self.decode}


@dataclass(slots=True, eq=False)
class Upstream:
    """One instance's place in the rotation and its counts."""

    instance: Instance
    role: str
    healthy: bool = True
    num_requests: int = 0
    num_failures: int = 0  # failed requests; failed health checks only take it out of rotation

    @property
    def url(self) -> str:
        return self.instance.url

    def as_json(self) -> dict:
        counts = {"requests": self.num_requests, "failures": self.num_failures}
        return {"role": self.role, "healthy": self.healthy, **counts}


@dataclass(slots=True)
class Decision:
    upstream: Upstream
    held_tokens: int
    reason: str  # kv-aware | kv-aware-tie | no-hit | tokenize-failed | round-robin


class Proxy:
    """The proxy's state (instances, rotation, decisions) and its request handlers."""

    def __init__(self, config: ProxyConfig, keyring: Keyring) -> None:
        self.config = config
        self._keyring = keyring  # the deployment secret: opens the lookup ports, signs push_to
        self.pools = {role: [Upstream(instance, role) for instance in pool] for role, pool in config.pools.items()}
        self._cursors: Counter[str] = Counter()  # pool -> index of the instance whose turn is next
        self._reasons = Counter(dict.fromkeys((*KV_AWARE_HITS, *KV_AWARE_FALLBACKS, "round-robin"), 0))
        # Sums only: one decision's held tokens would tell a stats reader what a client's prompt shares.
        self._num_held_tokens = 0
        self._num_prefill_fallbacks = 0
        self._num_answers = Counter(dict.fromkeys(KV_INDEXES, 0))  # instances' held tokens: from the index, or asked
        self._index: EventIndex | None = None

    # -- lifecycle --

    async def start(self, app: web.Application) -> None:
        # No cap on connections: each client stream holds one, and the instances set their own limits.
        # --timeout bounds the wait for each piece of an answer, not the whole of it: a long
        # generation streams for as long as it takes.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=self.config.timeout_s)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
        self._zmq = zmq.asyncio.Context()
        self._health_task = asyncio.create_task(self._watch_health())
        followed = [upstream.instance for pool in self.pools.values() for upstream in pool if upstream.instance.events]
        if self.config.kv_index == "events" and self.config.routing == "kv-aware" and followed:
            self._index = EventIndex(self._keyring, self._zmq)
            for instance in followed:
                self._index.follow(instance.url, instance.lookup, instance.events)

    async def stop(self, app: web.Application) -> None:
        self._health_task.cancel()
        await asyncio.gather(self._health_task, return_exceptions=True)
        if self._index is not None:
            await self._index.stop()
        await self._session.close()
        self._zmq.destroy(linger=0)

    # -- health --

    async def _watch_health(self) -> None:
        while True:
            try:
                upstreams = [upstream for pool in self.pools.values() for upstream in pool]
                await asyncio.gather(*(self._check_health(upstream) for upstream in upstreams))
            except Exception:  # noqa: BLE001 - the watch must outlive any one bad round
                logger.exception("kvshelf proxy: a round of health checks failed")
            await asyncio.sleep(self.config.health_interval_s)

    async def _check_health(self, upstream: Upstream) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
            async with self._session.get(f"{upstream.url}/health", timeout=timeout) as answer:
                healthy, why = answer.status == 200, f"health check answered HTTP {answer.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            healthy, why = False, f"health check failed: {describe(exc)}"
        self._set_health(upstream, healthy, why)

    def _set_health(self, upstream: Upstream, healthy: bool, why: str) -> None:
        if upstream.healthy != healthy:
            change = "back in rotation" if healthy else "out of rotation"
            logger.warning("kvshelf proxy: %s instance %s %s (%s)", upstream.role, upstream.url, change, why)
        upstream.healthy = healthy

    def _failed(self, upstream: Upstream, why: str) -> None:
        upstream.num_failures += 1
        self._set_health(upstream, False, why)

    # -- routing --

    def _healthy(self, pool: str, tried: Sequence[Upstream] = ()) -> list[Upstream]:
        return [upstream for upstream in self.pools[pool] if upstream.healthy and upstream not in tried]

    def _next_in_turn(self, pool: str, candidates: list[Upstream]) -> Upstream:
        """The first of `candidates` from the pool's cursor on; the cursor then moves past it."""
        members = self.pools[pool]
        start = self._cursors[pool]
        chosen = next(upstream for upstream in members[start:] + members[:start] if upstream in candidates)
        self._cursors[pool] = (members.index(chosen) + 1) % len(members)
        return chosen

    def _in_turn(self, pool: str) -> Iterator[Upstream]:
        """Healthy instances of a pool in turn, each once; health is looked at anew before each."""
        tried: list[Upstream] = []
        while candidates := self._healthy(pool, tried):
            tried.append(self._next_in_turn(pool, candidates))
            yield tried[-1]

    def _by_policy(self, pool: str, held: dict[str, int] | None) -> Iterator[Upstream]:
        """Healthy instances of a pool in the routing policy's order, each once, every choice recorded."""
        tried: list[Upstream] = []
        while candidates := self._healthy(pool, tried):
            decision = self._choose(pool, candidates, held)
            self._reasons[decision.reason] += 1
            self._num_held_tokens += decision.held_tokens
            tried.append(decision.upstream)
            yield decision.upstream

    def _choose(self, pool: str, candidates: list[Upstream], held: dict[str, int] | None) -> Decision:
        if held is None:
            reason = "round-robin" if self.config.routing == "round-robin" else "tokenize-failed"
            return Decision(self._next_in_turn(pool, candidates), 0, reason)
        best = max(held.get(upstream.url, 0) for upstream in candidates)
        tied = [upstream for upstream in candidates if held.get(upstream.url, 0) == best]
        reason = "no-hit" if best == 0 else "kv-aware" if len(tied) == 1 else "kv-aware-tie"
        return Decision(self._next_in_turn(pool, tied), best, reason)

    async def _held_tokens(self, path: str, body: dict, pool: str) -> dict[str, int] | None:
        """Leading prompt tokens each healthy instance of the pool holds, by URL; None: go in turn."""
        candidates = self._healthy(pool)
        if self.config.routing != "kv-aware" or not candidates:
            return None
        token_ids = await self._prompt_token_ids(path, body, candidates[0])
        if token_ids is None:
            return None
        return await self.held_by(candidates, token_ids, body.get("cache_salt"))

    async def held_by(self, candidates: Sequence[Upstream], token_ids: list[int], cache_salt: str | None
                      ) -> dict[str, int]:
        """Leading tokens of the prompt each candidate holds, by URL: from the event index where it is
        ready, else asked."""
        urls = [upstream.url for upstream in candidates]
        held = self._index.held_tokens(urls, token_ids, cache_salt) if self._index is not None else {}
        to_ask = [upstream for upstream in candidates if upstream.url not in held]
        answers = await asyncio.gather(*(self._lookup(upstream, token_ids, cache_salt) for upstream in to_ask))
        self._num_answers["events"] += len(held)
        self._num_answers["ask"] += len(to_ask)
        return {**held, **{upstream.url: num_tokens for upstream, num_tokens in zip(to_ask, answers)}}

    async def _prompt_token_ids(self, path: str, body: dict, upstream: Upstream) -> list[int] | None:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(type(token) is int for token in prompt):
            # Ids no vocabulary has: vLLM answers those itself (400); route them in turn.
            return prompt if all(0 <= token < 2**31 for token in prompt) else None
        model = {"model": body["model"]} if "model" in body else {}
        if path == COMPLETIONS and isinstance(prompt, str):
            return await self._tokenize(upstream, {**model, "prompt": prompt})
        if path == CHAT_COMPLETIONS and isinstance(body.get("messages"), list):
            template = {name: body[name] for name in CHAT_TEMPLATE_FIELDS if name in body}
            add_generation_prompt = body.get("add_generation_prompt", True)
            chat = {**model, "messages": body["messages"], "add_generation_prompt": add_generation_prompt}
            return await self._tokenize(upstream, {**chat, **template})
        return None  # a batch of prompts, or none: no one instance suits them

    async def _tokenize(self, upstream: Upstream, request: dict) -> list[int] | None:
        try:
            timeout = aiohttp.ClientTimeout(total=TOKENIZE_TIMEOUT_S)
            async with self._session.post(f"{upstream.url}/tokenize", json=request, timeout=timeout) as answer:
                if answer.status >= 500:
                    self._failed(upstream, f"/tokenize answered HTTP {answer.status}")
                answer.raise_for_status()
                return list((await answer.json())["tokens"])
        except (aiohttp.ClientResponseError, ValueError, KeyError, TypeError) as exc:  # up, but no tokens
            problem = describe(exc)
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = describe(exc)
            self._failed(upstream, f"/tokenize failed: {problem}")
        logger.warning("kvshelf proxy: tokenizing on %s failed (%s); routing in turn", upstream.url, problem)
        return None

    async def _lookup(self, upstream: Upstream, token_ids: list[int], cache_salt: str | None) -> int:
        """Leading tokens the instance's kvshelf holds; 0 without lookup= or without an answer in time."""
        address = upstream.instance.lookup
        if address is None:
            return 0
        # A fresh REQ socket per question: one that missed its reply can send no more, so it is closed.
        socket = self._zmq.socket(zmq.REQ)
        secure_client(socket, self._keyring)
        socket.connect(address)
        frames = [json.dumps({"cache_salt": cache_salt}).encode(), np.asarray(token_ids, dtype="<i4").tobytes()]
        try:
            return await asyncio.wait_for(_ask(socket, frames), LOOKUP_TIMEOUT_S)
        except (TimeoutError, zmq.ZMQError, ValueError) as exc:
            logger.warning("kvshelf proxy: lookup at %s failed (%s); counting 0 tokens", address, describe(exc))
            return 0
        finally:
            socket.close(linger=0)

    # -- forwarding --

    def _push_params(self, push_to: str) -> dict:
        """kvshelf's push_to, signed: a prefill instance pushes only where the secret's holder says."""
        if not self._keyring.keyed:
            return {"push_to": push_to}
        return {"push_to": push_to, "push_to_sig": sign_push_to(self._keyring, push_to)}

    async def _prefill(self, path: str, body: dict, push_to: str | None,
                       held: dict[str, int] | None) -> tuple[Upstream, dict] | web.Response | None:
        """Run the prefill: the instance that did and the `kv_transfer_params.kvshelf` of its answer, a
        client error to hand back as is, or None when none could."""
        request = prefill_request(body, self._push_params(push_to) if self.config.channel == "push" else {})
        for upstream in self._by_policy("prefill", held):
            upstream.num_requests += 1
            try:
                async with self._session.post(upstream.url + path, json=request) as answer:
                    payload = await answer.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._failed(upstream, f"prefill failed: {describe(exc)}")
                continue
            if answer.status == 200:
                return upstream, kvshelf_params_of(payload)
            if answer.status < 500:
                proxied = {"x-kvshelf-prefill": upstream.url, "x-kvshelf-instance": upstream.url}
                return web.Response(body=payload, status=answer.status, headers={**proxied, **content_type(answer)})
            self._failed(upstream, f"prefill answered HTTP {answer.status}")
        return None

    async def _answer(self, request: web.Request, upstreams: Iterable[Upstream], pool: str, body: dict | None,
                      headers: dict[str, str]) -> web.StreamResponse:
        """The answer of the first of `upstreams` that did not fail before the client got a byte of it."""
        for upstream in upstreams:
            response = await self._relay(request, upstream, body, {**headers, "x-kvshelf-instance": upstream.url})
            if response is not None:
                return response
        raise unavailable(pool)

    async def _relay(self, request: web.Request, upstream: Upstream, body: dict | None,
                     headers: dict[str, str]) -> web.StreamResponse | None:
        upstream.num_requests += 1
        try:
            async with self._session.request(request.method, upstream.url + request.path, json=body) as answer:
                if answer.status >= 500:
                    self._failed(upstream, f"{request.path} answered HTTP {answer.status}")
                    return None
                if answer.content_type == "text/event-stream":
                    return await self._stream(request, upstream, answer, {**headers, **content_type(answer)})
                payload = await answer.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._failed(upstream, f"{request.path} failed: {describe(exc)}")
            return None
        return web.Response(body=payload, status=answer.status, headers={**headers, **content_type(answer)})

    async def _stream(self, request: web.Request, upstream: Upstream, answer: aiohttp.ClientResponse,
                      headers: dict[str, str]) -> web.StreamResponse | None:
        """Relay server-sent events as they come. Until the first event the request can still go to
        another instance (None); after it, a failure cuts the connection, so the client sees a broken
        answer, never a complete-looking short one."""
        try:
            chunk = await answer.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._failed(upstream, f"the stream failed before its first event: {describe(exc)}")
            return None
        response = web.StreamResponse(status=answer.status, headers=headers)
        try:
            await response.prepare(request)
            while chunk:
                await response.write(chunk)
                chunk = await answer.content.readany()
            await response.write_eof()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._failed(upstream, f"the stream broke off: {describe(exc)}")
            if request.transport is not None:
                request.transport.close()
        except ConnectionResetError:  # the client left; leaving `async with answer` drops the upstream request
            logger.info("kvshelf proxy: the client left a stream from %s", upstream.url)
        return response

    # -- endpoints --

    async def completion(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        if self.config.instances:
            held = await self._held_tokens(request.path, body, "colocated")
            return await self._answer(request, self._by_policy("colocated", held), "colocated", body, {})
        # The decode instance comes first: a pushed prefill needs its address.
        decodes = self._in_turn("decode")
        decode = next(decodes, None)
        if decode is None:
            raise unavailable("decode")
        held = await self._held_tokens(request.path, body, "prefill")
        prefill = await self._prefill(request.path, body, decode.instance.kv, held)
        if isinstance(prefill, web.Response):
            return prefill
        if prefill is None:
            self._num_prefill_fallbacks += 1
            logger.warning("kvshelf proxy: no prefill instance could serve; the decode instance computes the prefill")
            return await self._answer(request, chain([decode], decodes), "decode", body, {"x-kvshelf-prefill": "none"})
        prefilled_by, kvshelf_params = prefill
        headers = {"x-kvshelf-prefill": prefilled_by.url}
        return await self._answer(request, chain([decode], decodes), "decode", decode_request(body, kvshelf_params),
                                  headers)

    async def models(self, request: web.Request) -> web.StreamResponse:
        pool = "colocated" if self.config.instances else "decode"
        return await self._answer(request, self._in_turn(pool), pool, None, {})

    async def health(self, request: web.Request) -> web.Response:
        healthy = {pool: len(self._healthy(pool)) for pool in self.pools}
        return web.json_response({"healthy_instances": healthy}, status=200 if all(healthy.values()) else 503)

    async def stats(self, request: web.Request) -> web.Response:
        """Aggregates for the operator (see the module docstring): behind the admin key, never per request."""
        check_admin_key(request, self.config.admin_key)
        num_looked_up = sum(self._reasons[reason] for reason in (*KV_AWARE_HITS, "no-hit"))
        return web.json_response({
            "routing": self.config.routing,
            "instances": {upstream.url: upstream.as_json() for pool in self.pools.values() for upstream in pool},
            "decisions": dict(self._reasons),
            "kv_aware_hits": sum(self._reasons[reason] for reason in KV_AWARE_HITS),
            "kv_aware_fallbacks": sum(self._reasons[reason] for reason in KV_AWARE_FALLBACKS),
            "held_tokens_total": self._num_held_tokens,
            # per decision routed by the instances' answers (kv-aware, kv-aware-tie, no-hit)
            "held_tokens_mean": self._num_held_tokens / num_looked_up if num_looked_up else 0.0,
            "prefill_fallbacks": self._num_prefill_fallbacks,
            "kv_index": self.kv_index_stats(),
        })

    def kv_index_stats(self) -> dict:
        """The --kv-index mode, instances whose event index is ready, and how instances' held tokens
        were learned: from the index (events) or asked (ask)."""
        ready = self._index.num_ready if self._index is not None else 0
        return {"mode": self.config.kv_index, "ready_instances": ready, "answers": dict(self._num_answers)}


async def _ask(socket: zmq.asyncio.Socket, frames: list[bytes]) -> int:
    await socket.send_multipart(frames)
    return int(await socket.recv())


def prefill_request(body: dict, kvshelf_params: dict) -> dict:
    """The client's request cut to its prefill: one token, not streamed, with kvshelf's transfer parameters."""
    request = {**body, "max_tokens": 1, "stream": False, "n": 1, "kv_transfer_params": {"kvshelf": kvshelf_params}}
    request.pop("stream_options", None)
    request.pop("min_tokens", None)  # vLLM refuses min_tokens above max_tokens
    if "max_completion_tokens" in body:
        request["max_completion_tokens"] = 1
    return request


def kvshelf_params_of(payload: bytes) -> dict:
    """What a prefill instance's answer says to its decode instance: its `kv_transfer_params.kvshelf`
    ({} if none). The decode instance checks what matters (signatures); here it is only passed on."""
    try:
        answer = json.loads(payload)
    except ValueError:
        return {}
    transfer_params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
    params = transfer_params.get("kvshelf") if isinstance(transfer_params, dict) else None
    return params if isinstance(params, dict) else {}


def decode_request(body: dict, kvshelf_params: dict) -> dict:
    """The client's request for the decode instance, with the prefill's `kvshelf_params` merged into
    its `kv_transfer_params.kvshelf` (the client's own request is left as it was)."""
    if not kvshelf_params:
        return body
    transfer_params = body.get("kv_transfer_params")
    transfer_params = transfer_params if isinstance(transfer_params, dict) else {}
    client_params = transfer_params.get("kvshelf")
    merged = {**(client_params if isinstance(client_params, dict) else {}), **kvshelf_params}
    return {**body, "kv_transfer_params": {**transfer_params, "kvshelf": merged}}


async def read_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError as exc:
        raise openai_error(web.HTTPBadRequest, f"the body is not valid JSON: {exc}", "invalid_request_error") from exc
    if not isinstance(body, dict):
        raise openai_error(web.HTTPBadRequest, "the body must be a JSON object", "invalid_request_error")
    return body


def content_type(answer: aiohttp.ClientResponse) -> dict[str, str]:
    return {"Content-Type": answer.headers.get("Content-Type", "application/json")}


def openai_error(error_class: type[web.HTTPException], message: str, error_type: str) -> web.HTTPException:
    body = {"error": {"message": message, "type": error_type, "code": error_class.status_code}}
    return error_class(text=json.dumps(body), content_type="application/json")


def unavailable(pool: str) -> web.HTTPException:
    return openai_error(web.HTTPServiceUnavailable, f"no healthy {pool} instance", "service_unavailable")


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def check_admin_key(request: web.Request, admin_key: str | None) -> None:
    if admin_key is None:
        raise openai_error(web.HTTPForbidden, f"{STATS_PATH} is off: start the proxy with --admin-key "
                           f"(or ${ADMIN_KEY_ENV}) and send Authorization: Bearer <admin key>", "permission_error")
    if not bearer_is(request, admin_key):
        raise openai_error(web.HTTPUnauthorized, f"missing or wrong admin key for {STATS_PATH} "
                           "(Authorization: Bearer <admin key>; the API key does not open it)", "authentication_error")


def api_key_middleware(api_key: str):
    # /health is for load balancers; /proxy/* check the admin key themselves; /dashboard asks for it.
    @web.middleware
    async def check_api_key(request: web.Request, handler):
        is_open = request.path in ("/health", "/dashboard") or request.path.startswith("/proxy/")
        if not is_open and not bearer_is(request, api_key):
            raise openai_error(web.HTTPUnauthorized, "missing or wrong API key (Authorization: Bearer <key>)",
                               "authentication_error")
        return await handler(request)

    return check_api_key


PROXY = web.AppKey("proxy", Proxy)


def build_app(config: ProxyConfig, keyring: Keyring | None = None) -> web.Application:
    """The proxy's app; `keyring` defaults to the deployment secret kvshelf's configuration names
    (security.key, KVSHELF_SECURITY_KEY, the key file), which the instances must share."""
    proxy = Proxy(config, keyring if keyring is not None else Keyring.from_config(load_config().security))
    middlewares = [api_key_middleware(config.api_key)] if config.api_key else []
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app.router.add_post(COMPLETIONS, proxy.completion)
    app.router.add_post(CHAT_COMPLETIONS, proxy.completion)
    app.router.add_get("/v1/models", proxy.models)
    app.router.add_get("/health", proxy.health)
    app.router.add_get(STATS_PATH, proxy.stats)
    FleetAdmin({instance.url: instance.admin for pool in config.pools.values() for instance in pool if instance.admin},
               config.admin_key).add_routes(app)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    app[PROXY] = proxy  # for benchmarks and tests that time or compare its routing
    return app


def run_proxy(config: ProxyConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    mode = "colocated" if config.instances else f"disaggregated, {config.channel} channel"
    banner = f"kvshelf proxy on http://{host}:{port} ({mode}, {config.routing} routing)"
    web.run_app(build_app(config), host=host, port=port, print=lambda _: print(banner, file=sys.stderr, flush=True))


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    spec = f"SPEC is {SPEC_FORM}; repeatable"
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", action="append", default=[], metavar="SPEC", help=f"a prefill instance; {spec}")
    parser.add_argument("--decode", action="append", default=[], metavar="SPEC", help=f"a decode instance; {spec}")
    parser.add_argument("--instance", action="append", default=[], metavar="SPEC",
                        help=f"a colocated instance, answering whole requests (not with --prefill/--decode); {spec}")
    parser.add_argument("--routing", choices=ROUTINGS, default="kv-aware",
                        help="how the prefill (or colocated) instance is chosen (default: kv-aware)")
    parser.add_argument("--channel", choices=CHANNELS, default="tier",
                        help="how KV reaches the decode instance: a shared tier such as Redis, or pushed to its kv= "
                        "address (default: tier)")
    parser.add_argument("--kv-index", choices=KV_INDEXES, default="events",
                        help="kv-aware routing: events (default) keeps an index of what each instance given "
                        "events= holds, fed by its vLLM KV events, and asks the others; ask asks every instance "
                        "for every request")
    parser.add_argument("--health-interval", type=float, default=2.0, help="seconds between health checks")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per upstream request")
    parser.add_argument("--api-key", help="the clients' key: every endpoint but /health and /proxy/stats requires "
                        f"Authorization: Bearer <key> (default: ${API_KEY_ENV})")
    parser.add_argument("--admin-key", help="the operators' key, not the same as --api-key: only it opens "
                        f"{STATS_PATH} (aggregate routing and instance counts), as Authorization: Bearer <admin key>; "
                        f"without it {STATS_PATH} answers 403 (default: ${ADMIN_KEY_ENV}; prefer the variables to "
                        "the options, which other users see in ps)")


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ProxyConfig:
    environ = os.environ if environ is None else environ
    return ProxyConfig(
        prefill=tuple(parse_instance(spec) for spec in args.prefill),
        decode=tuple(parse_instance(spec) for spec in args.decode),
        instances=tuple(parse_instance(spec) for spec in args.instance),
        routing=args.routing,
        channel=args.channel,
        kv_index=args.kv_index,
        health_interval_s=args.health_interval,
        timeout_s=args.timeout,
        api_key=args.api_key or environ.get(API_KEY_ENV) or None,
        admin_key=args.admin_key or environ.get(ADMIN_KEY_ENV) or None,
    )
