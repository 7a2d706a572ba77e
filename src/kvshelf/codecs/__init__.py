"""Codecs by name and by stored id."""

from kvshelf.codecs.base import Codec
from kvshelf.codecs.cachegen import LEVELS, CachegenCodec
from kvshelf.codecs.framing import codec_id_of, frame, frame_parts, unframe
from kvshelf.codecs.quantized import Fp8Codec, Int8Codec, Kivi2Codec
from kvshelf.codecs.raw import RawCodec

CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        RawCodec(),
        Int8Codec(),
        Int8Codec(per_channel=True),
        Fp8Codec(),
        Kivi2Codec(),
        *(CachegenCodec(name, *steps) for name, steps in LEVELS.items()),
    )
}
# One decoder per id: a codec's variants share its id and are told apart by their payloads.
CODECS_BY_ID: dict[int, Codec] = {codec.id: codec for codec in reversed(CODECS.values())}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}")
    return CODECS[name]


__all__ = ["CODECS", "CODECS_BY_ID", "Codec", "codec_id_of", "frame", "frame_parts", "get_codec", "unframe"]
