"""vLLM's paged layouts <-> canonical chunks: the CPU layout as vLLM's own kernel writes it."""

import pytest
import torch

from kvshelf.integrations.vllm.paged import PagedKV, block_views, check_cpu_layout

NUM_BLOCKS, HEADS, BLOCK, DIM = 6, 3, 32, 32
ISA = "vec"  # what the CPU kernel uses for float32 with blocks of a multiple of 32 on x86


def written_by_vllm(keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """A CPU cache layer into which vLLM's kernel wrote token i's keys and values at slot slots[i]."""
    from vllm import _custom_ops as ops

    cache = torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 2 * DIM)
    key_cache, value_cache = cache.view(NUM_BLOCKS, HEADS, 2 * BLOCK, DIM).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, ISA)
    return cache


def tokens(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(count, HEADS, DIM), torch.randn(count, HEADS, DIM)


def test_cpu_views_read_what_the_kernel_wrote_in_token_order():
    keys, values = tokens(2 * BLOCK)
    slots = torch.cat([torch.arange(5 * BLOCK, 6 * BLOCK), torch.arange(BLOCK, 2 * BLOCK)])  # blocks 5 then 1
    paged = PagedKV([block_views(written_by_vllm(keys, values, slots), DIM, cpu_layout=True)])
    chunk = paged.gather([5, 1])  # (layers, 2, tokens, heads, dim)
    assert torch.equal(chunk[0, 0], keys) and torch.equal(chunk[0, 1], values)


def test_check_cpu_layout_accepts_this_vllm():
    check_cpu_layout(BLOCK, HEADS, DIM, torch.float32, ISA)


@pytest.mark.parametrize("cpu_layout", [True, False])
def test_gather_then_scatter_round_trips(cpu_layout):
    layers = [torch.randn(NUM_BLOCKS, HEADS, BLOCK, 2 * DIM) for _ in range(2)]
    chunk = PagedKV([block_views(layer, DIM, cpu_layout) for layer in layers]).gather([5, 1])
    assert chunk.shape == (2, 2, 2 * BLOCK, HEADS, DIM)
    target = [torch.zeros_like(layer) for layer in layers]
    PagedKV([block_views(layer, DIM, cpu_layout) for layer in target]).scatter(chunk, [0, 3], 0, 2 * BLOCK)
    assert torch.equal(target[0][0], layers[0][5]) and torch.equal(target[1][3], layers[1][1])


def test_a_partial_last_block_moves_only_its_tokens():
    keys, values = tokens(BLOCK + 5)
    cache = written_by_vllm(keys, values, torch.arange(2 * BLOCK, 3 * BLOCK + 5))  # blocks 2 and 3 (5 tokens)
    chunk = PagedKV([block_views(cache, DIM, cpu_layout=True)]).gather([2, 3], num_tokens=BLOCK + 5)
    assert torch.equal(chunk[0, 0], keys) and torch.equal(chunk[0, 1], values)
    target = written_by_vllm(*tokens(2 * BLOCK), torch.arange(4 * BLOCK, 6 * BLOCK))  # blocks 4 and 5 in use
    before = target.clone()
    PagedKV([block_views(target, DIM, cpu_layout=True)]).scatter(chunk, [4, 5], first_token=0, num_tokens=BLOCK + 5)
    read_keys, read_values = block_views(target, DIM, cpu_layout=True)
    assert torch.equal(read_keys[4], keys[:BLOCK]) and torch.equal(read_keys[5, :5], keys[BLOCK:])
    assert torch.equal(read_values[5, :5], values[BLOCK:])
    before_keys, before_values = block_views(before, DIM, cpu_layout=True)
    assert torch.equal(read_keys[5, 5:], before_keys[5, 5:]) and torch.equal(read_values[5, 5:], before_values[5, 5:])


def test_scatter_from_inside_a_chunk_leaves_earlier_blocks_alone():
    layer = torch.randn(NUM_BLOCKS, HEADS, BLOCK, 2 * DIM)
    chunk = PagedKV([block_views(layer, DIM, True)]).gather([0, 1])
    target = torch.zeros_like(layer)
    PagedKV([block_views(target, DIM, True)]).scatter(chunk, [4], first_token=BLOCK, num_tokens=BLOCK)
    assert torch.equal(target[4], layer[1]) and not target[:4].any()


def test_wrong_channel_count_is_refused():
    with pytest.raises(ValueError, match="2 x head_dim"):
        block_views(torch.zeros(2, 3, 4, 10), DIM, True)
