"""Moving stored keys to new positions: RoPE rotates each key by an angle proportional to its
position, so a key computed at position p is moved to p + delta by one more rotation by delta.

    k' = k * cos(delta * theta) + rotate_half(k) * sin(delta * theta)

with theta_i = base^(-2i / head_dim) for each pair of channels (i, i + head_dim / 2), the
"rotate half" layout of Llama, Qwen2 and Mistral. Values carry no position and stay as they are.
Models whose position encoding this does not describe (rope scaling variants, partial rotary
dimensions, ALiBi or none) are refused with a message, never moved wrongly.
"""

from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class Rope:
    head_dim: int
    base: float  # rope_theta

    @classmethod
    def of(cls, model_config: Any) -> "Rope":
        """The RoPE of a transformers model config; ValueError if it is not plain rotate-half RoPE."""
        model_type = getattr(model_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"cannot move keys of model type {model_type!r}: only {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(rotate-half RoPE) are supported"
            )
        parameters = dict(getattr(model_config, "rope_parameters", None) or {})
        rope_type = parameters.get("rope_type", parameters.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"cannot move keys under RoPE scaling {rope_type!r}; only plain RoPE is supported")
        if getattr(model_config, "partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("cannot move keys of a model with partial rotary dimensions")
        base = parameters.get("rope_theta", getattr(model_config, "rope_theta", None))
        if base is None:
            raise ValueError("the model config names no rope_theta")
        heads = model_config.num_attention_heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        return cls(head_dim, float(base))

    def angles(self, delta: torch.Tensor) -> torch.Tensor:
        """(n, head_dim / 2) rotation angles for position shifts `delta` (n,), in float64."""
        inv_freq = self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        return delta.to(torch.float64)[:, None] * inv_freq[None, :]

    def move_keys(self, keys: torch.Tensor, delta: int | torch.Tensor) -> torch.Tensor:
        """`keys` (..., tokens, kv_heads, head_dim) moved by `delta` positions (one shift, or one per token)."""
        num_tokens = keys.shape[-3]
        shifts = torch.as_tensor(delta).expand(num_tokens) if torch.as_tensor(delta).dim() == 0 else delta
        angles = self.angles(torch.as_tensor(shifts))
        cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(keys.dtype)[:, None, :]  # (tokens, 1, head_dim)
        sin = torch.cat((angles.sin(), angles.sin()), dim=-1).to(keys.dtype)[:, None, :]
        half = self.head_dim // 2
        rotated_half = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)
        return keys * cos + rotated_half * sin
