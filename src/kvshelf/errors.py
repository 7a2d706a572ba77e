"""The kvshelf exception hierarchy.

    KVShelfError
    ├── ConfigError (also a ValueError)   bad configuration: says which key and how to fix it
    ├── CorruptChunk                      a stored object failed framing, authentication or shape checks
    │   └── ForeignChunk                  a newer kvshelf of this format wrote it (a codec or variant unknown here)
    │       └── UnknownCodec              a codec id this version does not know
    └── TierUnavailable                   a tier cannot serve right now (disk full, store down)

Only ConfigError reaches users at start-up. CorruptChunk and TierUnavailable never reach
an engine: the shelf turns them into cache misses and counts them. A CorruptChunk is deleted
from its tier; a ForeignChunk is not (during a rolling upgrade it is another version's chunk).
"""


class KVShelfError(Exception):
    """Base class of every error kvshelf raises."""


class ConfigError(KVShelfError, ValueError):
    """A configuration value is wrong; the message names the key and the fix."""


class CorruptChunk(KVShelfError):
    """A stored chunk is damaged, truncated, foreign, or stored under the wrong key."""


class ForeignChunk(CorruptChunk):
    """An authentic chunk a newer kvshelf of the same format wrote (its codec or variant is unknown here)."""


class UnknownCodec(ForeignChunk):
    """A stored chunk names a codec this version of kvshelf does not have."""


class TierUnavailable(KVShelfError):
    """A tier failed an operation (I/O error, full disk, store down)."""
