"""The codec interface: KV tensor <-> payload bytes, stateless."""

import warnings
from abc import ABC, abstractmethod

import torch

from kvshelf.errors import CorruptChunk
from kvshelf.layout import KVLayout


class Codec(ABC):
    """Turns one chunk's KV into bytes and back.

    `id` is stored in every object's header, so it must never change once released; a codec
    with variants (levels) stores the variant in its payload, so one id decodes them all.
    """

    name: str
    id: int
    lossless: bool = True
    expected_ratio: float = 1.0  # stored bytes per float32 byte, before any is measured (for codec: auto)
    # True: `decode` returns a view of the payload itself, needing no memory of its own: unframe gives it no `out`.
    shares_payload: bool = False
    planes: tuple[int, ...] = (2,)  # the layouts it takes, by planes per layer: 2 keys and values, 1 MLA
    # Codes each (layer, token) row on its own: it takes the packed rows of windowed layouts too.
    row_wise: bool = False

    def takes(self, layout: KVLayout) -> bool:
        return layout.planes in self.planes and (self.row_wise or not layout.windowed_layers)

    @abstractmethod
    def encode(self, kv: torch.Tensor) -> bytes | memoryview:
        """Payload of `kv` (layers, 2, tokens, kv_heads, head_dim)."""

    @abstractmethod
    def decode(
        self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The tensor of `shape` and `dtype` encoded in `payload`; raises CorruptChunk if it can't be.

        `out`: a tensor of `shape` and `dtype` to decode into (the memory tier's arena, so a loaded
        chunk takes no freshly faulted memory); None: the codec allocates its own.
        `shape` has been checked against the namespace's layout (see framing.Expected); the
        payload has not: every size it declares is checked against `shape` and against the
        payload's length before anything is allocated from it.
        """

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        """Elementwise bound on |decode(encode(kv)) - kv| (computed in float32, before casting back)."""
        return torch.zeros(())


def check_chunk_shape(codec: Codec, shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
    """`shape` as (layers, planes, tokens, kv_heads, head_dim) with planes the codec takes;
    CorruptChunk if it is not one."""
    if len(shape) != 5 or shape[1] not in codec.planes or any(size < 0 for size in shape):
        raise CorruptChunk(f"{codec.name} decodes chunks (layers, {' or '.join(map(str, codec.planes))}, tokens, "
                           f"kv_heads, head_dim), not {shape}")
    return shape


def check_payload_bytes(codec: Codec, payload: memoryview, expected_bytes: int, shape: tuple[int, ...]) -> None:
    """A payload must be exactly as long as its shape (and parameters) need: refused before any allocation."""
    if len(payload) != expected_bytes:
        raise CorruptChunk(f"{codec.name} payload holds {len(payload)} bytes, shape {shape} needs {expected_bytes}")


def payload_tensor(payload: memoryview, dtype: torch.dtype, offset: int = 0, count: int = -1) -> torch.Tensor:
    """`count` items of `dtype` at byte `offset` of `payload` (all the rest: -1), sharing its memory.

    Shared, not copied, even from a read-only buffer (a Redis reply, an inbox entry): torch warns
    that the tensor could write to it, but decoders only read it, and chunks from the shelf are
    never written (see LoadResult); copying several MB per chunk would cost more than the read.
    """
    if count == 0 or offset == len(payload):  # torch.frombuffer refuses to make an empty tensor
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        return torch.frombuffer(payload, dtype=dtype, offset=offset, count=count)
