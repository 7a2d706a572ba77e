"""HuggingFace transformers integration: generate with the cached prefix loaded from a Shelf.

For each request: load the longest cached prefix into a DynamicCache, prefill only the
rest, save the prompt's new full chunks (in the background), then decode. The last prompt
token is always computed, since its logits pick the first output token.

    engine = HFEngine(model, tokenizer, Shelf.from_config(), model_id="my-model@rev")
    result = engine.generate([{"role": "user", "content": "..."}], max_new_tokens=64)
    result.text, result.hit_tokens, result.ttft_s

A loaded chunk that does not fit the model's cache (another shape or dtype), or a shelf that
raises while loading, is a miss from that chunk on: the rest is recomputed, never an exception;
a shelf that raises while saving is logged, and the answer returned all the same.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from kvshelf.blend.engine import Blender, BlendSettings, BlendStats, split_prompt
from kvshelf.fingerprint import module_fingerprint
from kvshelf.keys import Namespace
from kvshelf.layout import DTYPE_NAMES, KVLayout
from kvshelf.ports import QuietLog
from kvshelf.shelf import Shelf

logger = logging.getLogger(__name__)
Prompt = str | Sequence[dict] | Sequence[int]


@dataclass(slots=True)
class GenerationResult:
    text: str
    output_ids: list[int]
    num_prompt_tokens: int
    hit_tokens: int  # prompt tokens whose KV came from the shelf
    ttft_s: float  # from the call to the first output token, load included
    load_s: float  # shelf -> DynamicCache
    first_logits: torch.Tensor = field(repr=False)  # (vocab,) logits of the first output token
    blend: BlendStats | None = None  # in blend mode: reused, recomputed and fresh tokens

    @property
    def computed_tokens(self) -> int:
        return self.num_prompt_tokens - self.hit_tokens


def layout_of(model: PreTrainedModel) -> KVLayout:
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if model.dtype not in DTYPE_NAMES:
        raise ValueError(
            f"kvshelf cannot store KV of dtype {model.dtype}; load the model in float32, float16 or bfloat16"
        )
    return KVLayout(config.num_hidden_layers, num_kv_heads, head_dim, DTYPE_NAMES[model.dtype])


class HFEngine:
    """Greedy or sampled generation on a transformers causal LM, with kvshelf's prefix cache.

    `shelf=None` runs the same code without any cache: the reference for correctness tests.
    `model_id` must name the model *and its weights* (two checkpoints of one architecture
    must not share KV); it defaults to a fingerprint of the weights in memory and the config
    (kvshelf.fingerprint.module_fingerprint).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        shelf: Shelf | None,
        model_id: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.shelf = shelf
        self.model_id = model_id or module_fingerprint(model, model.config.to_dict(), model.config.name_or_path)
        self.layout = layout_of(model)
        self._check_cache_layers()
        self._log = QuietLog(logger)

    def _check_cache_layers(self) -> None:
        layer_types = {type(layer) for layer in DynamicCache(config=self.model.config).layers}
        if layer_types != {DynamicLayer}:
            names = ", ".join(sorted(layer_type.__name__ for layer_type in layer_types))
            raise ValueError(f"kvshelf's HF integration supports full-attention models only; this one has {names}")

    def namespace(self, cache_salt: str | None = None, lora_id: str | None = None) -> Namespace:
        return Namespace(self.model_id, self.layout, lora_id=lora_id, cache_salt=cache_salt)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a text, of chat messages (with the generation prompt), or ids as given."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if prompt and isinstance(prompt[0], dict):
            return list(
                self.tokenizer.apply_chat_template(
                    list(prompt), add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        return [int(token_id) for token_id in prompt]

    @torch.inference_mode()
    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        cache_salt: str | None = None,
        blend: BlendSettings | None = None,
    ) -> GenerationResult:
        """Generate up to `max_new_tokens` (stopping at EOS); greedy when temperature is 0.

        With `blend`, the prompt (a string split at `blend.separator`, or a list of segments
        ending with the question) reuses each segment's stored KV wherever it stands; see
        kvshelf.blend.engine.
        """
        started_s = time.perf_counter()
        namespace = self.namespace(cache_salt)
        blend_stats = None
        if blend is None:
            token_ids = self.prompt_ids(prompt)
            self._check_lengths(token_ids, max_new_tokens)
            cache, hit_tokens = self.load_prefix(token_ids, namespace)
            load_s = time.perf_counter() - started_s
            logits = self._forward(token_ids[hit_tokens:], cache)

            def after_first_token() -> None:
                self.save_prompt(token_ids, cache, hit_tokens, namespace)
        else:
            blender = Blender(self, blend)
            layout = split_prompt(self.tokenizer, prompt, blend)
            token_ids = layout.token_ids
            self._check_lengths(token_ids, max_new_tokens)
            prefilled, missing, load_s = blender.prefill(layout, namespace)
            cache, logits = prefilled.cache, prefilled.last_logits
            hit_tokens = prefilled.num_reused + prefilled.num_recomputed
            blend_stats = BlendStats(prefilled.num_reused, prefilled.num_recomputed, prefilled.num_fresh, len(missing))

            def after_first_token() -> None:
                blender.store_segments(missing, namespace)

        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        next_id = pick_token(logits, temperature, top_p, generator)
        ttft_s = time.perf_counter() - started_s
        after_first_token()
        output_ids = [next_id]
        first_logits = logits
        while len(output_ids) < max_new_tokens and next_id not in self._eos_ids():
            logits = self._forward([next_id], cache)
            next_id = pick_token(logits, temperature, top_p, generator)
            output_ids.append(next_id)
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        return GenerationResult(
            text, output_ids, len(token_ids), hit_tokens, ttft_s, load_s, first_logits, blend_stats
        )

    def _check_lengths(self, token_ids: list[int], max_new_tokens: int) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        max_tokens = getattr(self.model.config.get_text_config(decoder=True), "max_position_embeddings", None)
        if max_tokens is not None and len(token_ids) + max_new_tokens > max_tokens:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {max_tokens} tokens; shorten the prompt or lower max_new_tokens"
            )

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def load_prefix(self, token_ids: list[int], namespace: Namespace) -> tuple[DynamicCache, int]:
        """A DynamicCache holding the longest usable cached prefix of `token_ids`, and its length."""
        cache = self.new_cache()
        if self.shelf is None:
            return cache, 0
        chunk_size = self.shelf.chunk_size
        # Leave the last prompt token to compute: its logits choose the first output token.
        usable_tokens = (len(token_ids) - 1) // chunk_size * chunk_size
        chunks = self._load_chunks(token_ids, namespace, usable_tokens) if usable_tokens else []
        if not chunks:
            return cache, 0
        device = self.model.device
        # Each chunk (layers, 2, tokens, kv_heads, head_dim) -> per layer (1, kv_heads, tokens, head_dim) views.
        per_head = [chunk.to(device).permute(0, 1, 3, 2, 4).unsqueeze(2) for chunk in chunks]
        for layer_index in range(len(cache.layers)):
            cache.layers[layer_index] = ChunkedPrefixLayer(
                [chunk[layer_index, 0] for chunk in per_head], [chunk[layer_index, 1] for chunk in per_head]
            )
        return cache, len(chunks) * chunk_size

    def _load_chunks(self, token_ids: list[int], namespace: Namespace, usable_tokens: int) -> list[torch.Tensor]:
        """The leading stored chunks of the first `usable_tokens` that fit the model's cache: a chunk
        of another shape or dtype, or a shelf that raises, is a miss from there on (recomputed)."""
        try:
            if self.shelf.lookup(token_ids, namespace) == 0:
                return []
            chunks = self.shelf.load(token_ids, namespace, usable_tokens).chunks
        except Exception as exc:  # noqa: BLE001 - a failed load is a miss, never a failed generation
            self._log.warning("error", "kvshelf: loading a prefix failed (%s: %s); recomputing it",
                              type(exc).__name__, exc)
            return []
        expected = self.layout.shape(self.shelf.chunk_size)
        for index, chunk in enumerate(chunks):
            if tuple(chunk.shape) != expected or chunk.dtype != self.layout.torch_dtype:
                self._log.warning("shape", "kvshelf: stored chunk %d is %s of %s, this model's cache takes %s of %s; "
                                  "recomputing from there", index, tuple(chunk.shape), chunk.dtype, expected,
                                  self.layout.torch_dtype)
                return chunks[:index]
        return chunks

    def _forward(self, new_ids: list[int], cache: DynamicCache) -> torch.Tensor:
        input_ids = torch.tensor([new_ids], dtype=torch.long, device=self.model.device)
        output = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return output.logits[0, -1].float()

    def save_prompt(self, token_ids: list[int], cache: DynamicCache, hit_tokens: int, namespace: Namespace) -> None:
        """Save the full chunks of `token_ids` past the first `hit_tokens` from `cache`, which holds
        their KV (in the background; a failed save is logged, never raised)."""
        if self.shelf is None:
            return
        chunk_size = self.shelf.chunk_size

        def chunk_at(index: int) -> torch.Tensor:
            begin = hit_tokens + index * chunk_size
            return cache_to_canonical(cache, begin, begin + chunk_size)

        try:
            self.shelf.save_chunks(token_ids, namespace, chunk_at, start=hit_tokens)
        except Exception as exc:  # noqa: BLE001 - the answer is computed; a failed save only costs a later hit
            self._log.warning("save", "kvshelf: saving the prompt's KV failed (%s: %s); it is not stored",
                              type(exc).__name__, exc)

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else {eos}


