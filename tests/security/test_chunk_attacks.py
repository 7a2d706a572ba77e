"""What an attacker with write access to a store can do to a chunk: each attempt is a counted miss.

Every test goes through the public Shelf API over real files and a real redis-server, and shows
the attack failing while the engine's answer (the KV it loads) stays the genuine one.
"""

import functools
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import redis
import torch

from kvshelf import Namespace, Shelf
from kvshelf.codecs import CODECS, frame
from kvshelf.codecs.framing import _PREFIX, FORMAT_VERSION
from kvshelf.security import Keyring
from kvshelf.tiers.disk import chunk_path
from tests.conftest import CHUNK_SIZE, LAYOUT, random_kv
from tests.tiers.test_disk import tmpfs

TOKENS = list(range(500, 516))  # 4 chunks of 4
SECRET = "a-test-deployment-secret-of-32-characters-or-more"


@pytest.fixture
def shelves(make_shelf):
    """Shelves of one deployment (SECRET) whose memory tier holds almost nothing: loads read the lower tiers."""
    return functools.partial(make_shelf, memory_size="1KiB", security_key=SECRET)


def stored(shelf: Shelf, namespace: Namespace) -> tuple[torch.Tensor, list]:
    kv = random_kv(len(TOKENS))
    shelf.save(TOKENS, kv, namespace)
    shelf.flush()
    return kv, shelf.chunk_keys(TOKENS, namespace)


def forged(key_digest: bytes, keyring: Keyring, num_tokens: int = CHUNK_SIZE, layout=LAYOUT) -> bytes:
    """A well-framed chunk of the attacker's choosing, tagged with the attacker's keyring."""
    kv = torch.full(layout.shape(num_tokens), 7.0, dtype=layout.torch_dtype)
    return frame(kv, key_digest, CODECS["raw"], keyring)


@pytest.mark.parametrize("attacker", [Keyring(None), Keyring(os.urandom(32))], ids=["unkeyed", "other-key"])
def test_forged_disk_chunk_is_a_counted_miss_and_the_genuine_one_replaces_it(shelves, namespace, attacker):
    victim = shelves()
    kv, keys = stored(victim, namespace)
    path = chunk_path(victim.config.disk.path, keys[1])
    path.write_bytes(forged(keys[1].digest, attacker))  # the name is public: the attacker lists the directory
    reader = shelves()
    loaded = reader.load(TOKENS, namespace, 16)
    assert loaded.num_tokens == CHUNK_SIZE and torch.equal(loaded.kv(), kv[:, :, :CHUNK_SIZE])
    assert reader.stats()["tiers"]["disk"]["corrupt_chunks"] == 1
    # The engine recomputes and saves: the genuine chunk is written, not blocked by the forged one.
    reader.save(TOKENS, kv, namespace)
    reader.flush()
    assert torch.equal(shelves().load(TOKENS, namespace, 16).kv(), kv)


def test_forged_redis_chunk_is_a_counted_miss(shelves, namespace, redis_server):
    victim = shelves(disk_path=None, redis_url=redis_server.url)
    kv, keys = stored(victim, namespace)
    client = redis.Redis.from_url(redis_server.url)
    name = f"kvshelf:{keys[0].namespace_id}:{keys[0].hex}"
    assert client.exists(name)
    client.set(name, forged(keys[0].digest, Keyring(None)))
    reader = shelves(disk_path=None, redis_url=redis_server.url)
    assert reader.load(TOKENS, namespace, 16).num_tokens == 0
    assert reader.stats()["tiers"]["redis"]["corrupt_chunks"] == 1
    assert not client.exists(name)  # deleted, so the next save stores the genuine chunk
    client.close()


def test_chunk_under_another_key_or_written_with_another_key_is_refused(shelves, namespace):
    victim = shelves()
    kv, keys = stored(victim, namespace)
    root = victim.config.disk.path
    shutil.copy(chunk_path(root, keys[3]), chunk_path(root, keys[2]))  # a genuine chunk, moved
    other_deployment = shelves(security_key="another-deployment-secret-32-chars-long!")
    assert other_deployment.lookup(TOKENS, namespace) == 0  # its keys differ: it never even finds them
    reader = shelves()
    assert reader.load(TOKENS, namespace, 16).num_tokens == 2 * CHUNK_SIZE
    assert reader.stats()["tiers"]["disk"]["corrupt_chunks"] == 1


