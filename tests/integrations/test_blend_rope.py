"""Keys moved to new positions equal keys computed there (CacheBlend's re-positioning)."""

import copy

import pytest
import torch
from transformers import DynamicCache

from kvshelf.blend.rope import Rope
from kvshelf.integrations.hf import cache_to_canonical


def segment_kv(model, token_ids: list[int], first_position: int) -> torch.Tensor:
    """KV (layers, 2, tokens, kv_heads, head_dim) of `token_ids` alone, placed at `first_position`."""
    cache = DynamicCache()
    positions = torch.arange(first_position, first_position + len(token_ids))[None]
    with torch.no_grad():
        model(torch.tensor([token_ids]), position_ids=positions, past_key_values=cache, use_cache=True)
    return cache_to_canonical(cache, 0, len(token_ids))


@pytest.mark.parametrize("shift", [1, 37, 1000, 5000])
def test_moved_keys_equal_keys_computed_at_the_new_positions(bundled, corpus_ids, shift):
    model, _ = bundled
    rope = Rope.of(model.config)
    segment = corpus_ids[500:600]
    at_zero, at_shift = segment_kv(model, segment, 0), segment_kv(model, segment, shift)
    moved = rope.move_keys(at_zero[:, 0], shift)
    assert torch.allclose(moved, at_shift[:, 0], atol=2e-3, rtol=1e-3)
    assert not torch.allclose(at_zero[:, 0], at_shift[:, 0], atol=2e-3)  # the move did something
    assert torch.allclose(at_zero[:, 1], at_shift[:, 1], atol=2e-3)  # values carry no position


def test_moving_back_and_forth_is_the_identity():
    rope = Rope(head_dim=64, base=100000.0)
    keys = torch.randn(2, 10, 3, 64)
    assert torch.allclose(rope.move_keys(rope.move_keys(keys, 123), -123), keys, atol=1e-5)
    per_token = torch.arange(10) * 7
    assert torch.allclose(rope.move_keys(rope.move_keys(keys, per_token), -per_token), keys, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "only llama, qwen2, mistral"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0}}, "RoPE scaling 'llama3'"),
        ({"partial_rotary_factor": 0.5}, "partial rotary"),
    ],
)
def test_unsupported_position_encodings_are_refused(bundled, change, message):
    config = copy.deepcopy(bundled[0].config)
    for name, value in change.items():
        setattr(config, name, value)
    with pytest.raises(ValueError, match=message):
        Rope.of(config)
