"""`cachegen`: KV quantized per channel, optionally as deltas against anchor tokens, then
entropy-coded with the `constriction` library's ANS coder (after CacheGen, SIGCOMM 2024).

Each (layer, key or value) is one stream of tokens x channels. With anchor groups of G tokens,
every G-th token is an anchor, quantized directly with half the step, and the others are coded
as their difference from their group's decoded anchor. Each channel's values are divided by
that channel's RMS (stored as one byte, a power of 2^(1/8)), so one step size, a multiple of
the RMS, suits every channel; keys get a finer step than values, since attention scores
suffer more from key error. Symbols are coded with one categorical table per (layer, key or
value, anchor or delta): the channels are scaled alike, so one table serves them all, and a
chunk carries 120 small tables (for a 30-layer model) instead of one per channel.

Measured on the bundled model (SmolLM2-135M, 4 windows of real prose, 512-token prefixes in
128-token chunks, perplexity of the next 128 tokens against exact KV):
- Anchor/delta wins: steps 0.25/0.5 give 3.89 bits per value and +1.8% perplexity with groups
  of 8, against 3.70 bits and +8.5% without anchors; groups of 4 and 16 did no better.
- Tables and scales are 2.3% and 3.2% of a chunk's payload (for 128-token chunks).
- Coarser steps for deeper layers (CacheGen's layer-dependent bins) buy little here: growing the
  step from 1x to 1.5x over the layers saved 0.31 bits for +1.4 points of perplexity, no better
  than a flat coarser step. This model's middle layers are its most sensitive ones (quantizing
  only layers 10-19 cost +3.2%, only 0-9 nothing measurable), so the steps stay flat.
- A chunk's first token is kept as float16, not quantized. In a prompt's first chunk that token
  is the attention sink, which every later query attends to heavily: keeping it exact cut the
  perplexity cost of steps 0.25/0.5 from +1.83% to +0.85%, and of 0.5/1.0 from +9.9% to +5.4%,
  for about 0.1 bits per value (16 bits for one token in 128). That pays for coarser steps:
  0.3/0.6 give 3.71 bits and +1.45%, 0.3/0.8 3.50 bits and +1.83% (now `cachegen`; before, the
  smallest level within 2% was 3.89 bits), 0.35/0.7 3.48 bits and +2.04%.
- Decoding is bound by the ANS decoder, about 60 M symbols/s on one core (constriction does
  not release the GIL, so threads do not help): about 23 of the 29 ms a 128-token chunk takes.

The error bound is half a step per element (a delta's also carries its anchor's half step):
steps are products of stored, exactly decodable numbers, so decoding repeats the encoder's
arithmetic.
"""

import math
import struct

import constriction
import numpy as np
import torch

from kvshelf.codecs.base import Codec
from kvshelf.errors import CorruptChunk

_HEADER = struct.Struct("<BBHff")  # version, anchor group size, reserved, key step, value step
_TABLE = struct.Struct("<iI")  # lowest symbol, number of symbols
_VERSION = 2  # 2: each chunk's first token is kept as float16 (1: quantized like any anchor)
_SCALE_OFFSET, _SCALE_RESOLUTION = 160, 8  # scale = 2 ** ((byte - 160) / 8): from 2^-20 to 2^12
_MAX_SYMBOLS = 1 << 16
_FP16_MAX = 65504.0
# Quality levels, finest first: (key step, value step) in channel RMS units, anchor groups of 8.
# Measured on the bundled model (`kvshelf bench codecs`, 4 prompts, 512-token prefixes):
# bits per value and perplexity against exact KV below, and in the README.
LEVELS = {"cachegen-fine": (0.15, 0.3), "cachegen": (0.3, 0.8), "cachegen-small": (0.5, 1.0)}
EXPECTED_BITS = {"cachegen-fine": 4.8, "cachegen": 3.5, "cachegen-small": 3.0}


