"""Codecs by name and by stored id."""

from kvshelf.codecs.base import Codec
from kvshelf.codecs.framing import frame, frame_parts, unframe
from kvshelf.codecs.raw import RawCodec

CODECS: dict[str, Codec] = {codec.name: codec for codec in (RawCodec(),)}
CODECS_BY_ID: dict[int, Codec] = {codec.id: codec for codec in CODECS.values()}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}")
    return CODECS[name]


__all__ = ["CODECS", "CODECS_BY_ID", "Codec", "frame", "frame_parts", "get_codec", "unframe"]
