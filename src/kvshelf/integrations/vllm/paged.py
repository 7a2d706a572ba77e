"""vLLM's paged KV cache <-> kvshelf's canonical chunks, copying block by block.

Every layer's cache is viewed (no copy) as (num_blocks, 2, block_size, kv_heads, head_dim):
  - CPU backend: each layer is (blocks, kv_heads, block_size, 2 * head_dim) in memory, read by
    the kernel as (blocks, kv_heads, 2 * block_size, head_dim): a block's keys, then its values.
  - GPU backends (flash-attn, triton): the logical per-layer view is (blocks, kv_heads,
    block_size, 2 * head_dim) with the key in the first head_dim channels, the value after.
A chunk (layers, 2, chunk_size, kv_heads, head_dim) spans chunk_size / block_size blocks; each
(layer, block) pair is one strided copy, so a gather or scatter passes over the bytes once.
"""

from collections.abc import Sequence

import torch


def block_view(layer_cache: torch.Tensor, head_dim: int, keys_then_values_per_block: bool) -> torch.Tensor:
    """`layer_cache` as (num_blocks, 2, block_size, kv_heads, head_dim), sharing its memory."""
    num_blocks, num_kv_heads, block_size, content = layer_cache.shape
    if content != 2 * head_dim:
        raise ValueError(f"vLLM KV cache layer has {content} channels, expected 2 x head_dim = {2 * head_dim}")
    if keys_then_values_per_block:
        return layer_cache.view(num_blocks, num_kv_heads, 2, block_size, head_dim).permute(0, 2, 3, 1, 4)
    return layer_cache.unflatten(-1, (2, head_dim)).permute(0, 3, 2, 1, 4)


class PagedKV:
    """The engine's per-layer block views, and copies between them and canonical chunks."""

    def __init__(self, layer_views: Sequence[torch.Tensor]) -> None:
        self.layers = list(layer_views)  # each (num_blocks, 2, block_size, kv_heads, head_dim)
        self.block_size = self.layers[0].shape[2]

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """The KV of `block_ids`, in order, as one CPU chunk (layers, 2, tokens, kv_heads, head_dim)."""
        first = self.layers[0]
        num_tokens = len(block_ids) * self.block_size
        chunk = torch.empty((len(self.layers), 2, num_tokens, *first.shape[3:]), dtype=first.dtype)
        for layer_chunk, layer in zip(chunk, self.layers):
            for index, block_id in enumerate(block_ids):
                begin = index * self.block_size
                layer_chunk[:, begin : begin + self.block_size].copy_(layer[block_id])
        return chunk

    def scatter(self, chunk: torch.Tensor, block_ids: Sequence[int], first_token: int = 0) -> None:
        """Write tokens [first_token, first_token + len(block_ids) * block_size) of `chunk` into `block_ids`."""
        for layer_chunk, layer in zip(chunk, self.layers):
            for index, block_id in enumerate(block_ids):
                begin = first_token + index * self.block_size
                layer[block_id].copy_(layer_chunk[:, begin : begin + self.block_size], non_blocking=True)
