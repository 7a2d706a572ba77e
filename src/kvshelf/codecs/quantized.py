"""Lossy codecs that quantize KV: `int8`, `fp8` (e4m3) and `kivi2` (KIVI's 2-bit scheme).

Each payload starts with a 4-byte header (variant, parameter dtype, group size) and holds its
scales next to its codes; decoding any variant needs only the payload. Every codec states its
error as an elementwise bound (`error_bound`), which the tests check on every round trip.

A payload's length is fixed by the chunk's shape and its header, so each decoder checks it
exactly before allocating anything; a variant this version does not know is ForeignChunk
(a newer kvshelf wrote it), any other inconsistency CorruptChunk.

Sizes per value, before framing: int8 8 bits + one float32 scale per 64 values (8.5 bits for
a head_dim of 64), fp8 the same, kivi2 2 bits + two float16 parameters per group of 32 (3 bits).
"""

import math
import struct

import numpy as np
import torch

from kvshelf.codecs.base import Codec, check_chunk_shape, check_payload_bytes, payload_tensor
from kvshelf.errors import CorruptChunk, ForeignChunk

_HEADER = struct.Struct("<BBH")  # variant, parameter dtype (0 float32, 1 float16), group size
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP16_SAFE = 2.0**14  # parameters above this are stored as float32, so they cannot overflow float16
_TINY = 1e-30
# Largest kivi2 group: bounds the padding a payload may declare (at most group_size - 1 codes per row).
MAX_GROUP_SIZE = 256


def _work(kv: torch.Tensor) -> torch.Tensor:
    """`kv` (layers, 2, tokens, kv_heads, head_dim) as float32, the precision every codec computes in."""
    return kv.detach().to(torch.float32)


