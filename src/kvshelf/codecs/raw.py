"""`raw`: the tensor's bytes as they are; lossless, and zero-copy on decode."""

import math

import torch

from kvshelf.codecs.base import Codec
from kvshelf.errors import CorruptChunk


class RawCodec(Codec):
    name = "raw"
    id = 1

    def encode(self, kv: torch.Tensor) -> memoryview:
        # Viewing as bytes works for every dtype, bfloat16 and float8 included (numpy has neither).
        return memoryview(kv.detach().contiguous().view(torch.uint8).numpy()).cast("B")

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(payload) != math.prod(shape) * itemsize:
            raise CorruptChunk(
                f"raw payload holds {len(payload)} bytes, shape {shape} needs {math.prod(shape) * itemsize}"
            )
        if len(payload) == 0:
            return torch.empty(shape, dtype=dtype)
        # A writable buffer (bytearray) is shared, not copied; a read-only one must be copied
        # because torch tensors are always writable.
        buffer = payload if not payload.readonly else bytearray(payload)
        return torch.frombuffer(buffer, dtype=dtype).view(shape)
