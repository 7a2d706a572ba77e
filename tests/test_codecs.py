import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshelf.codecs import CODECS_BY_ID, frame, get_codec, unframe
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
