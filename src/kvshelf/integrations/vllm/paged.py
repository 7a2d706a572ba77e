"""vLLM's paged KV cache <-> kvshelf's canonical chunks, copying block by block.

Every layer's cache is viewed (no copy) as keys and values, each (num_blocks, block_size,
kv_heads, head_dim) in token order:
  - CPU backend: each layer is (blocks, kv_heads, block_size, 2 * head_dim) in memory; per block
    and head, the kernel keeps the keys transposed (head_dim rows of block_size tokens), then
    the values (block_size rows of head_dim). `check_cpu_layout` proves this on the real kernel
    at start-up, so a vLLM that lays KV out otherwise is refused instead of misread.
  - GPU backends (flash-attn, triton): the logical per-layer view is (blocks, kv_heads,
    block_size, 2 * head_dim) with the key in the first head_dim channels, the value after.
A chunk (layers, 2, tokens, kv_heads, head_dim) spans tokens / block_size blocks, the last
possibly partly; each (layer, block) pair is two strided copies, so a gather or scatter passes
over the bytes once.
"""

from collections.abc import Sequence

import torch

KVViews = tuple[torch.Tensor, torch.Tensor]  # keys, values: each (num_blocks, block_size, kv_heads, head_dim)


def block_views(layer_cache: torch.Tensor, head_dim: int, cpu_layout: bool) -> KVViews:
    """`layer_cache` as (keys, values) in token order, sharing its memory."""
    num_blocks, num_kv_heads, block_size, content = layer_cache.shape
    if content != 2 * head_dim:
        raise ValueError(f"vLLM KV cache layer has {content} channels, expected 2 x head_dim = {2 * head_dim}")
    if cpu_layout:
        per_head = layer_cache.view(num_blocks, num_kv_heads, 2, block_size * head_dim)
        keys = per_head[:, :, 0].unflatten(-1, (head_dim, block_size)).permute(0, 3, 1, 2)
        values = per_head[:, :, 1].unflatten(-1, (block_size, head_dim)).permute(0, 2, 1, 3)
        return keys, values
    both = layer_cache.unflatten(-1, (2, head_dim)).permute(0, 3, 2, 1, 4)
    return both[:, 0], both[:, 1]


def check_cpu_layout(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, isa: str) -> None:
    """Write distinct keys and values through vLLM's own CPU kernel into one scratch block and
    check that `block_views` reads them back in token order."""
    from vllm import _custom_ops as ops

    shape = (block_size, num_kv_heads, head_dim)
    count = block_size * num_kv_heads * head_dim
    # Small integers, exact in every float dtype vLLM's CPU cache takes; keys and values differ.
    keys = (torch.arange(count) % 251).to(dtype).view(shape)
    values = (torch.arange(count) % 241 + 3).to(dtype).view(shape)
    cache = torch.zeros((1, num_kv_heads, block_size, 2 * head_dim), dtype=dtype)
    key_cache, value_cache = cache.view(1, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, torch.arange(block_size), isa)
    read_keys, read_values = block_views(cache, head_dim, cpu_layout=True)
    if not (torch.equal(read_keys[0], keys) and torch.equal(read_values[0], values)):
        raise ValueError(
            f"kvshelf does not know how vLLM's CPU attention (isa {isa!r}, block_size {block_size}, dtype {dtype}) "
            "lays out its KV cache; this vLLM version is not supported"
        )


class PagedKV:
    """The engine's per-layer (keys, values) views, and copies between them and canonical chunks."""

    def __init__(self, layer_views: Sequence[KVViews]) -> None:
        self.layers = list(layer_views)
        self.block_size = self.layers[0][0].shape[1]

    def gather(
        self, block_ids: Sequence[int], num_tokens: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The KV of `block_ids`, in order, as one CPU chunk (layers, 2, tokens, kv_heads, head_dim):
        all their tokens, or the first `num_tokens`; written into `out` if given (of that shape)."""
        keys = self.layers[0][0]
        num_tokens = len(block_ids) * self.block_size if num_tokens is None else num_tokens
        chunk = out if out is not None else torch.empty((len(self.layers), 2, num_tokens, *keys.shape[2:]),
                                                        dtype=keys.dtype)
        for layer_chunk, views in zip(chunk, self.layers):
            for begin, block_id, count in self._spans(block_ids, num_tokens):
                for kv_chunk, view in zip(layer_chunk, views):
                    kv_chunk[begin : begin + count].copy_(view[block_id, :count])
        return chunk

    def scatter(self, chunk: torch.Tensor, block_ids: Sequence[int], first_token: int, num_tokens: int) -> None:
        """Write tokens [first_token, first_token + num_tokens) of `chunk` into `block_ids`, from the
        start of the first block; the last block may be left partly unwritten."""
        for layer_chunk, views in zip(chunk, self.layers):
            for begin, block_id, count in self._spans(block_ids, num_tokens):
                start = first_token + begin
                for kv_chunk, view in zip(layer_chunk, views):
                    view[block_id, :count].copy_(kv_chunk[start : start + count], non_blocking=True)

    def _spans(self, block_ids: Sequence[int], num_tokens: int) -> list[tuple[int, int, int]]:
        """(first token, block id, tokens in it) of each block the first `num_tokens` tokens fill."""
        size = self.block_size
        return [(index * size, block_id, min(size, num_tokens - index * size))
                for index, block_id in enumerate(block_ids[: -(-num_tokens // size)])]
