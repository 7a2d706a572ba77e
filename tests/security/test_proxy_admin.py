"""/proxy/stats as an attacker holding the clients' API key would try it: no way in, and nothing per request
to find there even for the operator (issue 13, item 8)."""

import asyncio
import json

import pytest

from kvshelf.disagg.proxy import Instance, ProxyConfig
from tests.test_proxy import ADMIN, ADMIN_KEY, TOKEN_IDS, Cluster, read_stats

CLIENT_KEY = "every-client-has-this"
CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
SECRET_SALT = "tenant-secret-salt"
SECRET_PROMPT = "the board meets on friday to approve the merger"


def test_the_client_key_does_not_open_the_stats():
    asyncio.run(_client_key())


async def _client_key() -> None:
    async with Cluster() as cluster:
        instance = await cluster.instance("only")
        proxy = await cluster.proxy(instances=(instance.instance,), api_key=CLIENT_KEY)
        for headers in ({}, CLIENT, {"Authorization": f"Bearer {ADMIN_KEY}x"}, {"Authorization": ADMIN_KEY}):
            answer = await proxy.get("/proxy/stats", headers=headers)
            assert answer.status == 401
            error = (await answer.json())["error"]
            assert error["type"] == "authentication_error" and "admin key" in error["message"]
        assert (await proxy.get("/proxy/stats", headers=ADMIN)).status == 200
        # The admin key is the operators', not a client key.
        assert (await proxy.get("/v1/models", headers=ADMIN)).status == 401
        assert (await proxy.get("/v1/models", headers=CLIENT)).status == 200


@pytest.mark.parametrize("api_key", [None, CLIENT_KEY])
def test_without_an_admin_key_the_stats_are_off_and_say_how_to_turn_them_on(api_key):
    asyncio.run(_no_admin_key(api_key))


async def _no_admin_key(api_key: str | None) -> None:
    async with Cluster() as cluster:
        instance = await cluster.instance("only")
        proxy = await cluster.proxy(instances=(instance.instance,), api_key=api_key, admin_key=None)
        for headers in ({}, CLIENT, ADMIN):
            answer = await proxy.get("/proxy/stats", headers=headers)
            assert answer.status == 403
            assert await answer.json() == {"error": {
                "message": "/proxy/stats is off: start the proxy with --admin-key (or $KVSHELF_PROXY_ADMIN_KEY) "
                "and send Authorization: Bearer <admin key>",
                "type": "permission_error", "code": 403}}


def test_an_admin_key_equal_to_the_client_key_is_refused():
    with pytest.raises(ValueError, match="--admin-key must differ from --api-key"):
        ProxyConfig(instances=(Instance("http://i:1"),), api_key="same", admin_key="same")


def test_the_stats_hold_aggregates_only_never_a_request_its_prompt_or_its_salt():
    asyncio.run(_aggregates_only())


async def _aggregates_only() -> None:
    async with Cluster() as cluster:
        holder = await cluster.instance("holder", held_tokens=len(TOKEN_IDS))
        other = await cluster.instance("other", held_tokens=0)
        proxy = await cluster.proxy(instances=(holder.instance, other.instance))
        body = {"model": "m", "prompt": SECRET_PROMPT, "cache_salt": SECRET_SALT}
        answer = await proxy.post("/v1/completions", json=body)
        assert answer.headers["x-kvshelf-instance"] == holder.url
        stats = await read_stats(proxy)
        assert stats == {
            "routing": "kv-aware",
            "instances": {
                holder.url: {"role": "colocated", "healthy": True, "requests": 1, "failures": 0},
                other.url: {"role": "colocated", "healthy": True, "requests": 0, "failures": 0},
            },
            "decisions": {"kv-aware": 1, "kv-aware-tie": 0, "no-hit": 0, "tokenize-failed": 0, "round-robin": 0},
            "kv_aware_hits": 1,
            "kv_aware_fallbacks": 0,
            "held_tokens_total": len(TOKEN_IDS),
            "held_tokens_mean": float(len(TOKEN_IDS)),
            "prefill_fallbacks": 0,
            "kv_index": {"mode": "events", "ready_instances": 0, "answers": {"events": 0, "ask": 2}},
        }
        text = json.dumps(stats)
        assert SECRET_SALT not in text and SECRET_PROMPT not in text
