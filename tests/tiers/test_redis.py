"""The redis tier against real redis-server processes: one server, a 3-node cluster, failures."""

import json
import logging
import subprocess
import time
from pathlib import Path

import pytest
import torch

from kvshelf import ConfigError, KVLayout, Namespace, Shelf, load_config
from kvshelf.bench.redis_servers import RedisServer
from kvshelf.ports import free_port
from kvshelf.tiers.redis import USAGE_REFRESH_S, RedisTier
from tests.conftest import CHUNK_SIZE, LAYOUT, random_kv
from tests.tiers.test_memory import key

TOKENS = list(range(6 * CHUNK_SIZE))


def redis_config(urls, **options):
    return load_config(environ={}, redis_url=urls, **options).redis


def tier_of(urls, **options) -> RedisTier:
    tier = RedisTier(redis_config(urls, **options), backoff_s=0.2)
    tier.connect()
    return tier


@pytest.fixture
def redis_shelf(make_shelf, redis_server):
    """Shelves over `redis_server` alone: no disk, so a new shelf can only hit what Redis holds."""

    def make(**overrides):
        return make_shelf(disk_path=None, redis_url=redis_server.url, tier_backoff_s=0.2, **overrides)

    return make


def redis_name(key) -> str:
    return f"kvshelf:{key.namespace_id}:{key.hex}"


def saved_kv(shelf, namespace, tokens=TOKENS, seed=0):
    kv = random_kv(len(tokens), seed)
    shelf.save(tokens, kv, namespace)
    shelf.flush()
    return kv


def test_tier_round_trip_and_namespaced_names(redis_server):
    tier = tier_of(redis_server.url)
    tier.put_many([(key(i), [b"head", bytes([i]) * 100_000]) for i in range(4)])
    assert tier.contains_prefix([key(0), key(1), key(9), key(2)]) == 2
    assert tier.contains_each([key(0), key(9), key(3)]) == [True, False, True]
    assert tier.get_many([key(2), key(9)]) == [b"head" + bytes([2]) * 100_000, None]
    tier.delete([key(1)])
    assert tier.contains_each([key(1)]) == [False]
    names = {name.decode() for name in redis_server.client().keys("*")}
    assert names == {f"kvshelf:{key(i).namespace_id}:{key(i).hex}" for i in (0, 2, 3)}
    tier.close()


def test_names_that_are_not_utf8_or_not_a_chunks_spelling_are_listed_as_not_chunks_and_cleared(redis_server):
    tier = tier_of(redis_server.url)
    tier.put_many([(key(0xAB), [b"chunk"])])  # "ab00...": its hex has letters to spell in upper case
    namespace_id, chunk_hex = key(0xAB).namespace_id, key(0xAB).hex
    strays = {
        b"kvshelf:\xff\xfe:junk": "kvshelf:\\xff\\xfe:junk",  # anyone who can SET can write this
        f"kvshelf:{namespace_id}:".encode() + b"\xc3\x28": f"kvshelf:{namespace_id}:\\xc3(",
        f"kvshelf:{namespace_id}:{chunk_hex.upper()}".encode(): f"kvshelf:{namespace_id}:{chunk_hex.upper()}",
        f"kvshelf:{namespace_id.upper()}:{chunk_hex}".encode(): f"kvshelf:{namespace_id.upper()}:{chunk_hex}",
        f"kvshelf:{namespace_id}:{chunk_hex[:2]} {chunk_hex[2:]}".encode():  # bytes.fromhex would take it
            f"kvshelf:{namespace_id}:{chunk_hex[:2]} {chunk_hex[2:]}",
    }
    client = redis_server.client()
    for raw_name in strays:
        client.set(raw_name, b"x")
    listed = dict(tier.iter_names())
    assert listed == {redis_name(key(0xAB)): key(0xAB)} | {name: None for name in strays.values()}
    # clear deletes by the names Redis holds, so the namespace's strays go too; the others stay
    assert tier.clear(namespace_id) == 4
    left = [b"kvshelf:\xff\xfe:junk", f"kvshelf:{namespace_id.upper()}:{chunk_hex}".encode()]
    assert sorted(client.keys("*")) == sorted(left)
    tier.close()


