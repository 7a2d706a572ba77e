"""Decompression bombs and hostile payloads against every codec's decoder.

A store writable by an attacker (with `security.key: none`, or a tenant's own chunks) hands a
decoder any payload. Whatever sizes it declares inside (levels, counts, stream lengths, group
sizes), the decoder trusts only the chunk's shape, which framing has checked against the
namespace: each payload here is refused with CorruptChunk (ForeignChunk where it claims a
newer format), and decoding all of them grows memory by less than MEMORY_LIMIT_BYTES.
The header's own shape (the issue's 33M-token chunk) is framing's check: see test_chunk_attacks.
"""

import json
import resource
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from kvshelf.codecs import CODECS, CODECS_BY_ID
from kvshelf.errors import CorruptChunk, ForeignChunk

SHAPE = (2, 2, 16, 2, 8)  # (layers, 2, tokens, kv_heads, head_dim)
SYMBOLS_PER_STREAM = (SHAPE[2] - 1) * SHAPE[3] * SHAPE[4]  # cachegen codes every token but the first
MEMORY_LIMIT_BYTES = 64 * 2**20
HUGE_TOKENS = 33_000_000  # as the bomb declared, here to the codec itself with a short payload
REPO = Path(__file__).resolve().parents[2]


def kv() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def encoded(name: str) -> bytes:
    return bytes(CODECS[name].encode(kv()))


