"""The admin API: an operator's view of, and hand on, one kvshelf instance, over HTTP.

A vLLM worker serves it where `admin.address` is set (`kvshelf serve --admin-port`; a
tensor-parallel rank r on port + r, each acting on its own rank's shelf); `kvshelf proxy` serves
the fleet's (kvshelf.disagg.proxy, /proxy/admin/*), and the CLI's `stats`, `inspect` and `clear`
take `--admin URL` to use either.

    GET  /health             "ok" (no key)
    GET  /dashboard          the live dashboard: one page, no external assets (no key: it asks for it)
    GET  /metrics            the shelf's Prometheus metrics (kvshelf.metrics)
    GET  /kvshelf/stats      the shelf's statistics, the instance's facts and its TTFT by hit
    GET  /kvshelf/namespaces the namespaces this instance holds chunks of, with chunks per tier
    POST /kvshelf/clear      {} every chunk of this instance's own tiers (as vLLM's reset_prefix_cache);
                             {"namespace": id} one namespace, shared tiers too; or a prompt's chunks
    POST /kvshelf/pin        a prompt: keep its chunks in memory whatever comes (memory.pin_size bounds it)
    POST /kvshelf/unpin      a prompt
    POST /kvshelf/warm       a prompt: read what a lower tier holds into memory, and have the engine compute
                             the rest (admin.engine_url) so that its KV is stored before traffic asks for it
    POST /kvshelf/inspect    a prompt: which tiers hold each of its chunks

A prompt is {"token_ids": [...]} or {"text": "..."} (tokenized as the engine tokenizes a completion
prompt), with "cache_salt" for a tenant's namespace. Every path but /health and /dashboard needs
`Authorization: Bearer <admin key>` (admin.key, KVSHELF_ADMIN_KEY): 401 without it or with any other
key, a client's API key included. Answers never echo a prompt, its tokens or a salt.
"""

import asyncio
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvshelf.keys import Namespace, Prompt
from kvshelf.shelf import Shelf

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 * 2**20
VERBS = ("clear", "pin", "unpin", "warm", "inspect")
FLEET_PREFIX = "/proxy/admin"
FLEET_TIMEOUTS_S = {"GET": 10.0, "POST": 600.0}  # a warm may compute a long prompt
MAX_PROMPT_TOKENS = 1 << 20
WARM_WAIT_S = 10.0  # how long a warm waits for the engine's KV to be stored after its answer


def bearer_is(request: web.Request, key: str) -> bool:
    """Whether the request carries `Authorization: Bearer <key>`; compared in constant time."""
    given = request.headers.get("Authorization", "").encode()
    return hmac.compare_digest(given, f"Bearer {key}".encode())


def json_error(error_class: type[web.HTTPException], message: str) -> web.HTTPException:
    return error_class(text=json.dumps({"error": message}), content_type="application/json")


def dashboard_page(stats_path: str = "/kvshelf/stats") -> str:
    """The dashboard, reading its numbers from `stats_path` (an instance's, or the proxy's for the fleet)."""
    return resources.files("kvshelf").joinpath("dashboard.html").read_text().replace("{{STATS_PATH}}", stats_path)


@dataclass
class AdminTarget:
    """What the admin API acts on: a shelf, and how the engine names and computes prompts.

    `namespace_of(cache_salt)`: the namespace of this instance's requests of that tenant;
    `tokenize(text)`: token ids as the engine would see a completion prompt (None: text refused);
    `engine_url`: the engine's OpenAI server, to compute a prefix for `warm` (None: prefetch only)."""

    shelf: Shelf
    namespace_of: Callable[[str | None], Namespace]
    tokenize: Callable[[str], list[int]] | None = None
    engine_url: str | None = None
    engine_api_key: str | None = field(default=None, repr=False)
    facts: dict = field(default_factory=dict)  # shown in /kvshelf/stats: model, rank, chunk size...
    started_s: float = field(default_factory=time.time)


