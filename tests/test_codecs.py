from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshelf.codecs import CODECS, CODECS_BY_ID, frame, get_codec, unframe
from kvshelf.codecs.framing import HEADER_BYTES
from kvshelf.errors import CorruptChunk, UnknownCodec

KEY = bytes(range(32))
RAW = get_codec("raw")


def kv_of(dtype: torch.dtype, num_tokens: int = 3) -> torch.Tensor:
    return torch.randn(2, 2, num_tokens, 3, 4).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("num_tokens", [1, 3, 256])
def test_raw_round_trip_is_exact(dtype, num_tokens):
    kv = kv_of(dtype, num_tokens)
    decoded = unframe(frame(kv, KEY, RAW), KEY, CODECS_BY_ID)
    assert decoded.dtype == dtype and decoded.shape == kv.shape
    assert torch.equal(decoded.view(torch.uint8), kv.view(torch.uint8))


def test_decoding_a_writable_buffer_shares_it():
    blob = bytearray(frame(kv_of(torch.float32), KEY, RAW))
    decoded = unframe(blob, KEY, CODECS_BY_ID)
    blob[-4:] = b"\0\0\0\0"
    assert decoded.flatten()[-1].item() == 0.0


def test_non_contiguous_input_is_stored_in_logical_order():
    kv = kv_of(torch.float32).transpose(3, 4).contiguous().transpose(3, 4)
    assert torch.equal(unframe(frame(kv, KEY, RAW), KEY, CODECS_BY_ID), kv)


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


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 3, 33, 128])
def test_lossy_round_trip_within_the_stated_bound(name, dtype, num_tokens):
    codec = get_codec(name)
    kv = (torch.randn(2, 2, num_tokens, 3, 64) * torch.logspace(-2, 2, 64)).to(dtype)  # outlier channels too
    decoded = unframe(frame(kv, KEY, codec), KEY, CODECS_BY_ID)
    assert decoded.dtype == dtype and decoded.shape == kv.shape
    bound = codec.error_bound(kv)
    error = (decoded.float() - kv.float()).abs()
    assert (error <= bound + (kv.float().abs() + bound) * CAST_EPS[dtype] + 1e-6).all()


@pytest.mark.parametrize("name", LOSSY)
def test_constant_and_zero_chunks_round_trip(name):
    codec = get_codec(name)
    for kv in (torch.zeros(2, 2, 4, 3, 64), torch.full((2, 2, 4, 3, 64), -1.5)):
        decoded = unframe(frame(kv, KEY, codec), KEY, CODECS_BY_ID)
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


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(LOSSY),
    st.tuples(st.integers(1, 3), st.just(2), st.integers(1, 40), st.integers(1, 3), st.integers(1, 66)),
    st.binary(max_size=4096),
)
def test_arbitrary_payloads_decode_or_raise_corrupt_chunk(name, shape, payload):
    blob = frame(torch.zeros(shape), KEY, _Verbatim(get_codec(name).id, payload))
    try:
        decoded = unframe(blob, KEY, CODECS_BY_ID)
    except CorruptChunk:
        return
    assert decoded.shape == shape


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(LOSSY), st.integers(1, 40), st.data())
def test_truncated_payloads_raise_corrupt_chunk(name, num_tokens, data):
    codec = get_codec(name)
    kv = torch.randn(2, 2, num_tokens, 3, 64, generator=torch.Generator().manual_seed(num_tokens))
    payload = bytes(codec.encode(kv))
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(CorruptChunk):
        unframe(frame(kv, KEY, _Verbatim(codec.id, payload[:cut])), KEY, CODECS_BY_ID)


def test_cachegen_refuses_its_older_formats_cleanly():
    """Chunks of payload version 1 (anchor/delta groups) are a clean miss, so the shelf drops and recomputes them."""
    stored = torch.load(Path(__file__).parent / "data" / "cachegen-v1.pt")
    with pytest.raises(CorruptChunk, match="version 1; this kvshelf reads version 3"):
        unframe(frame(torch.zeros(stored["shape"]), KEY, _Verbatim(5, stored["payload"])), KEY, CODECS_BY_ID)


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