class CachegenCodec(Codec):
    """`key_step` and `value_step` are in units of each channel's RMS; see LEVELS."""

    id = 5
    lossless = False

    def __init__(self, name: str, key_step: float, value_step: float, anchor_group: int = 8) -> None:
        self.name, self.key_step, self.value_step, self.anchor_group = name, key_step, value_step, anchor_group
        self.expected_ratio = EXPECTED_BITS[name] / 32 if name in EXPECTED_BITS else 0.125

    # -- the arithmetic both directions share ---------------------------------------------------

    @staticmethod
    def _steps(key_step: float, value_step: float, scale_bytes: torch.Tensor, part: int) -> torch.Tensor:
        """Step per (layer, key or value, channel) of one part (0 anchors, 1 deltas): the channel's
        scale times the key or value step; anchors get half the step, as their error carries into
        their whole group."""
        kind_steps = torch.tensor([key_step, value_step], dtype=torch.float32).view(1, 2, 1)
        return _scales_of(scale_bytes) * kind_steps * (0.5 if part == 0 else 1.0)

    @staticmethod
    def _layout(num_tokens: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Which tokens are anchors, and each token's anchor (with no groups: none, and itself)."""
        if group == 0:
            return torch.zeros(num_tokens, dtype=torch.bool), torch.arange(num_tokens)
        positions = torch.arange(num_tokens)
        return positions % group == 0, positions // group * group

    # -- encode ------------------------------------------------------------------------------------

    def encode(self, kv: torch.Tensor) -> bytes:
        layers, _, tokens, heads, dim = kv.shape
        x = kv.detach().to(torch.float32).reshape(layers, 2, tokens, heads * dim)
        anchors, anchor_of = self._layout(tokens, self.anchor_group)
        first = x[:, :, :1].clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)  # (none in an empty chunk)
        anchors[:1] = False  # the first token is kept, not coded
        anchor_scales = _scale_bytes(x[:, :, anchors])
        anchor_steps = self._steps(self.key_step, self.value_step, anchor_scales, 0).unsqueeze(2)
        anchor_codes = (x[:, :, anchors] / anchor_steps).round()
        # Deltas against the decoded anchors, so that decoding rebuilds exactly what was measured here.
        decoded = torch.zeros_like(x)
        decoded[:, :, anchors] = anchor_codes * anchor_steps
        decoded[:, :, :1] = first.to(torch.float32)
        anchors[:1] = True  # ... but still its group's anchor
        deltas = x[:, :, ~anchors] - decoded[:, :, anchor_of[~anchors]]
        delta_scales = _scale_bytes(deltas)
        delta_codes = (deltas / self._steps(self.key_step, self.value_step, delta_scales, 1).unsqueeze(2)).round()

        parts = [_HEADER.pack(_VERSION, self.anchor_group, 0, self.key_step, self.value_step),
                 first.numpy().tobytes(), anchor_scales.numpy().tobytes(), delta_scales.numpy().tobytes()]
        streams = [_Stream.of(codes[layer, kind].to(torch.int64).flatten().numpy())
                   for layer in range(layers) for kind in range(2) for codes in (anchor_codes, delta_codes)]
        parts += [stream.table() for stream in streams]
        # ANS is a stack: pushing the streams last to first lets the decoder pop them first to last.
        encoder = constriction.stream.stack.AnsCoder()
        for stream in reversed(streams):
            stream.push(encoder)
        compressed = encoder.get_compressed()
        parts += [struct.pack("<I", len(compressed)), compressed.tobytes()]
        return b"".join(parts)

    # -- decode ------------------------------------------------------------------------------------

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if len(shape) != 5 or len(payload) < _HEADER.size:
            raise CorruptChunk(f"cachegen payload of {len(payload)} bytes cannot hold shape {shape}")
        version, group, _, key_step, value_step = _HEADER.unpack_from(payload)
        if version not in (1, _VERSION) or not (math.isfinite(key_step) and math.isfinite(value_step)):
            raise CorruptChunk(f"cachegen payload version {version} with steps {key_step}, {value_step}")
        layers, _, tokens, heads, dim = shape
        channels = heads * dim
        anchors, coded, first, steps, offset = self._read_steps(payload, version, group, key_step, value_step, shape)
        tables = []
        for _ in range(layers * 4):
            table, offset = _read_table(payload, offset)
            tables.append(table)
        words, offset = _read_words(payload, offset)
        decoder = constriction.stream.stack.AnsCoder(words)
        rows = (int(coded.sum()), int((~anchors).sum()))
        codes = [np.empty((layers, 2, rows[part] * channels), dtype=np.float32) for part in range(2)]
        for index, table in enumerate(tables):
            (layer, kind), part = divmod(index // 2, 2), index % 2
            _decode_stream(decoder, table, codes[part][layer, kind])
        anchor_values, delta_values = (
            torch.from_numpy(codes[part]).view(layers, 2, rows[part], channels) * steps[part].unsqueeze(2)
            for part in range(2)
        )
        if first is not None:
            anchor_values = torch.cat([first.unsqueeze(2), anchor_values], dim=2)
        return _assemble(anchor_values, delta_values, tokens, group).view(shape).to(dtype)

    def _read_steps(self, payload: memoryview, version: int, group: int, key_step: float, value_step: float,
                    shape: tuple[int, ...]):
        """Which tokens are anchors and which of them are coded, the kept first token (version 2),
        the steps of anchors and deltas, and where the tables begin."""
        layers, _, tokens, heads, dim = shape
        channels = heads * dim
        anchors, _ = self._layout(tokens, group)
        coded, first, offset = anchors.clone(), None, _HEADER.size
        if version >= 2 and tokens:
            first_bytes, offset = _take(payload, offset, layers * 2 * channels * 2)
            first = torch.from_numpy(first_bytes.copy().view(np.float16)).view(layers, 2, channels).float()
            anchors[0], coded[0] = True, False
        steps = []
        for part in range(2):
            scale_bytes, offset = _take(payload, offset, layers * 2 * channels)
            scale_bytes = torch.from_numpy(scale_bytes.copy()).view(layers, 2, channels)
            steps.append(self._steps(key_step, value_step, scale_bytes, part))
        return anchors, coded, first, steps, offset

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        """Half a step; a delta's decoded value also carries its anchor's error; the first token
        float16's rounding."""
        layers, _, tokens, heads, dim = kv.shape
        payload = memoryview(self.encode(kv))
        anchors, coded, first, steps, _ = self._read_steps(
            payload, _VERSION, self.anchor_group, self.key_step, self.value_step, tuple(kv.shape))
        bound = torch.empty(layers, 2, tokens, heads * dim)
        bound[:, :, coded] = (steps[0] / 2).unsqueeze(2)
        bound[:, :, ~anchors] = ((steps[1] + steps[0] * coded.any()) / 2).unsqueeze(2)
        if first is not None:
            magnitude = kv[:, :, 0].reshape(layers, 2, -1).float().abs()
            bound[:, :, 0] = magnitude * 2.0**-11 + 2.0**-24 + (magnitude - _FP16_MAX).clamp_min(0)
        return (bound * (1 + 1e-4) + 1e-7).view(kv.shape)


def _assemble(anchors: torch.Tensor, deltas: torch.Tensor, tokens: int, group: int) -> torch.Tensor:
    """Tokens from anchor values (every `group`-th token, from the first) and the other tokens'
    deltas against their group's anchor, each (layers, 2, count, channels) in token order; with no
    groups, the anchors (at most the kept first token) come first and the deltas are the values."""
    if group == 0:
        return torch.cat([anchors, deltas], dim=2)
    layers, _, _, channels = deltas.shape
    x = torch.empty(layers, 2, tokens, channels)
    full, rest = divmod(tokens, group)  # whole groups, and the tokens of a last, shorter one
    grouped = x[:, :, : full * group].view(layers, 2, full, group, channels)
    grouped[:, :, :, 0] = anchors[:, :, :full]
    whole = deltas[:, :, : full * (group - 1)].view(layers, 2, full, group - 1, channels)
    torch.add(whole, anchors[:, :, :full].unsqueeze(3), out=grouped[:, :, :, 1:])
    if rest:
        x[:, :, full * group] = anchors[:, :, full]
        torch.add(deltas[:, :, full * (group - 1) :], anchors[:, :, full : full + 1], out=x[:, :, full * group + 1 :])
    return x


def _scale_bytes(values: torch.Tensor) -> torch.Tensor:
    """Each channel's RMS over the tokens of `values` (layers, 2, tokens, channels), as one byte."""
    if values.shape[2] == 0:
        return torch.full((values.shape[0], 2, values.shape[3]), _SCALE_OFFSET, dtype=torch.uint8)
    rms = values.pow(2).mean(2).sqrt().clamp_min(2.0**-20)
    return (torch.log2(rms) * _SCALE_RESOLUTION + _SCALE_OFFSET).round().clamp(0, 255).to(torch.uint8)


def _read_words(payload: memoryview, offset: int) -> tuple[np.ndarray, int]:
    if offset + 4 > len(payload):
        raise CorruptChunk("cachegen payload ends before its compressed stream")
    (num_words,) = struct.unpack_from("<I", payload, offset)
    if offset + 4 + num_words * 4 != len(payload):
        raise CorruptChunk("cachegen payload's compressed stream does not end where the payload does")
    return np.frombuffer(payload, dtype=np.uint32, count=num_words, offset=offset + 4).copy(), len(payload)


def _scales_of(scale_bytes: torch.Tensor) -> torch.Tensor:
    return torch.exp2((scale_bytes.to(torch.float32) - _SCALE_OFFSET) / _SCALE_RESOLUTION)


def _take(payload: memoryview, offset: int, count: int) -> tuple[np.ndarray, int]:
    if offset + count > len(payload):
        raise CorruptChunk(f"cachegen payload of {len(payload)} bytes ends early")
    return np.frombuffer(payload, dtype=np.uint8, count=count, offset=offset), offset + count


def _model(counts: np.ndarray):
    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


class _Stream:
    """One stream's symbols, shifted to start at 0, and its table: the lowest symbol and every count."""

    def __init__(self, symbols: np.ndarray, lowest: int, counts: np.ndarray) -> None:
        self.symbols, self.lowest, self.counts = symbols, lowest, counts

    @classmethod
    def of(cls, symbols: np.ndarray) -> "_Stream":
        if symbols.size == 0:
            return cls(symbols.astype(np.int32), 0, np.zeros(0, dtype=np.uint32))
        lowest = int(symbols.min())
        shifted = (symbols - lowest).astype(np.int32)
        counts = np.bincount(shifted).astype(np.uint32)
        if len(counts) > _MAX_SYMBOLS:
            raise ValueError(f"cachegen cannot code {len(counts)} distinct levels; use a larger step")
        return cls(shifted, lowest, counts)

    def table(self) -> bytes:
        return _TABLE.pack(self.lowest, len(self.counts)) + self.counts.tobytes()

    def push(self, encoder) -> None:
        if len(self.counts) > 1:  # one symbol alone needs no bits
            encoder.encode_reverse(self.symbols, _model(self.counts.astype(np.float64)))


def _read_table(payload: memoryview, offset: int) -> tuple[tuple[int, np.ndarray], int]:
    if offset + _TABLE.size > len(payload):
        raise CorruptChunk("cachegen payload ends inside a table")
    lowest, num_symbols = _TABLE.unpack_from(payload, offset)
    offset += _TABLE.size
    if num_symbols > _MAX_SYMBOLS or offset + num_symbols * 4 > len(payload):
        raise CorruptChunk(f"cachegen table of {num_symbols} symbols does not fit the payload")
    counts = np.frombuffer(payload, dtype=np.uint32, count=num_symbols, offset=offset)
    return (lowest, counts), offset + num_symbols * 4


def _decode_stream(decoder, table: tuple[int, np.ndarray], out: np.ndarray) -> None:
    """Decode one stream's symbols into `out` (float32, as many as the shape needs)."""
    lowest, counts = table
    if counts.sum() != out.size:
        raise CorruptChunk(f"cachegen table counts {int(counts.sum())} symbols, the shape needs {out.size}")
    if len(counts) <= 1:
        out.fill(lowest)
    else:
        np.add(decoder.decode(_model(counts.astype(np.float64)), out.size), lowest, out=out, casting="unsafe")
