"""vLLM's paged layouts <-> canonical chunks, on synthetic caches (no engine needed)."""

import pytest
import torch

from kvshelf.integrations.vllm.paged import PagedKV, block_view

NUM_BLOCKS, HEADS, BLOCK, DIM = 6, 3, 4, 8


def cache() -> torch.Tensor:
    return torch.randn(NUM_BLOCKS, HEADS, BLOCK, 2 * DIM)


def test_cpu_layout_is_keys_then_values_per_block():
    layer = cache()
    view = block_view(layer, DIM, keys_then_values_per_block=True)
    as_kernel_reads_it = layer.view(NUM_BLOCKS, HEADS, 2 * BLOCK, DIM)  # what the CPU attention kernel does
    block, head, token = 2, 1, 3
    assert torch.equal(view[block, 0, token, head], as_kernel_reads_it[block, head, token])
    assert torch.equal(view[block, 1, token, head], as_kernel_reads_it[block, head, BLOCK + token])


def test_gpu_layout_splits_channels():
    layer = cache()
    view = block_view(layer, DIM, keys_then_values_per_block=False)
    key_cache, value_cache = layer.transpose(1, 2).split(DIM, dim=-1)  # what flash-attn's backend does
    assert torch.equal(view[4, 0, 2, 1], key_cache[4, 2, 1])
    assert torch.equal(view[4, 1, 2, 1], value_cache[4, 2, 1])


@pytest.mark.parametrize("keys_then_values_per_block", [True, False])
def test_gather_then_scatter_round_trips(keys_then_values_per_block):
    layers = [cache() for _ in range(2)]
    paged = PagedKV([block_view(layer, DIM, keys_then_values_per_block) for layer in layers])
    chunk = paged.gather([5, 1])  # (layers, 2, tokens, heads, dim)
    assert chunk.shape == (2, 2, 2 * BLOCK, HEADS, DIM)
    assert torch.equal(chunk[1, 0, BLOCK:], paged.layers[1][1, 0])
    target = [torch.zeros_like(layer) for layer in layers]
    target_paged = PagedKV([block_view(layer, DIM, keys_then_values_per_block) for layer in target])
    target_paged.scatter(chunk, [0, 3])
    assert torch.equal(target[0][0], layers[0][5]) and torch.equal(target[1][3], layers[1][1])


def test_scatter_from_inside_a_chunk_leaves_earlier_blocks_alone():
    layers = [cache()]
    chunk = PagedKV([block_view(layers[0], DIM, True)]).gather([0, 1])
    target = torch.zeros_like(layers[0])
    PagedKV([block_view(target, DIM, True)]).scatter(chunk, [4], first_token=BLOCK)
    assert torch.equal(target[4], layers[0][1]) and not target[:4].any()


def test_wrong_channel_count_is_refused():
    with pytest.raises(ValueError, match="2 x head_dim"):
        block_view(torch.zeros(2, 3, 4, 10), DIM, True)
