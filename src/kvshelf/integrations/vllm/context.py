"""What both halves of the connector derive from vLLM's config: the namespace, the paging."""

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from kvshelf.codecs import Codec
from kvshelf.config import MODEL_ID_KEY
from kvshelf.fingerprint import FingerprintCache, is_local_model, model_identity
from kvshelf.keys import Namespace
from kvshelf.layout import DTYPE_NAMES, KVLayout

logger = logging.getLogger(__name__)

# request_namespace runs per request in the scheduler: an adapter is re-read only when its files change.
_ADAPTER_FINGERPRINTS = FingerprintCache()
_unfingerprinted_adapters: set[str] = set()


@dataclass(frozen=True)
class EngineFacts:
    """The parts of vLLM's config that decide what a KV tensor means, and how it is paged."""

    base_namespace: Namespace  # per request: LoRA adapter and cache_salt; per worker: tp_rank
    block_size: int
    # vLLM's KV cache groups (one, or several with its hybrid allocator): each group's layers
    # share block tables. The sliding window of each group's layers, None for full attention.
    windows: tuple[int | None, ...] = (None,)
    layer_groups: dict[str, int] = field(default_factory=dict)  # layer name -> its group
    compute_dtype: str = "float32"  # the model's: an fp8 cache quantizes KV computed in it

    @property
    def has_windows(self) -> bool:
        return any(window is not None for window in self.windows)


