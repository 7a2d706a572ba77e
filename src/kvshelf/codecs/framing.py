"""The stored-object format: a fixed header, then the codec's payload.

    magic "KVSH" | version u8 | codec id u8 | dtype code u8 | flags u8 |
    shape 5 x u32 | payload length u64 | tag 32 B | payload

The tag authenticates the key digest the object is stored under, the header and the payload
(see `Keyring.tag`: a GMAC under a one-time key, or an xxh3-128 checksum with `security.key: none`). So a
flipped byte anywhere, an object copied to another key, or one forged without the secret is
caught before anything is decoded. With the ENCRYPTED flag the payload is sealed with
AES-256-GCM (`Keyring.seal`), whose own tag authenticates the key digest and header too: the tag
field then holds the nonce, and no second MAC is computed.

Nothing in a header is trusted: `unframe` checks the declared shape and dtype against what the
caller expects (the namespace's layout and the chunk's token count) before a codec allocates.

Rolling upgrades: FORMAT_VERSION is part of every chunk key (kvshelf.keys), so kvshelf versions
of different formats never read each other's objects: an object of another version or with
unknown flags under one of our keys is damaged or forged (`CorruptChunk`, deleted; left alone, a
planted one would block its key for good). An authentic object with a codec this version lacks
was written by a newer kvshelf of the same format: `ForeignChunk`, a miss that is left alone.
"""

import struct
from dataclasses import dataclass
from typing import Protocol

import torch

from kvshelf.codecs.base import Codec
from kvshelf.errors import CorruptChunk, UnknownCodec
from kvshelf.layout import DTYPE_NAMES, DTYPES, KVLayout
from kvshelf.security import GCM_TAG_BYTES, NONCE_BYTES, TAG_BYTES, Keyring

MAGIC = b"KVSH"
FORMAT_VERSION = 2
ENCRYPTED = 0x01
KNOWN_FLAGS = ENCRYPTED
MAX_UNKNOWN_CHUNK_TOKENS = 1 << 20
_PREFIX = struct.Struct("<4sBBBB5IQ")
HEADER_BYTES = _PREFIX.size + TAG_BYTES
_DTYPE_CODES = {name: code for code, name in enumerate(sorted(DTYPES), start=1)}
_DTYPE_BY_CODE = {code: DTYPES[name] for name, code in _DTYPE_CODES.items()}


@dataclass(frozen=True, slots=True)
class Expected:
    """What a chunk must be: the namespace's layout, and its token count (a whole chunk's or a
    tail's); `num_tokens` None (tools that do not know the chunk size) allows 1..MAX_UNKNOWN_CHUNK_TOKENS."""

    layout: KVLayout
    num_tokens: int | None

    def check(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """The chunk's token count, if a stored chunk of `shape` and `dtype` is one (see
        KVLayout.stored_shape); else CorruptChunk."""
        if self.num_tokens is not None:
            tokens = self.num_tokens if shape == self.layout.stored_shape(self.num_tokens) else None
        else:
            tokens = self.layout.stored_tokens(shape)
            tokens = tokens if tokens is not None and 0 < tokens <= MAX_UNKNOWN_CHUNK_TOKENS else None
        if tokens is None or dtype != self.layout.torch_dtype:
            want = self.layout.stored_shape(self.num_tokens) if self.num_tokens is not None else self.layout
            raise CorruptChunk(f"chunk is {shape} of {dtype}; this namespace stores {want} of {self.layout.dtype}")
        return tokens


class ChunkMemory(Protocol):
    """Where `unframe` decodes chunks: the memory tier's arena (kvshelf.tiers.memory.MemoryTier)."""

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...

    def release(self, buffer: torch.Tensor) -> None: ...


def frame_parts(
    kv: torch.Tensor, key_digest: bytes, codec: Codec, keyring: Keyring, encrypt: bool = False,
    layout: KVLayout | None = None,
) -> list[bytes | memoryview]:
    """The stored object for chunk `kv` (layers, planes, tokens, kv_heads, head_dim) of `layout`
    under `key_digest`, as [header, payload]: tiers write one after the other, so the payload (for
    `raw`, the tensor's own memory) is never copied to join them. `encrypt` seals the payload
    (keyring.encrypt_at_rest). A layout with windowed layers stores them packed (`KVLayout.pack`)."""
    if layout is not None:
        kv = layout.pack(kv)
    payload = codec.encode(kv)
    flags = ENCRYPTED if encrypt else 0
    dtype_code = _DTYPE_CODES[DTYPE_NAMES[kv.dtype]]
    payload_bytes = memoryview(payload).nbytes + (GCM_TAG_BYTES if encrypt else 0)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, codec.id, dtype_code, flags, *kv.shape, payload_bytes)
    if encrypt:
        nonce, payload = keyring.seal(payload, key_digest + prefix)
        return [prefix + nonce.ljust(TAG_BYTES, b"\0"), payload]
    return [prefix + keyring.tag(key_digest, prefix, payload), payload]


