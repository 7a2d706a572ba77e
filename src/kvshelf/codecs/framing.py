"""The stored-object format: a fixed header, then the codec's payload.

    magic "KVSH" | version u8 | codec id u8 | dtype code u8 | reserved u8 |
    shape 5 x u32 | key digest 32 B | payload length u64 | checksum u64 | payload

The checksum is xxh3-64 over the header (checksum field excluded) and the payload, so a
flipped byte anywhere — a shape, a dtype, the data — is caught. The key digest ties the
object to the key it was stored under: a file copied or renamed to another key is foreign.
"""

import struct

import torch
import xxhash

from kvshelf.codecs.base import Codec
from kvshelf.errors import CorruptChunk, UnknownCodec
from kvshelf.layout import DTYPE_NAMES, DTYPES

MAGIC = b"KVSH"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sBBBB5I32sQ")
_CHECKSUM = struct.Struct("<Q")
HEADER_BYTES = _PREFIX.size + _CHECKSUM.size
_DTYPE_CODES = {name: code for code, name in enumerate(sorted(DTYPES), start=1)}
_DTYPE_BY_CODE = {code: DTYPES[name] for name, code in _DTYPE_CODES.items()}


def frame_parts(kv: torch.Tensor, key_digest: bytes, codec: Codec) -> list[bytes | memoryview]:
    """The stored object for chunk `kv` (layers, 2, tokens, kv_heads, head_dim) under `key_digest`,
    as [header, payload]: tiers write one after the other, so the payload (for `raw`, the tensor's
    own memory) is never copied to join them."""
    payload = codec.encode(kv)
    prefix = _PREFIX.pack(
        MAGIC, FORMAT_VERSION, codec.id, _DTYPE_CODES[DTYPE_NAMES[kv.dtype]], 0, *kv.shape, key_digest, len(payload)
    )
    checksum = xxhash.xxh3_64(prefix)
    checksum.update(payload)
    return [prefix + _CHECKSUM.pack(checksum.intdigest()), payload]


def codec_id_of(blob: bytes | bytearray | memoryview) -> int:
    """The codec id in a stored object's header (which unframe has checked)."""
    return blob[5]


def frame(kv: torch.Tensor, key_digest: bytes, codec: Codec) -> bytes:
    """The stored object as one bytes object (for tools and tests)."""
    return b"".join(frame_parts(kv, key_digest, codec))


def unframe(blob: bytes | bytearray | memoryview, key_digest: bytes, codecs: dict[int, Codec]) -> torch.Tensor:
    """The chunk stored in `blob`; raises CorruptChunk unless it is intact and stored under `key_digest`."""
    view = memoryview(blob)
    if len(view) < HEADER_BYTES:
        raise CorruptChunk(f"object of {len(view)} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, codec_id, dtype_code, _, *shape_and_rest = _PREFIX.unpack_from(view)
    *shape, stored_digest, payload_bytes = shape_and_rest
    if magic != MAGIC:
        raise CorruptChunk("not a kvshelf object (bad magic)")
    if version != FORMAT_VERSION:
        raise CorruptChunk(f"object format version {version}; this kvshelf reads version {FORMAT_VERSION}")
    if len(view) != HEADER_BYTES + payload_bytes:
        raise CorruptChunk(f"object has {len(view) - HEADER_BYTES} payload bytes, header says {payload_bytes}")
    checksum = xxhash.xxh3_64(view[: _PREFIX.size])
    checksum.update(view[HEADER_BYTES:])
    (stored_checksum,) = _CHECKSUM.unpack_from(view, _PREFIX.size)
    if checksum.intdigest() != stored_checksum:
        raise CorruptChunk("checksum mismatch")
    if stored_digest != key_digest:
        raise CorruptChunk("object was stored under another key")
    if codec_id not in codecs:
        raise UnknownCodec(f"codec id {codec_id} is unknown to this version of kvshelf")
    if dtype_code not in _DTYPE_BY_CODE:
        raise CorruptChunk(f"dtype code {dtype_code} is unknown")
    codec = codecs[codec_id]
    try:
        return codec.decode(view[HEADER_BYTES:], tuple(shape), _DTYPE_BY_CODE[dtype_code])
    except CorruptChunk:
        raise
    except (ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as exc:  # the codec's own checks missed it
        raise CorruptChunk(f"{codec.name} payload does not decode to {tuple(shape)}: {exc}") from exc
