"""Load or recompute: how many of a prompt's held chunks are faster to load than to compute.

Loading a chunk costs its stored bytes over its tier's read bandwidth plus its codec's decode
time: what each lower tier's CodecChoice already measures on every read and decode (shelf.stack),
so nothing is measured twice. A chunk in the memory tier (a tier without a CodecChoice) costs
nothing. The copy into the engine's cache is the same for every tier and is left out.

Computing costs what this engine's forward passes measurably cost (`note_prefill`): per token a
constant part (weights: projections and MLP) plus a part that grows with the number of tokens it
attends to (attention), so computing a prompt's tokens [0, n) takes

    per_token_s * n + per_pair_s * n (n + 1) / 2

with the two rates fitted (least squares, non-negative, recent steps weighted most) to each
step's computed tokens, (query, key) pairs and seconds. Attention is not a detail: the bundled
model (transformers, float32, one CPU thread) computes a 256-token chunk in 596 ms at position 0
and in 1642 ms at position 3840, so a flat tokens/s rate would misjudge late chunks by up to 2.8x.

A chunk is loaded only together with every chunk before it, so the answer is the prefix whose
load saves the most time (its compute time minus its load time), never negative.

Until the engine's compute rate is measured, and for a tier never read, loading is assumed free:
everything held is loaded. Loading is the only way a tier's bandwidth gets measured, and on
these machines a CPU prefill (hundreds of tokens/s) is far slower than any tier's reads, so the
guess is nearly always right; a wrong one costs one slow load, whose measurement corrects the
next answer. For the same reason every REMEASURE_EVERY-th refusal loads everything anyway: a
tier that was slow for a moment is read again and its estimate recovers.
"""

import threading
from collections.abc import Mapping, Sequence

from kvshelf.metrics import ShelfCounters
from kvshelf.shelf.codec_choice import CodecChoice

SMOOTHING = 0.1  # weight of the newest step in the fit
REMEASURE_EVERY = 16
# Smaller steps are left out of the fit: their time is mostly the step's fixed cost (scheduling,
# sampling: ~20 ms a step on this machine's vLLM), which would inflate the per-token rate.
MIN_MEASURED_TOKENS = 128
# Below this, the steps' tokens and pairs are too nearly proportional to tell the two rates apart.
MIN_INDEPENDENCE = 1e-9


def num_attention_pairs(start: int, num_tokens: int) -> int:
    """(query, key) pairs that tokens [start, start + num_tokens) of one sequence attend to (each
    attends to itself and every token before it)."""
    return num_tokens * start + num_tokens * (num_tokens + 1) // 2


class LoadCostModel:
    """Per prompt: how many leading held chunks to load rather than compute.

    `tiers` maps each lower tier's name to its CodecChoice (the stack's own estimates).
    """

    def __init__(self, tiers: Mapping[str, CodecChoice], counters: ShelfCounters) -> None:
        self._tiers = tiers
        self._counters = counters
        self._lock = threading.Lock()
        # Exponentially weighted sums of the fit: t tokens, p pairs, y seconds (t*t, t*p, p*p, t*y, p*y).
        self._sums = [0.0] * 5
        self._num_refusals = 0

    def note_prefill(self, num_tokens: int, seconds: float, num_pairs: int = 0) -> None:
        """One forward pass computed `num_tokens` tokens attending to `num_pairs` (query, key) pairs
        in all (see `num_attention_pairs`) in `seconds`. Without pairs the fit is per token only."""
        if num_tokens < MIN_MEASURED_TOKENS or seconds <= 0:
            return
        sample = (num_tokens * num_tokens, num_tokens * num_pairs, num_pairs * num_pairs,
                  num_tokens * seconds, num_pairs * seconds)
        with self._lock:
            self._sums = [(1 - SMOOTHING) * old + SMOOTHING * new for old, new in zip(self._sums, sample)]

    def compute_rates(self) -> tuple[float, float] | None:
        """(seconds per token, seconds per attended pair), or None before any step was measured."""
        with self._lock:
            s_tt, s_tp, s_pp, s_ty, s_py = self._sums
        if s_tt == 0:
            return None
        det = s_tt * s_pp - s_tp * s_tp
        if s_pp > 0 and det > MIN_INDEPENDENCE * s_tt * s_pp:
            per_token_s, per_pair_s = (s_ty * s_pp - s_py * s_tp) / det, (s_py * s_tt - s_ty * s_tp) / det
            if per_token_s >= 0 and per_pair_s >= 0:
                return per_token_s, per_pair_s
        # The best fit needs a negative rate, or cannot tell the rates apart: the better single rate.
        candidates = [(s_ty / s_tt, 0.0)] + ([(0.0, s_py / s_pp)] if s_pp > 0 else [])
        return max(candidates, key=lambda rates: rates[0] * s_ty + rates[1] * s_py)

    def prefill_s(self, start: int, num_tokens: int) -> float | None:
        """Estimated seconds to compute tokens [start, start + num_tokens) of a prompt; None before
        any step was measured."""
        rates = self.compute_rates()
        if rates is None:
            return None
        return _prefill_s(rates, start, num_tokens)

    def load_s(self, tier: str, chunk_nbytes: int) -> float:
        """Estimated seconds to read and decode one chunk of `chunk_nbytes` raw bytes from `tier`;
        0 for the memory tier and for a tier not read yet."""
        choice = self._tiers.get(tier)
        if choice is None or choice.read_bytes_per_s is None:
            return 0.0
        return choice.expected_load_s(choice.choose(chunk_nbytes), chunk_nbytes)

    def worth_loading(self, located: Sequence[str], chunk_nbytes: int, chunk_tokens: int) -> int:
        """How many of the leading chunks to load: `located` names the tier of each held chunk
        (Shelf.locate), each of `chunk_tokens` tokens and `chunk_nbytes` raw bytes."""
        rates = self.compute_rates()
        if rates is None:
            return len(located)
        best_count, best_saved_s, load_s = 0, 0.0, 0.0
        for count, tier in enumerate(located, 1):
            load_s += self.load_s(tier, chunk_nbytes)
            saved_s = _prefill_s(rates, 0, count * chunk_tokens) - load_s
            if saved_s >= best_saved_s:
                best_count, best_saved_s = count, saved_s
        if best_count == len(located):
            return best_count
        with self._lock:
            self._num_refusals += 1
            remeasure = self._num_refusals % REMEASURE_EVERY == 0
        if remeasure:
            return len(located)
        # A refused stored tail (a prompt's partial last chunk) counts as a whole chunk.
        self._counters.load_refused_tokens += (len(located) - best_count) * chunk_tokens
        return best_count


def _prefill_s(rates: tuple[float, float], start: int, num_tokens: int) -> float:
    per_token_s, per_pair_s = rates
    return per_token_s * num_tokens + per_pair_s * num_attention_pairs(start, num_tokens)