def codec_id_of(blob: bytes | bytearray | memoryview) -> int:
    """The codec id in a stored object's header (which unframe has checked)."""
    return blob[5]


def frame(kv: torch.Tensor, key_digest: bytes, codec: Codec, keyring: Keyring) -> bytes:
    """The stored object as one bytes object (for tools and tests)."""
    return b"".join(frame_parts(kv, key_digest, codec, keyring))


def verify(
    blob: bytes | bytearray | memoryview, key_digest: bytes, keyring: Keyring, authenticated: bool = False
) -> tuple[int, int, tuple[int, ...], memoryview]:
    """Check an object's framing and authenticity without decoding it (the push receiver does this
    on arrival); `authenticated`: its tag was checked already (it came from the inbox). Returns the
    codec id, dtype code, shape and the (decrypted) payload; raises CorruptChunk."""
    view = memoryview(blob).cast("B")
    if view.nbytes < HEADER_BYTES:
        raise CorruptChunk(f"object of {view.nbytes} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, codec_id, dtype_code, flags, *shape, payload_bytes = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptChunk("not a kvshelf object (bad magic)")
    if version != FORMAT_VERSION:  # never under a key of ours (the version is in every key)
        raise CorruptChunk(f"object format version {version} under a key of format version {FORMAT_VERSION}")
    if view.nbytes != HEADER_BYTES + payload_bytes:
        raise CorruptChunk(f"object has {view.nbytes - HEADER_BYTES} payload bytes, header says {payload_bytes}")
    if flags & ~KNOWN_FLAGS:  # new flags come with a new format version
        raise CorruptChunk(f"object has flags {flags:#x}, unknown in format version {FORMAT_VERSION}")
    prefix, tag, payload = view[: _PREFIX.size], view[_PREFIX.size : HEADER_BYTES], view[HEADER_BYTES:]
    if flags & ENCRYPTED:
        payload = memoryview(keyring.open(bytes(tag[:NONCE_BYTES]), payload, key_digest + bytes(prefix)))
    elif not authenticated:
        keyring.check_tag(tag, key_digest, prefix, payload)
    return codec_id, dtype_code, tuple(shape), payload


def unframe(
    blob: bytes | bytearray | memoryview,
    key_digest: bytes,
    keyring: Keyring,
    codecs: dict[int, Codec],
    expected: Expected,
    authenticated: bool = False,
    memory: ChunkMemory | None = None,
) -> torch.Tensor:
    """The chunk stored in `blob`; raises CorruptChunk unless it is authentic, stored under
    `key_digest` and shaped as `expected`, or ForeignChunk if a newer kvshelf wrote it (an
    authentic chunk of a codec this version lacks). `authenticated`: as in `verify`.

    `memory`: where to decode into, once the object is verified and its shape checked; a codec
    that shares its payload (raw) returns a view of `blob` instead. A failed decode releases it."""
    codec_id, dtype_code, shape, payload = verify(blob, key_digest, keyring, authenticated)
    if codec_id not in codecs:  # authentic: a newer kvshelf of this format wrote it
        raise UnknownCodec(f"codec id {codec_id} is unknown to this version of kvshelf")
    if dtype_code not in _DTYPE_BY_CODE:
        raise CorruptChunk(f"dtype code {dtype_code} is unknown")
    dtype = _DTYPE_BY_CODE[dtype_code]
    num_tokens = expected.check(shape, dtype)
    codec = codecs[codec_id]
    out = memory.allocate(shape, dtype) if memory is not None and not codec.shares_payload else None
    try:
        stored = codec.decode(payload, shape, dtype, out)
    except (CorruptChunk, ValueError, RuntimeError, TypeError, OverflowError, MemoryError, IndexError) as exc:
        if out is not None:
            memory.release(out)
        if isinstance(exc, CorruptChunk):
            raise
        raise CorruptChunk(f"{codec.name} payload does not decode to {shape}: {exc}") from exc
    layout = expected.layout
    if not layout.windowed_layers:
        return stored
    chunk = memory.allocate(layout.shape(num_tokens), dtype) if memory is not None else None
    return layout.unpack(stored, num_tokens, chunk)