def _take(payload: memoryview, offset: int, count: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """`count` items of `dtype` at `offset`; raises CorruptChunk if the payload is too short."""
    num_bytes = count * np.dtype(dtype).itemsize
    if offset + num_bytes > len(payload):
        raise CorruptChunk(f"payload of {len(payload)} bytes ends before its data ({offset + num_bytes} needed)")
    return np.frombuffer(payload, dtype=dtype, count=count, offset=offset), offset + num_bytes


def _header(payload: memoryview, codec: Codec, variants: tuple[int, ...]) -> tuple[int, int, int]:
    if len(payload) < _HEADER.size:
        raise CorruptChunk(f"{codec.name} payload of {len(payload)} bytes is shorter than its header")
    variant, param_dtype, group_size = _HEADER.unpack_from(payload)
    if variant not in variants:
        raise ForeignChunk(f"{codec.name} variant {variant} is unknown to this version of kvshelf")
    return variant, param_dtype, group_size


class Int8Codec(Codec):
    """Symmetric 8-bit: one float32 scale per token and head (`int8`) or per channel (`int8-channel`)."""

    id = 2
    planes = (1, 2)  # per token and head, or per channel: no split into keys and values
    lossless = False
    expected_ratio = 8.5 / 32
    _PER_TOKEN, _PER_CHANNEL = 0, 1

    def __init__(self, per_channel: bool = False) -> None:
        self.name = "int8-channel" if per_channel else "int8"
        self.variant = self._PER_CHANNEL if per_channel else self._PER_TOKEN
        self.row_wise = not per_channel

    @staticmethod
    def _reduced_dims(variant: int) -> tuple[int, ...]:
        # Per token and head: over head_dim. Per channel (a layer's key or value, head, dim): over tokens.
        return (4,) if variant == Int8Codec._PER_TOKEN else (2,)

    def _scales(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs().amax(self._reduced_dims(self.variant), keepdim=True).div(127.0).clamp_min(_TINY)

    def encode(self, kv: torch.Tensor) -> bytes:
        x = _work(kv)
        scales = self._scales(x)
        codes = (x / scales).round().clamp(-127, 127).to(torch.int8)
        return b"".join((_HEADER.pack(self.variant, 0, 0), scales.numpy().tobytes(), codes.numpy().tobytes()))

    def decode(
        self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_chunk_shape(self, shape)
        variant, _, _ = _header(payload, self, (self._PER_TOKEN, self._PER_CHANNEL))
        scale_shape = [1 if dim in self._reduced_dims(variant) else size for dim, size in enumerate(shape)]
        num_scales = math.prod(scale_shape)
        check_payload_bytes(self, payload, _HEADER.size + num_scales * 4 + math.prod(shape), shape)
        scales = payload_tensor(payload, torch.float32, _HEADER.size, num_scales).view(scale_shape)
        codes = payload_tensor(payload, torch.int8, _HEADER.size + num_scales * 4, math.prod(shape)).view(shape)
        # Multiplied in float32 and rounded once to `dtype` as each value is written: no temporary chunk.
        return torch.mul(codes, scales, out=torch.empty(shape, dtype=dtype) if out is None else out)

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        return self._scales(_work(kv)) / 2 * (1 + 1e-5)


class Fp8Codec(Codec):
    """float8 e4m3 (3 mantissa bits) after scaling each token and head into its range."""

    name = "fp8"
    id = 3
    planes = (1, 2)
    row_wise = True
    lossless = False
    expected_ratio = 8.5 / 32

    @staticmethod
    def _scales(x: torch.Tensor) -> torch.Tensor:
        return x.abs().amax(4, keepdim=True).div(FP8_MAX).clamp_min(_TINY)

    def encode(self, kv: torch.Tensor) -> bytes:
        x = _work(kv)
        scales = self._scales(x)
        codes = (x / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return b"".join((_HEADER.pack(0, 0, 0), scales.numpy().tobytes(), codes.numpy().tobytes()))

    def decode(
        self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_chunk_shape(self, shape)
        _header(payload, self, (0,))
        scale_shape = [*shape[:4], 1]
        num_scales = math.prod(scale_shape)
        check_payload_bytes(self, payload, _HEADER.size + num_scales * 4 + math.prod(shape), shape)
        scales = payload_tensor(payload, torch.float32, _HEADER.size, num_scales).view(scale_shape)
        codes = payload_tensor(payload, torch.uint8, _HEADER.size + num_scales * 4, math.prod(shape))
        values = codes.view(torch.float8_e4m3fn).to(torch.float32).view(shape)  # float8 takes part in no arithmetic
        return torch.mul(values, scales, out=torch.empty(shape, dtype=dtype) if out is None else out)

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        # Normal e4m3 numbers round to within 2^-4 of their magnitude; subnormals to 2^-10 in scaled units.
        x = _work(kv)
        return (x.abs() * 2.0**-4 + self._scales(x) * 2.0**-10) * (1 + 1e-5)


class Kivi2Codec(Codec):
    """KIVI (Liu et al., ICML 2024): 2-bit asymmetric, keys per channel, values per token, in groups.

    Keys are grouped along tokens (each channel's outliers stay in their channel); values along
    channels (each token's own range). Each group stores its minimum and step (max - min) / 3.
    """

    name = "kivi2"
    id = 4
    lossless = False
    expected_ratio = 3 / 32
    BITS = 2
    LEVELS = 2**BITS - 1

    def __init__(self, group_size: int = 32) -> None:
        if not 1 <= group_size <= MAX_GROUP_SIZE:
            raise ValueError(f"kivi2 group_size must be in [1, {MAX_GROUP_SIZE}], got {group_size}")
        self.group_size = group_size

    @staticmethod
    def _groups(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (layers, heads, dim, key groups, G) and values (layers, tokens, value groups, G),
        the last group padded by repeating its last element (padding changes no minimum or maximum)."""
        layers, _, tokens, heads, dim = x.shape
        keys = x[:, 0].permute(0, 2, 3, 1)  # (layers, heads, dim, tokens)
        values = x[:, 1].reshape(layers, tokens, heads * dim)
        return _pad_groups(keys, group_size), _pad_groups(values, group_size)

    def _params(self, groups: torch.Tensor, param_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        step = ((high - low) / self.LEVELS).to(param_dtype).to(torch.float32).clamp_min(_TINY)
        return low.to(param_dtype).to(torch.float32), step

    def encode(self, kv: torch.Tensor) -> bytes:
        x = _work(kv)
        param_dtype = torch.float16 if x.abs().max() < FP16_SAFE else torch.float32
        parts = [_HEADER.pack(0, param_dtype == torch.float16, self.group_size)]
        codes = []
        for groups in self._groups(x, self.group_size):
            low, step = self._params(groups, param_dtype)
            parts += [low.to(param_dtype).numpy().tobytes(), step.to(param_dtype).numpy().tobytes()]
            codes.append(((groups - low) / step).round().clamp(0, self.LEVELS).to(torch.uint8).flatten())
        parts.append(_pack_2bit(torch.cat(codes)))
        return b"".join(parts)

    def decode(
        self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        layers, _, tokens, heads, dim = check_chunk_shape(self, shape)
        _, half_params, group_size = _header(payload, self, (0,))
        if half_params not in (0, 1) or not 1 <= group_size <= MAX_GROUP_SIZE:
            raise CorruptChunk(f"kivi2 payload with parameter dtype {half_params} and group size {group_size}")
        key_groups = (layers, heads, dim, -(-tokens // group_size))
        value_groups = (layers, tokens, -(-(heads * dim) // group_size))
        param_dtype = np.float16 if half_params else np.float32
        num_groups = math.prod(key_groups) + math.prod(value_groups)
        num_codes = num_groups * group_size
        param_bytes = 2 * num_groups * np.dtype(param_dtype).itemsize  # each group's minimum and step
        check_payload_bytes(self, payload, _HEADER.size + param_bytes + -(-num_codes // 4), shape)
        offset, params = _HEADER.size, []
        for group_shape in (key_groups, value_groups):
            low, offset = _take(payload, offset, math.prod(group_shape), param_dtype)
            step, offset = _take(payload, offset, math.prod(group_shape), param_dtype)
            params.append((group_shape, low, step))
        packed, offset = _take(payload, offset, -(-num_codes // 4), np.uint8)
        codes = _unpack_2bit(packed, num_codes)
        halves, start = [], 0
        for group_shape, low, step in params:
            count = math.prod(group_shape) * group_size
            group_codes = codes[start : start + count].view(*group_shape, group_size).to(torch.float32)
            low_t = torch.from_numpy(low.astype(np.float32)).view(*group_shape, 1)
            step_t = torch.from_numpy(step.astype(np.float32)).view(*group_shape, 1)
            halves.append(group_codes * step_t + low_t)
            start += count
        keys = halves[0].flatten(-2)[..., :tokens].permute(0, 3, 1, 2)  # (layers, tokens, heads, dim)
        values = halves[1].flatten(-2)[..., : heads * dim].view(layers, tokens, heads, dim)
        out = torch.empty(shape, dtype=dtype) if out is None else out
        out[:, 0].copy_(keys)
        out[:, 1].copy_(values)
        return out

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        x = _work(kv)
        param_dtype = torch.float16 if x.abs().max() < FP16_SAFE else torch.float32
        layers, _, tokens, heads, dim = x.shape
        bounds = []
        for groups in self._groups(x, self.group_size):
            low, step = self._params(groups, param_dtype)
            # Half a step, plus what rounding the parameters to their dtype may have moved.
            slack = (groups.abs().amax(-1, keepdim=True) + step) * (2.0**-9 if param_dtype == torch.float16 else 1e-6)
            bounds.append((step / 2 + slack).expand_as(groups))
        keys = bounds[0].flatten(-2)[..., :tokens].permute(0, 3, 1, 2)
        values = bounds[1].flatten(-2)[..., : heads * dim].reshape(layers, tokens, heads, dim)
        return torch.stack((keys, values), dim=1)


def _pad_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """`x` (..., n) as (..., ceil(n / G), G), padded with copies of its last element."""
    size = x.shape[-1]
    padding = -size % group_size
    if padding:
        x = torch.cat((x, x[..., -1:].expand(*x.shape[:-1], padding)), dim=-1)
    return x.reshape(*x.shape[:-1], -1, group_size)


def _pack_2bit(codes: torch.Tensor) -> bytes:
    padded = np.zeros(-(-len(codes) // 4) * 4, dtype=np.uint8)
    padded[: len(codes)] = codes.numpy()
    quads = padded.reshape(-1, 4)
    return (quads[:, 0] | quads[:, 1] << 2 | quads[:, 2] << 4 | quads[:, 3] << 6).astype(np.uint8).tobytes()


def _unpack_2bit(packed: np.ndarray, count: int) -> torch.Tensor:
    quads = np.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], axis=1)
    return torch.from_numpy(quads.reshape(-1)[:count].copy())