def cachegen_payload(tables=None, words: bytes = b"", num_words: int | None = None, version: int = 3,
                     width: int = 1, steps: tuple[float, float] = (0.4, 0.6), scale: float = 1.0) -> bytes:
    """A cachegen payload for SHAPE, field by field as the format lays it out. By default a valid
    all-zero chunk (every stream one level); each bomb below changes one field."""
    layers, _, tokens, heads, dim = SHAPE
    streams, channels = layers * 2, heads * dim
    if tables is None:
        tables = [(0, [SYMBOLS_PER_STREAM])] * streams
    parts = [struct.pack("<BBHff", version, width, 0, *steps), np.zeros(streams * channels, np.float16).tobytes(),
             np.full(streams * heads, scale, np.float32).tobytes(), bytes(streams * channels * width)]
    for table in tables:
        if isinstance(table, bytes):  # a table header declaring more than follows it
            parts.append(table)
        else:
            lowest, counts = table
            parts += [struct.pack("<iI", lowest, len(counts)), np.asarray(counts, np.uint32).tobytes()]
    parts += [struct.pack("<I", len(words) // 4 if num_words is None else num_words), words]
    return b"".join(parts)


def with_first_table(table) -> bytes:
    return cachegen_payload([table] + [(0, [SYMBOLS_PER_STREAM])] * 3)


def with_header(payload: bytes, variant: int, param_dtype: int, group_size: int) -> bytes:
    return struct.pack("<BBH", variant, param_dtype, group_size) + payload[4:]


def two_level_tables() -> list:
    half = SYMBOLS_PER_STREAM // 2
    return [(0, [half, SYMBOLS_PER_STREAM - half])] * 4


def bombs() -> dict[str, tuple[str, bytes, tuple[int, ...], type]]:
    """name -> (codec, payload, shape, the exception it must raise)."""
    kivi2, int8, fp8, raw = encoded("kivi2"), encoded("int8"), encoded("fp8"), encoded("raw")
    huge = (2, 2, HUGE_TOKENS, 2, 8)
    return {
        "raw one byte short": ("raw", raw[:-1], SHAPE, CorruptChunk),
        "raw one byte long": ("raw", raw + b"\0", SHAPE, CorruptChunk),
        "raw declaring 33M tokens": ("raw", raw[:130], huge, CorruptChunk),
        "int8 one byte long": ("int8", int8 + b"\0", SHAPE, CorruptChunk),
        "int8 header only": ("int8", int8[:4], SHAPE, CorruptChunk),
        "int8 unknown variant": ("int8", with_header(int8, 7, 0, 0), SHAPE, ForeignChunk),
        "int8 declaring 33M tokens": ("int8", int8[:130], huge, CorruptChunk),
        "fp8 one byte short": ("fp8", fp8[:-1], SHAPE, CorruptChunk),
        "fp8 unknown variant": ("fp8", with_header(fp8, 1, 0, 0), SHAPE, ForeignChunk),
        "fp8 declaring 33M tokens": ("fp8", fp8[:130], huge, CorruptChunk),
        "kivi2 group of 65535": ("kivi2", with_header(kivi2, 0, 1, 65535), SHAPE, CorruptChunk),
        "kivi2 group of 0": ("kivi2", with_header(kivi2, 0, 1, 0), SHAPE, CorruptChunk),
        "kivi2 group of 256 in a payload for 32": ("kivi2", with_header(kivi2, 0, 1, 256), SHAPE, CorruptChunk),
        "kivi2 parameter dtype 7": ("kivi2", with_header(kivi2, 0, 7, 32), SHAPE, CorruptChunk),
        "kivi2 unknown variant": ("kivi2", with_header(kivi2, 9, 1, 32), SHAPE, ForeignChunk),
        "kivi2 one byte long": ("kivi2", kivi2 + b"\0", SHAPE, CorruptChunk),
        "kivi2 declaring 33M tokens": ("kivi2", kivi2[:130], huge, CorruptChunk),
        "cachegen table of 2^32-1 levels": ("cachegen", with_first_table(struct.pack("<iI", 0, 2**32 - 1)), SHAPE,
                                            CorruptChunk),
        "cachegen table of 65536 levels, 3 present": ("cachegen", with_first_table(
            struct.pack("<iI", 0, 65536) + bytes(12)), SHAPE, CorruptChunk),
        "cachegen stream of 2^40 symbols": ("cachegen", with_first_table((0, [2**32 - 1] * 256)), SHAPE,
                                            CorruptChunk),
        "cachegen stream one symbol short": ("cachegen", with_first_table((0, [SYMBOLS_PER_STREAM - 1])), SHAPE,
                                             CorruptChunk),
        "cachegen levels past int32": ("cachegen", with_first_table((2**31 - 1, [1, SYMBOLS_PER_STREAM - 1])),
                                       SHAPE, CorruptChunk),
        "cachegen unused highest level": ("cachegen", with_first_table((0, [SYMBOLS_PER_STREAM, 0])), SHAPE,
                                          CorruptChunk),
        "cachegen stream of 2^32-1 words": ("cachegen", cachegen_payload(num_words=2**32 - 1), SHAPE, CorruptChunk),
        "cachegen stream ending in a zero word": ("cachegen", cachegen_payload(
            two_level_tables(), np.array([7, 0], np.uint32).tobytes()), SHAPE, CorruptChunk),
        "cachegen newer version": ("cachegen", cachegen_payload(version=4), SHAPE, ForeignChunk),
        "cachegen older version": ("cachegen", cachegen_payload(version=2), SHAPE, CorruptChunk),
        "cachegen mean width 3": ("cachegen", cachegen_payload(width=3), SHAPE, CorruptChunk),
        "cachegen NaN step": ("cachegen", cachegen_payload(steps=(float("nan"), 0.6)), SHAPE, CorruptChunk),
        "cachegen infinite step": ("cachegen", cachegen_payload(steps=(3e38, 0.6), scale=3e38), SHAPE,
                                   CorruptChunk),
        "cachegen zero scale": ("cachegen", cachegen_payload(scale=0.0), SHAPE, CorruptChunk),
        "cachegen fixed parts cut short": ("cachegen", cachegen_payload()[:100], SHAPE, CorruptChunk),
        "cachegen declaring 2^31 channels": ("cachegen", cachegen_payload(), (2, 2, 16, 2, 2**31), CorruptChunk),
    }


def decode(codec_name: str, payload: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """As a load decodes: by the codec id's decoder."""
    return CODECS_BY_ID[CODECS[codec_name].id].decode(memoryview(payload), shape, torch.float32)


def test_the_cachegen_builder_makes_a_valid_payload():
    """The bombs differ from this payload in one field each, so each tests that field's check."""
    assert torch.equal(decode("cachegen", cachegen_payload(), SHAPE), torch.zeros(SHAPE))
    two_levels = decode("cachegen", cachegen_payload(two_level_tables(), np.array([7, 3], np.uint32).tobytes()), SHAPE)
    assert two_levels.shape == SHAPE and two_levels.isfinite().all()


@pytest.mark.parametrize("name", sorted(bombs()))
def test_each_bomb_is_refused_by_its_decoder(name):
    codec_name, payload, shape, error = bombs()[name]
    with pytest.raises(CorruptChunk) as caught:
        decode(codec_name, payload, shape)
    assert caught.type is error


def _outcome(attempt) -> str:
    try:
        attempt()
    except Exception as exc:  # noqa: BLE001 - the outcome is the exception's type, checked by the caller
        return type(exc).__name__
    return "decoded"


def measure_bombs() -> dict[str, list]:
    """In a fresh process: decode every bomb; name -> [outcome, peak RSS growth, peak traced bytes].

    RSS growth is measured from a baseline taken after each decoder has run once (their imports
    and first allocations are not the bomb's). tracemalloc sees numpy's allocations even where
    pages are never touched; the address-space limit turns an allocation the two would miss (an
    untouched torch tensor) into an error instead of letting a bomb take the machine.
    """
    torch.set_num_threads(1)  # no thread pools (and their malloc arenas) appearing mid-measurement
    for name in ("raw", "int8", "fp8", "kivi2", "cachegen"):
        decode(name, encoded(name), SHAPE)
    attempts = {name: (lambda bomb=bomb: decode(*bomb[:3])) for name, bomb in bombs().items()}
    for attempt in attempts.values():
        _outcome(attempt)  # warm each path once: exceptions' first formatting, lazy imports
    _limit_address_space(headroom_bytes=4 * MEMORY_LIMIT_BYTES)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = {}
    tracemalloc.start()
    for name, attempt in attempts.items():
        tracemalloc.reset_peak()
        outcome = _outcome(attempt)
        growth_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) * 1024
        results[name] = [outcome, growth_bytes, tracemalloc.get_traced_memory()[1]]
    return results


def _limit_address_space(headroom_bytes: int) -> None:
    used_bytes = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used_bytes + headroom_bytes, resource.RLIM_INFINITY))


def test_decoding_every_bomb_stays_within_the_memory_limit():
    script = "import json; from tests.security.test_codec_bombs import measure_bombs as m; print(json.dumps(m()))"
    finished = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads(finished.stdout.splitlines()[-1])
    expected = {name: bomb[3].__name__ for name, bomb in bombs().items()}
    assert {name: outcome for name, (outcome, _, _) in results.items()} == expected
    over = {name: (rss, traced) for name, (_, rss, traced) in results.items()
            if rss >= MEMORY_LIMIT_BYTES or traced >= MEMORY_LIMIT_BYTES}
    assert over == {}
