"""kvshelf inside real vLLM (CPU, float32, bundled model): hits give the tokens vLLM gives alone.

Each engine runs in its own process (vllm_runner.py); one module-wide scenario drives them: the
session's reference engine without kvshelf, engine A with kvshelf, then engine B, a fresh process
sharing only A's disk tier (A's memory tier is gone with A), and engine C, computing alone.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvshelf import load_config
from kvshelf.codecs import CODECS, CODECS_BY_ID, frame, unframe
from kvshelf.codecs.framing import Expected
from kvshelf.keys import Namespace, chunk_keys
from kvshelf.security import Keyring
from kvshelf.tiers.disk import chunk_path
from tests.integrations.vllm_runner import engine_results, run_engine, start_engine

CHUNK_SIZE = 128  # = vLLM's CPU block size, keeps prompts short
RUNNER = Path(__file__).with_name("vllm_runner.py")
KEYRING = Keyring.from_config(load_config().security)  # the engines' key: the same default key file


@pytest.fixture(scope="module")
def prompts(corpus_ids):
    document = corpus_ids[:300]  # 2 full chunks and a tail
    return {
        "doc": document,
        "doc_other_tail": document[:200] + corpus_ids[5000:5100],  # shares chunk 0 only
        "exact": corpus_ids[1000 : 1000 + 3 * CHUNK_SIZE],  # an exact multiple of chunk_size
        "damaged": corpus_ids[2000:2300],
        "damaged_longer": corpus_ids[2000:2500],  # the damaged prompt's 2 chunks, then 1 more
        "salted": corpus_ids[3000:3300],
    }


@pytest.fixture(scope="module")
def scenario(prompts, tmp_path_factory, vllm_alone):
    disk_path = tmp_path_factory.mktemp("vllm-disk")
    extra_config = {"chunk_size": CHUNK_SIZE, "disk.path": str(disk_path), "model_id": "smollm2-test"}
    # Engine C computes the damaged prompt from nothing, into a disk tier of its own; it and engine
    # A start while the reference answers (three engine starts at once: most of a start is one core's).
    clean_path = tmp_path_factory.mktemp("vllm-clean-disk")
    engine_c = start_engine(extra_config | {"disk.path": str(clean_path)},
                            [{"prompt_token_ids": prompts["damaged_longer"]}])
    engine_a = start_engine(extra_config, [
        {"prompt_token_ids": prompts["doc"]},
        {"prompt_token_ids": prompts["doc"]},
        {"prompt_token_ids": prompts["doc_other_tail"]},
        {"prompt_token_ids": prompts["exact"]},
        {"prompt_token_ids": prompts["exact"]},
        {"prompt_token_ids": prompts["damaged"]},
        {"prompt_token_ids": prompts["salted"], "cache_salt": "tenant-a"},
        {"prompt_token_ids": prompts["salted"], "cache_salt": "tenant-b"},
        {"prompt_token_ids": prompts["salted"], "cache_salt": "tenant-a"},
    ])
    reference = dict(zip(prompts, vllm_alone([{"prompt_token_ids": ids} for ids in prompts.values()])))
    results_a = engine_results(engine_a)
    # Chunk 0 of the damaged prompt gets a flipped byte. Chunk 1 is replaced by an authentic chunk
    # (framed with the deployment key, as a buggy or malicious key holder could) of the wrong shape:
    # one layer short, which once left another request's stale KV in the last layer's blocks.
    damaged_bytes = {}
    first, second = _keys_of(prompts["damaged"], disk_path)
    flipped = bytearray(chunk_path(disk_path, first).read_bytes())
    flipped[-50] ^= 0xFF
    layout = _namespace(disk_path).layout
    short = torch.zeros((layout.num_layers - 1, *layout.shape(CHUNK_SIZE)[1:]))
    for key, data in ((first, bytes(flipped)), (second, frame(short, second.digest, CODECS["raw"], KEYRING))):
        chunk_path(disk_path, key).write_bytes(data)
        damaged_bytes[chunk_path(disk_path, key)] = data
    engine_b = run_engine(extra_config, [
        {"prompt_token_ids": prompts["doc"]},
        {"prompt_token_ids": prompts["damaged_longer"]},  # loads fail: recomputed, and saved afresh
        {"prompt_token_ids": prompts["damaged_longer"]},
    ])
    engine_results(engine_c)
    return {"reference": reference, "a": results_a, "b": engine_b, "damaged_bytes": damaged_bytes,
            "disk_path": disk_path, "clean_path": clean_path}


def _namespace(disk_path: Path) -> Namespace:
    """The unsalted namespace engine A wrote, from its public description (namespace.json)."""
    (description,) = [json.loads(p.read_text()) for p in disk_path.glob("*/namespace.json")
                      if json.loads(p.read_text())["cache_salt_tag"] is None]
    description.pop("cache_salt_tag")
    return Namespace.from_description(description | {"cache_salt": None})


def _keys_of(token_ids: list[int], disk_path: Path):
    """Chunk keys of a prompt under the namespace engine A wrote."""
    return chunk_keys(token_ids, _namespace(disk_path), CHUNK_SIZE, keyring=KEYRING)


def test_same_prompt_twice_loads_the_prefix_and_matches_vllm_alone(scenario):
    first, second = scenario["a"][0], scenario["a"][1]
    assert first["num_cached_tokens"] == 0
    assert second["num_cached_tokens"] == 2 * CHUNK_SIZE
    assert first["output_ids"] == second["output_ids"] == scenario["reference"]["doc"]["output_ids"]


def test_partial_prefix(scenario):
    assert scenario["a"][2]["num_cached_tokens"] == CHUNK_SIZE
    assert scenario["a"][2]["output_ids"] == scenario["reference"]["doc_other_tail"]["output_ids"]


def test_exact_multiple_of_chunk_size_loads_all_but_the_last_token(scenario):
    assert scenario["a"][4]["num_cached_tokens"] == 3 * CHUNK_SIZE - 1
    assert scenario["a"][4]["output_ids"] == scenario["reference"]["exact"]["output_ids"]


def test_cache_salt_keeps_tenants_apart(scenario):
    tenant_a, tenant_b, tenant_a_again = scenario["a"][6:9]
    assert tenant_b["num_cached_tokens"] == 0
    assert tenant_a_again["num_cached_tokens"] == 2 * CHUNK_SIZE
    assert tenant_a_again["output_ids"] == tenant_b["output_ids"] == scenario["reference"]["salted"]["output_ids"]


def test_second_engine_process_hits_the_shared_disk_tier(scenario):
    assert scenario["b"][0]["num_cached_tokens"] == 2 * CHUNK_SIZE
    assert scenario["b"][0]["output_ids"] == scenario["reference"]["doc"]["output_ids"]


def test_damaged_stored_chunk_is_recomputed_then_stored_afresh(scenario, prompts):
    assert len(scenario["damaged_bytes"]) == 2
    expected = scenario["reference"]["damaged_longer"]["output_ids"]
    recomputed, reloaded = scenario["b"][1], scenario["b"][2]
    assert recomputed["output_ids"] == expected
    # The step that met the damage computed KV against blocks that never loaded; none of it was
    # kept. The recomputed prefill stored all three chunks, which now load and give the same tokens.
    assert reloaded["num_cached_tokens"] == 3 * CHUNK_SIZE
    assert reloaded["output_ids"] == expected
    for path, damaged in scenario["damaged_bytes"].items():
        assert path.read_bytes() != damaged
    # Every stored chunk of that prompt holds the KV a clean engine computes.
    keys = _keys_of(prompts["damaged_longer"], scenario["disk_path"])
    assert len(keys) == 3
    expected_shape = Expected(_namespace(scenario["disk_path"]).layout, CHUNK_SIZE)
    for key in keys:
        stored, clean = (unframe(chunk_path(scenario[path], key).read_bytes(), key.digest, KEYRING, CODECS_BY_ID,
                                 expected_shape) for path in ("disk_path", "clean_path"))
        assert torch.allclose(stored, clean, atol=1e-4)


def test_chunk_size_not_a_multiple_of_the_block_size_stops_the_engine_with_the_fix(tmp_path):
    job = json.dumps({"extra_config": {"chunk_size": 100, "disk.path": str(tmp_path)}, "requests": []})
    done = subprocess.run([sys.executable, str(RUNNER), job], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "chunk_size 100 is not a multiple of vLLM's block_size 128" in done.stderr
