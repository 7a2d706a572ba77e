"""The codec interface: KV tensor <-> payload bytes, stateless."""

from abc import ABC, abstractmethod

import torch


class Codec(ABC):
    """Turns one chunk's KV into bytes and back.

    `id` is stored in every object's header, so it must never change once released;
    `max_abs_error` states the codec's error bound (0.0 for lossless codecs).
    """

    name: str
    id: int
    max_abs_error: float = 0.0

    @abstractmethod
    def encode(self, kv: torch.Tensor) -> bytes | memoryview:
        """Payload of `kv` (layers, 2, tokens, kv_heads, head_dim)."""

    @abstractmethod
    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The tensor of `shape` and `dtype` encoded in `payload`; raises CorruptChunk if it can't be."""