@pytest.mark.parametrize("security_key", [SECRET, "none"])
@pytest.mark.parametrize("layout_change", [
    {"num_tokens": 2}, {"layout": LAYOUT.__class__(1, 2, 4)}, {"layout": LAYOUT.__class__(2, 1, 4)},
    {"layout": LAYOUT.__class__(2, 2, 8)}, {"layout": LAYOUT.__class__(2, 2, 4, "float16")},
])
def test_authentic_chunk_of_the_wrong_shape_is_refused(shelves, namespace, security_key, layout_change):
    """A key holder's bug (or an insider) wrote a chunk of another shape: never loaded, never raised."""
    victim = shelves(security_key=security_key)
    kv, keys = stored(victim, namespace)
    chunk_path(victim.config.disk.path, keys[1]).write_bytes(forged(keys[1].digest, victim.keyring, **layout_change))
    reader = shelves(security_key=security_key)
    loaded = reader.load(TOKENS, namespace, 16)
    assert loaded.num_tokens == CHUNK_SIZE and torch.equal(loaded.kv(), kv[:, :, :CHUNK_SIZE])
    assert reader.stats()["tiers"]["disk"]["corrupt_chunks"] == 1


BOMB_SCRIPT = """
import resource, sys, struct
from kvshelf import Namespace, Shelf, load_config
from kvshelf.codecs import CODECS
from kvshelf.codecs.framing import FORMAT_VERSION, _PREFIX
from kvshelf.keys import chunk_keys
from kvshelf.layout import KVLayout
from kvshelf.tiers.disk import chunk_path
layout = KVLayout(2, 2, 4)
namespace = Namespace("bomb-model", layout)
shelf = Shelf(load_config(environ={}, chunk_size=4, disk_path=sys.argv[1], security_key="none"))
key = shelf.chunk_keys(list(range(4)), namespace)[0]
# 130 bytes declaring 33M tokens of cachegen payload: the old decoder allocated from this shape.
prefix = _PREFIX.pack(b"KVSH", FORMAT_VERSION, CODECS["cachegen"].id, 3, 0, 2, 2, 33_000_000, 2, 4, 30)
payload = bytes(30)
blob = prefix + shelf.keyring.tag(key.digest, prefix, payload) + payload
path = chunk_path(shelf.config.disk.path, key)
path.parent.mkdir(parents=True, exist_ok=True)
path.write_bytes(blob)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loaded = shelf.load(list(range(4)), namespace, 4)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(loaded.num_tokens, shelf.stats()["tiers"]["disk"]["corrupt_chunks"], (after - before) // 1024)
shelf.close()
"""


def test_decompression_bomb_is_refused_before_any_allocation(tmp_path):
    """With authentication off the tag is computable, so the header is the attacker's: its shape is
    checked against the namespace's layout before a codec sees it."""
    child = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(tmp_path / "disk")],
                           capture_output=True, text=True, check=True)
    num_tokens, corrupt, grown_mib = map(int, child.stdout.split())
    assert (num_tokens, corrupt) == (0, 1)
    assert grown_mib < 64


def _rewrite_header(path, **fields) -> None:
    data = bytearray(path.read_bytes())
    values = dict(zip(("magic", "version", "codec", "dtype", "flags"), _PREFIX.unpack_from(data)[:5]))
    values.update(fields)
    struct.pack_into("<4sBBBB", data, 0, *values.values())
    path.write_bytes(data)


def _retagged(path, key, keyring, **header_changes) -> bytes:
    """The object at `path` with its header changed and tagged again, as a key holder could."""
    _rewrite_header(path, **header_changes)
    data = bytearray(path.read_bytes())
    tag_at = _PREFIX.size
    data[tag_at : tag_at + 32] = keyring.tag(key.digest, bytes(data[:tag_at]), bytes(data[tag_at + 32 :]))
    path.write_bytes(data)
    return bytes(data)


def test_a_newer_kvshelfs_codec_is_a_foreign_miss_left_alone(shelves, namespace):
    """Rolling upgrades: an older instance must not delete what a newer one of the same format wrote."""
    victim = shelves()
    _, keys = stored(victim, namespace)
    path = chunk_path(victim.config.disk.path, keys[0])
    data = _retagged(path, keys[0], victim.keyring, codec=200)
    reader = shelves()
    assert reader.load(TOKENS, namespace, 16).num_tokens == 0
    stats = reader.stats()["tiers"]["disk"]
    assert (stats["foreign_chunks"], stats["corrupt_chunks"]) == (1, 0)
    assert path.read_bytes() == data  # left alone


