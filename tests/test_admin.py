"""The admin API over a real shelf (memory and disk tiers), served on a real port."""

import asyncio
import dataclasses
import json

import httpx
import pytest
import torch

from kvshelf import Namespace
from kvshelf.admin import AdminAPI, AdminServer, AdminTarget
from kvshelf.ports import free_port
from tests.conftest import CHUNK_SIZE, LAYOUT, random_kv

ADMIN_KEY = "operators-only-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TOKENS = list(range(100, 118))  # 4 full chunks of 4 and a partial one
CHUNK_BYTES = LAYOUT.bytes_per_token * CHUNK_SIZE


@pytest.fixture
def admin(make_shelf, namespace):
    """(shelf, client) of an admin API served on a free port; closed at the end."""
    shelf = make_shelf(memory_size=8 * CHUNK_BYTES, memory_pin_size=2 * CHUNK_BYTES)
    target = AdminTarget(shelf, lambda salt: dataclasses.replace(namespace, cache_salt=salt),
                         tokenize=lambda text: [100 + ord(c) % 50 for c in text], facts={"name": "test"})
    server = AdminServer(AdminAPI(target, ADMIN_KEY).app(), "127.0.0.1", free_port())
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield shelf, client
    server.close()


def test_only_the_admin_key_opens_it(admin):
    _, client = admin
    for headers in ({}, {"Authorization": "Bearer a-client-api-key"}, {"Authorization": f"Bearer {ADMIN_KEY}x"},
                    {"Authorization": ADMIN_KEY}):
        for path in ("/metrics", "/kvshelf/stats", "/kvshelf/namespaces"):
            answer = client.get(path, headers=headers)
            assert answer.status_code == 401 and "admin key" in answer.json()["error"]
        assert client.post("/kvshelf/clear", headers=headers).status_code == 401
    assert client.get("/health").text == "ok"
    page = client.get("/dashboard")
    assert page.status_code == 200 and "/kvshelf/stats" in page.text and "<script" in page.text
    offline = page.text.replace("http://www.w3.org/2000/svg", "")  # a name, never fetched
    assert "http://" not in offline and "https://" not in offline  # no external assets


def test_stats_and_metrics_tell_the_same_numbers(admin, namespace):
    shelf, client = admin
    shelf.save(TOKENS, random_kv(len(TOKENS)), namespace)
    shelf.lookup(TOKENS, namespace)
    stats = client.get("/kvshelf/stats", headers=ADMIN).json()
    assert stats["hit_tokens"] == 16 and stats["misses_by_reason"]["partial_chunk"] == 2
    assert stats["instance"]["name"] == "test" and stats["instance"]["chunk_size"] == CHUNK_SIZE
    assert set(stats["ttft"]) == {"true", "false"}
    metrics = client.get("/metrics", headers=ADMIN).text
    assert 'kvshelf_lookup_tokens_total{result="hit"} 16.0' in metrics
    assert 'kvshelf_miss_tokens_total{reason="partial_chunk"} 2.0' in metrics


def test_namespaces_and_clearing_one(admin, namespace):
    shelf, client = admin
    tenant = dataclasses.replace(namespace, cache_salt="tenant-secret-salt")
    shelf.save(TOKENS, random_kv(len(TOKENS)), namespace)
    shelf.save(TOKENS[:8], random_kv(8), tenant)
    shelf.flush()
    answer = client.get("/kvshelf/namespaces", headers=ADMIN)
    assert "tenant-secret-salt" not in answer.text
    namespaces = answer.json()["namespaces"]
    plain_id, tenant_id = namespace.id(shelf.keyring), tenant.id(shelf.keyring)
    assert namespaces[plain_id]["chunks"] == {"memory": 4, "disk": 4}
    assert namespaces[tenant_id]["chunks"] == {"memory": 2, "disk": 2}
    assert namespaces[tenant_id]["description"]["cache_salt_tag"] == shelf.keyring.salt_tag("tenant-secret-salt")
    answer = client.post("/kvshelf/clear", headers=ADMIN, json={"namespace": tenant_id}).json()
    assert answer == {"dropped_chunks": {"memory": 2, "disk": 2}}
    assert shelf.lookup(TOKENS, tenant) == 0 and shelf.lookup(TOKENS, namespace) == 16
    assert set(client.get("/kvshelf/namespaces", headers=ADMIN).json()["namespaces"]) == {plain_id}


def test_clearing_a_prefix_and_everything(admin, namespace):
    shelf, client = admin
    other = [5] * 8
    shelf.save(TOKENS, random_kv(len(TOKENS)), namespace)
    shelf.save(other, random_kv(8), namespace)
    shelf.flush()
    answer = client.post("/kvshelf/clear", headers=ADMIN, json={"token_ids": TOKENS})
    assert answer.json() == {"dropped_chunks": {"memory": 4, "disk": 4}}
    assert shelf.lookup(TOKENS, namespace) == 0 and shelf.lookup(other, namespace) == 8
    assert client.post("/kvshelf/clear", headers=ADMIN).json() == {"cleared": True}
    assert shelf.lookup(other, namespace) == 0


