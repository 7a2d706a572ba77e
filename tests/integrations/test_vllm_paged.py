"""vLLM's paged layouts <-> canonical chunks: the CPU layout as vLLM's own kernel writes it."""

from types import SimpleNamespace

import pytest
import torch

from kvshelf import KVLayout, Namespace
from kvshelf.codecs import CODECS
from kvshelf.integrations.vllm.context import EngineFacts, kv_cache_groups, with_window_storage
from kvshelf.integrations.vllm.paged import (
    NULL_BLOCK_ID,
    PagedKV,
    block_views,
    blocks_from,
    check_cpu_layout,
    check_cpu_mla_layout,
)

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
    chunk = paged.gather(([5, 1],))  # (layers, 2, tokens, heads, dim)
    assert torch.equal(chunk[0, 0], keys) and torch.equal(chunk[0, 1], values)


def test_check_cpu_layout_accepts_this_vllm():
    check_cpu_layout(BLOCK, HEADS, DIM, torch.float32, ISA)


@pytest.mark.parametrize("cpu_layout", [True, False])
def test_gather_then_scatter_round_trips(cpu_layout):
    layers = [torch.randn(NUM_BLOCKS, HEADS, BLOCK, 2 * DIM) for _ in range(2)]
    chunk = PagedKV([block_views(layer, DIM, cpu_layout) for layer in layers]).gather(([5, 1],))
    assert chunk.shape == (2, 2, 2 * BLOCK, HEADS, DIM)
    target = [torch.zeros_like(layer) for layer in layers]
    PagedKV([block_views(layer, DIM, cpu_layout) for layer in target]).scatter(chunk, ([4, 3],), 0, 2 * BLOCK)
    assert torch.equal(target[0][4], layers[0][5]) and torch.equal(target[1][3], layers[1][1])


def test_a_partial_last_block_moves_only_its_tokens():
    keys, values = tokens(BLOCK + 5)
    cache = written_by_vllm(keys, values, torch.arange(2 * BLOCK, 3 * BLOCK + 5))  # blocks 2 and 3 (5 tokens)
    chunk = PagedKV([block_views(cache, DIM, cpu_layout=True)]).gather(([2, 3],), num_tokens=BLOCK + 5)
    assert torch.equal(chunk[0, 0], keys) and torch.equal(chunk[0, 1], values)
    target = written_by_vllm(*tokens(2 * BLOCK), torch.arange(4 * BLOCK, 6 * BLOCK))  # blocks 4 and 5 in use
    before = target.clone()
    PagedKV([block_views(target, DIM, cpu_layout=True)]).scatter(chunk, ([4, 5],), first_token=0, num_tokens=BLOCK + 5)
    read_keys, read_values = block_views(target, DIM, cpu_layout=True)
    assert torch.equal(read_keys[4], keys[:BLOCK]) and torch.equal(read_keys[5, :5], keys[BLOCK:])
    assert torch.equal(read_values[5, :5], values[BLOCK:])
    before_keys, before_values = block_views(before, DIM, cpu_layout=True)
    assert torch.equal(read_keys[5, 5:], before_keys[5, 5:]) and torch.equal(read_values[5, 5:], before_values[5, 5:])


def test_scatter_from_inside_a_chunk_leaves_earlier_blocks_alone():
    layer = torch.randn(NUM_BLOCKS, HEADS, BLOCK, 2 * DIM)
    chunk = PagedKV([block_views(layer, DIM, True)]).gather(([0, 1],))
    target = torch.zeros_like(layer)
    PagedKV([block_views(target, DIM, True)]).scatter(chunk, ([4],), first_token=BLOCK, num_tokens=BLOCK)
    assert torch.equal(target[4], layer[1]) and not target[:4].any()


def test_wrong_channel_count_is_refused():
    with pytest.raises(ValueError, match="2 x head_dim"):
        block_views(torch.zeros(2, 3, 4, 10), DIM, True)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_check_cpu_layout_accepts_fp8_caches_quantized_by_vllms_kernel(dtype, compute_dtype):
    check_cpu_layout(BLOCK, HEADS, DIM, dtype, ISA, compute_dtype)


def test_each_layer_reads_and_writes_its_own_groups_blocks():
    # Layer 0 in group 0 (full attention), layer 1 in group 1 (a sliding window): other block tables.
    layers = [torch.randn(NUM_BLOCKS, HEADS, BLOCK, 2 * DIM) for _ in range(2)]
    paged = PagedKV([block_views(layer, DIM, True) for layer in layers], layer_groups=[0, 1])
    chunk = paged.gather(([5, 1], [2, 4]))
    assert torch.equal(chunk[0], PagedKV([block_views(layers[0], DIM, True)]).gather(([5, 1],))[0])
    assert torch.equal(chunk[1], PagedKV([block_views(layers[1], DIM, True)]).gather(([2, 4],))[0])
    target = [torch.zeros_like(layer) for layer in layers]
    PagedKV([block_views(layer, DIM, True) for layer in target], layer_groups=[0, 1]).scatter(
        chunk, ([3, 1], [4, 5]), 0, 2 * BLOCK)
    assert torch.equal(target[0][3], layers[0][5]) and torch.equal(target[1][5], layers[1][4])
    assert not target[0][4].any() and not target[1][3].any()


