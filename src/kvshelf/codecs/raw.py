"""`raw`: the tensor's bytes as they are; lossless, and zero-copy on decode."""

import math
import warnings

import torch

from kvshelf.codecs.base import Codec, check_chunk_shape, check_payload_bytes


class RawCodec(Codec):
    name = "raw"
    id = 1

    def encode(self, kv: torch.Tensor) -> memoryview:
        # Viewing as bytes works for every dtype, bfloat16 and float8 included (numpy has neither).
        return memoryview(kv.detach().contiguous().view(torch.uint8).numpy()).cast("B")

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        check_chunk_shape(self, shape)
        check_payload_bytes(self, payload, math.prod(shape) * dtype.itemsize, shape)
        if len(payload) == 0:
            return torch.empty(shape, dtype=dtype)
        # The buffer is shared, not copied, even a read-only one (a Redis reply is `bytes`): torch
        # warns that the tensor could write to it, but chunks from the shelf are never written
        # (see LoadResult), and copying several MB per chunk would cost more than the read.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
            return torch.frombuffer(payload, dtype=dtype).view(shape)