def test_pin_keeps_a_prefix_through_traffic_within_the_budget(admin, namespace):
    shelf, client = admin
    kv = random_kv(len(TOKENS))
    shelf.save(TOKENS, kv, namespace)
    answer = client.post("/kvshelf/pin", headers=ADMIN, json={"token_ids": TOKENS}).json()
    assert answer["pinned_tokens"] == 8 and answer["pinned_bytes"] == 2 * CHUNK_BYTES  # the budget: 2 chunks
    shelf.flush()
    shelf._stack.lower[0].tier.clear()  # the disk copy gone: only the pins keep it
    for seed in range(12):
        shelf.save([seed] * 4, random_kv(4, seed=seed), namespace)
    assert shelf.lookup(TOKENS, namespace) == 8
    assert torch.equal(shelf.load(TOKENS, namespace, 8).kv(), kv[:, :, :8])
    assert client.post("/kvshelf/unpin", headers=ADMIN, json={"token_ids": TOKENS}).json() == {"unpinned_tokens": 8}


def test_warm_reads_a_stored_prefix_into_memory_and_inspect_tells_where_chunks_are(admin, namespace):
    shelf, client = admin
    shelf.save(TOKENS, random_kv(len(TOKENS)), namespace)
    shelf.flush()
    shelf._stack.memory.clear()
    where = client.post("/kvshelf/inspect", headers=ADMIN, json={"token_ids": TOKENS}).json()
    assert where["prompt_tokens"] == 18
    assert [chunk["tiers"] for chunk in where["chunks"]] == [["disk"]] * 4 + [[]]
    assert where["chunks"][4]["tokens"] == [16, 18]
    warm = client.post("/kvshelf/warm", headers=ADMIN, json={"token_ids": TOKENS}).json()
    assert warm == {"prompt_tokens": 18, "held_tokens": 16, "computed": False}  # no engine_url: prefetch only
    where = client.post("/kvshelf/inspect", headers=ADMIN, json={"token_ids": TOKENS}).json()
    assert [chunk["tiers"] for chunk in where["chunks"]][:4] == [["memory", "disk"]] * 4


def test_text_prompts_and_tenants(admin, namespace):
    shelf, client = admin
    text_ids = [100 + ord(c) % 50 for c in "hello world!"]
    tenant = dataclasses.replace(namespace, cache_salt="acme")
    shelf.save(text_ids, random_kv(len(text_ids)), tenant)
    shelf.flush()
    inspect = client.post("/kvshelf/inspect", headers=ADMIN, json={"text": "hello world!", "cache_salt": "acme"})
    assert [chunk["tiers"] for chunk in inspect.json()["chunks"]] == [["memory", "disk"]] * 3
    other_tenant = client.post("/kvshelf/inspect", headers=ADMIN, json={"text": "hello world!", "cache_salt": "x"})
    assert [chunk["tiers"] for chunk in other_tenant.json()["chunks"]] == [[]] * 3


@pytest.mark.parametrize("body", [
    {}, {"token_ids": []}, {"token_ids": [1, -2]}, {"token_ids": [1, True]}, {"token_ids": "1 2"}, {"text": ""},
    {"token_ids": [1], "cache_salt": 5}, [1, 2],
])
def test_a_bad_prompt_is_a_400_that_says_what_to_send(admin, body):
    _, client = admin
    answer = client.post("/kvshelf/pin", headers=ADMIN, json=body)
    assert answer.status_code == 400 and answer.json()["error"]


def test_a_bad_namespace_or_body_is_a_400(admin):
    _, client = admin
    for namespace_id in ("../x", "*" * 16, "0123456789ABCDEF"):  # a glob would match every namespace in Redis
        assert client.post("/kvshelf/clear", headers=ADMIN, json={"namespace": namespace_id}).status_code == 400
    answer = client.post("/kvshelf/clear", headers=ADMIN, content=b"{not json")
    assert answer.status_code == 400 and "JSON" in answer.json()["error"]


def test_an_unreachable_engine_is_a_502_that_names_the_setting(admin, namespace):
    shelf, client = admin
    shelf_target_url = f"http://127.0.0.1:{free_port()}"
    target = AdminTarget(shelf, lambda salt: namespace, engine_url=shelf_target_url)
    server = AdminServer(AdminAPI(target, ADMIN_KEY).app(), "127.0.0.1", free_port())
    try:
        answer = httpx.post(f"{server.url}/kvshelf/warm", headers=ADMIN, json={"token_ids": TOKENS}, timeout=30)
        assert answer.status_code == 502 and "admin.engine_url" in answer.json()["error"]
    finally:
        server.close()


def test_admin_address_needs_a_key(make_shelf):
    from kvshelf.errors import ConfigError

    with pytest.raises(ConfigError, match="admin.key"):
        make_shelf(admin_address="127.0.0.1:8101")
    with pytest.raises(ConfigError, match="host:port"):
        make_shelf(admin_address="8101", admin_key="k")


