"""Which codec a lower tier writes with: a fixed one, or `auto`.

`auto` trades quality for load time only when it has to: it takes the best codec of
AUTO_LADDER (lossless first, then ever smaller lossy levels) whose expected time to load one
chunk from this tier — stored bytes over the tier's measured read bandwidth, plus the codec's
measured decode time — fits the tier's `codec_budget_ms`. Until a tier has been read from, its
bandwidth is unknown and the best codec is used; every read and every encode refines the
estimates (exponential moving averages), so a slow disk or a distant Redis moves the choice
down the ladder and a fast one moves it back up.
"""

import threading
from dataclasses import dataclass, field

from kvshelf.codecs import CODECS, Codec
from kvshelf.layout import KVLayout

AUTO = "auto"
# Best quality first. Each step costs quality (see `kvshelf bench codecs`) and saves bytes.
AUTO_LADDER = ("raw", "int8", "cachegen-fine", "cachegen", "cachegen-small")
SMOOTHING = 0.2  # weight of the newest measurement


def _blend(old: float | None, new: float) -> float:
    return new if old is None else old + SMOOTHING * (new - old)


@dataclass
class CodecChoice:
    """The codec of one lower tier. `budget_s` is None for a fixed codec."""

    codecs: tuple[Codec, ...]
    budget_s: float | None = None
    read_bytes_per_s: float | None = None
    # Per codec name: stored bytes per raw byte; per codec id: raw bytes decoded per second.
    stored_ratio: dict[str, float] = field(default_factory=dict)
    decode_bytes_per_s: dict[int, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, name: str, budget_ms: float | None) -> "CodecChoice":
        if name == AUTO:
            return cls(tuple(CODECS[level] for level in AUTO_LADDER), budget_ms / 1000)
        return cls((CODECS[name],))

    def choose(self, raw_bytes: int, layout: KVLayout | None = None) -> Codec:
        """The codec for a chunk of `raw_bytes` (of `layout`: only codecs that take it, else raw)."""
        codecs = [codec for codec in self.codecs if layout is None or codec.takes(layout)] or [CODECS["raw"]]
        if self.budget_s is None or self.read_bytes_per_s is None:
            return codecs[0]
        for codec in codecs:
            if self.expected_load_s(codec, raw_bytes) <= self.budget_s:
                return codec
        return codecs[-1]

    def expected_load_s(self, codec: Codec, raw_bytes: int) -> float:
        stored_bytes = raw_bytes * self.stored_ratio.get(codec.name, codec.expected_ratio)
        decode_rate = self.decode_bytes_per_s.get(codec.id)
        return stored_bytes / self.read_bytes_per_s + (raw_bytes / decode_rate if decode_rate else 0.0)

    def note_encoded(self, codec: Codec, raw_bytes: int, stored_bytes: int) -> None:
        with self._lock:
            self.stored_ratio[codec.name] = _blend(self.stored_ratio.get(codec.name), stored_bytes / raw_bytes)

    def note_read(self, stored_bytes: int, seconds: float) -> None:
        if stored_bytes and seconds > 0:
            with self._lock:
                self.read_bytes_per_s = _blend(self.read_bytes_per_s, stored_bytes / seconds)

    def note_decoded(self, codec_id: int, raw_bytes: int, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self.decode_bytes_per_s[codec_id] = _blend(self.decode_bytes_per_s.get(codec_id), raw_bytes / seconds)
