"""The HF engine treats a stored chunk that does not fit the model, or a shelf that raises, as a
miss from there on: it recomputes, and answers exactly as without kvshelf.

The model is a tiny randomly initialised Llama built here (no hub, no bundled weights): what is
tested is the engine's load path, which is the same for every full-attention model.
"""

import logging

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvshelf import Shelf, load_config
from kvshelf.integrations.hf import HFEngine
from kvshelf.tiers.memory import MemoryTier

CHUNK_SIZE = 8
VOCAB_SIZE = 64
PROMPT = list(range(3, 23))  # 20 tokens: two full chunks are usable, the rest is computed
MAX_NEW_TOKENS = 6
LOGITS_ATOL = 1e-4
SECRET = "a-test-deployment-secret-of-32-characters-or-more"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    vocab = {f"t{index}": index for index in range(VOCAB_SIZE)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")), eos_token="t2")
    return model, tokenizer


@pytest.fixture
def engine(model_and_tokenizer):
    shelf = Shelf(load_config(environ={}, chunk_size=CHUNK_SIZE, memory_size="1MiB", security_key=SECRET))
    yield HFEngine(*model_and_tokenizer, shelf, model_id="tiny-llama@test")
    shelf.close()


@pytest.fixture(scope="module")
def expected(model_and_tokenizer):
    """The answer without kvshelf."""
    return HFEngine(*model_and_tokenizer, None, model_id="tiny-llama@test").generate(PROMPT, MAX_NEW_TOKENS)


def assert_same_answer(result, expected) -> None:
    assert result.output_ids == expected.output_ids
    assert torch.allclose(result.first_logits, expected.first_logits, atol=LOGITS_ATOL)


def plant(engine: HFEngine, index: int, chunk: torch.Tensor) -> None:
    """Replace the stored chunk `index` of PROMPT in the memory tier, as a tier that let a bad
    chunk through would hand it to the engine."""
    key = engine.shelf.chunk_keys(PROMPT, engine.namespace())[index]
    engine.shelf._stack.memory.put_many([(key, chunk)])


def test_a_genuine_prefix_is_used(engine, expected):
    engine.generate(PROMPT, MAX_NEW_TOKENS)
    result = engine.generate(PROMPT, MAX_NEW_TOKENS)
    assert result.hit_tokens == 2 * CHUNK_SIZE
    assert_same_answer(result, expected)


WRONG_CHUNKS = {  # the model's chunks are (2, 2, 8, 2, 16) of float32
    "fewer layers": ((1, 2, CHUNK_SIZE, 2, 16), torch.float32),
    "fewer tokens": ((2, 2, CHUNK_SIZE - 1, 2, 16), torch.float32),
    "other kv heads": ((2, 2, CHUNK_SIZE, 1, 16), torch.float32),
    "other head_dim": ((2, 2, CHUNK_SIZE, 2, 8), torch.float32),
    "other dtype": ((2, 2, CHUNK_SIZE, 2, 16), torch.float16),
}


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("shape, dtype", WRONG_CHUNKS.values(), ids=WRONG_CHUNKS.keys())
def test_a_chunk_that_does_not_fit_is_a_miss_from_there_on(engine, expected, index, shape, dtype, caplog):
    engine.generate(PROMPT, MAX_NEW_TOKENS)
    plant(engine, index, torch.ones(shape, dtype=dtype))
    with caplog.at_level(logging.WARNING, logger="kvshelf.integrations.hf"):
        result = engine.generate(PROMPT, MAX_NEW_TOKENS)
    assert result.hit_tokens == index * CHUNK_SIZE
    assert_same_answer(result, expected)
    [record] = caplog.records
    assert f"stored chunk {index} is" in record.getMessage()


class FailingMemoryTier(MemoryTier):
    """A memory tier with a bug: every read and write raises what no caller expects."""

    def contains_prefix(self, keys):
        return len(keys)  # it claims to hold the prompt, then fails to read it

    def get_many(self, keys):
        raise RuntimeError("a bug deep in a tier")

    def put_many(self, items):
        raise RuntimeError("a bug deep in a tier")


def test_a_shelf_that_raises_is_a_miss_and_the_answer_stands(engine, expected, caplog):
    engine.shelf._stack.memory = FailingMemoryTier(2**20)
    with caplog.at_level(logging.WARNING, logger="kvshelf.integrations.hf"):
        result = engine.generate(PROMPT, MAX_NEW_TOKENS)
    assert result.hit_tokens == 0
    assert_same_answer(result, expected)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["kvshelf: loading a prefix failed (RuntimeError: a bug deep in a tier); recomputing it",
                        "kvshelf: saving the prompt's KV failed (RuntimeError: a bug deep in a tier); it is not stored"]
    assert all(record.exc_info is None for record in caplog.records)