def test_a_namespace_named_in_the_stats_is_the_tenants_tag_only(admin):
    shelf, client = admin
    tenant = Namespace("m", LAYOUT, cache_salt="tenant-secret-salt")
    shelf.save(TOKENS[:4], random_kv(4), tenant)
    shelf.lookup(TOKENS, tenant)
    text = client.get("/kvshelf/stats", headers=ADMIN).text + client.get("/metrics", headers=ADMIN).text
    assert "tenant-secret-salt" not in text and shelf.keyring.salt_tag("tenant-secret-salt") in text


def test_the_proxy_serves_the_fleets_admin_api_and_dashboard(make_shelf, namespace):
    asyncio.run(_fleet(make_shelf, namespace))


async def _fleet(make_shelf, namespace) -> None:
    from tests.test_proxy import ADMIN as PROXY_ADMIN
    from tests.test_proxy import ADMIN_KEY as PROXY_ADMIN_KEY
    from tests.test_proxy import Cluster

    shelves, servers = [], []
    for _ in range(2):
        shelf = make_shelf()
        shelf.save(TOKENS, random_kv(len(TOKENS)), namespace)
        target = AdminTarget(shelf, lambda salt: dataclasses.replace(namespace, cache_salt=salt))
        servers.append(AdminServer(AdminAPI(target, PROXY_ADMIN_KEY).app(), "127.0.0.1", free_port()))
        shelves.append(shelf)
    try:
        async with Cluster() as cluster:
            fakes = [await cluster.instance(name) for name in ("a", "b", "c")]
            admin_urls = [server.url for server in servers] + [f"http://127.0.0.1:{free_port()}"]  # c is down
            instances = tuple(dataclasses.replace(fake.instance, admin=url) for fake, url in zip(fakes, admin_urls))
            proxy = await cluster.proxy(instances=instances, api_key="client-key")
            for headers in ({}, {"Authorization": "Bearer client-key"}):
                assert (await proxy.get("/proxy/admin/stats", headers=headers)).status == 401
            stats = (await (await proxy.get("/proxy/admin/stats", headers=PROXY_ADMIN)).json())["instances"]
            assert [stats[fake.url].get("tiers", {}).get("memory", {}).get("stored_bytes") for fake in fakes] == [
                4 * CHUNK_BYTES, 4 * CHUNK_BYTES, None]
            assert "unreachable" in stats[fakes[2].url]["error"]
            answer = await proxy.post("/proxy/admin/inspect", headers=PROXY_ADMIN, json={"token_ids": TOKENS})
            where = (await answer.json())["instances"]
            assert [chunk["tiers"][:1] for chunk in where[fakes[0].url]["chunks"]] == [["memory"]] * 4 + [[]]
            cleared = await proxy.post("/proxy/admin/clear", headers=PROXY_ADMIN, json={})
            assert (await cleared.json())["instances"][fakes[1].url] == {"cleared": True}
            assert all(shelf.lookup(TOKENS, namespace) == 0 for shelf in shelves)
            page = await proxy.get("/dashboard")  # the page is open; its data needs the admin key
            assert page.status == 200 and "/proxy/admin/stats" in await page.text()
    finally:
        for server in servers:
            server.close()


def test_a_port_in_use_is_an_error_that_says_what_to_change(admin, namespace):
    shelf, client = admin
    port = int(str(client.base_url).rsplit(":", 1)[1].rstrip("/"))
    with pytest.raises(ValueError, match="admin.address"):
        AdminServer(AdminAPI(AdminTarget(shelf, lambda salt: namespace), ADMIN_KEY).app(), "127.0.0.1", port)


def test_the_cli_talks_to_a_running_instance(admin, namespace, capsys, monkeypatch):
    from kvshelf.cli import main

    shelf, client = admin
    url = str(client.base_url).rstrip("/")
    shelf.save(TOKENS, random_kv(len(TOKENS)), namespace)
    monkeypatch.delenv("KVSHELF_ADMIN_KEY", raising=False)
    assert main(["stats", url]) == 2
    assert "KVSHELF_ADMIN_KEY" in capsys.readouterr().err
    monkeypatch.setenv("KVSHELF_ADMIN_KEY", "a-client-key")
    assert main(["stats", url]) == 1 and "admin key" in capsys.readouterr().out
    monkeypatch.setenv("KVSHELF_ADMIN_KEY", ADMIN_KEY)
    assert main(["stats", url]) == 0
    assert json.loads(capsys.readouterr().out)["tiers"]["memory"]["stored_bytes"] == 4 * CHUNK_BYTES
    token_ids = ",".join(map(str, TOKENS))
    assert main(["pin", url, "--token-ids", token_ids]) == 0
    assert json.loads(capsys.readouterr().out)["pinned_tokens"] == 8
    assert main(["inspect", url, "--token-ids", token_ids]) == 0
    assert len(json.loads(capsys.readouterr().out)["chunks"]) == 5
    assert main(["inspect", url]) == 0
    assert namespace.id(shelf.keyring) in json.loads(capsys.readouterr().out)["namespaces"]
    assert main(["clear", url, "--token-ids", token_ids]) == 0
    assert json.loads(capsys.readouterr().out)["dropped_chunks"]["memory"] == 4
    assert main(["clear", url, "--all"]) == 0 and shelf.lookup(TOKENS, namespace) == 0
