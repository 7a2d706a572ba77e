import dataclasses
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvshelf import KVLayout, Namespace
from kvshelf.keys import chunk_keys as keyed_chunk_keys
from kvshelf.security import Keyring

BASE = Namespace("model@1", KVLayout(30, 3, 64), tp_rank=0, tp_size=1, lora_id=None, cache_salt=None)
TOKENS = list(range(1000, 1040))
SECRET = bytes(range(32))
KEYRING = Keyring(SECRET)


def chunk_keys(*args, keyring=KEYRING, **kwargs):
    return keyed_chunk_keys(*args, keyring=keyring, **kwargs)


def test_only_full_chunks_get_keys():
    assert len(chunk_keys(TOKENS, BASE, 16)) == 2
    assert chunk_keys(TOKENS[:15], BASE, 16) == []


def test_key_names_the_chunk_and_everything_before_it():
    keys = chunk_keys(TOKENS, BASE, 8)
    changed = list(TOKENS)
    changed[9] += 1  # in chunk 1
    changed_keys = chunk_keys(changed, BASE, 8)
    assert changed_keys[0] == keys[0]
    assert all(a != b for a, b in zip(keys[1:], changed_keys[1:]))


def test_keys_are_the_same_in_another_process():
    script = (
        "from kvshelf import KVLayout, Namespace, chunk_keys; from kvshelf.security import Keyring;"
        "ns = Namespace('model@1', KVLayout(30, 3, 64));"
        "print(' '.join(k.hex for k in chunk_keys(list(range(1000, 1040)), ns, 8, keyring=Keyring(bytes(range(32))))))"
    )
    # PYTHONHASHSEED differs per process by default; keys must not depend on it.
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert other.stdout.split() == [key.hex for key in chunk_keys(TOKENS, BASE, 8)]


def test_multimodal_hash_changes_its_chunk_and_later_ones():
    plain = chunk_keys(TOKENS, BASE, 8)
    with_image = chunk_keys(TOKENS, BASE, 8, mm_hashes=[(17, b"image-a")])
    other_image = chunk_keys(TOKENS, BASE, 8, mm_hashes=[(17, b"image-b")])
    assert with_image[:2] == plain[:2]
    assert all(a != b for a, b in zip(with_image[2:], plain[2:]))
    assert all(a != b for a, b in zip(with_image[2:], other_image[2:]))


namespace_changes = st.one_of(
    st.builds(lambda s: {"model_id": s}, st.text(min_size=1)),
    st.builds(lambda n: {"layout": KVLayout(n, 3, 64)}, st.integers(1, 200)),
    st.builds(lambda n: {"layout": KVLayout(30, n, 64)}, st.integers(1, 64)),
    st.builds(lambda n: {"layout": KVLayout(30, 3, n)}, st.integers(1, 512)),
    st.builds(lambda d: {"layout": KVLayout(30, 3, 64, d)}, st.sampled_from(["float16", "bfloat16"])),
    st.builds(lambda n: {"layout": KVLayout(30, n, 64, kind="mla")}, st.integers(1, 4)),
    st.builds(lambda r: {"tp_rank": r, "tp_size": 8}, st.integers(0, 7)),
    st.builds(lambda n: {"tp_size": n}, st.integers(2, 64)),
    st.builds(lambda s: {"lora_id": s}, st.text()),
    st.builds(lambda s: {"cache_salt": s}, st.text()),
    st.builds(lambda s: {"extra": (("kv_cache_dtype", s),)}, st.text()),
)


@given(namespace_changes)
def test_any_namespace_change_gives_different_keys(change):
    changed = dataclasses.replace(BASE, **change)
    if changed == BASE:
        return  # e.g. the same model id drawn again
    assert changed.digest != BASE.digest
    assert not set(chunk_keys(TOKENS, changed, 8)) & set(chunk_keys(TOKENS, BASE, 8))


@given(st.lists(st.integers(0, 2**31 - 1), min_size=8, max_size=64), st.integers(1, 16))
def test_keys_are_deterministic_and_prefix_stable(tokens, chunk_size):
    keys = chunk_keys(tokens, BASE, chunk_size)
    assert keys == chunk_keys(tokens, BASE, chunk_size)
    assert chunk_keys(tokens[: len(tokens) // 2], BASE, chunk_size) == keys[: len(tokens) // 2 // chunk_size]


def test_keys_depend_on_the_secret():
    """A store reader without the secret cannot compute which key a prompt has."""
    keyed = chunk_keys(TOKENS, BASE, 8)
    other = chunk_keys(TOKENS, BASE, 8, keyring=Keyring(bytes(32)))
    unkeyed = chunk_keys(TOKENS, BASE, 8, keyring=Keyring(None))
    assert not set(keyed) & set(other) and not set(keyed) & set(unkeyed)
    assert keyed[0].namespace_id == BASE.id(KEYRING) != BASE.id(Keyring(bytes(32)))


def test_stored_description_holds_no_salt():
    tenant = dataclasses.replace(BASE, cache_salt="secret-tenant-salt")
    description = tenant.public_description(KEYRING)
    assert "secret-tenant-salt" not in str(description) and "cache_salt" not in description
    assert description["cache_salt_tag"] == KEYRING.salt_tag("secret-tenant-salt")
    assert description["cache_salt_tag"] != Keyring(bytes(32)).salt_tag("secret-tenant-salt")


def test_a_kv_layout_is_named_as_before_layouts_had_kinds():
    # Adding `kind` kept every key and-value namespace's digest: their stored chunks stay reachable.
    assert "kind" not in BASE.describe()["layout"]
    mla = dataclasses.replace(BASE, layout=KVLayout(30, 1, 576, kind="mla"))
    assert mla.describe()["layout"]["kind"] == "mla" and Namespace.from_description(mla.describe()) == mla
    assert mla.layout.shape(5) == (30, 1, 5, 1, 576) and mla.layout.bytes_per_token == 30 * 576 * 4


def test_windowed_layers_are_stored_with_the_window_only():
    layout = KVLayout(4, 2, 8, windowed_layers=(0, 2), window_tokens=3)
    chunk = torch.randn(layout.shape(5))
    stored = layout.pack(chunk)
    assert tuple(stored.shape) == layout.stored_shape(5) == (2 * 5 + 2 * 3, 2, 1, 2, 8)
    assert layout.stored_tokens(tuple(stored.shape)) == 5 and layout.stored_bytes(5) == stored.numel() * 4
    back = layout.unpack(stored, 5)
    for layer in (1, 3):
        assert torch.equal(back[layer], chunk[layer])
    for layer in (0, 2):  # only the last 3 tokens: the window of the token after the chunk
        assert torch.equal(back[layer, :, 2:], chunk[layer, :, 2:]) and not back[layer, :, :2].any()
    short = torch.randn(layout.shape(2))  # a tail shorter than the window keeps everything
    assert torch.equal(layout.unpack(layout.pack(short), 2), short)
    assert layout.stored_tokens((17, 2, 1, 2, 8)) is None
    with pytest.raises(ValueError, match="windowed_layers"):
        KVLayout(4, 2, 8, windowed_layers=(4,), window_tokens=3)


def test_a_windowed_layout_is_its_own_namespace():
    windowed = dataclasses.replace(BASE, layout=dataclasses.replace(BASE.layout, windowed_layers=(0, 1),
                                                                    window_tokens=48))
    assert windowed.digest != BASE.digest and Namespace.from_description(windowed.describe()) == windowed
