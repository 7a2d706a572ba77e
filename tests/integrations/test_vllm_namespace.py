"""What a vLLM request may share: never KV of another adapter, tenant or image."""

from types import SimpleNamespace

from kvshelf import KVLayout, Namespace
from kvshelf.integrations.vllm.context import mm_hashes, request_namespace
from kvshelf.keys import chunk_keys
from kvshelf.security import Keyring

BASE = Namespace("model@rev", KVLayout(30, 3, 64), extra=(("engine", "vllm"),))
TOKENS = list(range(512))


def request(lora=None, salt=None, images=()):
    features = [SimpleNamespace(identifier=digest, mm_position=SimpleNamespace(offset=offset, length=8))
                for offset, digest in images]
    return SimpleNamespace(lora_request=lora, cache_salt=salt, mm_features=features)


def keys(req) -> list:
    return chunk_keys(TOKENS, request_namespace(BASE, req), 128, mm_hashes(req), keyring=Keyring(bytes(32)))


def test_plain_requests_share():
    assert keys(request()) == keys(request())


def test_adapter_tenant_and_image_each_change_the_keys():
    plain = keys(request())
    adapter = keys(request(lora=SimpleNamespace(lora_name="sql", lora_path="/adapters/sql")))
    other_adapter = keys(request(lora=SimpleNamespace(lora_name="sql", lora_path="/adapters/sql-v2")))
    tenant = keys(request(salt="tenant-b"))
    image = keys(request(images=[(200, "img-a")]))
    other_image = keys(request(images=[(200, "img-b")]))
    for variant in (adapter, other_adapter, tenant):
        assert not set(variant) & set(plain)
    assert adapter != other_adapter
    assert image[0] == plain[0]  # the image sits in chunk 1: chunk 0 is shared
    assert not set(image[1:]) & set(plain) and not set(image[1:]) & set(other_image)
