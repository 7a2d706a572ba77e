import json
import os
import sys

import pytest

from kvshelf import Namespace, load_config
from kvshelf.bench.redis_servers import RedisServer
from kvshelf.cli import main
from kvshelf.errors import TierUnavailable
from kvshelf.tiers.disk import chunk_path
from kvshelf.tiers.redis import RedisTier
from tests.conftest import LAYOUT, random_kv

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
    damaged = chunk_path(root, shelf.chunk_keys(TOKENS, tenant)[2])
    damaged.write_bytes(damaged.read_bytes()[:-1])
    namespace_id, tenant_id = namespace.id(shelf.keyring), tenant.id(shelf.keyring)
    (root / namespace_id / "notes.txt").write_text("not a chunk")
    return root, namespace, namespace_id, tenant_id


def test_inspect_json_counts_namespaces_and_damage(store, capsys):
    root, namespace, namespace_id, tenant_id = store
    assert main(["inspect", str(root), "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)
    assert report["num_chunks"] == 5
    assert report["namespaces"][namespace_id]["num_chunks"] == 3
    assert report["namespaces"][tenant_id]["description"]["model_id"] == namespace.model_id
    assert "tenant-b" not in out  # the salt is a tenant's secret
    reasons = sorted(entry["reason"] for entry in report["damaged"])
    assert len(reasons) == 2 and "not a chunk's name" in reasons
    assert any(reason.startswith("object has") for reason in reasons)


def test_inspect_table(store, capsys):
    root, namespace, _, _ = store
    assert main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{root}: 5 chunks" in out
    assert "tenant-b" not in out and "damaged:" in out and namespace.model_id in out


def test_inspect_without_verify_does_not_read_chunks(store, capsys):
    root, _, _, _ = store
    assert main(["inspect", str(root), "--json", "--no-verify"]) == 0
    assert json.loads(capsys.readouterr().out)["num_chunks"] == 6


def test_inspect_of_a_missing_directory_says_what_to_give(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "disk.path" in capsys.readouterr().err


def test_clear_one_namespace_of_a_disk_store(store, capsys):
    root, namespace, namespace_id, tenant_id = store
    assert main(["clear", str(root), "--namespace", tenant_id]) == 0
    assert f"{tenant_id}: removed 4 objects" in capsys.readouterr().out  # 3 chunks and namespace.json
    assert main(["stats", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["namespaces"]) == [namespace_id] and report["num_chunks"] == 3


def test_clear_refuses_what_is_not_a_namespace_id(store, capsys):
    root, _, _, _ = store
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
    tenant_id = tenant.id(shelf.keyring)
    damaged = f"kvshelf:{tenant_id}:{shelf.chunk_keys(TOKENS, tenant)[2].hex}"
    client = redis_server.client()
    client.set(damaged, client.get(damaged)[:-1])
    return redis_server, namespace, namespace.id(shelf.keyring), tenant_id


def test_inspect_stats_and_clear_a_redis_store(redis_store, capsys):
    server, namespace, namespace_id, tenant_id = redis_store
    assert main(["inspect", server.url, "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)
    assert report["num_chunks"] == 5 and len(report["damaged"]) == 1
    assert report["namespaces"][tenant_id]["description"]["model_id"] == namespace.model_id
    assert "tenant-b" not in out
    assert main(["stats", server.url]) == 0
    out = capsys.readouterr().out
    assert "6 chunks" in out and "maxmemory_policy" in out
    assert main(["clear", server.url, "--namespace", tenant_id]) == 0
    assert f"{tenant_id}: removed 4 objects" in capsys.readouterr().out  # 3 chunks and the description
    assert main(["stats", server.url, "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["namespaces"]) == [namespace_id]
    assert main(["clear", server.url, "--all"]) == 0
    assert server.client().dbsize() == 0


def test_stats_print_the_tenant_tag_and_never_a_salt_even_one_an_old_description_holds(store, capsys):
    root, namespace, namespace_id, tenant_id = store
    tag = "5f0e9c2ab3d14e77"
    old_and_new = {"model_id": namespace.model_id, "cache_salt": "tenant-b", "cache_salt_tag": tag}
    (root / tenant_id / "namespace.json").write_text(json.dumps(old_and_new))
    assert main(["stats", str(root)]) == 0
    table = capsys.readouterr().out
    assert f"{namespace.model_id}, tenant {tag}" in table and "tenant-b" not in table
    assert main(["stats", str(root), "--json"]) == 0
    description = json.loads(capsys.readouterr().out)["namespaces"][tenant_id]["description"]
    assert description == {"model_id": namespace.model_id, "cache_salt_tag": tag}


def test_a_name_that_is_not_utf8_is_reported_not_a_chunk_and_clear_still_works(redis_store, capsys):
    server, namespace, namespace_id, tenant_id = redis_store
    client = server.client()
    stray = b"kvshelf:\xff\xfe:junk"
    in_tenant = f"kvshelf:{tenant_id}:".encode() + b"\xc3\x28"  # an invalid 2-byte sequence
    client.set(stray, b"x")
    client.set(in_tenant, b"y")
    assert main(["inspect", server.url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    not_chunks = sorted(entry["where"] for entry in report["damaged"] if entry["reason"] == "not a chunk's name")
    assert not_chunks == sorted(["kvshelf:\\xff\\xfe:junk", f"kvshelf:{tenant_id}:\\xc3("])
    assert report["num_chunks"] == 5
    assert main(["stats", server.url]) == 0
    table = capsys.readouterr().out
    assert "6 chunks" in table and "damaged: kvshelf:\\xff\\xfe:junk: not a chunk's name" in table
    assert main(["clear", server.url, "--namespace", tenant_id]) == 0
    assert f"{tenant_id}: removed 5 objects" in capsys.readouterr().out  # 3 chunks, the description, the stray
    assert not client.exists(in_tenant) and client.exists(stray)
    assert main(["clear", server.url, "--all"]) == 0
    assert client.keys("*") == [stray]  # in no namespace: `clear --all` leaves it, and says nothing of it


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
    assert "memory.size must be a finite size larger than zero, like 512MiB" in capsys.readouterr().err


def test_serve_refuses_a_redis_it_cannot_reach_before_starting_vllm(capsys):
    assert main(["serve", "--redis-url", "redis://127.0.0.1:1/0"]) == 2
    assert "cannot reach Redis at 127.0.0.1:1" in capsys.readouterr().err


def test_serve_refuses_a_bad_receive_address_before_starting_vllm(capsys):
    assert main(["serve", "--role", "decode", "--receive-address", "localhost:5600"]) == 2
    assert "pd.receive_address must be tcp://host:port" in capsys.readouterr().err


def test_serve_refuses_a_kvshelf_server_on_vllms_own_port_before_starting_vllm(capsys):
    assert main(["serve", "--port", "8123", "--lookup-address", "tcp://127.0.0.1:8123"]) == 2
    assert ("vLLM's --host/--port (127.0.0.1:8123) and lookup_address (tcp://127.0.0.1:8123) are one port"
            in capsys.readouterr().err)


def test_pd_over_a_tier_needs_the_redis_to_share(capsys):
    assert main(["pd", "--channel", "tier"]) == 2
    assert "--redis-url" in capsys.readouterr().err


def test_proxy_refuses_a_push_channel_without_receive_addresses(capsys):
    pools = ["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"]
    assert main(["proxy", *pools, "--channel", "push"]) == 2
    assert "kv=" in capsys.readouterr().err


# -- a Redis login given on the command line reaches vLLM through its environment, never its argv --

ALICE_PASSWORD = "s3cret-pw"


@pytest.fixture
def acl_redis(tmp_path, monkeypatch):
    """A redis-server whose only login is alice's; no Redis login in this process's environment."""
    for name in ("KVSHELF_CONFIG", "KVSHELF_REDIS_URL", "KVSHELF_REDIS_USERNAME", "KVSHELF_REDIS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    acl = ("--user", "default", "off", "--user", "alice", "on", f">{ALICE_PASSWORD}", "~*", "+@all")
    with RedisServer(tmp_path, *acl) as server:
        yield server, server.url.replace("//", f"//alice:{ALICE_PASSWORD}@")


def logs_in(server: RedisServer, child_env: dict[str, str]) -> bool:
    """Whether kvshelf, configured as the child vLLM would be (its environment, the URL without login), logs in."""
    login = {name: value for name, value in child_env.items() if name.startswith("KVSHELF_REDIS_")}
    tier = RedisTier(load_config(environ=login, redis_url=server.url).redis, backoff_s=1.0)
    try:
        tier.connect()
        return True
    except TierUnavailable:
        return False
    finally:
        tier.close()


def test_serve_passes_the_redis_login_in_vllms_environment_not_its_argv(acl_redis, tmp_path):
    from kvshelf.serve import connector_extra_config, redis_login_env, vllm_serve_argv

    server, url = acl_redis
    extra = connector_extra_config(None, None, None, None, url)  # logs in to check the Redis, as serve does
    assert extra["redis.url"] == server.url
    argv = vllm_serve_argv("org/model", "127.0.0.1", 8000, extra, [])
    transfer_config = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert transfer_config["kv_connector_extra_config"]["redis.url"] == server.url
    assert not any("alice" in arg or ALICE_PASSWORD in arg for arg in argv)
    env = redis_login_env(None, url)
    assert env == {"KVSHELF_REDIS_USERNAME": "alice", "KVSHELF_REDIS_PASSWORD": ALICE_PASSWORD}
    assert logs_in(server, env) and not logs_in(server, {})


def test_exec_vllm_hands_the_login_over_in_the_environment(acl_redis, tmp_path):
    """exec_vllm in a forked child, replaced by a probe that records its own command line and environment."""
    from kvshelf.serve import connector_extra_config, exec_vllm, redis_login_env, vllm_serve_argv

    _, url = acl_redis
    argv = vllm_serve_argv("org/model", "127.0.0.1", 8000, connector_extra_config(None, None, None, None, url), [])
    seen = tmp_path / "seen.json"
    probe = ("import json, os, sys; json.dump({'cmdline': open('/proc/self/cmdline', 'rb').read().decode(), "
             "'password': os.environ.get('KVSHELF_REDIS_PASSWORD')}, open(sys.argv[1], 'w'))")
    pid = os.fork()
    if pid == 0:
        try:
            exec_vllm([sys.executable, "-c", probe, str(seen), *argv[1:]], redis_login_env(None, url))
        finally:
            os._exit(1)  # only if the exec failed
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    record = json.loads(seen.read_text())
    assert "--kv-transfer-config" in record["cmdline"]
    assert "alice" not in record["cmdline"] and ALICE_PASSWORD not in record["cmdline"]
    assert record["password"] == ALICE_PASSWORD
    assert "KVSHELF_REDIS_PASSWORD" not in os.environ  # set in the child only


def test_a_login_set_outside_the_url_wins_and_is_not_moved(acl_redis, monkeypatch):
    from kvshelf.serve import redis_login_env

    _, url = acl_redis
    monkeypatch.setenv("KVSHELF_REDIS_PASSWORD", ALICE_PASSWORD)  # vLLM inherits it as it is
    assert redis_login_env(None, url.replace(ALICE_PASSWORD, "other")) == {"KVSHELF_REDIS_USERNAME": "alice"}
    assert redis_login_env(None, None) == {}


def test_pd_passes_the_redis_login_in_each_instances_environment_not_its_argv(acl_redis):
    from kvshelf.disagg.launch import instance_argv, instance_env, new_instance

    server, url = acl_redis
    for instance in (new_instance("prefill"), new_instance("decode")):
        argv = instance_argv(instance, "1GiB", url, [])
        assert not any("alice" in arg or ALICE_PASSWORD in arg for arg in argv)
        transfer_config = json.loads(argv[argv.index("--kv-transfer-config") + 1])
        assert transfer_config["kv_connector_extra_config"]["redis.url"] == server.url
    env = instance_env(url, cpus="1")
    assert (env["KVSHELF_REDIS_USERNAME"], env["KVSHELF_REDIS_PASSWORD"]) == ("alice", ALICE_PASSWORD)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and env["PATH"] == os.environ["PATH"]
    assert logs_in(server, env)
