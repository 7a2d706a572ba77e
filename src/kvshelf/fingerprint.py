"""Model identity from content: which weights (and tokenizer) a path holds, not where it lies.

A namespace's model id decides which stored KV a model may load, so it must change whenever the
weights do. A path does not: a checkpoint rewritten in place keeps its path (and would load KV
computed by the old weights), and the same weights at two paths would never share.

`model_fingerprint(path)` reads a local model directory (or one file, e.g. a GGUF) and returns
`content:<32 hex>`, a blake3 digest over
- the whole contents of the config and tokenizer files (config.json, tokenizer files, chat
  templates, adapter_config.json, the safetensors index);
- for each weights file: its name relative to the directory, its size, its whole safetensors
  header (dtypes, shapes, offsets), and samples of its bytes: the first and last 64 KiB and 64 KiB
  at 16 evenly spaced offsets, plus (safetensors) 4 KiB at the start, middle and end of every
  tensor. Weights files up to 4 MiB (small adapters, test checkpoints) are hashed whole.

So any change of a config or tokenizer file, of a weights file's size, of a tensor's dtype,
shape or place, and any tensor replaced as a whole (another checkpoint, a fine-tune, a
re-quantization) is caught, while a multi-GB checkpoint costs about a megabyte of reads per file
plus 12 KiB per tensor (the bundled 540 MB model: about 15 ms from the page cache, 60 ms cold).
What sampling misses: a change confined to bytes between samples, e.g. a few rows or one value
edited inside a large tensor. Name such a model yourself: `model_id` (the connector's
`kv_connector_extra_config.model_id`, HFEngine's `model_id`) overrides the fingerprint.

Paths never enter the digest: symlinks (as in the HuggingFace cache) are read through, and the
same files at two paths give one id. Only the top level of a directory is read, as vLLM and
transformers load from there.

`module_fingerprint(module)` is the same idea for weights already in memory (names, shapes,
dtypes and a strided sample of every parameter and buffer).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import blake3

logger = logging.getLogger(__name__)

FINGERPRINT_PREFIX = "content:"
FINGERPRINT_HEX_CHARS = 32
DOMAIN = b"kvshelf-model-fingerprint-v1\0"

# Read whole: small files that change what a token id or a weight means.
WHOLE_FILE_NAMES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "adapter_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
    "params.json", "tekken.json",  # Mistral's own format
})
WHOLE_FILE_PATTERNS = ("*.model", "*.tiktoken", "chat_template*")
WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "adapter_model.*")

SAMPLE_BYTES = 64 * 1024
NUM_SPACED_SAMPLES = 16
TENSOR_SAMPLE_BYTES = 4 * 1024
WHOLE_WEIGHTS_MAX_BYTES = 4 * 1024 * 1024
SAFETENSORS_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
TENSOR_SAMPLE_ELEMENTS = 256  # per in-memory tensor, evenly spaced


def is_local_model(name_or_path: str) -> bool:
    return bool(name_or_path) and os.path.exists(name_or_path)


def model_fingerprint(path: str | os.PathLike) -> str:
    """`content:<32 hex>` of a local model directory or single weights file (see the module doc).

    Raises FileNotFoundError when `path` does not exist, ValueError when a directory holds no
    file this module reads (nothing would tell two such directories apart).
    """
    files = model_files(Path(path))
    if not files:
        raise ValueError(f"{path} holds no model files (config.json, *.safetensors, *.gguf, ...) to fingerprint")
    hasher = blake3.blake3(DOMAIN)
    for name, file_path, is_weights in files:
        _frame(hasher, name.encode())
        if is_weights:
            _hash_weights_file(hasher, file_path)
        else:
            _frame(hasher, file_path.read_bytes())
    return FINGERPRINT_PREFIX + hasher.hexdigest()[:FINGERPRINT_HEX_CHARS]


def model_identity(name_or_path: str, revision: str | None = None) -> str:
    """The content fingerprint of a local model; for anything else (a hub name), `name@revision`."""
    named = f"{name_or_path}@{revision or 'local'}"
    if is_local_model(name_or_path):
        try:
            return model_fingerprint(name_or_path)
        except ValueError as exc:
            reason = str(exc)
    else:
        reason = "not a local path"
    logger.warning(
        "kvshelf cannot fingerprint %r (%s); its KV is named %r, so weights changed under that name would "
        "load stale KV. Set model_id to name the weights yourself.", name_or_path, reason, named,
    )
    return named


def model_files(path: Path) -> list[tuple[str, Path, bool]]:
    """(name that enters the digest, path to read, is a weights file), sorted by name."""
    if path.is_file():
        return [("", path, True)]  # a single file's own name is part of its path: leave it out
    if not path.is_dir():
        raise FileNotFoundError(f"no model file or directory at {path}")
    files = []
    for entry in sorted(path.iterdir(), key=lambda entry: entry.name):
        name = entry.name
        if name.startswith(".") or not entry.is_file():  # is_file follows symlinks
            continue
        if name in WHOLE_FILE_NAMES or _matches(name, WHOLE_FILE_PATTERNS):
            files.append((name, entry, False))
        elif _matches(name, WEIGHT_FILE_PATTERNS):
            files.append((name, entry, True))
    return files


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _frame(hasher: Any, data: bytes) -> None:
    """Length-prefixed, so no two sequences of records hash the same bytes."""
    hasher.update(struct.pack("<Q", len(data)))
    hasher.update(data)


def _hash_weights_file(hasher: Any, path: Path) -> None:
    size_bytes = path.stat().st_size
    _frame(hasher, struct.pack("<Q", size_bytes))
    with open(path, "rb") as file:
        fd = file.fileno()
        if size_bytes <= WHOLE_WEIGHTS_MAX_BYTES:
            _frame(hasher, file.read())
            return
        header, data_start = _safetensors_header(fd, size_bytes)
        if header is not None:
            _frame(hasher, header)
            for begin, end in _tensor_ranges(header, data_start):
                for offset in _spaced_offsets(begin, end, TENSOR_SAMPLE_BYTES, 1):
                    _frame(hasher, os.pread(fd, TENSOR_SAMPLE_BYTES, offset))
        for offset in _spaced_offsets(0, size_bytes, SAMPLE_BYTES, NUM_SPACED_SAMPLES):
            _frame(hasher, os.pread(fd, SAMPLE_BYTES, offset))


def _safetensors_header(fd: int, size_bytes: int) -> tuple[bytes | None, int]:
    """(the JSON header, where tensor data starts), or (None, 0) if this is no safetensors file."""
    (header_bytes,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if not 2 <= header_bytes <= min(SAFETENSORS_MAX_HEADER_BYTES, size_bytes - 8):
        return None, 0
    header = os.pread(fd, header_bytes, 8)
    return (header, 8 + header_bytes) if header.startswith(b"{") else (None, 0)


def _tensor_ranges(header: bytes, data_start: int) -> list[tuple[int, int]]:
    """Each tensor's [begin, end) in the file; none if the header does not parse (its bytes are hashed anyway)."""
    try:
        entries = json.loads(header)
        return [(data_start + entry["data_offsets"][0], data_start + entry["data_offsets"][1])
                for name, entry in entries.items() if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return []


def _spaced_offsets(begin: int, end: int, sample_bytes: int, num_inner: int) -> list[int]:
    """Offsets of samples at the start, the end and `num_inner` evenly spaced between; all of a short range."""
    if end - begin <= sample_bytes * (num_inner + 2):
        return list(range(begin, end, sample_bytes))
    last = end - sample_bytes
    inner = [begin + (last - begin) * (index + 1) // (num_inner + 1) for index in range(num_inner)]
    return [begin, *inner, last]


def _stat_signature(path: Path) -> tuple:
    """What changes when any fingerprinted file is rewritten, replaced, added or removed."""
    signature = []
    for name, file_path, _ in model_files(path):
        stat = file_path.stat()
        signature.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev))
    return tuple(signature)


