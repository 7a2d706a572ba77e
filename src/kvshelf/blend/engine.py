"""Blend mode for the HF engine: reuse each segment's stored KV wherever the segment stands.

A prompt is `segment ++ sep ++ segment ++ sep ... ++ sep ++ question`. Each segment is
tokenized on its own, so its tokens (and so its keys in the shelf) do not depend on what
precedes it; its KV is stored as if it stood alone at position 0, under the namespace's
`blend` variant, in the shelf's usual chunks. At request time each stored segment's full
chunks are loaded, their keys moved to the segment's place (RoPE), and `blend_prefill`
recomputes the tokens that deviate most. Separators, each segment's last partial chunk,
segments shorter than `min_segment_tokens`, and the question are always computed.

A segment the shelf lacks is computed in context this time and, after the first output token,
on its own for the shelf, so the next prompt holding it reuses it.

Prompts: a string is split at `separator` (empty segments are dropped); a list is taken as
the segments, the last one the question. A prompt without a separator is all question: a
full prefill, with nothing reused.
"""

import dataclasses
import time
from dataclasses import dataclass

import torch

from kvshelf.blend.forward import BlendResult, blend_prefill
from kvshelf.blend.rope import Rope
from kvshelf.keys import Namespace

BLEND_VARIANT = ("blend", "segment")


@dataclass(frozen=True)
class BlendSettings:
    separator: str = "\n\n# # #\n\n"  # unlikely inside a document; documents hold blank lines
    recompute_ratio: float = 0.15
    check_layers: tuple[int, ...] = (1,)  # several: gradual filtering (see blend.forward)
    min_segment_tokens: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must lie in [0, 1], got {self.recompute_ratio}")
        if not self.check_layers or min(self.check_layers) < 0:
            raise ValueError(f"check_layers must name one or more layers, got {self.check_layers}")
        if not self.separator:
            raise ValueError("the blend separator must not be empty")


@dataclass(slots=True)
class BlendStats:
    num_reused: int  # prompt tokens whose stored KV was used at every layer
    num_recomputed: int  # stored tokens recomputed because their context changed them most
    num_fresh: int  # tokens with no stored KV (question, separators, partial chunks, new segments)
    num_segments_stored: int  # segments computed on their own and saved for next time


@dataclass(slots=True)
class Layout:
    token_ids: list[int]
    segments: list[tuple[int, list[int]]]  # (first position, tokens) of each reusable segment


def split_prompt(tokenizer, prompt: str | list[str], settings: BlendSettings) -> Layout:
    """Token ids of the prompt and where its segments stand; the last segment is the question."""
    texts = prompt.split(settings.separator) if isinstance(prompt, str) else list(prompt)
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ValueError("the prompt is empty; give at least a question")
    separator_ids = tokenizer(settings.separator, add_special_tokens=False)["input_ids"]
    token_ids: list[int] = []
    segments = []
    for index, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if index < len(texts) - 1 and len(ids) >= settings.min_segment_tokens:
            segments.append((len(token_ids), ids))
        token_ids += ids + (separator_ids if index < len(texts) - 1 else [])
    return Layout(token_ids, segments)


class Blender:
    """The blend path of an HFEngine (which owns the model, tokenizer and shelf)."""

    def __init__(self, engine, settings: BlendSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.rope = Rope.of(engine.model.config.get_text_config(decoder=True))

    def segment_namespace(self, namespace: Namespace) -> Namespace:
        return dataclasses.replace(namespace, extra=(*namespace.extra, BLEND_VARIANT))

    def prefill(self, layout: Layout, namespace: Namespace) -> tuple[BlendResult, list[list[int]], float]:
        """The blended prefill, the segments the shelf lacked, and the seconds spent loading."""
        started_s = time.perf_counter()
        model, shelf = self.engine.model, self.engine.shelf
        segment_namespace = self.segment_namespace(namespace)
        num_tokens = len(layout.token_ids)
        reused_kv = torch.zeros(self.engine.layout.shape(num_tokens), dtype=model.dtype)
        reused = torch.zeros(num_tokens, dtype=torch.bool)
        missing = []
        for start, ids in layout.segments:
            loaded = shelf.load(ids, segment_namespace, len(ids)) if shelf is not None else None
            if loaded is None or loaded.num_tokens == 0:
                missing.append(ids)
                continue
            kv = loaded.kv()  # (layers, 2, stored tokens, kv_heads, head_dim), keys at positions 0..
            end = start + loaded.num_tokens
            reused_kv[:, 0, start:end] = self.rope.move_keys(kv[:, 0], start)
            reused_kv[:, 1, start:end] = kv[:, 1]
            reused[start:end] = True
        load_s = time.perf_counter() - started_s
        settings = self.settings
        result = blend_prefill(
            model, layout.token_ids, reused_kv, reused, settings.recompute_ratio, settings.check_layers
        )
        return result, missing, load_s

    def store_segments(self, segments: list[list[int]], namespace: Namespace) -> int:
        """Compute each segment on its own, at positions 0.., and save its full chunks (as the engine
        saves a prompt: a failed save is logged, never raised)."""
        if self.engine.shelf is None:
            return 0
        segment_namespace = self.segment_namespace(namespace)
        for ids in segments:
            cache = self.engine.new_cache()
            with torch.inference_mode():
                self.engine.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
                                  logits_to_keep=1)
            self.engine.save_prompt(ids, cache, 0, segment_namespace)
        return len(segments)