class ChunkedPrefixLayer(DynamicLayer):
    """A DynamicLayer holding a loaded prefix as per-chunk views until its first update.

    A DynamicLayer concatenates new KV onto its tensor at every update, so a prefix given as one
    tensor would be copied twice (joining the chunks, then appending the new tokens); this layer
    joins chunks and new tokens in that first update: one copy, which prefill makes anyway.
    """

    def __init__(self, key_chunks: list[torch.Tensor], value_chunks: list[torch.Tensor]) -> None:
        super().__init__()
        self.lazy_initialization(key_chunks[0], value_chunks[0])
        self._pending_chunks: tuple[list[torch.Tensor], list[torch.Tensor]] | None = (key_chunks, value_chunks)
        self._prefix_tokens = sum(chunk.shape[-2] for chunk in key_chunks)

    def get_seq_length(self) -> int:
        return self._prefix_tokens if self._pending_chunks is not None else super().get_seq_length()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._pending_chunks is None:
            return super().update(key_states, value_states, *args, **kwargs)
        key_chunks, value_chunks = self._pending_chunks
        self._pending_chunks = None
        self.keys = torch.cat([*key_chunks, key_states], dim=-2)
        self.values = torch.cat([*value_chunks, value_states], dim=-2)
        return self.keys, self.values


def cache_to_canonical(cache: DynamicCache, begin: int, end: int) -> torch.Tensor:
    """Tokens [begin, end) of `cache` as (layers, 2, tokens, kv_heads, head_dim) on the CPU, in one copy."""
    first = cache.layers[0].keys  # each layer: (batch=1, kv_heads, tokens, head_dim)
    kv = torch.empty((len(cache.layers), 2, end - begin, first.shape[1], first.shape[3]), dtype=first.dtype)
    for layer_kv, layer in zip(kv, cache.layers):
        layer_kv[0].copy_(layer.keys[0, :, begin:end].transpose(0, 1))
        layer_kv[1].copy_(layer.values[0, :, begin:end].transpose(0, 1))
    return kv


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy (temperature 0) or nucleus sampling from `logits` (vocab,)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, sorted_ids = torch.sort(probs, descending=True)
    # Keep the smallest set of tokens whose probability reaches top_p (always at least one).
    outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
    sorted_probs[outside] = 0.0
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return int(sorted_ids[choice])
