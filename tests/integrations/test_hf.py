"""The HF engine with kvshelf gives the same tokens as without it, whatever the cache holds."""

import json
import subprocess
import sys

import pytest
import torch

from kvshelf import Shelf, load_config
from kvshelf.codecs import CODECS_BY_ID, unframe
from kvshelf.codecs.framing import Expected
from kvshelf.integrations.hf import HFEngine
from kvshelf.models import BUNDLED_MODEL_ID
from kvshelf.tiers.disk import chunk_path

CHUNK_SIZE = 64
MAX_NEW_TOKENS = 12
LOGITS_ATOL = 1e-3


@pytest.fixture
def shelf(tmp_path):
    with Shelf(load_config(environ={}, chunk_size=CHUNK_SIZE, disk_path=str(tmp_path / "disk"))) as shelf:
        yield shelf


@pytest.fixture
def engine(bundled, shelf):
    model, tokenizer = bundled
    return HFEngine(model, tokenizer, shelf, BUNDLED_MODEL_ID)


@pytest.fixture
def question_ids(bundled):
    def ids(text: str) -> list[int]:
        return bundled[1](f"\n\nQuestion: {text}\nAnswer:", add_special_tokens=False)["input_ids"]

    return ids


def assert_same_as_reference(result, reference, prompt):
    expected = reference.generate(prompt, MAX_NEW_TOKENS)
    assert result.output_ids == expected.output_ids
    assert torch.allclose(result.first_logits, expected.first_logits, atol=LOGITS_ATOL)


def test_full_prefix_hit(engine, reference, corpus_ids, question_ids):
    prompt = corpus_ids[:200] + question_ids("What is this about?")
    first = engine.generate(prompt, MAX_NEW_TOKENS)
    engine.shelf.flush()
    second = engine.generate(prompt, MAX_NEW_TOKENS)
    assert first.hit_tokens == 0
    assert second.hit_tokens == len(prompt) // CHUNK_SIZE * CHUNK_SIZE
    assert second.output_ids == first.output_ids
    assert_same_as_reference(second, reference, prompt)


def test_partial_prefix_same_document_other_question(engine, reference, corpus_ids, question_ids):
    document = corpus_ids[1000:1250]  # 3 full chunks; the 4th holds the document's end and the question
    first_prompt = document + question_ids("Summarize the text.")
    engine.generate(first_prompt, MAX_NEW_TOKENS)
    assert engine.shelf.lookup(first_prompt, engine.namespace()) == 4 * CHUNK_SIZE
    prompt = document + question_ids("Name one function mentioned above.")
    result = engine.generate(prompt, MAX_NEW_TOKENS)
    assert result.hit_tokens == 3 * CHUNK_SIZE
    assert_same_as_reference(result, reference, prompt)


def test_prompt_an_exact_multiple_of_chunk_size(engine, reference, corpus_ids):
    prompt = corpus_ids[2000 : 2000 + 4 * CHUNK_SIZE]
    engine.generate(prompt, MAX_NEW_TOKENS)
    result = engine.generate(prompt, MAX_NEW_TOKENS)
    # All 4 chunks are stored, but the last one is recomputed: its last token's logits are needed.
    assert engine.shelf.lookup(prompt, engine.namespace()) == 4 * CHUNK_SIZE
    assert result.hit_tokens == 3 * CHUNK_SIZE
    assert_same_as_reference(result, reference, prompt)


def test_prompt_shorter_than_one_chunk(engine, reference, corpus_ids):
    prompt = corpus_ids[3000 : 3000 + CHUNK_SIZE - 5]
    engine.generate(prompt, MAX_NEW_TOKENS)
    result = engine.generate(prompt, MAX_NEW_TOKENS)
    assert result.hit_tokens == 0
    assert engine.shelf.stats()["tiers"]["memory"]["used_bytes"] == 0
    assert_same_as_reference(result, reference, prompt)


def test_text_and_chat_prompts(engine, reference, corpus_ids, bundled):
    document = bundled[1].decode(corpus_ids[4000:4200])
    messages = [{"role": "user", "content": document + "\n\nWhat is this about?"}]
    engine.generate(messages, MAX_NEW_TOKENS)
    result = engine.generate(messages, MAX_NEW_TOKENS)
    assert result.hit_tokens >= 2 * CHUNK_SIZE
    assert_same_as_reference(result, reference, messages)
    assert result.text == reference.generate(messages, MAX_NEW_TOKENS).text != ""
    assert engine.prompt_ids(document)[:10] == bundled[1](document)["input_ids"][:10]


def test_cache_salt_keeps_tenants_apart(engine, corpus_ids):
    prompt = corpus_ids[5000:5200]
    engine.generate(prompt, 2, cache_salt="tenant-a")
    assert engine.generate(prompt, 2, cache_salt="tenant-b").hit_tokens == 0
    assert engine.generate(prompt, 2, cache_salt="tenant-a").hit_tokens > 0


