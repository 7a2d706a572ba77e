"""The canonical KV layout: one chunk is a tensor (layers, planes, tokens, kv_heads, head_dim).

Two planes (keys, values) for attention that caches both; one for multi-head latent attention
(MLA: DeepSeek-V2/V3, GLM), which caches one compressed vector per token and layer, with
kv_heads 1 and head_dim the latent's width (kv_lora_rank + rope dims, 576 for DeepSeek).
"""

from dataclasses import dataclass

import torch

# Stable names for the dtypes kvshelf stores; they appear in namespaces and stored headers.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
KINDS = {"kv": 2, "mla": 1}  # layout kind -> planes per layer


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What one token's KV looks like for a model; part of every namespace."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    kind: str = "kv"  # "kv": keys and values; "mla": one latent vector

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"KVLayout.dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.kind not in KINDS:
            raise ValueError(f"KVLayout.kind {self.kind!r} is not one of {sorted(KINDS)}")

    @property
    def planes(self) -> int:
        return KINDS[self.kind]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.num_layers * self.planes * self.num_kv_heads * self.head_dim * itemsize

    def shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.planes, num_tokens, self.num_kv_heads, self.head_dim)
