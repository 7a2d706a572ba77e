"""Blend mode of the HF engine: segments reused wherever they stand, checked against full prefill."""

import pytest

from kvshelf import Shelf, load_config
from kvshelf.blend.engine import BlendSettings, split_prompt
from kvshelf.integrations.hf import HFEngine
from kvshelf.models import BUNDLED_MODEL_ID

MAX_NEW_TOKENS = 8


@pytest.fixture
def engine(bundled, tmp_path):
    model, tokenizer = bundled
    with Shelf(load_config(environ={}, chunk_size=32, disk_path=str(tmp_path / "disk"))) as shelf:
        yield HFEngine(model, tokenizer, shelf, BUNDLED_MODEL_ID)


@pytest.fixture(scope="module")
def documents(bundled, corpus_ids):
    decode = bundled[1].decode
    return [decode(corpus_ids[start : start + 120]) for start in (6000, 7000, 8000)]


def same_as_full_prefill(engine, reference, prompt, settings, result):
    expected = reference.generate(split_prompt(engine.tokenizer, prompt, settings).token_ids, MAX_NEW_TOKENS)
    return result.output_ids == expected.output_ids


def test_segments_stored_on_first_use_are_reused_in_another_order(engine, reference, documents):
    question = "Question: what is this about?\nAnswer:"
    settings = BlendSettings(recompute_ratio=1.0)
    first = engine.generate([*documents, question], MAX_NEW_TOKENS, blend=settings)
    assert first.blend.num_reused + first.blend.num_recomputed == 0 and first.blend.num_segments_stored == 3
    engine.shelf.flush()
    shuffled = [documents[2], documents[0], documents[1], question]
    again = engine.generate(shuffled, MAX_NEW_TOKENS, blend=settings)
    stats = again.blend
    assert stats.num_segments_stored == 0 and stats.num_recomputed > 0 and stats.num_reused == 0
    assert stats.num_recomputed + stats.num_fresh == again.num_prompt_tokens
    assert same_as_full_prefill(engine, reference, shuffled, settings, again)  # ratio 1: exact


def test_selective_recompute_reuses_most_tokens(engine, documents):
    question = "Question: what is this about?\nAnswer:"
    engine.generate([*documents, question], MAX_NEW_TOKENS, blend=BlendSettings())
    engine.shelf.flush()
    result = engine.generate([documents[1], documents[2], question], MAX_NEW_TOKENS, blend=BlendSettings())
    stats = result.blend
    assert stats.num_reused > 4 * stats.num_recomputed > 0  # 15% of the stored tokens recomputed
    assert stats.num_reused + stats.num_recomputed + stats.num_fresh == result.num_prompt_tokens


def test_one_segment_at_the_start_is_plain_prefix_reuse(engine, reference, documents):
    settings = BlendSettings(recompute_ratio=0.0)
    prompt = f"{documents[0]}{settings.separator}Question: what is this about?\nAnswer:"
    engine.generate(prompt, MAX_NEW_TOKENS, blend=settings)
    engine.shelf.flush()
    result = engine.generate(prompt, MAX_NEW_TOKENS, blend=settings)
    assert result.blend.num_reused > 0 and result.blend.num_recomputed == 0
    assert same_as_full_prefill(engine, reference, prompt, settings, result)


def test_a_prompt_without_separator_is_all_question(engine, reference):
    prompt = "What is the capital of France? Answer:"
    result = engine.generate(prompt, MAX_NEW_TOKENS, blend=BlendSettings())
    assert result.blend.num_fresh == result.num_prompt_tokens and result.hit_tokens == 0
    assert same_as_full_prefill(engine, reference, prompt, BlendSettings(), result)


def test_empty_segments_are_dropped_and_short_ones_computed(engine, documents):
    settings = BlendSettings(min_segment_tokens=32)
    sep = settings.separator
    layout = split_prompt(engine.tokenizer, f"{sep}{documents[0]}{sep}{sep} {sep}short{sep}Question?", settings)
    assert [start for start, _ in layout.segments] == [0]  # "short" is computed, never stored
    with pytest.raises(ValueError, match="the prompt is empty"):
        split_prompt(engine.tokenizer, sep + " " + sep, settings)


def test_a_prompt_longer_than_the_context_is_refused(engine, documents):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.generate([documents[0] * 200, "Question?"], MAX_NEW_TOKENS, blend=BlendSettings())


def test_bad_settings_say_what_is_wrong():
    with pytest.raises(ValueError, match="recompute_ratio"):
        BlendSettings(recompute_ratio=1.5)
