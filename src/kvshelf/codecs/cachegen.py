"""`cachegen`: KV quantized with one step per head, less each channel's mean, then entropy-coded
with the `constriction` library's ANS coder (after CacheGen, SIGCOMM 2024).

Each (layer, key or value) is one stream of tokens x channels. A chunk's first token is kept as
float16. For the others, each head's step is a multiple of its RMS (stored as float32), finer for
keys than values; each channel's mean over the chunk, in half steps, is subtracted before
quantizing. Symbols are coded with one categorical table per (layer, key or value), so a chunk
carries 60 small tables (for a 30-layer model).

Measured on the bundled model (SmolLM2-135M, 8 windows of real prose, 512-token prefixes in
128-token chunks, perplexity of the next 256 tokens against exact KV):
- One step per head, not per channel: with a step scaled to each channel's RMS every channel
  gets about the same bits, however small its values; one step for a head's channels (the
  MSE-optimal choice for entropy-coded uniform quantization) puts the bits where the values are
  large. At steps 0.3/0.8 and the same 3.50 bits: +0.79% perplexity instead of +1.56%.
- Channel means instead of anchor/delta groups (the previous format): tokens are barely
  correlated beyond each channel's offset. Symbol entropy at steps 0.6/0.8: 2.46 bits coding
  values as they are, 2.56 with anchor groups of 8, 2.30 against the previous token, 2.11 less
  the channel mean. At equal perplexity the two formats come out close (anchor groups: 2.97 bits
  at +2.0%; means: 2.78 bits at +1.7%), and means need no reassembly when decoding.
- The first token is kept as float16: in a prompt's first chunk it is the attention sink, which
  every later query attends to heavily. Measured with the previous format, keeping it exact cut
  the perplexity cost of steps 0.25/0.5 from +1.83% to +0.85%, for 0.125 bits per value.
- Levels: 0.25/0.3 give 3.61 bits and +0.42%, 0.4/0.6 2.78 bits and +1.70% (`cachegen`, 3.06x
  smaller than int8), 0.6/0.7 2.40 bits and +5.25%.
- What else was measured and not kept:
  - Layer-dependent steps (CacheGen's bins): quantizing 5 layers at a time at 1.2/1.2 costs
    +0.53, +1.84, +1.59, +0.62, +1.99 and +0.25% (layers 0-4 to 25-29; the costs add up). Steps
    fitted to that profile would save about 0.2 bits, but only for this model; steps stay flat.
  - Tables per channel would cut the entropy by 0.27 bits and cost more than that; 8 tables per
    stream by channel spread saved 0.10 bits and cost 0.10 bits.
  - A channel basis (PCA) fitted on other text decorrelates channels by only ~0.1 bits per value.
- Overheads per value (`cachegen`): the first token 0.125 bits, means 0.06, tables 0.03, scales 0.004.
- Decoding is bound by constriction's ANS decoder (about 16 ns a step, one core: it holds the
  GIL). Coding symbols in pairs (see `_paired`) and writing into one output tensor took a
  128-token chunk from 28 to 24 ms; loaded from disk and decoded, it is 5.7x faster than recomputed.

The error bound is half a step per element (float16 rounding for the first token): steps and
means are products of stored numbers, so decoding repeats the encoder's arithmetic.

Decoding trusts only the chunk's shape (checked against the namespace's layout before any codec
runs): the payload must be at least as long as the shape's fixed parts, each table's counts must
add up to its stream's symbols, and its levels must fit the payload and int32, all before the
output is allocated. A payload version newer than this one's is ForeignChunk (left in the store).
"""

import math
import struct

import constriction
import numpy as np
import torch

from kvshelf.codecs.base import Codec, check_chunk_shape
from kvshelf.errors import CorruptChunk, ForeignChunk