def test_note_namespace_records_the_first_description_only(redis_server):
    tier = tier_of(redis_server.url)
    first = {"model_id": "m@1", "cache_salt_tag": "5f0e9c2ab3d14e77"}
    tier.note_namespace("0123456789abcdef", first)
    tier.note_namespace("0123456789abcdef", {"model_id": "other"})  # noted already: not even sent
    another = tier_of(redis_server.url)
    another.note_namespace("0123456789abcdef", {"model_id": "other"})  # SET NX: the first stays
    another.close()
    assert json.loads(redis_server.client().get("kvshelf:0123456789abcdef:namespace")) == first
    assert tier.namespace_description("0123456789abcdef") == first
    assert dict(tier.iter_names()) == {"kvshelf:0123456789abcdef:namespace": None}
    tier.close()


def test_a_second_shelf_hits_what_the_first_stored(redis_shelf, namespace):
    kv = saved_kv(redis_shelf(), namespace)
    reader = redis_shelf()
    assert reader.lookup(TOKENS, namespace) == len(TOKENS)
    assert torch.equal(reader.load(TOKENS, namespace, len(TOKENS)).kv(), kv)
    assert reader.stats()["tiers"]["redis"]["loaded_bytes"] > kv.nbytes
    assert reader.stats()["tiers"]["memory"]["used_bytes"] == kv.nbytes  # promoted on read


def test_tenants_sharing_one_redis_never_hit_each_other(redis_shelf):
    tenant_a = Namespace("test-model@1", LAYOUT, cache_salt="tenant-a")
    tenant_b = Namespace("test-model@1", LAYOUT, cache_salt="tenant-b")
    saved_kv(redis_shelf(), tenant_a)
    reader = redis_shelf()
    assert reader.lookup(TOKENS, tenant_b) == 0
    assert reader.lookup(TOKENS, tenant_a) == len(TOKENS)


def test_ttl_is_set_and_renewed_by_reads(redis_shelf, redis_server, namespace):
    writer = redis_shelf(redis_ttl_s=100)
    saved_kv(writer, namespace)
    client = redis_server.client()
    first = redis_name(writer.chunk_keys(TOKENS, namespace)[0])
    assert 0 < client.pttl(first) <= 100_000
    client.pexpire(first, 5000)
    redis_shelf(redis_ttl_s=100).load(TOKENS, namespace, CHUNK_SIZE)
    assert client.pttl(first) > 5000


def test_corrupt_value_is_a_miss_counted_and_removed(redis_shelf, redis_server, namespace):
    writer = redis_shelf()
    kv = saved_kv(writer, namespace)
    client = redis_server.client()
    second = redis_name(writer.chunk_keys(TOKENS, namespace)[1])
    damaged = bytearray(client.get(second))
    damaged[-3] ^= 0x01
    client.set(second, bytes(damaged))
    reader = redis_shelf()
    loaded = reader.load(TOKENS, namespace, len(TOKENS))
    assert loaded.num_tokens == CHUNK_SIZE
    assert torch.equal(loaded.kv(), kv[:, :, :CHUNK_SIZE])
    assert reader.stats()["tiers"]["redis"]["corrupt_chunks"] == 1
    assert not client.exists(second)


def test_redis_eviction_inside_a_prefix_ends_the_prefix_there(tmp_path, make_shelf):
    namespace = Namespace("big-model@1", KVLayout(num_layers=8, num_kv_heads=8, head_dim=64))  # 128 KiB chunks
    # LFU with a log factor of 0 counts every read, so the chunks in use are never the ones evicted;
    # LRU would do the same with sleeps, as its clock ticks once a second. Either way Redis picks.
    lfu = ("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lfu", "--lfu-log-factor", "0",
           "--maxmemory-samples", "10")
    with RedisServer(tmp_path, *lfu) as server:
        shelf = make_shelf(disk_path=None, redis_url=server.url, memory_size="1KiB")  # every read goes to Redis
        tokens = list(range(12 * CHUNK_SIZE))
        kv = torch.randn(namespace.layout.shape(len(tokens)))
        shelf.save(tokens, kv, namespace)
        shelf.flush()
        for filler in range(6):  # keep the first 6 chunks in use while other prompts fill Redis up
            shelf.load(tokens, namespace, 6 * CHUNK_SIZE)
            other = list(range(10_000 * (filler + 1), 10_000 * (filler + 1) + 6 * CHUNK_SIZE))
            shelf.save(other, torch.randn(namespace.layout.shape(len(other))), namespace)
            shelf.flush()
        client = server.client()
        assert client.info("stats")["evicted_keys"] > 0
        names = [redis_name(k) for k in shelf.chunk_keys(tokens, namespace)]
        held = [bool(client.exists(name)) for name in names]
        first_missing = held.index(False)
        assert first_missing > 0  # the hole is inside the prefix
        reader = make_shelf(disk_path=None, redis_url=server.url)
        assert reader.lookup(tokens, namespace) == first_missing * CHUNK_SIZE
        # Reading counts against maxmemory too (reply buffers), so Redis may evict more meanwhile.
        loaded = reader.load(tokens, namespace, len(tokens))
        assert 0 < loaded.num_tokens <= first_missing * CHUNK_SIZE
        assert torch.equal(loaded.kv(), kv[:, :, : loaded.num_tokens])
        time.sleep(USAGE_REFRESH_S)  # Redis's counters are read at most once a second
        assert shelf.stats()["tiers"]["redis"]["evictions"] > 0


