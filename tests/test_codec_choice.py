"""codec: auto — the best codec whose expected load time fits the budget, from measured speeds."""

import pytest
import torch

from kvshelf import Namespace
from kvshelf.codecs import CODECS, CODECS_BY_ID, codec_id_of, unframe
from kvshelf.codecs.framing import Expected
from kvshelf.errors import ConfigError
from kvshelf.layout import KVLayout
from kvshelf.shelf.codec_choice import AUTO_LADDER, CodecChoice
from tests.conftest import CHUNK_SIZE, random_kv

CHUNK_BYTES = 10_000_000


def test_a_fixed_codec_is_always_chosen():
    choice = CodecChoice.of("int8", None)
    choice.note_read(1000, 10.0)
    assert choice.choose(CHUNK_BYTES).name == "int8"


def test_auto_starts_lossless_until_the_tier_has_been_read():
    assert CodecChoice.of("auto", 100).choose(CHUNK_BYTES).name == "raw"


def test_auto_steps_down_the_ladder_as_the_tier_gets_slower():
    choice = CodecChoice.of("auto", 100)
    for codec in choice.codecs:
        choice.note_decoded(codec.id, CHUNK_BYTES, 0.01)  # 1 GB/s decoding: 10 ms a chunk
    chosen = []
    for bytes_per_s in (1e9, 1e8, 3e7, 1e6):
        choice.read_bytes_per_s = bytes_per_s
        chosen.append(choice.choose(CHUNK_BYTES).name)
    assert chosen[0] == "raw" and chosen[-1] == AUTO_LADDER[-1]
    assert [AUTO_LADDER.index(name) for name in chosen] == sorted(AUTO_LADDER.index(name) for name in chosen)
    assert len(set(chosen)) >= 3


def test_auto_chooses_only_codecs_that_take_the_layout():
    mla = KVLayout(2, 1, 576, kind="mla")
    choice = CodecChoice.of("auto", 100)
    choice.read_bytes_per_s = 1e3  # so slow that the smallest codec would be chosen
    assert choice.choose(CHUNK_BYTES).name == AUTO_LADDER[-1]
    assert choice.choose(CHUNK_BYTES, mla).name == "int8"  # cachegen splits keys from values: MLA has neither
    assert CodecChoice.of("kivi2", None).choose(CHUNK_BYTES, mla).name == "raw"


def test_measured_sizes_and_speeds_replace_the_priors():
    choice = CodecChoice.of("auto", 100)
    choice.read_bytes_per_s = 1e8  # raw: 100 ms to read, over budget with any decoding
    choice.note_decoded(CODECS["raw"].id, CHUNK_BYTES, 0.001)
    choice.note_decoded(CODECS["int8"].id, CHUNK_BYTES, 0.5)  # a slow int8 decoder: 500 ms
    assert choice.choose(CHUNK_BYTES).name != "int8"


def test_a_shelf_with_auto_moves_to_smaller_codecs_when_its_disk_is_slow(make_shelf, namespace):
    shelf = make_shelf(disk_codec="auto", disk_codec_budget_ms=0.001, memory_size="1KiB")
    tokens = list(range(4 * CHUNK_SIZE))
    shelf.save(tokens, random_kv(len(tokens)), namespace)
    shelf.flush()
    disk = shelf.config.disk.path
    assert {codec_id_of(path.read_bytes()) for path in disk.rglob("*.kvs")} == {CODECS["raw"].id}
    assert shelf.load(tokens, namespace, len(tokens)).num_tokens == len(tokens)  # measures the disk
    other = list(range(1000, 1000 + 4 * CHUNK_SIZE))
    kv = random_kv(len(other), seed=1)
    shelf.save(other, kv, namespace)
    shelf.flush()
    loaded = shelf.load(other, namespace, len(other))
    assert loaded.num_tokens == len(other)
    assert not torch.equal(loaded.kv(), kv)  # lossy now: no disk meets a budget of a microsecond
    ids = {codec_id_of(path.read_bytes()) for path in disk.rglob("*.kvs")}
    assert CODECS[AUTO_LADDER[-1]].id in ids
    expected = Expected(namespace.layout, CHUNK_SIZE)
    assert all(unframe(path.read_bytes(), bytes.fromhex(path.stem), shelf.keyring, CODECS_BY_ID, expected) is not None
               for path in disk.rglob("*.kvs"))


@pytest.mark.parametrize("codec", ["raw", "int8", "int8-channel", "fp8"])
def test_mla_latents_round_trip_through_the_shelf(make_shelf, codec):
    namespace = Namespace("mla-model@1", KVLayout(2, 1, 576, kind="mla"))
    shelf = make_shelf(disk_codec=codec, memory_size="1KiB")  # too small to hold a chunk: loads read the disk
    shelf.check_layout(namespace.layout)
    kv = torch.randn(namespace.layout.shape(2 * CHUNK_SIZE))
    shelf.save(list(range(2 * CHUNK_SIZE)), kv, namespace)
    shelf.flush()
    loaded = shelf.load(list(range(2 * CHUNK_SIZE)), namespace, 2 * CHUNK_SIZE)
    assert loaded.num_tokens == 2 * CHUNK_SIZE and loaded.kv().shape == kv.shape
    bound = CODECS[codec].error_bound(kv)
    assert ((loaded.kv() - kv).abs() <= bound).all()


@pytest.mark.parametrize("codec", ["kivi2", "cachegen"])
def test_a_codec_that_cannot_store_mla_is_refused_at_start(make_shelf, codec):
    shelf = make_shelf(disk_codec=codec)
    with pytest.raises(ConfigError, match=f"disk.codec {codec} cannot store this model's mla KV.*set disk.codec to "
                                          "auto or one of fp8, int8, int8-channel, raw"):
        shelf.check_layout(KVLayout(2, 1, 576, kind="mla"))


def test_windowed_chunks_frame_packed_and_unframe_whole(make_shelf):
    namespace = Namespace("gemma-like@1", KVLayout(3, 2, 8, windowed_layers=(0, 1), window_tokens=3))
    shelf = make_shelf(disk_codec="int8", memory_size="1KiB")  # loads read the disk
    shelf.check_layout(namespace.layout)
    kv = torch.randn(namespace.layout.shape(2 * CHUNK_SIZE))
    shelf.save(list(range(2 * CHUNK_SIZE)), kv, namespace)
    shelf.flush()
    loaded = shelf.load(list(range(2 * CHUNK_SIZE)), namespace, 2 * CHUNK_SIZE).kv()
    for start in (0, CHUNK_SIZE):
        want, got = kv[:, :, start : start + CHUNK_SIZE], loaded[:, :, start : start + CHUNK_SIZE]
        bound = CODECS["int8"].error_bound(want)
        assert ((got[2] - want[2]).abs() <= bound[2]).all()  # the full-attention layer: every token
        assert ((got[:2, :, -3:] - want[:2, :, -3:]).abs() <= bound[:2, :, -3:]).all() and not got[:2, :, :-3].any()
    with pytest.raises(ConfigError, match="disk.codec cachegen cannot store"):
        make_shelf(disk_codec="cachegen").check_layout(namespace.layout)