def kv_cache_groups(kv_cache_config: Any) -> tuple[tuple[int | None, ...], dict[str, int], int]:
    """(each group's sliding window or None, each layer's group, the block size) of vLLM's KV
    cache groups; a group kvshelf cannot store (SSM state, chunked local attention, ...) is refused."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec

    windows, layer_groups, block_sizes = [], {}, set()
    for index, group in enumerate(kv_cache_config.kv_cache_groups):
        spec = group.kv_cache_spec
        if type(spec) is SlidingWindowSpec:
            windows.append(spec.sliding_window)
        elif type(spec) in (FullAttentionSpec, MLAAttentionSpec):  # with the allocator off, windowed layers too
            windows.append(None)
        else:
            raise ValueError(f"kvshelf stores attention KV only; this model's KV cache group {index} holds "
                             f"{type(spec).__name__} ({len(group.layer_names)} layers), which it cannot store. "
                             "Run it without --kv-transfer-config")
        block_sizes.add(spec.block_size)
        layer_groups.update(dict.fromkeys(group.layer_names, index))
    if len(block_sizes) != 1:
        raise ValueError(f"kvshelf needs one block size in every KV cache group; this model's groups use "
                         f"{sorted(block_sizes)}")
    return tuple(windows), layer_groups, block_sizes.pop()


def model_order(layer_name: str) -> tuple[tuple[int, ...], str]:
    """Sorts layer names as the model stacks them: by the numbers in them ("model.layers.12.self_attn.attn")."""
    return tuple(int(number) for number in re.findall(r"\d+", layer_name)), layer_name


def with_window_storage(facts: EngineFacts, chunk_size: int, codecs: list[Codec]) -> EngineFacts:
    """`facts` whose layout stores sliding-window layers with only each chunk's last W tokens,
    where the windows (W) are shorter than a chunk and every tier's codec takes such rows
    (`codecs`: the tiers' fixed codecs; `auto` skips those that do not). A hit ends at a chunk's
    end, and the window of the token after it reaches back W - 1 tokens: the rest of a chunk's
    windowed layers is never loaded into vLLM's blocks (it allocates them the null block)."""
    windows = [window for window in facts.windows if window is not None]
    if not windows or max(windows) >= chunk_size or not all(codec.row_wise for codec in codecs):
        return facts
    names = sorted(facts.layer_groups, key=model_order)
    windowed = tuple(index for index, name in enumerate(names) if facts.windows[facts.layer_groups[name]] is not None)
    layout = dataclasses.replace(facts.base_namespace.layout, windowed_layers=windowed, window_tokens=max(windows))
    return dataclasses.replace(facts, base_namespace=dataclasses.replace(facts.base_namespace, layout=layout))


def engine_facts(vllm_config: Any, kv_cache_config: Any, extra_config: dict[str, Any]) -> EngineFacts:
    model_config, parallel_config = vllm_config.model_config, vllm_config.parallel_config
    windows, layer_groups, block_size = kv_cache_groups(kv_cache_config)
    layout = KVLayout(
        num_layers=len(layer_groups),
        num_kv_heads=model_config.get_num_kv_heads(parallel_config),
        head_dim=model_config.get_head_size(),
        dtype=_kv_dtype_name(vllm_config),
        kind="mla" if model_config.use_mla else "kv",
    )
    model_id = extra_config.get(MODEL_ID_KEY) or default_model_id(model_config, vllm_config.load_config)
    compute_dtype = DTYPE_NAMES[model_config.dtype]
    # KV quantized to fp8 from bfloat16 and from float32 differs: another compute dtype is another namespace.
    compute = (("compute_dtype", compute_dtype),) if compute_dtype != layout.dtype else ()
    namespace = Namespace(
        model_id,
        layout,
        tp_rank=0,  # each worker puts in its own rank; the scheduler asks every rank
        tp_size=parallel_config.tensor_parallel_size,
        # KV from another engine may differ in the last bits; never mix them. Chunks stored before
        # kvshelf read the CPU cache's transposed keys in token order differ in meaning: "kv-order".
        extra=(("engine", "vllm"), ("kv-order", "tokens"), *compute),
    )
    return EngineFacts(namespace, block_size, windows, layer_groups, compute_dtype)


def default_model_id(model_config: Any, load_config: Any) -> str:
    """What the weights are, from their content (kvshelf.fingerprint); `model_id` overrides it."""
    revision = model_config.revision
    weights_url = getattr(model_config, "model_weights", "")
    if weights_url:  # streamed from object storage: the local directory holds no weights
        return model_identity(weights_url, revision)
    model_path = _local_snapshot(model_config.model, revision, getattr(load_config, "download_dir", None))
    model_id = model_identity(model_path, revision)
    tokenizer = model_config.tokenizer
    if tokenizer and tokenizer != model_config.model:
        tokenizer_revision = getattr(model_config, "tokenizer_revision", None)
        tokenizer_id = model_identity(_local_snapshot(tokenizer, tokenizer_revision, None), tokenizer_revision)
        model_id += "+tokenizer=" + tokenizer_id
    return model_id


def _local_snapshot(name_or_path: str, revision: str | None, cache_dir: str | None) -> str:
    """A hub name's snapshot in the local HuggingFace cache (vLLM downloaded it there before the
    connector starts); the name itself when it is a path or not cached."""
    if is_local_model(name_or_path):
        return name_or_path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception:  # not a hub name, not cached, or no huggingface_hub: model_identity names it instead
        return name_or_path


def _kv_dtype_name(vllm_config: Any) -> str:
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype == "auto":
        return DTYPE_NAMES[vllm_config.model_config.dtype]
    if cache_dtype in ("fp8", "fp8_e4m3"):
        return "float8_e4m3fn"
    if cache_dtype == "fp8_e5m2":
        return "float8_e5m2"
    raise ValueError(f"kvshelf cannot store vLLM's kv_cache_dtype {cache_dtype!r}; use auto, fp8 or fp8_e5m2")


def request_namespace(base: Namespace, request: Any) -> Namespace:
    """The namespace of one request: its LoRA adapter and tenant salt change what KV it may share."""
    lora = request.lora_request
    lora_id = f"{lora.lora_name}:{adapter_identity(lora.lora_path)}" if lora is not None else None
    return dataclasses.replace(base, lora_id=lora_id, cache_salt=request.cache_salt)


def adapter_identity(lora_path: str) -> str:
    """A LoRA adapter's content fingerprint when it is local; else its path (warned about once)."""
    if is_local_model(lora_path):
        try:
            return _ADAPTER_FINGERPRINTS.fingerprint(lora_path)
        except (OSError, ValueError) as exc:  # no adapter files in it, or rewritten while read
            reason = str(exc)
    else:
        reason = "not a local path"
    if lora_path not in _unfingerprinted_adapters:
        _unfingerprinted_adapters.add(lora_path)
        logger.warning("kvshelf cannot fingerprint the LoRA adapter %r (%s); its KV is named by the path, so an "
                       "adapter changed under it would load stale KV", lora_path, reason)
    return lora_path


def mm_hashes(request: Any) -> list[tuple[int, bytes]]:
    """(token position, content hash) of the request's images, audio and video."""
    return [(feature.mm_position.offset, feature.identifier.encode()) for feature in request.mm_features]