def test_a_full_redis_that_may_not_evict_rejects_writes_and_keeps_serving(tmp_path, make_shelf):
    namespace = Namespace("big-model@1", KVLayout(num_layers=8, num_kv_heads=8, head_dim=64))  # 128 KiB chunks
    with RedisServer(tmp_path, "--maxmemory", "3mb", "--maxmemory-policy", "noeviction") as server:
        shelf = make_shelf(disk_path=None, redis_url=server.url, memory_size="1KiB")
        tokens = list(range(40 * CHUNK_SIZE))
        kv = torch.randn(namespace.layout.shape(len(tokens)))
        shelf.save(tokens, kv, namespace)
        shelf.flush()
        stats = shelf.stats()["tiers"]["redis"]
        assert stats["rejected_writes"] > 0 and stats["errors"] == 0 and stats["skipped"] == 0
        num_tokens = shelf.lookup(tokens, namespace)
        assert 0 < num_tokens < len(tokens)
        assert torch.equal(shelf.load(tokens, namespace, num_tokens).kv(), kv[:, :, :num_tokens])


def test_redis_down_means_misses_and_dropped_writes_then_it_is_used_again(redis_shelf, redis_server, namespace):
    shelf = redis_shelf(memory_size="1KiB")  # too small to hold a chunk: every hit comes from Redis
    kv = saved_kv(shelf, namespace)
    redis_server.kill()
    assert shelf.lookup(TOKENS, namespace) == 0
    assert shelf.load(TOKENS, namespace, len(TOKENS)).num_tokens == 0
    shelf.save(list(range(100, 100 + 2 * CHUNK_SIZE)), random_kv(2 * CHUNK_SIZE), namespace)
    shelf.flush()
    stats = shelf.stats()
    assert stats["tiers"]["redis"]["errors"] >= 1
    assert stats["tiers"]["redis"]["skipped"] >= 1
    assert stats["dropped_writes"] == 1
    redis_server.start()  # same port, empty
    time.sleep(0.3)  # past the back-off
    saved_kv(shelf, namespace)
    assert shelf.lookup(TOKENS, namespace) == len(TOKENS)
    assert torch.equal(shelf.load(TOKENS, namespace, len(TOKENS)).kv(), kv)


@pytest.mark.parametrize(
    ("server_args", "options", "message"),
    [
        ((), {"redis_url": "redis://127.0.0.1:1/0"}, "cannot reach Redis at 127.0.0.1:1"),
        (("--requirepass", "s3cret"), {}, "refused the login.*set or check redis.password"),
        (("--requirepass", "s3cret"), {"redis_password": "wrong"}, "refused the login"),
        (("--user", "alice", "on", ">pw", "~*", "+@all"), {"redis_username": "alice", "redis_password": "no"},
         "refused the login"),
    ],
)
def test_unreachable_or_refused_at_start_is_a_clear_error(tmp_path, server_args, options, message):
    with RedisServer(tmp_path, *server_args) as server:
        values = {"redis_url": server.url} | options
        with pytest.raises(ConfigError, match=message) as raised:
            Shelf(load_config(environ={}, **values))
        assert "s3cret" not in str(raised.value) and "wrong" not in str(raised.value)


PASSWORD = "p@ss/w:rd%"  # characters a URL must escape
QUOTED_PASSWORD = "p%40ss%2Fw%3Ard%25"


