"""CacheBlend's prefill (Yao et al., EuroSys 2025): reuse KV computed for text out of its
context, and recompute only the tokens whose KV that context changes most.

Reused KV of a segment was computed as if the segment stood alone, so it misses the attention
to the text before it. Layers up to the check layer compute every token; at the check layer
each reused token's deviation (how far its fresh KV lies from the reused KV) ranks the tokens,
and only the top `recompute_ratio` of them, plus every token without reused KV (the question),
go on through the later layers. Their fresh KV replaces the reused KV; the others keep theirs.
Queries of the computed tokens attend to all keys with the exact causal mask by position.

Gradual filtering (several check layers): the first keeps twice `recompute_ratio`, each later
one re-ranks the tokens still computed and keeps fewer, down to `recompute_ratio` at the last,
so a token whose deviation shows only in deeper layers gets a second chance.

Written for the Llama family's decoder layer (Llama, Qwen2, Mistral): pre-norm attention with
rotate-half RoPE and grouped KV heads, then a pre-norm MLP.
"""

from dataclasses import dataclass

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import DynamicCache


@dataclass(slots=True)
class BlendResult:
    cache: DynamicCache  # the prompt's KV, for decoding on
    last_logits: torch.Tensor  # (vocab,) at the prompt's last token
    num_reused: int  # tokens whose KV was reused at every layer after the check layer
    num_recomputed: int  # reused tokens recomputed because their deviation ranked high
    num_fresh: int  # tokens with no reused KV, computed in full


@torch.no_grad()
def blend_prefill(
    model,
    token_ids: list[int],
    reused_kv: torch.Tensor,
    reused: torch.Tensor,
    recompute_ratio: float,
    check_layers: tuple[int, ...] = (1,),
) -> BlendResult:
    """Prefill `token_ids` at positions 0.. reusing `reused_kv` (layers, 2, tokens, kv_heads, head_dim),
    keys already at their positions, for the tokens where `reused` (tokens,) is True."""
    if reused[-1]:
        raise ValueError("the prompt's last token must be computed (it gives the first output token); do not reuse it")
    decoder = model.model
    if max(check_layers) >= len(decoder.layers):
        raise ValueError(f"check layers {check_layers} beyond the model's {len(decoder.layers)} layers")
    num_tokens = len(token_ids)
    positions = torch.arange(num_tokens)
    hidden = decoder.embed_tokens(torch.tensor([token_ids]))  # (1, tokens, hidden)
    cos, sin = decoder.rotary_emb(hidden, positions[None])  # each (1, tokens, head_dim)
    selected = positions  # tokens computed at the current layer
    cache = DynamicCache()
    num_recomputed = int(reused.sum())
    shares = _shares(recompute_ratio, sorted(check_layers))
    for index, layer in enumerate(decoder.layers):
        stored_keys = reused_kv[index, 0].transpose(0, 1)[None]  # (1, kv_heads, tokens, head_dim)
        stored_values = reused_kv[index, 1].transpose(0, 1)[None]
        hidden, keys, values = _layer(layer, hidden, selected, cos, sin, stored_keys, stored_values, reused)
        cache.update(keys, values, index)
        if index in shares and shares[index] < 1.0:
            computed = torch.zeros(num_tokens, dtype=torch.bool)
            computed[selected] = True
            keep = _select(keys, values, stored_keys, stored_values, reused, computed, shares[index])
            hidden = hidden[:, keep[selected]]
            selected = positions[keep]
            num_recomputed = int((reused & keep).sum())
    logits = model.lm_head(decoder.norm(hidden[:, -1:]))[0, -1]
    num_fresh = int((~reused).sum())
    return BlendResult(cache, logits.float(), num_tokens - num_fresh - num_recomputed, num_recomputed, num_fresh)


def _layer(layer, hidden, selected, cos, sin, stored_keys, stored_values, reused):
    """One decoder layer for the `selected` tokens (whose hidden states `hidden` holds); the other
    tokens' keys and values are the stored ones. Returns the selected tokens' new hidden states and
    the layer's keys and values (1, kv_heads, tokens, head_dim) for every token."""
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    head_dim = attention.head_dim
    query = attention.q_proj(normed).view(1, len(selected), -1, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(1, len(selected), -1, head_dim).transpose(1, 2)
    value = attention.v_proj(normed).view(1, len(selected), -1, head_dim).transpose(1, 2)
    cos_selected, sin_selected = cos[:, selected][:, None], sin[:, selected][:, None]
    query = query * cos_selected + _rotate_half(query) * sin_selected
    key = key * cos_selected + _rotate_half(key) * sin_selected
    if len(selected) == stored_keys.shape[2]:
        keys, values = key, value
    else:
        keys, values = stored_keys.clone(), stored_values.clone()
        keys[:, :, selected], values[:, :, selected] = key, value
    groups = query.shape[1] // keys.shape[1]
    causal = selected[:, None] >= torch.arange(keys.shape[2])[None, :]  # (selected, tokens)
    attended = scaled_dot_product_attention(
        query,
        keys.repeat_interleave(groups, dim=1),
        values.repeat_interleave(groups, dim=1),
        attn_mask=causal,
        scale=attention.scaling,
    )
    hidden = hidden + attention.o_proj(attended.transpose(1, 2).reshape(1, len(selected), -1))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, keys, values


def _shares(recompute_ratio: float, check_layers: list[int]) -> dict[int, float]:
    """The share of reused tokens each check layer keeps computing: twice `recompute_ratio` at the
    first of several, falling evenly to `recompute_ratio` at the last."""
    if len(check_layers) == 1:
        return {check_layers[0]: recompute_ratio}
    last = len(check_layers) - 1
    return {layer: min(1.0, recompute_ratio * (2 - step / last)) for step, layer in enumerate(check_layers)}


def _select(keys, values, stored_keys, stored_values, reused, computed, share) -> torch.Tensor:
    """Which tokens to keep computing (a mask): of the `computed` reused ones, those whose KV
    deviates most, `share` of all reused tokens; and every fresh token."""
    deviation = (keys - stored_keys).pow(2).sum((0, 1, 3)) + (values - stored_values).pow(2).sum((0, 1, 3))
    deviation[~computed] = -float("inf")  # dropped at an earlier check layer: not a candidate again
    deviation[~reused] = float("inf")  # tokens without stored KV are always computed
    num_keep = min(int(computed.sum()), int((~reused).sum()) + round(share * int(reused.sum())))
    keep = torch.zeros_like(reused)
    keep[torch.topk(deviation, num_keep).indices] = True
    return keep


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