def test_damaged_disk_chunk_means_recompute_not_wrong_output(bundled, tmp_path, reference, corpus_ids):
    model, tokenizer = bundled
    config = load_config(environ={}, chunk_size=CHUNK_SIZE, disk_path=str(tmp_path / "disk"))
    prompt = corpus_ids[6000:6250]
    with Shelf(config) as writer:
        HFEngine(model, tokenizer, writer, BUNDLED_MODEL_ID).generate(prompt, 2)
    engine_namespace = HFEngine(model, tokenizer, None, BUNDLED_MODEL_ID).namespace()
    with Shelf(config) as keys_of:
        key = keys_of.chunk_keys(prompt, engine_namespace)[1]
        keyring = keys_of.keyring
    damaged = chunk_path(config.disk.path, key)
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside the KV payload
    damaged.write_bytes(data)
    with Shelf(config) as reader:
        result = HFEngine(model, tokenizer, reader, BUNDLED_MODEL_ID).generate(prompt, MAX_NEW_TOKENS)
        assert result.hit_tokens == CHUNK_SIZE  # chunk 0 only
        assert reader.stats()["tiers"]["disk"]["corrupt_chunks"] == 1
    # The damaged file was removed, and the recompute stored a good copy in its place.
    assert damaged.read_bytes() != data
    unframe(damaged.read_bytes(), key.digest, keyring, CODECS_BY_ID, Expected(engine_namespace.layout, CHUNK_SIZE))
    assert_same_as_reference(result, reference, prompt)


def test_new_process_hits_what_an_earlier_one_wrote(bundled, tmp_path, reference, corpus_ids):
    model, tokenizer = bundled
    disk_path = tmp_path / "disk"
    prompt = corpus_ids[7000:7200]
    with Shelf(load_config(environ={}, chunk_size=CHUNK_SIZE, disk_path=str(disk_path))) as shelf:
        HFEngine(model, tokenizer, shelf, BUNDLED_MODEL_ID).generate(prompt, 2)
    script = """
import json, sys
from kvshelf import Shelf, load_config
from kvshelf.codecs import CODECS_BY_ID, unframe
from kvshelf.integrations.hf import HFEngine
from kvshelf.models import BUNDLED_MODEL_ID, load_bundled
model, tokenizer = load_bundled()
prompt = json.loads(sys.argv[2])
with Shelf(load_config(environ={}, chunk_size=64, disk_path=sys.argv[1])) as shelf:
    result = HFEngine(model, tokenizer, shelf, BUNDLED_MODEL_ID).generate(prompt, 12)
    print(json.dumps({"hit_tokens": result.hit_tokens, "output_ids": result.output_ids,
                      "disk_loaded_bytes": shelf.stats()["tiers"]["disk"]["loaded_bytes"]}))
"""
    child = subprocess.run(
        [sys.executable, "-c", script, str(disk_path), json.dumps(prompt)], capture_output=True, text=True, check=True
    )
    outcome = json.loads(child.stdout.strip().splitlines()[-1])
    assert outcome["hit_tokens"] == 3 * CHUNK_SIZE
    assert outcome["disk_loaded_bytes"] > 0
    assert outcome["output_ids"] == reference.generate(prompt, MAX_NEW_TOKENS).output_ids


def test_sampling_is_reproducible_with_a_seed(engine, corpus_ids):
    prompt = corpus_ids[8000:8150]
    first = engine.generate(prompt, MAX_NEW_TOKENS, temperature=0.8, top_p=0.9, seed=7)
    second = engine.generate(prompt, MAX_NEW_TOKENS, temperature=0.8, top_p=0.9, seed=7)
    assert second.hit_tokens > 0 and second.output_ids == first.output_ids


def test_empty_or_too_long_prompt_is_refused(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate([], 4)
    with pytest.raises(ValueError, match="exceeds the model's context of 8192"):
        engine.generate([1] * 8190, 4)


@pytest.mark.parametrize("codec", ["int8", "kivi2", "cachegen"])
def test_engine_reads_chunks_a_lossy_codec_wrote(bundled, reference, corpus_ids, question_ids, tmp_path, codec):
    """Lossy KV is not exact KV: the engine must run on it; how close it comes is `kvshelf bench codecs`."""
    model, tokenizer = bundled
    prompt = corpus_ids[3000:3200] + question_ids("What is this about?")
    config = load_config(environ={}, chunk_size=CHUNK_SIZE, disk_path=str(tmp_path / "disk"), disk_codec=codec)
    with Shelf(config) as writer:
        HFEngine(model, tokenizer, writer, BUNDLED_MODEL_ID).generate(prompt, MAX_NEW_TOKENS)
    with Shelf(config) as reader:  # a fresh memory tier: the prefix comes from the disk tier, decoded
        result = HFEngine(model, tokenizer, reader, BUNDLED_MODEL_ID).generate(prompt, MAX_NEW_TOKENS)
        assert result.hit_tokens == len(prompt) // CHUNK_SIZE * CHUNK_SIZE
        assert reader.stats()["tiers"]["disk"]["loaded_bytes"] > 0
    expected = reference.generate(prompt, MAX_NEW_TOKENS)
    assert len(result.output_ids) == MAX_NEW_TOKENS
    if codec == "int8":  # 8 bits per value keeps greedy decoding of this prompt on the exact path
        assert result.output_ids == expected.output_ids
