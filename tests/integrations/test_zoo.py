"""Every KV layout of the model zoo on real vLLM: hits are token-for-token what vLLM alone gives.

Each cell runs as `kvshelf bench compat` runs it (kvshelf.bench.compat): vLLM alone, then vLLM with
kvshelf in one process (a cold prompt, a full and a partial hit from memory, a prompt past the
sliding window and its hit; for LLaVA the same text with another image), then a second process
(a hit from disk, a prefill in steps of 96 tokens and its hit). Every family runs, each in one
KV dtype so that together they cover float32, bfloat16 and both fp8 formats (the README's table
has the whole matrix, with Redis); MLA, which vLLM's reference CPU backend cannot load into, is
refused.
"""

import importlib.util

import pytest

from kvshelf.bench.compat import run_matrix
from kvshelf.bench.zoo import FAMILIES, zoo_model_dir


def test_the_zoo_is_built_offline_and_deterministically(tmp_path):
    first, second = zoo_model_dir("qwen3", tmp_path / "a"), zoo_model_dir("qwen3", tmp_path / "b")
    assert first.name == second.name  # named by the config's hash
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert sum(path.stat().st_size for path in first.iterdir()) < 24 * 2**20
    assert zoo_model_dir("qwen3", tmp_path / "a") == first  # built once


CELLS = [
    ("gemma3", "float32"),  # hybrid: sliding-window and full-attention groups
    ("mistral", "fp8_e5m2"),  # every layer windowed
    ("qwen2", "fp8_e4m3"),
    ("qwen3", "bfloat16"),
    ("llava", "float32"),  # images; last: where vLLM cannot start it, the process is unfit for more engines
]
# vLLM's vision models load transformers' pixtral image processor, which needs torchvision; the one
# PyPI builds for torch 2.13 cannot register its operators next to the CPU build of torch used here.
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("compat")
    cells = run_matrix(CELLS, out, together=True)  # two processes in all: engines one after another
    return {(cell["family"], cell["kv_dtype"]): cell for cell in cells}, (out / "compat.md").read_text()


@pytest.mark.parametrize("family, kv_dtype", CELLS)
def test_hits_are_exact_for_every_family(family, kv_dtype, matrix):
    cell = matrix[0][family, kv_dtype]
    if FAMILIES[family].images and not HAS_TORCHVISION:
        assert cell["outcome"] == "refused by vLLM" and "torchvision" in cell["detail"], cell
        return
    assert cell["outcome"] == "exact", cell
    hits = cell["hit_tokens"]
    assert hits["memory hit"] == hits["disk hit, new process"] == 192  # 3 chunks
    assert hits["partial hit"] == 128 and hits["long hit"] == 448  # 7 chunks, far past the window of 48
    assert hits["chunked prefill hit"] == 384  # each step saved what it completed
    # Windowed layers (window 48) store the last 48 of each 64-token chunk: the rest is never loaded.
    stored = {"gemma3": (1 * 64 + 3 * 48) / (4 * 64), "mistral": 48 / 64}.get(family, 1)
    assert cell["stored_bytes_per_token"] == cell["kv_bytes_per_token"] * stored
    if FAMILIES[family].images:
        assert hits["other image"] == 64  # the chunk before the image, not the image's own
    assert matrix[1].count("| exact |") == len(CELLS) - (not HAS_TORCHVISION)


def test_mla_on_the_reference_cpu_backend_is_refused_not_wrong(tmp_path):
    (cell,) = run_matrix([("deepseek_v2", "float32")], tmp_path)
    assert cell["outcome"] == "refused by kvshelf", cell
    assert "its prefill ignores cached context" in cell["detail"] and FAMILIES["deepseek_v2"].block_size == 16
