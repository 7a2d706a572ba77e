"""The codec interface: KV tensor <-> payload bytes, stateless."""

from abc import ABC, abstractmethod

import torch


class Codec(ABC):
    """Turns one chunk's KV into bytes and back.

    `id` is stored in every object's header, so it must never change once released; a codec
    with variants (levels) stores the variant in its payload, so one id decodes them all.
    """

    name: str
    id: int
    lossless: bool = True
    expected_ratio: float = 1.0  # stored bytes per float32 byte, before any is measured (for codec: auto)

    @abstractmethod
    def encode(self, kv: torch.Tensor) -> bytes | memoryview:
        """Payload of `kv` (layers, 2, tokens, kv_heads, head_dim)."""

    @abstractmethod
    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The tensor of `shape` and `dtype` encoded in `payload`; raises CorruptChunk if it can't be."""

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        """Elementwise bound on |decode(encode(kv)) - kv| (computed in float32, before casting back)."""
        return torch.zeros(())