@pytest.mark.parametrize("change", [{"version": FORMAT_VERSION + 1}, {"flags": 0x80}])
def test_another_format_under_our_key_is_corrupt_and_removed(shelves, namespace, change):
    """The format version is in every key, so another version's object under ours is planted (left in
    place it would block the key for good): a counted miss, deleted, and the genuine chunk comes back."""
    victim = shelves(security_key="none")  # unkeyed: the attacker can compute the checksum
    kv, keys = stored(victim, namespace)
    path = chunk_path(victim.config.disk.path, keys[0])
    _retagged(path, keys[0], victim.keyring, **change)
    reader = shelves(security_key="none")
    assert reader.load(TOKENS, namespace, 16).num_tokens == 0
    assert reader.stats()["tiers"]["disk"]["corrupt_chunks"] == 1 and not path.exists()
    reader.save(TOKENS, kv, namespace)
    reader.flush()
    assert torch.equal(shelves(security_key="none").load(TOKENS, namespace, 16).kv(), kv)


def test_stores_never_hold_the_salt(shelves, namespace, redis_server):
    tenant = Namespace(namespace.model_id, namespace.layout, cache_salt="acme-private-salt")
    shelf = shelves(redis_url=redis_server.url)
    stored(shelf, tenant)
    root = shelf.config.disk.path
    for path in root.rglob("*"):
        if path.is_file():
            assert b"acme-private-salt" not in path.read_bytes(), path
    client = redis.Redis.from_url(redis_server.url)
    for name in client.scan_iter("*"):
        assert b"acme-private-salt" not in client.get(name) + name
    description = json.loads((root / tenant.id(shelf.keyring) / "namespace.json").read_text())
    assert description["cache_salt_tag"] == shelf.keyring.salt_tag("acme-private-salt")
    client.close()


def test_encryption_at_rest_hides_the_kv_and_still_loads_exactly(shelves, namespace, redis_server):
    shelf = shelves(security_encrypt=True, redis_url=redis_server.url)
    kv, keys = stored(shelf, namespace)
    plain = kv[:, :, :CHUNK_SIZE].contiguous().numpy().tobytes()
    on_disk = chunk_path(shelf.config.disk.path, keys[0]).read_bytes()
    client = redis.Redis.from_url(redis_server.url)
    in_redis = client.get(f"kvshelf:{keys[0].namespace_id}:{keys[0].hex}")
    client.close()
    for blob in (on_disk, in_redis):
        assert all(plain[i : i + 16] not in blob for i in range(0, len(plain), 16))
    reader = shelves(security_encrypt=True, disk_path=None, redis_url=redis_server.url)
    assert torch.equal(reader.load(TOKENS, namespace, 16).kv(), kv)
    # An instance of the same deployment with encryption off still reads them (the setting can change
    # across a fleet without one instance deleting another's chunks); another deployment cannot.
    assert torch.equal(shelves(disk_path=None, redis_url=redis_server.url).load(TOKENS, namespace, 16).kv(), kv)
    other = shelves(disk_path=None, redis_url=redis_server.url, security_key="another-deployment-secret-32-chars-long!")
    assert other.load(TOKENS, namespace, 16).num_tokens == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user")
def test_another_local_user_cannot_read_stored_kv(shelves, namespace):
    """Layer-0 values map back to token ids, so stored KV is the prompt: other users must not read it."""
    parent = Path(tempfile.mkdtemp(dir="/tmp"))
    parent.chmod(0o755)  # a place every user may walk through, as /var/cache is
    try:
        shelf = shelves(disk_path=str(parent / "disk"))
        _, keys = stored(shelf, namespace)
        chunk = chunk_path(shelf.config.disk.path, keys[0])
        attempt = subprocess.run(
            ["cat", str(chunk)], user="nobody", capture_output=True, text=True,
        )
        assert attempt.returncode != 0 and "Permission denied" in attempt.stderr
        assert (chunk.stat().st_mode & 0o777, shelf.config.disk.path.stat().st_mode & 0o777) == (0o600, 0o700)
    finally:
        shutil.rmtree(parent)


def test_a_disk_that_fails_writes_still_serves_reads(shelves, namespace, tmp_path):
    """One breaker per direction: a read-only (or full) filesystem stops writes, not reads."""
    with tmpfs(tmp_path / "fs", size="4m") as fs:
        shelf = shelves(tier_backoff_s=600, disk_path=str(fs / "disk"), disk_size="2MiB")
        kv, _ = stored(shelf, namespace)
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        shelf.save(list(range(900, 916)), random_kv(16, seed=3), namespace)
        shelf.flush()
        assert shelf.stats()["tiers"]["disk"]["errors"] == 1
        loaded = shelf.load(TOKENS, namespace, 16)  # memory holds 1 KiB: this reads the disk
        assert torch.equal(loaded.kv(), kv) and shelf.stats()["tiers"]["disk"]["loaded_bytes"] > 0
        shelf.close()
