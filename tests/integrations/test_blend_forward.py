"""CacheBlend's prefill on the bundled model: exact at ratio 1, better than plain concatenation at 0.15."""

import pytest
import torch
from transformers import DynamicCache

from kvshelf.blend.forward import blend_prefill
from kvshelf.blend.rope import Rope
from kvshelf.integrations.hf import cache_to_canonical
from tests.integrations.test_blend_rope import segment_kv


@pytest.fixture(scope="module")
def prompt(corpus_ids, bundled):
    first, second = corpus_ids[2000:2100], corpus_ids[4000:4100]
    question = bundled[1]("\n\nQuestion: what is this about?\nAnswer:", add_special_tokens=False)["input_ids"]
    return first, second, question


def full_prefill(model, token_ids):
    cache = DynamicCache()
    with torch.no_grad():
        logits = model(torch.tensor([token_ids]), past_key_values=cache, use_cache=True).logits[0, -1]
    return logits, cache_to_canonical(cache, 0, len(token_ids))


def reused_of(model, segments, question):
    """Each segment's KV computed alone at position 0, keys moved to where the segment stands."""
    rope, parts, start = Rope.of(model.config), [], 0
    for segment in segments:
        kv = segment_kv(model, segment, 0)
        kv[:, 0] = rope.move_keys(kv[:, 0], start)
        parts.append(kv)
        start += len(segment)
    parts.append(torch.zeros_like(parts[0][:, :, : len(question)]))
    reused = torch.tensor([True] * start + [False] * len(question))
    return torch.cat(parts, dim=2), reused


def test_recomputing_every_token_is_a_full_prefill(bundled, prompt):
    model, _ = bundled
    first, second, question = prompt
    tokens = first + second + question
    reused_kv, reused = reused_of(model, [first, second], question)
    result = blend_prefill(model, tokens, reused_kv, reused, recompute_ratio=1.0)
    logits, kv = full_prefill(model, tokens)
    assert torch.allclose(result.last_logits, logits, atol=1e-3)
    assert torch.allclose(cache_to_canonical(result.cache, 0, len(tokens)), kv, atol=1e-3)
    assert (result.num_reused, result.num_recomputed, result.num_fresh) == (0, 200, len(question))


def test_one_segment_at_the_start_is_plain_prefix_reuse(bundled, prompt):
    model, _ = bundled
    first, _, question = prompt
    tokens = first + question
    reused_kv, reused = reused_of(model, [first], question)
    result = blend_prefill(model, tokens, reused_kv, reused, recompute_ratio=0.0)
    logits, kv = full_prefill(model, tokens)
    assert torch.allclose(result.last_logits, logits, atol=1e-3)
    assert (result.num_reused, result.num_recomputed) == (100, 0)


def test_selective_recompute_restores_what_concatenation_loses(bundled, prompt):
    model, _ = bundled
    first, second, question = prompt
    tokens = first + second + question
    reused_kv, reused = reused_of(model, [first, second], question)
    logits, _ = full_prefill(model, tokens)
    errors = {}
    for ratio in (0.0, 0.15, 0.5):
        result = blend_prefill(model, tokens, reused_kv, reused, recompute_ratio=ratio)
        errors[ratio] = (result.last_logits - logits).abs().max().item()
        assert result.num_recomputed == round(ratio * 200)
    assert errors[0.5] < errors[0.15] < errors[0.0]


def test_the_last_token_must_be_computed(bundled, prompt):
    model, _ = bundled
    first, _, _ = prompt
    reused_kv = segment_kv(model, first, 0)
    with pytest.raises(ValueError, match="last token must be computed"):
        blend_prefill(model, first, reused_kv, torch.ones(len(first), dtype=torch.bool), 0.15)


def test_gradual_filtering_narrows_to_the_ratio_and_reproduces_exact_kv(bundled, prompt):
    model, _ = bundled
    first, second, question = prompt
    tokens = first + second + question
    logits, exact_kv = full_prefill(model, tokens)
    reused_kv, reused = reused_of(model, [first, second], question)
    result = blend_prefill(model, tokens, reused_kv, reused, recompute_ratio=0.15, check_layers=(1, 8, 16))
    assert result.num_recomputed == round(0.15 * 200)
    single = blend_prefill(model, tokens, reused_kv, reused, recompute_ratio=0.15)
    assert not torch.equal(result.last_logits, single.last_logits)  # other tokens were kept
    # With the KV each token has in this very context, filtering changes nothing: a full prefill.
    exact = blend_prefill(model, tokens, exact_kv, reused, recompute_ratio=0.15, check_layers=(1, 8, 16))
    assert torch.allclose(exact.last_logits, logits, atol=1e-3)


def test_check_layers_beyond_the_model_are_refused(bundled, prompt):
    model, _ = bundled
    first, _, question = prompt
    reused_kv, reused = reused_of(model, [first], question)
    with pytest.raises(ValueError, match="beyond the model's 30 layers"):
        blend_prefill(model, first + question, reused_kv, reused, 0.15, check_layers=(1, 30))