_HEADER = struct.Struct("<BBHff")  # version, bytes per mean code (1 or 2), reserved, key step, value step
_TABLE = struct.Struct("<iI")  # lowest symbol, number of levels (then a uint32 count per level)
_NUM_WORDS = struct.Struct("<I")  # the compressed stream's length in 32-bit words
_INT32_MAX = 2**31 - 1
_VERSION = 3  # 3: per-head steps and channel means (1 and 2, anchor/delta groups, are no longer read)
_MEAN_RESOLUTION = 2  # channel means are stored in half steps
_MAX_SYMBOLS = 1 << 16
_PAIRED_LEVELS = 64  # streams of at most this many levels are coded in pairs (see _paired)
_FP16_MAX = 65504.0
# Quality levels, finest first: (key step, value step) in units of each head's RMS.
# Measured on the bundled model (`kvshelf bench codecs`): bits per value and perplexity
# against exact KV in the module docstring and the README.
LEVELS = {"cachegen-fine": (0.25, 0.3), "cachegen": (0.4, 0.6), "cachegen-small": (0.6, 0.7)}
EXPECTED_BITS = {"cachegen-fine": 3.6, "cachegen": 2.8, "cachegen-small": 2.4}


class CachegenCodec(Codec):
    """`key_step` and `value_step` are in units of each head's RMS; see LEVELS."""

    id = 5
    lossless = False

    def __init__(self, name: str, key_step: float, value_step: float) -> None:
        self.name, self.key_step, self.value_step = name, key_step, value_step
        self.expected_ratio = EXPECTED_BITS[name] / 32 if name in EXPECTED_BITS else 0.125

    def encode(self, kv: torch.Tensor) -> bytes:
        layers, _, tokens, heads, dim = kv.shape
        x = kv.detach().to(torch.float32).reshape(layers, 2, tokens, heads * dim)
        first = x[:, :, :1].clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)  # (none in an empty chunk)
        rest = x[:, :, 1:]
        wide = rest.double()  # sums in float64: huge values do not overflow
        scales = _head_rms(wide, heads)
        steps = _steps(self.key_step, self.value_step, scales, dim)
        mean = wide.mean(2).float() if tokens > 1 else torch.zeros_like(steps)
        mean_codes = (mean / (steps / _MEAN_RESOLUTION)).round()
        means = mean_codes * steps / _MEAN_RESOLUTION
        codes = ((rest - means.unsqueeze(2)) / steps.unsqueeze(2)).round().to(torch.int64)
        width = 1 if bool((mean_codes.abs() <= 127).all()) else 2  # |mean| <= sqrt(dim) * RMS: 2 always do
        parts = [_HEADER.pack(_VERSION, width, 0, self.key_step, self.value_step), first.numpy().tobytes(),
                 scales.numpy().tobytes(), mean_codes.numpy().astype(np.int8 if width == 1 else np.int16).tobytes()]
        streams = [_Stream.of(codes[layer, kind].flatten().numpy()) for layer in range(layers) for kind in range(2)]
        parts += [stream.table() for stream in streams]
        # ANS is a stack: pushing the streams last to first lets the decoder pop them first to last.
        encoder = constriction.stream.stack.AnsCoder()
        for stream in reversed(streams):
            stream.push(encoder)
        compressed = encoder.get_compressed()
        parts += [_NUM_WORDS.pack(len(compressed)), compressed.tobytes()]
        return b"".join(parts)

    def decode(
        self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        layers, _, tokens, heads, dim = check_chunk_shape(self, shape)
        if len(payload) < _min_payload_bytes(shape):
            raise CorruptChunk(f"cachegen payload of {len(payload)} bytes cannot hold shape {shape} "
                               f"(its fixed parts alone take {_min_payload_bytes(shape)})")
        first, steps, means, offset = self._read_header(payload, shape)
        symbols_per_stream = max(tokens - 1, 0) * heads * dim
        tables = []
        for _ in range(layers * 2):
            table, offset = _read_table(payload, offset, symbols_per_stream)
            tables.append(table)
        decoder = _ans_decoder(payload, offset)
        codes = np.empty((layers, 2, max(tokens - 1, 0), heads * dim), dtype=np.int32)
        for index, table in enumerate(tables):
            _decode_stream(decoder, table, codes[divmod(index, 2)].reshape(-1))
        in_place = out is not None and out.dtype == torch.float32
        x = out.view(layers, 2, tokens, heads * dim) if in_place else torch.empty(layers, 2, tokens, heads * dim)
        x[:, :, :1] = first
        x[:, :, 1:] = torch.from_numpy(codes)
        x[:, :, 1:].mul_(steps.unsqueeze(2)).add_(means.unsqueeze(2))
        if out is None:
            return x.view(shape).to(dtype)
        if not in_place:
            out.copy_(x.view(shape))
        return out

    def _read_header(self, payload: memoryview, shape: tuple[int, ...]):
        """The kept first token, each channel's step and mean, and where the tables begin."""
        version, width, _, key_step, value_step = _HEADER.unpack_from(payload)
        if version > _VERSION:
            raise ForeignChunk(f"cachegen payload version {version}; this kvshelf reads version {_VERSION} "
                               "(a newer kvshelf wrote it)")
        if version != _VERSION:
            raise CorruptChunk(f"cachegen payload version {version}; this kvshelf reads version {_VERSION} "
                               "(a chunk from an older kvshelf is dropped and recomputed)")
        if width not in (1, 2) or not all(math.isfinite(step) and step > 0 for step in (key_step, value_step)):
            raise CorruptChunk(f"cachegen payload with mean width {width} and steps {key_step}, {value_step}")
        layers, _, tokens, heads, dim = shape
        channels = heads * dim
        first_bytes, offset = _take(payload, _HEADER.size, layers * 2 * min(tokens, 1) * channels * 2)
        first = torch.from_numpy(first_bytes.copy().view(np.float16)).view(layers, 2, min(tokens, 1), channels)
        scale_bytes, offset = _take(payload, offset, layers * 2 * heads * 4)
        scales = torch.from_numpy(scale_bytes.copy().view(np.float32)).view(layers, 2, heads)
        if not (scales.isfinite().all() and (scales > 0).all()):
            raise CorruptChunk("cachegen payload holds a scale that is not a positive number")
        steps = _steps(key_step, value_step, scales, dim)
        if not steps.isfinite().all():
            raise CorruptChunk("cachegen payload's scales and steps multiply to a step that is not finite")
        mean_bytes, offset = _take(payload, offset, layers * 2 * channels * width)
        mean_codes = torch.from_numpy(mean_bytes.copy().view(np.int8 if width == 1 else np.int16))
        means = mean_codes.to(torch.float32).view(layers, 2, channels) * steps / _MEAN_RESOLUTION
        return first.to(torch.float32), steps, means, offset

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        """Half a step; float16's rounding for the first token."""
        layers, _, tokens, heads, dim = kv.shape
        _, steps, _, _ = self._read_header(memoryview(self.encode(kv)), tuple(kv.shape))
        bound = (steps / 2).unsqueeze(2).expand(layers, 2, tokens, heads * dim).clone()
        if tokens:
            magnitude = kv[:, :, 0].reshape(layers, 2, -1).float().abs()
            bound[:, :, 0] = magnitude * 2.0**-11 + 2.0**-24 + (magnitude - _FP16_MAX).clamp_min(0)
        return (bound * (1 + 1e-4) + 1e-7).view(kv.shape)


def _head_rms(values: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's RMS over the tokens and channels of `values` (layers, 2, tokens, channels; float64),
    as float32 of at least 2^-100, so that every step is a positive normal float; 1 with no tokens."""
    layers, _, tokens, channels = values.shape
    if tokens == 0:
        return torch.ones(layers, 2, heads)
    squares = values.view(layers, 2, tokens, heads, channels // heads).pow(2)
    return squares.mean((2, 4)).sqrt().float().clamp_min(2.0**-100)


def _steps(key_step: float, value_step: float, scales: torch.Tensor, dim: int) -> torch.Tensor:
    """Step per (layer, key or value, channel): its head's RMS times the key or value step."""
    kind_steps = torch.tensor([key_step, value_step], dtype=torch.float32).view(1, 2, 1)
    return (scales * kind_steps).repeat_interleave(dim, dim=2)


def _min_payload_bytes(shape: tuple[int, ...]) -> int:
    """The bytes every payload of `shape` holds whatever its symbols: header, first token, scales,
    one-byte means, a table header per stream and the compressed stream's length."""
    layers, _, tokens, heads, dim = shape
    streams, channels = layers * 2, heads * dim
    first_token_bytes = streams * min(tokens, 1) * channels * 2
    return _HEADER.size + first_token_bytes + streams * (heads * 4 + channels + _TABLE.size) + _NUM_WORDS.size


def _ans_decoder(payload: memoryview, offset: int):
    """constriction's decoder over the compressed stream at `offset`, which must end the payload."""
    if offset + _NUM_WORDS.size > len(payload):
        raise CorruptChunk("cachegen payload ends before its compressed stream")
    (num_words,) = _NUM_WORDS.unpack_from(payload, offset)
    offset += _NUM_WORDS.size
    if offset + num_words * 4 != len(payload):
        raise CorruptChunk("cachegen payload's compressed stream does not end where the payload does")
    words = np.frombuffer(payload, dtype=np.uint32, count=num_words, offset=offset).copy()
    if num_words and words[-1] == 0:  # ANS never ends in a zero word; constriction refuses one
        raise CorruptChunk("cachegen payload's compressed stream ends in a zero word")
    return constriction.stream.stack.AnsCoder(words)


def _take(payload: memoryview, offset: int, count: int) -> tuple[np.ndarray, int]:
    if offset + count > len(payload):
        raise CorruptChunk(f"cachegen payload of {len(payload)} bytes ends early")
    return np.frombuffer(payload, dtype=np.uint8, count=count, offset=offset), offset + count


def _paired(num_symbols: int, num_levels: int) -> bool:
    """Whether a stream is coded two symbols at a time, as one of num_levels^2 joint levels with the
    product of the two symbols' probabilities: the same size, and half as many of the ANS decoder's
    steps (constriction's Categorical costs about 16 ns a step); decoding gets 15% faster."""
    return num_symbols % 2 == 0 and num_levels <= _PAIRED_LEVELS


def _model(counts: np.ndarray, paired: bool):
    probabilities = counts.astype(np.float64) / counts.sum()
    if paired:
        probabilities = np.outer(probabilities, probabilities).ravel()
    return constriction.stream.model.Categorical(probabilities, perfect=False)


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
        num_levels = len(self.counts)
        if num_levels <= 1:  # one symbol alone needs no bits
            return
        paired = _paired(self.symbols.size, num_levels)
        symbols = self.symbols[0::2] * num_levels + self.symbols[1::2] if paired else self.symbols
        encoder.encode_reverse(symbols, _model(self.counts, paired))


def _read_table(payload: memoryview, offset: int, num_symbols: int) -> tuple[tuple[int, np.ndarray], int]:
    """The table of a stream of `num_symbols` symbols: its lowest symbol and a count per level, as
    the encoder writes it (counts adding up to num_symbols, the first and last level used)."""
    if offset + _TABLE.size > len(payload):
        raise CorruptChunk("cachegen payload ends inside a table")
    lowest, num_levels = _TABLE.unpack_from(payload, offset)
    offset += _TABLE.size
    if num_levels > _MAX_SYMBOLS or offset + num_levels * 4 > len(payload):
        raise CorruptChunk(f"cachegen table of {num_levels} levels does not fit the payload")
    if num_levels and lowest + num_levels - 1 > _INT32_MAX:
        raise CorruptChunk(f"cachegen table's levels {lowest} + {num_levels} overflow int32")
    counts = np.frombuffer(payload, dtype=np.uint32, count=num_levels, offset=offset)
    num_counted = int(counts.sum(dtype=np.uint64))
    if num_counted != num_symbols:
        raise CorruptChunk(f"cachegen table counts {num_counted} symbols, the shape needs {num_symbols}")
    if num_levels and (counts[0] == 0 or counts[-1] == 0):
        raise CorruptChunk("cachegen table has an unused lowest or highest level")
    return (lowest, counts), offset + num_levels * 4


def _decode_stream(decoder, table: tuple[int, np.ndarray], out: np.ndarray) -> None:
    """Decode one stream's symbols into `out` (int32, as many as its table counts)."""
    lowest, counts = table
    num_levels = len(counts)
    if num_levels <= 1:
        out.fill(lowest)
        return
    try:
        if _paired(out.size, num_levels):
            joint = decoder.decode(_model(counts, True), out.size // 2)
            np.divmod(joint, num_levels, out=(out[0::2], out[1::2]))
            out += lowest
        else:
            np.add(decoder.decode(_model(counts, False), out.size), lowest, out=out)
    except ValueError as exc:  # constriction's own refusals
        raise CorruptChunk(f"cachegen stream does not decode: {exc}") from exc
