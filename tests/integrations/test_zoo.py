"""Every KV layout of the model zoo on real vLLM: hits are token-for-token what vLLM alone gives.

Each cell runs as `kvshelf bench compat` runs it (kvshelf.bench.compat): vLLM alone, then vLLM with
kvshelf in one process (a cold prompt, a full and a partial hit from memory, a prompt past the
sliding window and its hit), then a second process (a hit from disk, a prefill in steps of 96
tokens and its hit) and a third engine (a hit from Redis). The cells cover the zoo's distinct
layouts and KV dtypes without running the whole matrix: hybrid sliding-window + full groups,
every layer windowed with an fp8 cache, q/k-normed full attention in bfloat16; and MLA, which
vLLM's reference CPU backend cannot load into, refused.
"""

import pytest

from kvshelf.bench.compat import run_matrix
from kvshelf.bench.redis_servers import RedisServer
from kvshelf.bench.zoo import FAMILIES, zoo_model_dir


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("zoo-redis")) as server:
        yield server.url


def test_the_zoo_is_built_offline_and_deterministically(tmp_path):
    first, second = zoo_model_dir("qwen3", tmp_path / "a"), zoo_model_dir("qwen3", tmp_path / "b")
    assert first.name == second.name  # named by the config's hash
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert sum(path.stat().st_size for path in first.iterdir()) < 24 * 2**20
    assert zoo_model_dir("qwen3", tmp_path / "a") == first  # built once


@pytest.mark.parametrize("family, kv_dtype", [("gemma3", "float32"), ("mistral", "fp8_e5m2"), ("qwen3", "bfloat16")])
def test_hits_are_exact_for_every_layout(family, kv_dtype, redis_url, tmp_path):
    (cell,) = run_matrix([family], [kv_dtype], tmp_path, redis_url)
    assert cell["outcome"] == "exact", cell
    hits = cell["hit_tokens"]
    assert hits["memory hit"] == hits["disk hit, new process"] == hits["redis hit, new engine"] == 192  # 3 chunks
    assert hits["partial hit"] == 128 and hits["long hit"] == 448  # 7 chunks, far past the window of 48
    assert hits["chunked prefill hit"] == 384  # each step saved what it completed
    assert (tmp_path / "compat.md").read_text().count("| exact |") == 1


def test_mla_on_the_reference_cpu_backend_is_refused_not_wrong(tmp_path):
    (cell,) = run_matrix(["deepseek_v2"], ["float32"], tmp_path)
    assert cell["outcome"] == "refused by kvshelf", cell
    assert "its prefill ignores cached context" in cell["detail"] and FAMILIES["deepseek_v2"].block_size == 16
