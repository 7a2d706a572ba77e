from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshelf.codecs import CODECS, CODECS_BY_ID, get_codec
from kvshelf.codecs import frame as frame_keyed
from kvshelf.codecs import unframe as unframe_keyed
from kvshelf.codecs.framing import HEADER_BYTES, Expected
from kvshelf.errors import CorruptChunk, ForeignChunk, UnknownCodec
from kvshelf.layout import DTYPE_NAMES, KVLayout
from kvshelf.security import Keyring

KEY = bytes(range(32))
RAW = get_codec("raw")
# Checksummed, not keyed: what a payload meets with `security.key: none`, where anyone can write one.
KEYRING = Keyring(None)


def frame(kv: torch.Tensor, key_digest: bytes, codec) -> bytes:
    return frame_keyed(kv, key_digest, codec, KEYRING)


def unframe(blob, key_digest: bytes, codecs, shape: tuple[int, ...] = (2, 2, 3, 3, 4), dtype=torch.float32):
    """`blob` unframed as a chunk of `shape` and `dtype` (the namespace's layout and token count)."""
    layers, _, num_tokens, kv_heads, head_dim = shape
    expected = Expected(KVLayout(layers, kv_heads, head_dim, DTYPE_NAMES[dtype]), num_tokens)
    return unframe_keyed(blob, key_digest, KEYRING, codecs, expected)


def unframe_as(blob, kv: torch.Tensor) -> torch.Tensor:
    return unframe(blob, KEY, CODECS_BY_ID, tuple(kv.shape), kv.dtype)


def kv_of(dtype: torch.dtype, num_tokens: int = 3) -> torch.Tensor:
    return torch.randn(2, 2, num_tokens, 3, 4).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("num_tokens", [1, 3, 256])
def test_raw_round_trip_is_exact(dtype, num_tokens):
    kv = kv_of(dtype, num_tokens)
    decoded = unframe_as(frame(kv, KEY, RAW), kv)
    assert decoded.dtype == dtype and decoded.shape == kv.shape
    assert torch.equal(decoded.view(torch.uint8), kv.view(torch.uint8))


def test_decoding_a_writable_buffer_shares_it():
    blob = bytearray(frame(kv_of(torch.float32), KEY, RAW))
    decoded = unframe(blob, KEY, CODECS_BY_ID)
    blob[-4:] = b"\0\0\0\0"
    assert decoded.flatten()[-1].item() == 0.0


def test_non_contiguous_input_is_stored_in_logical_order():
    kv = kv_of(torch.float32).transpose(3, 4).contiguous().transpose(3, 4)
    assert torch.equal(unframe_as(frame(kv, KEY, RAW), kv), kv)


BLOB = frame(kv_of(torch.float32), KEY, RAW)


@settings(max_examples=300)
@given(st.integers(0, len(BLOB) - 1), st.integers(1, 255))
def test_any_flipped_byte_is_caught(position, flip):
    damaged = bytearray(BLOB)
    damaged[position] ^= flip
    with pytest.raises(CorruptChunk):
        unframe(damaged, KEY, CODECS_BY_ID)


@given(st.integers(0, len(BLOB) - 1))
def test_any_truncation_is_caught(length):
    with pytest.raises(CorruptChunk):
        unframe(BLOB[:length], KEY, CODECS_BY_ID)


@given(st.binary(max_size=2 * HEADER_BYTES))
def test_foreign_bytes_are_caught(blob):
    with pytest.raises(CorruptChunk):
        unframe(blob, KEY, CODECS_BY_ID)


def test_object_under_another_key_is_caught():
    with pytest.raises(CorruptChunk, match="another key"):
        unframe(BLOB, bytes(32), CODECS_BY_ID)


def test_unknown_codec_id_is_a_typed_error():
    class FutureCodec(type(RAW)):
        id = 200

    blob = frame(kv_of(torch.float32), KEY, FutureCodec())
    with pytest.raises(UnknownCodec):
        unframe(blob, KEY, CODECS_BY_ID)


def test_unknown_codec_name_says_what_exists():
    with pytest.raises(ValueError, match="raw"):
        get_codec("zstd")


LOSSY = [name for name, codec in CODECS.items() if not codec.lossless]
CAST_EPS = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_codec_stores_fp8_kv_caches(name, dtype):
    codec = get_codec(name)
    kv = torch.randn(2, 2, 33, 3, 64).to(dtype)  # as vLLM's fp8 cache holds it
    decoded = unframe_as(frame(kv, KEY, codec), kv)
    assert decoded.dtype == dtype and decoded.shape == kv.shape
    bound = codec.error_bound(kv)
    cast_eps = {torch.float8_e4m3fn: 2.0**-3, torch.float8_e5m2: 2.0**-2}[dtype]  # rounding back to fp8
    error = (decoded.float() - kv.float()).abs()
    assert (error <= bound + (kv.float().abs() + bound) * cast_eps + 2.0**-9).all()


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 3, 33, 128])
def test_lossy_round_trip_within_the_stated_bound(name, dtype, num_tokens):
    codec = get_codec(name)
    kv = (torch.randn(2, 2, num_tokens, 3, 64) * torch.logspace(-2, 2, 64)).to(dtype)  # outlier channels too
    decoded = unframe_as(frame(kv, KEY, codec), kv)
    assert decoded.dtype == dtype and decoded.shape == kv.shape
    bound = codec.error_bound(kv)
    error = (decoded.float() - kv.float()).abs()
    assert (error <= bound + (kv.float().abs() + bound) * CAST_EPS[dtype] + 1e-6).all()


