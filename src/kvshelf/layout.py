"""The canonical KV layout: one chunk is a tensor (layers, planes, tokens, kv_heads, head_dim).

Two planes (keys, values) for attention that caches both; one for multi-head latent attention
(MLA: DeepSeek-V2/V3, GLM), which caches one compressed vector per token and layer, with
kv_heads 1 and head_dim the latent's width (kv_lora_rank + rope dims, 576 for DeepSeek).
"""

import math
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
    # Sliding-window layers (indices, in model order) are stored with only the last `window_tokens`
    # tokens of each chunk: a later hit ends at a chunk's end, and its next token's window reaches
    # back no further. () and 0: every layer with every token.
    windowed_layers: tuple[int, ...] = ()
    window_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"KVLayout.dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.kind not in KINDS:
            raise ValueError(f"KVLayout.kind {self.kind!r} is not one of {sorted(KINDS)}")
        windowed = self.windowed_layers
        if bool(windowed) != (self.window_tokens > 0) or list(windowed) != sorted(set(windowed)) or (
            windowed and not 0 <= windowed[0] <= windowed[-1] < self.num_layers
        ):
            raise ValueError(f"KVLayout.windowed_layers {windowed} and window_tokens {self.window_tokens} must be "
                             "distinct sorted layer indices with a positive token count, or neither")

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

    # ---- how a chunk is stored: with windowed layers, (rows, planes, 1, kv_heads, head_dim), a
    # row per layer and token kept, layer by layer in order, each layer's tokens in order.

    def _kept(self, layer: int, num_tokens: int) -> int:
        return min(num_tokens, self.window_tokens) if layer in self.windowed_layers else num_tokens

    def stored_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        if not self.windowed_layers:
            return self.shape(num_tokens)
        rows = sum(self._kept(layer, num_tokens) for layer in range(self.num_layers))
        return (rows, self.planes, 1, self.num_kv_heads, self.head_dim)

    def stored_bytes(self, num_tokens: int) -> int:
        """Bytes of a chunk of `num_tokens` as stored (raw)."""
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return math.prod(self.stored_shape(num_tokens)) * itemsize

    def stored_tokens(self, shape: tuple[int, ...]) -> int | None:
        """The token count a stored chunk of `shape` holds, or None if no count gives that shape
        (for a layout whose every layer is windowed, counts of window_tokens and more all give one:
        window_tokens)."""
        if not self.windowed_layers:
            return shape[2] if len(shape) == 5 and shape == self.shape(shape[2]) else None
        rows, num_windowed = shape[0], len(self.windowed_layers)
        num_full = self.num_layers - num_windowed
        if rows <= self.num_layers * self.window_tokens and rows % self.num_layers == 0:
            num_tokens = rows // self.num_layers
        elif num_full and (rows - num_windowed * self.window_tokens) % num_full == 0:
            num_tokens = (rows - num_windowed * self.window_tokens) // num_full
        else:
            return None
        return num_tokens if num_tokens > 0 and shape == self.stored_shape(num_tokens) else None

    def pack(self, chunk: torch.Tensor) -> torch.Tensor:
        """`chunk` (layers, planes, tokens, kv_heads, head_dim) as it is stored."""
        if not self.windowed_layers:
            return chunk
        num_tokens = chunk.shape[2]
        rows = [chunk[layer, :, num_tokens - self._kept(layer, num_tokens):].transpose(0, 1)
                for layer in range(self.num_layers)]
        return torch.cat(rows).unsqueeze(2)

    def unpack(self, stored: torch.Tensor, num_tokens: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The chunk `pack` made `stored` from; the windowed layers' tokens it left out are zeros
        (no later load reads them). Written into `out` if given."""
        if not self.windowed_layers:
            return stored
        chunk = out if out is not None else torch.empty(self.shape(num_tokens), dtype=stored.dtype)
        row = 0
        for layer in range(self.num_layers):
            kept = self._kept(layer, num_tokens)
            chunk[layer, :, : num_tokens - kept].zero_()
            chunk[layer, :, num_tokens - kept :].copy_(stored[row : row + kept, :, 0].transpose(0, 1))
            row += kept
        return chunk
