"""vLLM's paged KV cache <-> kvshelf's canonical chunks, copying block by block.

Every layer's cache is viewed (no copy) as keys and values, each (num_blocks, block_size,
kv_heads, head_dim) in token order:
  - CPU backend: each layer is (blocks, kv_heads, block_size, 2 * head_dim) in memory; per block
    and head, the kernel keeps the keys transposed (head_dim rows of block_size tokens), then
    the values (block_size rows of head_dim). `check_cpu_layout` proves this on the real kernel
    at start-up, so a vLLM that lays KV out otherwise is refused instead of misread.
  - GPU backends (flash-attn, triton): the logical per-layer view is (blocks, kv_heads,
    block_size, 2 * head_dim) with the key in the first head_dim channels, the value after.
  - MLA (one latent per token): (blocks, 1, block_size, latent) on the CPU, (blocks, block_size,
    latent) on GPUs; viewed as one plane (num_blocks, block_size, 1, latent).
A chunk (layers, planes, tokens, kv_heads, head_dim) spans tokens / block_size blocks, the last
possibly partly; each (layer, block) pair is two strided copies, so a gather or scatter passes
over the bytes once.

With vLLM's hybrid allocator a model's layers fall into KV cache groups, each with its own block
table: a sliding-window group replaces the blocks its window has moved past with the null block
(NULL_BLOCK_ID). Block ids are therefore given per group, and each layer reads its group's.
"""

from collections.abc import Sequence

import torch

# keys, values (or one MLA latent): each (num_blocks, block_size, kv_heads, head_dim)
KVViews = tuple[torch.Tensor, ...]
BlockIds = Sequence[Sequence[int]]  # per KV cache group: a request's block ids from its first token
# vLLM's null block: the first its block pool hands out, never to a request; it stands for the blocks
# a sliding-window group no longer keeps.
NULL_BLOCK_ID = 0


def blocks_from(block_ids: BlockIds, first_block: int, count: int | None = None) -> tuple[list[int], ...]:
    """Each group's block ids from `first_block` on (`count` of them, or all)."""
    end = None if count is None else first_block + count
    return tuple(list(group[first_block:end]) for group in block_ids)


def block_views(layer_cache: torch.Tensor, head_dim: int, cpu_layout: bool, mla: bool = False) -> KVViews:
    """`layer_cache` as (keys, values), or (latent,) for MLA, in token order, sharing its memory."""
    if mla:
        latent = layer_cache if layer_cache.dim() == 4 else layer_cache.unsqueeze(1)
        if latent.shape[1] != 1 or latent.shape[3] != head_dim:
            raise ValueError(f"vLLM MLA cache layer is {tuple(layer_cache.shape)}, expected (blocks, 1, block_size, "
                             f"{head_dim})")
        return (latent.transpose(1, 2),)
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


def _exact_values(dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    """`count` values exact in `dtype` (and in every wider float dtype), cycling through many distinct ones."""
    if dtype.itemsize == 1:  # float8: each of its finite values, in turn
        table = torch.arange(256, dtype=torch.uint8).view(dtype).float()
        table = table[table.isfinite()]
        return table[(torch.arange(count) * 7 + offset) % len(table)]
    return (torch.arange(count) % (251 - offset) + offset).float()


def check_cpu_layout(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, isa: str,
                     compute_dtype: torch.dtype | None = None) -> None:
    """Write distinct keys and values through vLLM's own CPU kernel into one scratch block and
    check that `block_views` reads them back in token order. With an fp8 `dtype`, keys and values
    are given in `compute_dtype` and the kernel quantizes them (scale 1), as in the engine."""
    from vllm import _custom_ops as ops

    shape = (block_size, num_kv_heads, head_dim)
    count = block_size * num_kv_heads * head_dim
    fp8 = dtype.itemsize == 1
    given = compute_dtype if fp8 else dtype
    keys = _exact_values(dtype, count, 0).to(given).view(shape)  # keys and values differ
    values = _exact_values(dtype, count, 3).to(given).view(shape)
    cache = torch.zeros((1, num_kv_heads, block_size, 2 * head_dim), dtype=torch.uint8 if fp8 else dtype)
    key_cache, value_cache = cache.view(1, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    kv_cache_dtype = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}.get(dtype, "auto")
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, torch.arange(block_size), isa,
                                   kv_cache_dtype=kv_cache_dtype)
    read_keys, read_values = block_views(cache.view(dtype), head_dim, cpu_layout=True)
    if not (torch.equal(read_keys[0].float(), keys.float()) and torch.equal(read_values[0].float(), values.float())):
        raise ValueError(
            f"kvshelf does not know how vLLM's CPU attention (isa {isa!r}, block_size {block_size}, dtype {dtype}) "
            "lays out its KV cache; this vLLM version is not supported"
        )


