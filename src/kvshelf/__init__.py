"""kvshelf: a KV-cache layer for LLM inference engines."""

from kvshelf.config import DiskConfig, MemoryConfig, ShelfConfig, load_config
from kvshelf.errors import ConfigError, CorruptChunk, KVShelfError, TierUnavailable, UnknownCodec
from kvshelf.keys import ChunkKey, Namespace, chunk_keys
from kvshelf.layout import KVLayout
from kvshelf.shelf import LoadResult, Shelf

__all__ = [
    "ChunkKey",
    "ConfigError",
    "CorruptChunk",
    "DiskConfig",
    "KVLayout",
    "KVShelfError",
    "LoadResult",
    "MemoryConfig",
    "Namespace",
    "Shelf",
    "ShelfConfig",
    "TierUnavailable",
    "UnknownCodec",
    "chunk_keys",
    "load_config",
]
