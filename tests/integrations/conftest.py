import pytest

from kvshelf.integrations.hf import HFEngine
from kvshelf.models import BUNDLED_MODEL_ID, load_bundled


@pytest.fixture(scope="session")
def bundled():
    """The real bundled model (converted once per machine), shared by every test."""
    return load_bundled()


@pytest.fixture(scope="session")
def reference(bundled):
    """The same engine without kvshelf: what every cached run must reproduce."""
    model, tokenizer = bundled
    return HFEngine(model, tokenizer, None, BUNDLED_MODEL_ID)


@pytest.fixture(scope="session")
def corpus_ids(bundled):
    from kvshelf.bench.documents import stdlib_corpus

    return bundled[1](stdlib_corpus()[:40_000], add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="session")
def vllm_alone():
    """vLLM without kvshelf, one engine for the session: `vllm_alone(requests)` -> results."""
    from tests.integrations.vllm_runner import ReferenceEngine

    engine = ReferenceEngine()
    yield engine.results
    engine.close()