class FingerprintCache:
    """`model_fingerprint` for callers that ask per request: a path is re-read only when one of its
    files changed (size, mtime, ctime or inode), so a rewritten adapter gets a new id and an
    unchanged one costs a directory listing and a few stat calls."""

    def __init__(self, max_entries: int = 256) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()

    def fingerprint(self, path: str | os.PathLike) -> str:
        resolved = Path(path).resolve()
        cache_key = (str(resolved), _stat_signature(resolved))
        with self._lock:
            if cache_key in self._entries:
                self._entries.move_to_end(cache_key)
                return self._entries[cache_key]
        fingerprint = model_fingerprint(resolved)
        with self._lock:
            self._entries[cache_key] = fingerprint
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return fingerprint


def _portable(settings: Any) -> Any:
    """`settings` without loading metadata, at any depth: private keys (transformers' `_name_or_path`
    is a path) and versions."""
    if not isinstance(settings, dict):
        return settings
    return {key: _portable(value) for key, value in settings.items()
            if not str(key).startswith("_") and key != "transformers_version"}


def module_fingerprint(module: Any, settings: dict | None = None, source_path: str | None = None) -> str:
    """`content:<32 hex>` of a torch module's weights as they are in memory.

    Hashes each parameter's and buffer's name, shape and dtype and TENSOR_SAMPLE_ELEMENTS of its
    values at evenly spaced positions, plus `settings` (e.g. the model config, which holds RoPE
    and norm settings) as canonical JSON. Weights edited in memory (a merged LoRA adapter) get
    their own id; as with files, a change confined to elements between samples is missed.
    Weights offloaded to the meta device cannot be read: then the files at `source_path` are
    fingerprinted, if it is local; else a ValueError asks for a model_id.
    """
    import torch

    if any(tensor.device.type == "meta" for tensor in module.parameters()):
        if source_path and is_local_model(source_path):
            return model_fingerprint(source_path)
        raise ValueError("the model's weights are offloaded (on the meta device), so kvshelf cannot fingerprint "
                         "them; pass model_id to name the model and its weights")
    hasher = blake3.blake3(DOMAIN + b"module\0")
    _frame(hasher, json.dumps(_portable(settings or {}), sort_keys=True, default=str).encode())
    tensors = [*module.named_parameters(), *module.named_buffers()]
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        _frame(hasher, f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            num_samples = min(TENSOR_SAMPLE_ELEMENTS, flat.numel())
            positions = torch.linspace(0, flat.numel() - 1, num_samples, dtype=torch.float64)
            sample = flat[positions.round().long().to(flat.device)].cpu().contiguous()
            _frame(hasher, sample.view(torch.uint8).numpy().tobytes())
    return FINGERPRINT_PREFIX + hasher.hexdigest()[:FINGERPRINT_HEX_CHARS]