def check_cpu_mla_layout(block_size: int, latent_dim: int, dtype: torch.dtype) -> None:
    """As `check_cpu_layout`, for the MLA cache: write latents through vLLM's own CPU MLA cache
    update into one scratch block and read them back in token order."""
    from vllm.v1.attention.backends.mla.cpu_mla import CPUMLAImpl

    rope_dim = 64 if latent_dim > 64 else latent_dim // 2  # where the update joins the latent and its rope part
    latents = (torch.arange(block_size * latent_dim) % 251).to(dtype).view(block_size, latent_dim)
    cache = torch.zeros((1, 1, block_size, latent_dim), dtype=dtype)
    split = latent_dim - rope_dim
    CPUMLAImpl.do_kv_cache_update(None, latents[:, :split], latents[:, split:].unsqueeze(1), cache.squeeze(1),
                                  torch.arange(block_size), "auto", torch.ones(()))
    (read,) = block_views(cache, latent_dim, cpu_layout=True, mla=True)
    if not torch.equal(read[0, :, 0], latents):
        raise ValueError(f"kvshelf does not know how vLLM's CPU MLA (block_size {block_size}, dtype {dtype}) lays out "
                         "its cache; this vLLM version is not supported")


class PagedKV:
    """The engine's per-layer views, and copies between them and canonical chunks."""

    def __init__(self, layer_views: Sequence[KVViews], layer_groups: Sequence[int] | None = None) -> None:
        """`layer_groups`: each layer's KV cache group (all in group 0 if None)."""
        self.layers = list(layer_views)
        self.groups = list(layer_groups) if layer_groups is not None else [0] * len(self.layers)
        self.block_size = self.layers[0][0].shape[1]
        self.planes = len(self.layers[0])

    def held_tokens(self, block_ids: BlockIds, num_tokens: int, first_token: int = 0) -> int:
        """Where the tokens from `first_token` to `num_tokens` that every group still holds end:
        at the first block a sliding window has freed, or `num_tokens`."""
        for index in range(first_token // self.block_size, -(-num_tokens // self.block_size)):
            if any(group[index] == NULL_BLOCK_ID for group in block_ids):
                return index * self.block_size
        return num_tokens

    def gather(
        self, block_ids: BlockIds, num_tokens: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The KV of `block_ids` (per group), in order, as one CPU chunk (layers, planes, tokens,
        kv_heads, head_dim): all their tokens, or the first `num_tokens` (which every group must
        hold: see `held_tokens`); written into `out` if given (of that shape)."""
        keys = self.layers[0][0]
        num_tokens = len(block_ids[0]) * self.block_size if num_tokens is None else num_tokens
        chunk = out if out is not None else torch.empty((len(self.layers), self.planes, num_tokens, *keys.shape[2:]),
                                                        dtype=keys.dtype)
        for layer_chunk, views, group in zip(chunk, self.layers, self.groups):
            for begin, block_id, count in self._spans(block_ids[group], num_tokens):
                for kv_chunk, view in zip(layer_chunk, views):
                    kv_chunk[begin : begin + count].copy_(view[block_id, :count])
        return chunk

    def scatter(self, chunk: torch.Tensor, block_ids: BlockIds, first_token: int, num_tokens: int) -> None:
        """Write tokens [first_token, first_token + num_tokens) of `chunk` into `block_ids` (per
        group), from the start of each group's first block; the last block may be left partly
        unwritten, and a null block (outside a sliding window) is skipped."""
        for layer_chunk, views, group in zip(chunk, self.layers, self.groups):
            for begin, block_id, count in self._spans(block_ids[group], num_tokens):
                if block_id == NULL_BLOCK_ID:
                    continue
                start = first_token + begin
                for kv_chunk, view in zip(layer_chunk, views):
                    view[block_id, :count].copy_(kv_chunk[start : start + count], non_blocking=True)

    def _spans(self, block_ids: Sequence[int], num_tokens: int) -> list[tuple[int, int, int]]:
        """(first token, block id, tokens in it) of each block the first `num_tokens` tokens fill."""
        size = self.block_size
        return [(index * size, block_id, min(size, num_tokens - index * size))
                for index, block_id in enumerate(block_ids[: -(-num_tokens // size)])]