@pytest.mark.parametrize("login", ["password_in_url", "password_option", "acl_user"])
def test_login(tmp_path, make_shelf, namespace, login):
    server_args = (("--user", "alice", "on", f">{PASSWORD}", "~*", "+@all") if login == "acl_user"
                   else ("--requirepass", PASSWORD))
    with RedisServer(tmp_path, *server_args) as server:
        options = {
            "password_in_url": {"redis_url": server.url.replace("//", f"//:{QUOTED_PASSWORD}@")},
            "password_option": {"redis_url": server.url, "redis_password": PASSWORD},
            "acl_user": {"redis_url": server.url.replace("//", f"//alice:{QUOTED_PASSWORD}@")},
        }[login]
        shelf = make_shelf(disk_path=None, **options)
        saved_kv(shelf, namespace)
        assert make_shelf(disk_path=None, **options).lookup(TOKENS, namespace) == len(TOKENS)


def test_warn_on_start_failure_serves_without_redis_until_it_comes(tmp_path, make_shelf, namespace, caplog):
    server = RedisServer(tmp_path)
    with caplog.at_level(logging.WARNING):
        shelf = make_shelf(disk_path=None, redis_url=server.url, redis_on_start_failure="warn",
                           tier_backoff_s=0.2, memory_size="1KiB")
    assert "starting without it" in caplog.text
    assert shelf.lookup(TOKENS, namespace) == 0
    with server:
        time.sleep(0.3)
        kv = saved_kv(shelf, namespace)
        assert shelf.load(TOKENS, namespace, len(TOKENS)).kv().equal(kv)


def test_bad_redis_config_names_the_key():
    with pytest.raises(ConfigError, match="redis.url must be redis://"):
        load_config(environ={}, redis_url="http://localhost:6379")
    with pytest.raises(ConfigError, match="set redis.cluster: true"):
        load_config(environ={}, redis_url="redis://a:1,redis://b:2")
    with pytest.raises(ConfigError, match="set redis.url"):
        load_config(environ={}, redis_ttl_s=10)
    with pytest.raises(ConfigError, match="redis.on_start_failure must be"):
        load_config(environ={}, redis_url="redis://a:1", redis_on_start_failure="maybe")


def test_cluster_spreads_chunks_and_losing_a_node_loses_only_its_keys(redis_cluster, make_shelf, namespace):
    tokens = list(range(30 * CHUNK_SIZE))

    def cluster_shelf():
        return make_shelf(disk_path=None, redis_url=redis_cluster.urls, redis_cluster=True, memory_size="1KiB")

    writer = cluster_shelf()
    kv = saved_kv(writer, namespace, tokens)
    sizes = [node.client().dbsize() for node in redis_cluster.nodes]
    assert all(size > 0 for size in sizes) and sum(sizes) == 30 + 1  # + the namespace description
    reader = cluster_shelf()
    assert torch.equal(reader.load(tokens, namespace, len(tokens)).kv(), kv)

    lost, survivors = redis_cluster.nodes[1], redis_cluster.nodes[::2]
    held_by_survivors = set()
    for node in survivors:
        held_by_survivors |= {name.decode() for name in node.client().keys("*")}
    lost.kill()
    keys = writer.chunk_keys(tokens, namespace)
    tier = tier_of(redis_cluster.urls, redis_cluster=True)
    expected = [redis_name(k) in held_by_survivors for k in keys]
    assert tier.contains_each(keys) == expected
    chunks = tier.get_many(keys)
    assert [chunk is not None for chunk in chunks] == expected
    assert tier.counters.num_errors >= 1
    after_loss = cluster_shelf()
    assert after_loss.lookup(tokens, namespace) == expected.index(False) * CHUNK_SIZE
    tier.close()


def self_signed_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key_file), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key_file


def test_tls_with_a_certificate_checked_against_its_ca(tmp_path, make_shelf, namespace):
    cert, key_file = self_signed_certificate(tmp_path, "server")
    stranger, _ = self_signed_certificate(tmp_path, "stranger")
    tls_port = free_port()
    tls = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key_file),
           "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no")
    with RedisServer(tmp_path, *tls):
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}&ssl_cert_reqs=required"
        kv = saved_kv(make_shelf(disk_path=None, redis_url=url), namespace)
        assert torch.equal(make_shelf(disk_path=None, redis_url=url).load(TOKENS, namespace, len(TOKENS)).kv(), kv)
        with pytest.raises(ConfigError, match="certificate verify failed"):  # a server its CA did not sign
            make_shelf(disk_path=None, redis_url=url.replace(str(cert), str(stranger)))