class AdminAPI:
    def __init__(self, target: AdminTarget, admin_key: str) -> None:
        self.target = target
        self._admin_key = admin_key

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._check_key])
        app.router.add_get("/health", health)
        app.router.add_get("/dashboard", self.dashboard)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/kvshelf/stats", self.stats)
        app.router.add_get("/kvshelf/namespaces", self.namespaces)
        for verb in VERBS:
            app.router.add_post(f"/kvshelf/{verb}", getattr(self, verb))
        return app

    @web.middleware
    async def _check_key(self, request: web.Request, handler):
        if request.path not in ("/health", "/dashboard") and not bearer_is(request, self._admin_key):
            raise json_error(web.HTTPUnauthorized, "missing or wrong admin key: send Authorization: Bearer <admin key> "
                             "(admin.key or KVSHELF_ADMIN_KEY; a client's API key does not open the admin API)")
        return await handler(request)

    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(text=dashboard_page(), content_type="text/html")

    async def metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self.target.shelf.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self.stats_now))

    def stats_now(self) -> dict:
        shelf = self.target.shelf
        return {"instance": {**self.target.facts, "pid": os.getpid(), "chunk_size": shelf.chunk_size,
                             "uptime_s": round(time.time() - self.target.started_s, 3)},
                "ttft": shelf.metrics.ttft_summary(), "time": time.time(), **shelf.stats()}

    async def namespaces(self, request: web.Request) -> web.Response:
        return web.json_response({"namespaces": await asyncio.to_thread(self.target.shelf.namespaces)})

    async def clear(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        shelf = self.target.shelf
        if not body:
            return web.json_response({"cleared": await asyncio.to_thread(shelf.clear)})
        if "namespace" in body:
            namespace_id = body["namespace"]
            if not isinstance(namespace_id, str) or not re.fullmatch(r"[0-9a-f]{16}", namespace_id):
                raise json_error(web.HTTPBadRequest, "namespace must be a namespace id (16 hex digits, as "
                                 "/kvshelf/namespaces lists them)")
            return web.json_response({"dropped_chunks": await asyncio.to_thread(shelf.drop, namespace_id)})
        prompt = self._prompt(body)
        return web.json_response({"dropped_chunks": await asyncio.to_thread(shelf.drop, None, prompt)})

    async def pin(self, request: web.Request) -> web.Response:
        prompt = self._prompt(await read_json(request))
        return web.json_response(await asyncio.to_thread(self._pin, prompt))

    def _pin(self, prompt: Prompt) -> dict:
        shelf = self.target.shelf
        pinned = shelf.pin(prompt)
        return {"pinned_tokens": pinned, "prompt_tokens": len(prompt),
                "pinned_bytes": shelf.stats()["tiers"]["memory"]["pinned_bytes"],
                "pin_budget_bytes": shelf.config.memory.pin_budget_bytes}

    async def unpin(self, request: web.Request) -> web.Response:
        prompt = self._prompt(await read_json(request))
        return web.json_response({"unpinned_tokens": await asyncio.to_thread(self.target.shelf.unpin, prompt)})

    async def warm(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        prompt = self._prompt(body)
        shelf = self.target.shelf
        full_tokens = shelf.chunking.floor(len(prompt))
        held = await asyncio.to_thread(self._prefetch, prompt)
        computed = False
        if held < full_tokens and self.target.engine_url is not None:
            await self._compute(prompt, body.get("cache_salt"))
            computed = True
            deadline_s = time.monotonic() + WARM_WAIT_S
            while (held := await asyncio.to_thread(self._prefetch, prompt)) < full_tokens:
                if time.monotonic() > deadline_s:
                    break
                await asyncio.sleep(0.05)
        return web.json_response({"prompt_tokens": len(prompt), "held_tokens": held, "computed": computed})

    def _prefetch(self, prompt: Prompt) -> int:
        """Read the prompt's stored chunks into memory; the tokens held there now."""
        return self.target.shelf.load(prompt.token_ids, prompt.namespace, len(prompt), prefetch=True).num_tokens

    async def _compute(self, prompt: Prompt, cache_salt: str | None) -> None:
        """Have the engine prefill the prompt (one output token): its connector stores the KV."""
        headers = {"Authorization": f"Bearer {self.target.engine_api_key}"} if self.target.engine_api_key else {}
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(self.target.engine_url, timeout=timeout, headers=headers) as session:
            try:
                async with session.get("/v1/models") as answer:
                    model = (await answer.json())["data"][0]["id"]
                request = {"model": model, "prompt": list(prompt.token_ids), "max_tokens": 1, "temperature": 0}
                if cache_salt is not None:
                    request["cache_salt"] = cache_salt
                async with session.post("/v1/completions", json=request) as answer:
                    if answer.status != 200:
                        raise json_error(web.HTTPBadGateway, f"the engine refused to compute the prompt: HTTP "
                                         f"{answer.status}")
            except (aiohttp.ClientError, KeyError, IndexError, ValueError) as exc:
                raise json_error(web.HTTPBadGateway, f"could not reach the engine at {self.target.engine_url} to "
                                 f"compute the prompt ({type(exc).__name__}); check admin.engine_url") from None

    async def inspect(self, request: web.Request) -> web.Response:
        prompt = self._prompt(await read_json(request))
        chunks = await asyncio.to_thread(self.target.shelf.whereabouts, prompt)
        return web.json_response({"prompt_tokens": len(prompt), "chunk_size": self.target.shelf.chunk_size,
                                  "chunks": chunks})

    def _prompt(self, body: dict) -> Prompt:
        salt = body.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise json_error(web.HTTPBadRequest, "cache_salt must be a non-empty string")
        if "token_ids" in body:
            token_ids = body["token_ids"]
            if (not isinstance(token_ids, list) or not 0 < len(token_ids) <= MAX_PROMPT_TOKENS
                    or not all(isinstance(token, int) and not isinstance(token, bool) and 0 <= token < 2**31
                               for token in token_ids)):
                raise json_error(web.HTTPBadRequest, f"token_ids must be a list of 1 to {MAX_PROMPT_TOKENS} "
                                 "non-negative integers")
        elif isinstance(body.get("text"), str) and body["text"]:
            if self.target.tokenize is None:
                raise json_error(web.HTTPBadRequest, "this instance cannot tokenize text: send token_ids")
            token_ids = self.target.tokenize(body["text"])
        else:
            raise json_error(web.HTTPBadRequest, 'a prompt is {"token_ids": [...]} or {"text": "..."}, '
                             'with "cache_salt" for a tenant\'s namespace')
        return Prompt(token_ids, self.target.namespace_of(salt))


class FleetAdmin:
    """The fleet's admin API, on `kvshelf proxy`: /proxy/admin/<path> calls /kvshelf/<path> on every
    instance given admin= (instances: proxy url -> admin url) with the proxy's admin key, which the
    instances share (admin.key), and answers {"instances": {url: answer, or {"error": ...}}}; an
    instance that cannot be reached is an error entry, never a failed call. /dashboard shows the fleet."""

    def __init__(self, instances: dict[str, str], admin_key: str | None) -> None:
        self._instances = instances
        self._admin_key = admin_key

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/dashboard", self.dashboard)
        app.router.add_get(f"{FLEET_PREFIX}/stats", self.fan_out)
        app.router.add_get(f"{FLEET_PREFIX}/namespaces", self.fan_out)
        for verb in VERBS:
            app.router.add_post(f"{FLEET_PREFIX}/{verb}", self.fan_out)

    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(text=dashboard_page(f"{FLEET_PREFIX}/stats"), content_type="text/html")

    async def fan_out(self, request: web.Request) -> web.Response:
        if self._admin_key is None:
            raise json_error(web.HTTPForbidden, f"{FLEET_PREFIX} is off: start the proxy with --admin-key (the "
                             "instances' admin.key) and send Authorization: Bearer <admin key>")
        if not bearer_is(request, self._admin_key):
            raise json_error(web.HTTPUnauthorized, "missing or wrong admin key (Authorization: Bearer <admin key>; "
                             "the API key does not open it)")
        path = "/kvshelf/" + request.path.removeprefix(f"{FLEET_PREFIX}/")
        body = await request.read() if request.method == "POST" else None
        timeout = aiohttp.ClientTimeout(total=FLEET_TIMEOUTS_S[request.method])
        async with aiohttp.ClientSession(timeout=timeout) as session:
            answers = await asyncio.gather(*(self._call(session, request.method, admin_url + path, body)
                                             for admin_url in self._instances.values()))
        return web.json_response({"instances": dict(zip(self._instances, answers))})

    async def _call(self, session: aiohttp.ClientSession, method: str, url: str, body: bytes | None) -> dict:
        headers = {"Authorization": f"Bearer {self._admin_key}", "Content-Type": "application/json"}
        try:
            async with session.request(method, url, data=body, headers=headers) as answer:
                payload = await answer.json(content_type=None)
                if answer.status != 200:
                    return {"error": f"HTTP {answer.status}: {payload.get('error', '')}"}
                return payload
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
            return {"error": f"unreachable ({type(exc).__name__})"}


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def read_json(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise json_error(web.HTTPBadRequest, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise json_error(web.HTTPBadRequest, "the body must be a JSON object")
    return body


class AdminServer:
    """An aiohttp application served on a thread and event loop of its own (inside an engine's process)."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app, access_log=None)
        started: Future = Future()
        self._thread = threading.Thread(target=self._serve, args=(host, port, started), name="kvshelf-admin",
                                        daemon=True)
        self._thread.start()
        try:
            started.result(timeout=60)
        except OSError as exc:
            self._thread.join()
            raise ValueError(f"kvshelf admin API: cannot listen on {host}:{port} ({exc.strerror or exc}); choose "
                             "another admin.address (kvshelf serve --admin-port)") from None
        self.url = f"http://{host}:{port}"
        logger.info("kvshelf: admin API, /metrics and /dashboard on %s", self.url)

    def _serve(self, host: str, port: int, started: Future) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.TCPSite(self._runner, host, port).start())
        except Exception as exc:  # noqa: BLE001 - handed to the starting thread, which reports it
            started.set_exception(exc)
            self._loop.close()
            return
        started.set_result(None)
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
