"""`raw`: the tensor's bytes as they are; lossless, and zero-copy on decode."""

import math

import torch

from kvshelf.codecs.base import Codec, check_chunk_shape, check_payload_bytes, payload_tensor


class RawCodec(Codec):
    name = "raw"
    id = 1
    planes = (1, 2)
    row_wise = True
    # A load reads the stored object into the memory tier's arena: the chunk is a view of its payload there.
    shares_payload = True

    def encode(self, kv: torch.Tensor) -> memoryview:
        # Viewing as bytes works for every dtype, bfloat16 and float8 included (numpy has neither).
        return memoryview(kv.detach().contiguous().view(torch.uint8).numpy()).cast("B")

    def decode(
        self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_chunk_shape(self, shape)
        check_payload_bytes(self, payload, math.prod(shape) * dtype.itemsize, shape)
        values = payload_tensor(payload, dtype).view(shape)
        return values if out is None else out.copy_(values)
