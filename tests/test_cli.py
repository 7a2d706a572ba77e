import json

import pytest

from kvshelf import Namespace
from kvshelf.cli import main
from kvshelf.keys import chunk_keys
from kvshelf.tiers.disk import chunk_path
from tests.conftest import CHUNK_SIZE, LAYOUT, random_kv

TOKENS = list(range(12))


@pytest.fixture
def store(make_shelf, namespace):
    """A disk store with two namespaces, one damaged chunk and one stray file."""
    shelf = make_shelf()
    tenant = Namespace(namespace.model_id, LAYOUT, cache_salt="tenant-b")
    shelf.save(TOKENS, random_kv(12), namespace)
    shelf.save(TOKENS, random_kv(12, seed=1), tenant)
    shelf.flush()
    root = shelf.config.disk.path
    damaged = chunk_path(root, chunk_keys(TOKENS, tenant, CHUNK_SIZE)[2])
    damaged.write_bytes(damaged.read_bytes()[:-1])
    (root / namespace.id / "notes.txt").write_text("not a chunk")
    return root, namespace, tenant


def test_inspect_json_counts_namespaces_and_damage(store, capsys):
    root, namespace, tenant = store
    assert main(["inspect", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_chunks"] == 5
    assert report["namespaces"][namespace.id]["num_chunks"] == 3
    assert report["namespaces"][tenant.id]["description"]["cache_salt"] == "tenant-b"
    reasons = sorted(entry["reason"] for entry in report["damaged"])
    assert len(reasons) == 2 and "not a chunk's name" in reasons
    assert any(reason.startswith("object has") for reason in reasons)


def test_inspect_table(store, capsys):
    root, namespace, _ = store
    assert main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{root}: 5 chunks" in out
    assert "cache_salt=tenant-b" in out and "damaged:" in out and namespace.model_id in out


def test_inspect_without_verify_does_not_read_chunks(store, capsys):
    root, _, _ = store
    assert main(["inspect", str(root), "--json", "--no-verify"]) == 0
    assert json.loads(capsys.readouterr().out)["num_chunks"] == 6


def test_inspect_of_a_missing_directory_says_what_to_give(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "disk.path" in capsys.readouterr().err


def test_clear_one_namespace_of_a_disk_store(store, capsys):
    root, namespace, tenant = store
    assert main(["clear", str(root), "--namespace", tenant.id]) == 0
    assert f"{tenant.id}: removed 4 objects" in capsys.readouterr().out  # 3 chunks and namespace.json
    assert main(["stats", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["namespaces"]) == [namespace.id] and report["num_chunks"] == 3


def test_clear_refuses_what_is_not_a_namespace_id(store, capsys):
    root, _, _ = store
    assert main(["clear", str(root), "--namespace", ".."]) == 2
    assert "is not a namespace id" in capsys.readouterr().err
    assert root.is_dir()


@pytest.fixture
def redis_store(make_shelf, namespace, redis_server):
    """A Redis with two namespaces and one damaged chunk."""
    shelf = make_shelf(disk_path=None, redis_url=redis_server.url)
    tenant = Namespace(namespace.model_id, LAYOUT, cache_salt="tenant-b")
    shelf.save(TOKENS, random_kv(12), namespace)
    shelf.save(TOKENS, random_kv(12, seed=1), tenant)
    shelf.flush()
    damaged = f"kvshelf:{tenant.id}:{chunk_keys(TOKENS, tenant, CHUNK_SIZE)[2].hex}"
    client = redis_server.client()
    client.set(damaged, client.get(damaged)[:-1])
    return redis_server, namespace, tenant


def test_inspect_stats_and_clear_a_redis_store(redis_store, capsys):
    server, namespace, tenant = redis_store
    assert main(["inspect", server.url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_chunks"] == 5 and len(report["damaged"]) == 1
    assert report["namespaces"][tenant.id]["description"]["cache_salt"] == "tenant-b"
    assert main(["stats", server.url]) == 0
    out = capsys.readouterr().out
    assert "6 chunks" in out and "maxmemory_policy" in out
    assert main(["clear", server.url, "--namespace", tenant.id]) == 0
    assert f"{tenant.id}: removed 4 objects" in capsys.readouterr().out  # 3 chunks and the description
    assert main(["stats", server.url, "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["namespaces"]) == [namespace.id]
    assert main(["clear", server.url, "--all"]) == 0
    assert server.client().dbsize() == 0


def test_stats_of_a_cluster(redis_cluster, make_shelf, namespace, capsys):
    shelf = make_shelf(disk_path=None, redis_url=redis_cluster.urls, redis_cluster=True)
    shelf.save(list(range(40)), random_kv(40), namespace)
    shelf.flush()
    assert main(["stats", redis_cluster.urls[0], "--cluster", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_chunks"] == 10 and len(report["info"]["nodes"]) == 3


def test_a_redis_that_is_not_there_is_a_clear_message(capsys):
    assert main(["stats", "redis://127.0.0.1:1/0"]) == 2
    assert "cannot reach Redis at 127.0.0.1:1" in capsys.readouterr().err


def test_serve_refuses_a_bad_config_before_starting_vllm(capsys):
    assert main(["serve", "--memory-size", "lots"]) == 2
    assert "memory.size must be a size like" in capsys.readouterr().err


def test_serve_refuses_a_redis_it_cannot_reach_before_starting_vllm(capsys):
    assert main(["serve", "--redis-url", "redis://127.0.0.1:1/0"]) == 2
    assert "cannot reach Redis at 127.0.0.1:1" in capsys.readouterr().err


def test_serve_refuses_a_bad_receive_address_before_starting_vllm(capsys):
    assert main(["serve", "--role", "decode", "--receive-address", "localhost:5600"]) == 2
    assert "pd.receive_address must be tcp://host:port" in capsys.readouterr().err


def test_pd_over_a_tier_needs_the_redis_to_share(capsys):
    assert main(["pd", "--channel", "tier"]) == 2
    assert "--redis-url" in capsys.readouterr().err


def test_proxy_refuses_a_push_channel_without_receive_addresses(capsys):
    pools = ["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"]
    assert main(["proxy", *pools, "--channel", "push"]) == 2
    assert "kv=" in capsys.readouterr().err