def test_null_blocks_are_never_written_and_end_what_a_save_can_read():
    # A sliding-window group gave its first block back (the null block stands in its place).
    layers = [torch.randn(NUM_BLOCKS, HEADS, BLOCK, 2 * DIM) for _ in range(2)]
    paged = PagedKV([block_views(layer, DIM, True) for layer in layers], layer_groups=[0, 1])
    block_ids = ([5, 1, 2], [NULL_BLOCK_ID, 3, 4])
    assert paged.held_tokens(block_ids, 3 * BLOCK) == 0
    assert paged.held_tokens(block_ids, 3 * BLOCK, first_token=BLOCK) == 3 * BLOCK
    assert paged.held_tokens(([5, 1], [3, NULL_BLOCK_ID]), 2 * BLOCK - 3) == BLOCK
    null_before = layers[1][NULL_BLOCK_ID].clone()
    paged.scatter(torch.randn(2, 2, 3 * BLOCK, HEADS, DIM), block_ids, 0, 3 * BLOCK)
    assert torch.equal(layers[1][NULL_BLOCK_ID], null_before)
    assert blocks_from(block_ids, 1, 1) == ([1], [3])


def test_mla_views_read_what_vllms_cpu_mla_wrote_in_token_order():
    from vllm.v1.attention.backends.mla.cpu_mla import CPUMLAImpl

    latent, rope, block = 512, 64, 16
    cache = torch.zeros(NUM_BLOCKS, 1, block, latent + rope)  # as vLLM's CPU MLA backend allocates it
    kv_c, k_pe = torch.randn(2 * block, latent), torch.randn(2 * block, 1, rope)
    slots = torch.cat([torch.arange(4 * block, 5 * block), torch.arange(block, 2 * block)])  # blocks 4 then 1
    CPUMLAImpl.do_kv_cache_update(None, kv_c, k_pe, cache.squeeze(1), slots, "auto", torch.ones(()))
    paged = PagedKV([block_views(cache, latent + rope, cpu_layout=True, mla=True)])
    chunk = paged.gather(([4, 1],))
    assert chunk.shape == (1, 1, 2 * block, 1, latent + rope)  # one plane: the latent
    assert torch.equal(chunk[0, 0, :, 0], torch.cat([kv_c, k_pe.squeeze(1)], dim=1))
    check_cpu_mla_layout(block, latent + rope, torch.float32)


def groups(*specs_and_layers):
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec

    return SimpleNamespace(kv_cache_groups=[KVCacheGroupSpec(layers, spec) for spec, layers in specs_and_layers])


def test_kv_cache_groups_give_each_layer_its_group_and_window():
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    shape = {"num_kv_heads": 2, "head_size": 32, "dtype": torch.float32}
    config = groups((SlidingWindowSpec(32, sliding_window=48, **shape), ["layers.0.attn", "layers.2.attn"]),
                    (FullAttentionSpec(32, **shape), ["layers.1.attn", "layers.3.attn"]))
    windows, layer_groups, block_size = kv_cache_groups(config)
    assert windows == (48, None) and block_size == 32
    assert layer_groups == {"layers.0.attn": 0, "layers.2.attn": 0, "layers.1.attn": 1, "layers.3.attn": 1}


def test_windowed_layers_store_only_the_window_where_it_is_shorter_than_a_chunk():
    namespace = Namespace("m", KVLayout(4, 2, 32))
    groups = {"layers.3.attn": 1, "layers.0.attn": 0, "layers.2.attn": 0, "layers.1.attn": 1}
    facts = EngineFacts(namespace, 32, windows=(48, None), layer_groups=groups)
    layout = with_window_storage(facts, 64, [CODECS["raw"], CODECS["fp8"]]).base_namespace.layout
    assert layout.windowed_layers == (0, 2) and layout.window_tokens == 48  # in model order
    assert with_window_storage(facts, 32, []) is facts  # a window as long as a chunk: all of it is needed
    assert with_window_storage(facts, 64, [CODECS["cachegen"]]) is facts  # a codec that cannot take rows


def test_state_kvshelf_cannot_store_is_refused_with_what_it_is():
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec

    config = groups((FullAttentionSpec(32, num_kv_heads=2, head_size=32, dtype=torch.float32), ["layers.0.attn"]),
                    (MambaSpec(32, shapes=((4, 8),), dtypes=(torch.float32,)), ["layers.1.mixer"]))
    with pytest.raises(ValueError, match="kvshelf stores attention KV only; this model's KV cache group 1 holds "
                                         "MambaSpec"):
        kv_cache_groups(config)