@pytest.mark.parametrize("name", LOSSY)
def test_constant_and_zero_chunks_round_trip(name):
    codec = get_codec(name)
    for kv in (torch.zeros(2, 2, 4, 3, 64), torch.full((2, 2, 4, 3, 64), -1.5)):
        decoded = unframe_as(frame(kv, KEY, codec), kv)
        assert decoded.isfinite().all() and ((decoded - kv).abs() <= codec.error_bound(kv) + 1e-6).all()


def test_sizes_per_value():
    kv = torch.randn(30, 2, 128, 3, 64)
    bits = {name: len(get_codec(name).encode(kv)) * 8 / kv.numel() for name in CODECS}
    assert bits["raw"] == 32 and 8 < bits["int8"] < 8.6 and 8 < bits["fp8"] < 8.6 and 3 < bits["kivi2"] < 3.1
    assert bits["cachegen"] < bits["kivi2"] + 2  # random data has no structure to exploit; real KV does better


class _Verbatim(type(RAW)):
    """Frames any payload under another codec's id, so the real boundary (unframe) meets it."""

    def __init__(self, codec_id: int, payload: bytes) -> None:
        self.id, self.payload = codec_id, payload

    def encode(self, kv):
        return self.payload


def decode_or_refuse(name: str, payload: bytes, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor | None:
    """The codec id's decoder on `payload`, as a load runs it: a tensor of exactly `shape` and
    `dtype`, or None where it raised CorruptChunk. Anything else it raises fails the test: a
    codec refuses hostile bytes itself, with no help from framing's catch-all."""
    try:
        decoded = CODECS_BY_ID[get_codec(name).id].decode(memoryview(payload), shape, dtype)
    except CorruptChunk:
        return None
    assert decoded.shape == shape and decoded.dtype == dtype
    return decoded


SHAPES = st.tuples(st.integers(1, 3), st.just(2), st.integers(1, 40), st.integers(1, 3), st.integers(1, 66))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(CODECS)), SHAPES, st.binary(max_size=4096))
def test_arbitrary_payloads_decode_or_raise_corrupt_chunk(name, shape, payload):
    decode_or_refuse(name, payload, shape)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(CODECS)), st.integers(1, 40), st.data())
def test_truncated_payloads_raise_corrupt_chunk(name, num_tokens, data):
    kv = torch.randn(2, 2, num_tokens, 3, 64, generator=torch.Generator().manual_seed(num_tokens))
    payload = bytes(get_codec(name).encode(kv))
    cut = data.draw(st.integers(0, len(payload) - 1))
    assert decode_or_refuse(name, payload[:cut], tuple(kv.shape)) is None


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(LOSSY), st.integers(2, 40), st.data())
def test_damaged_payloads_decode_or_raise_corrupt_chunk(name, num_tokens, data):
    """Bytes changed inside a well-formed payload reach what random bytes rarely do: tables,
    counts and the compressed stream, past the checks of a payload's first bytes."""
    kv = torch.randn(2, 2, num_tokens, 3, 8, generator=torch.Generator().manual_seed(num_tokens))
    payload = bytearray(get_codec(name).encode(kv))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] ^= data.draw(st.integers(1, 255))
    decode_or_refuse(name, bytes(payload), tuple(kv.shape))


def test_a_framed_payload_that_does_not_decode_is_a_corrupt_chunk():
    kv = torch.randn(2, 2, 5, 3, 8)
    blob = frame(kv, KEY, _Verbatim(get_codec("cachegen").id, bytes(get_codec("cachegen").encode(kv))[:-3]))
    with pytest.raises(CorruptChunk):
        unframe_as(blob, kv)


def test_cachegen_refuses_its_older_formats_cleanly():
    """Chunks of payload version 1 (anchor/delta groups) are a clean miss, so the shelf drops and recomputes them."""
    stored = torch.load(Path(__file__).parent / "data" / "cachegen-v1.pt")
    kv = torch.zeros(stored["shape"])
    with pytest.raises(CorruptChunk, match="version 1; this kvshelf reads version 3") as caught:
        unframe_as(frame(kv, KEY, _Verbatim(5, stored["payload"])), kv)
    assert not isinstance(caught.value, ForeignChunk)  # deleted: no kvshelf reads version 1 any more


def test_cachegen_keeps_a_chunks_first_token_nearly_exact():
    kv = torch.randn(2, 2, 16, 3, 8) * 5
    decoded = CODECS["cachegen-small"].decode(memoryview(CODECS["cachegen-small"].encode(kv)), kv.shape, kv.dtype)
    assert torch.allclose(decoded[:, :, 0], kv[:, :, 0], rtol=2**-10, atol=1e-6)
    assert not torch.allclose(decoded[:, :, 1:], kv[:, :, 1:], rtol=2**-10, atol=1e-6)


@pytest.mark.parametrize("magnitude", [1e-44, 1e-30, 1e30])
def test_cachegen_codes_tiny_and_huge_values_within_the_bound(magnitude):
    kv = torch.randn(2, 2, 9, 3, 8, generator=torch.Generator().manual_seed(0)) * magnitude
    codec = CODECS["cachegen"]
    decoded = codec.decode(memoryview(codec.encode(kv)), kv.shape, kv.dtype)
    assert decoded.isfinite().all() and ((decoded - kv).abs() <= codec.error_bound(kv)).all()
