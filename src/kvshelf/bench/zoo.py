"""A zoo of tiny random-weight checkpoints, one per distinct KV layout or grouping vLLM serves.

No model hub is reachable here, and correctness needs no trained weights: a checkpoint built
from a transformers config with seeded random weights has exactly the layers, KV heads, head
sizes, sliding windows, KV cache groups and attention kernels of the real family. Each is built
once (deterministically: same seed, same bytes) into `$KVSHELF_HOME/models/zoo/<family>-<stamp>`,
published by one rename, and shares the bundled model's tokenizer (vocabulary 49152).

    from kvshelf.bench.zoo import FAMILIES, zoo_model_dir
    zoo_model_dir("gemma3")   # -> a directory vLLM and transformers load offline

The weights are scaled up from transformers' default initialisation so that attention, not just
the last token, decides the greedy output: a wrong KV entry changes it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvshelf.models import _exclusive_lock, bundled_model_dir, default_home

ZOO_VERSION = 1  # bump when a builder changes, so cached checkpoints get rebuilt
SEED = 1234
INIT_STD = 0.25  # transformers' 0.02 gives near-uniform attention: outputs barely depend on the KV
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
VOCAB_SIZE = 49152  # the bundled SmolLM2 tokenizer's
# Small enough for a test to prefill a few chunks in seconds on two cores.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, FFN = 128, 4, 2, 32, 4, 256  # hidden = heads x head_dim: Qwen2 derives it
WINDOW = 48  # sliding window (tokens) of the sliding-window families: shorter than a chunk of 64


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # the transformers class vLLM maps to its own
    layout: str  # what distinguishes its KV, for the compatibility table
    config: Callable[[], Any]  # a transformers config
    block_size: int = 32  # vLLM's CPU attention takes multiples of 32; its MLA kernel only 16
    images: bool = False  # a vision-language model: IMAGE_TOKEN in its tokenizer, a processor beside it


def _common(**extra: Any) -> dict[str, Any]:
    return {**dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                   max_position_embeddings=4096, tie_word_embeddings=True, initializer_range=INIT_STD,
                   bos_token_id=1, eos_token_id=2, pad_token_id=2), **extra}


def _qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**_common(architectures=["Qwen2ForCausalLM"]))  # q/k/v biases


def _qwen3() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**_common(architectures=["Qwen3ForCausalLM"]))  # q/k RMS norms


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(**_common(architectures=["MistralForCausalLM"], sliding_window=WINDOW))


def _gemma3() -> Any:
    from transformers import Gemma3TextConfig

    # Three sliding-window layers to one full-attention layer (Gemma 3 has five to one).
    layer_types = ["sliding_attention"] * (LAYERS - 1) + ["full_attention"]
    return Gemma3TextConfig(**_common(architectures=["Gemma3ForCausalLM"], sliding_window=WINDOW,
                                      layer_types=layer_types, query_pre_attn_scalar=HEAD_DIM))


def _deepseek_v2() -> Any:
    from transformers import DeepseekV2Config

    # vLLM's CPU MLA kernel takes only DeepSeek's latent size: kv_lora_rank 512 + rope 64 = 576.
    config = _common(architectures=["DeepseekV2ForCausalLM"], kv_lora_rank=512, qk_rope_head_dim=64,
                     qk_nope_head_dim=32, v_head_dim=32, q_lora_rank=None, n_routed_experts=2,
                     num_experts_per_tok=1, first_k_dense_replace=LAYERS, moe_intermediate_size=FFN)  # all dense
    del config["head_dim"]
    config["num_key_value_heads"] = HEADS  # MLA expands the latent to every head
    config["tie_word_embeddings"] = False  # vLLM's DeepseekV2 never ties: its lm_head would stay unloaded
    return DeepseekV2Config(**config)


def _bamba() -> Any:
    from transformers import BambaConfig

    # Three Mamba2 (SSM state) layers and one attention layer: a hybrid SSM model.
    return BambaConfig(**_common(architectures=["BambaForCausalLM"], attn_layer_indices=[LAYERS - 1],
                                 mamba_n_heads=8, mamba_d_head=32, mamba_d_state=16, mamba_n_groups=1,
                                 mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=64))


IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = VOCAB_SIZE  # the first token added to the bundled tokenizer
IMAGE_SIZE, PATCH_SIZE = 56, 14  # an image is (56 / 14)^2 = 16 tokens
# LLaVA-style chat: images where the message puts them, as the OpenAI API's content parts order them.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] in ('image', "
    "'image_url') %}" + IMAGE_TOKEN + "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _llava() -> Any:
    from transformers import LlavaConfig

    text = _common(model_type="llama", vocab_size=VOCAB_SIZE + 64, tie_word_embeddings=False)  # room for <image>
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64,
                  initializer_range=INIT_STD)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN_ID,
                       vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
                       architectures=["LlavaForConditionalGeneration"])


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("qwen2", "Qwen2ForCausalLM", "full attention, q/k/v biases", _qwen2),
    Family("qwen3", "Qwen3ForCausalLM", "full attention, q/k norms", _qwen3),
    Family("mistral", "MistralForCausalLM", f"sliding window {WINDOW} in every layer", _mistral),
    Family("gemma3", "Gemma3ForCausalLM", f"hybrid: 3 sliding-window ({WINDOW}) layers, 1 full", _gemma3),
    Family("deepseek_v2", "DeepseekV2ForCausalLM", "MLA: one 576-wide latent per token and layer", _deepseek_v2,
           block_size=16),
    Family("bamba", "BambaForCausalLM", "hybrid SSM: 3 Mamba2 layers (state, no KV), 1 attention", _bamba),
    Family("llava", "LlavaForConditionalGeneration", "full attention; images (CLIP encoder) in the prompt", _llava,
           images=True),
)}


def zoo_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """The directory of family `name`'s checkpoint, built on first use."""
    family = FAMILIES[name]
    config = family.config()
    stamp = hashlib.sha256(json.dumps([ZOO_VERSION, SEED, INIT_STD, config.to_dict()], sort_keys=True,
                                      default=str).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_home() / "models" / "zoo"
    final_dir = cache_dir / f"{name}-{stamp}"
    if (final_dir / "config.json").is_file():
        return final_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f".{name}.lock"):
        if (final_dir / "config.json").is_file():
            return final_dir
        tmp_dir = cache_dir / f".{name}.tmp-{uuid.uuid4().hex}"
        try:
            _build(family, config, tmp_dir)
            tmp_dir.rename(final_dir)
            for stale in cache_dir.glob(f"{name}-*"):  # built by an older zoo: never used again
                if stale != final_dir:
                    shutil.rmtree(stale, ignore_errors=True)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir


def _build(family: Family, config: Any, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    torch.manual_seed(SEED)
    if family.images:
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(out_dir)  # half the bytes; float32 engines widen it exactly
    tokenizer_dir = bundled_model_dir()
    if not family.images:
        for file_name in TOKENIZER_FILES:
            if (tokenizer_dir / file_name).is_file():
                shutil.copy(tokenizer_dir / file_name, out_dir / file_name)
        return
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != IMAGE_TOKEN_ID:
        raise RuntimeError(f"{IMAGE_TOKEN} got another id than {IMAGE_TOKEN_ID} in the bundled tokenizer")
    # The PIL image processor: transformers' default one needs torchvision, which this torch cannot take.
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(out_dir)
