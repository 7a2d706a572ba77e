"""Chunk keys: a chained blake3 hash that names a chunk and everything before it.

key_{-1} = H(namespace), key_i = H(key_{i-1} || tokens_i [|| multimodal hashes in chunk i]),
with tokens as little-endian int32 and H keyed by the deployment secret (see kvshelf.security):
deterministic across processes and machines that share the secret, and meaningless to anyone
reading a store without it.

A prompt's trailing partial chunk (its "tail") has a key only when asked for: prefill/decode
transfer ships it, so the decode instance recomputes only the last token. The tail's key hashes
a marker too, so it can never equal a full chunk's key.
"""

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property

import blake3
import numpy as np

from kvshelf.codecs.framing import FORMAT_VERSION
from kvshelf.layout import KVLayout
from kvshelf.security import Keyring

NAMESPACE_ID_CHARS = 16
# (token position, content hash) of each multimodal input in a prompt.
MMHashes = Sequence[tuple[int, bytes]]
TAIL_MARKER = b"kvshelf-tail\0"


@dataclass(frozen=True)
class Namespace:
    """Everything that changes what a KV tensor means. Two requests share KV only if all agree."""

    model_id: str
    layout: KVLayout
    tp_rank: int = 0
    tp_size: int = 1
    lora_id: str | None = None
    cache_salt: str | None = None
    # Room for engine-specific meaning (e.g. a vLLM kv-cache dtype); sorted into the digest.
    extra: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("Namespace.model_id must be a non-empty string naming the model and its weights")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"Namespace tp_rank {self.tp_rank} must be in [0, tp_size={self.tp_size})")

    @classmethod
    def from_description(cls, description: dict) -> "Namespace":
        """The inverse of `describe`."""
        fields = dict(description)
        layout = dict(fields["layout"])
        layout["windowed_layers"] = tuple(layout.get("windowed_layers", ()))  # a JSON list
        fields["layout"] = KVLayout(**layout)
        fields["extra"] = tuple(sorted(fields["extra"].items()))
        return cls(**fields)

    def describe(self) -> dict:
        """A JSON-able description; its canonical form is what the namespace digest hashes.
        It holds the tenant's salt: stores get `public_description` instead."""
        description = asdict(self)
        description["extra"] = dict(sorted(self.extra))
        # Described as before layouts had kinds and windows: their chunk keys stay the same.
        for name, default in (("kind", "kv"), ("windowed_layers", ()), ("window_tokens", 0)):
            if description["layout"][name] == default:
                del description["layout"][name]
        return description

    def public_description(self, keyring: Keyring) -> dict:
        """What a store may record of the namespace: the salt only as a keyed hash."""
        description = self.describe()
        salt = description.pop("cache_salt")
        description["cache_salt_tag"] = keyring.salt_tag(salt) if salt is not None else None
        return description

    @cached_property
    def digest(self) -> bytes:
        """Unkeyed: never stored. Stores see only `root`'s keyed derivations."""
        canonical = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return blake3.blake3(b"kvshelf-namespace-v1\0" + canonical.encode()).digest()

    def root(self, keyring: Keyring) -> bytes:
        """key_{-1}: the start of every chunk key chain in this namespace. It holds the stored-object
        format version: kvshelf versions of two formats sharing a store never meet each other's objects."""
        hasher = keyring.hasher()
        hasher.update(self.digest + bytes([FORMAT_VERSION]))
        return hasher.digest()

    def id(self, keyring: Keyring) -> str:
        """Short printable id; stores group chunks under it (listing, clearing)."""
        return self.root(keyring).hex()[:NAMESPACE_ID_CHARS]


@dataclass(frozen=True)
class Chunking:
    """How a prompt of `num_tokens` splits into chunks of `size` tokens, the last maybe a partial tail."""

    size: int

    def count(self, num_tokens: int) -> int:
        """Chunks holding `num_tokens` tokens, a trailing partial one included."""
        return -(-num_tokens // self.size)

    def floor(self, num_tokens: int) -> int:
        """The tokens of the full chunks among the first `num_tokens`."""
        return num_tokens // self.size * self.size

    def span(self, index: int, num_tokens: int) -> tuple[int, int]:
        """Tokens [begin, end) of chunk `index` of a prompt of `num_tokens`."""
        return index * self.size, min((index + 1) * self.size, num_tokens)

    def prefix_tokens(self, num_chunks: int, num_tokens: int) -> int:
        """Tokens in the first `num_chunks` chunks of a prompt of `num_tokens` (the last may be its tail)."""
        return min(num_chunks * self.size, num_tokens)

    def tokens_in(self, index: int, num_tokens: int) -> int:
        begin, end = self.span(index, num_tokens)
        return end - begin


@dataclass(frozen=True)
class Prompt:
    """One request's prompt as the shelf sees it: its tokens, what they mean (namespace), and the
    content hashes of its images, audio and video ((token position, hash), see `chunk_keys`)."""

    token_ids: Sequence[int]
    namespace: Namespace
    mm_hashes: MMHashes = ()

    def __len__(self) -> int:
        return len(self.token_ids)

    def with_rank(self, tp_rank: int) -> "Prompt":
        """The same prompt as one tensor-parallel rank's shard names it."""
        return dataclasses.replace(self, namespace=dataclasses.replace(self.namespace, tp_rank=tp_rank))


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """A chunk's name: its namespace id (for grouping) and the chained digest (for identity)."""

    namespace_id: str
    digest: bytes

    @property
    def hex(self) -> str:
        return self.digest.hex()


def chunk_keys(
    token_ids: Sequence[int],
    namespace: Namespace,
    chunk_size: int,
    mm_hashes: MMHashes = (),
    tail: bool = False,
    *,
    keyring: Keyring,
) -> list[ChunkKey]:
    """Keys of every full chunk of `token_ids`, and with `tail` of the trailing partial chunk if any.

    `mm_hashes` are (token position, content hash) pairs of multimodal inputs; each is mixed
    into the chunk its position falls in, so an image changes that chunk's key and all later ones.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    tokens_le = np.asarray(token_ids, dtype="<i4").tobytes()
    mm_by_chunk: dict[int, list[bytes]] = {}
    for position, content_hash in sorted(mm_hashes):
        mm_by_chunk.setdefault(position // chunk_size, []).append(content_hash)
    chunk_bytes = chunk_size * 4
    num_chunks = len(token_ids) // chunk_size
    if tail and len(token_ids) % chunk_size:
        num_chunks += 1
    previous = namespace.root(keyring)
    namespace_id = previous.hex()[:NAMESPACE_ID_CHARS]
    keys = []
    for index in range(num_chunks):
        hasher = keyring.hasher()
        hasher.update(previous)
        if (index + 1) * chunk_size > len(token_ids):
            hasher.update(TAIL_MARKER)
        hasher.update(tokens_le[index * chunk_bytes : (index + 1) * chunk_bytes])
        for content_hash in mm_by_chunk.get(index, ()):
            hasher.update(content_hash)
        previous = hasher.digest()
        keys.append(ChunkKey(namespace_id, previous))
    return keys
