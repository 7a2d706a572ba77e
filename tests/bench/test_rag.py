"""The RAG benchmark's prompts and scoring (the runs themselves are `kvshelf bench rag`)."""

import random

from kvshelf.bench.rag import Document, RagSpec, make_prompts, score


def test_gold_document_takes_every_place_and_is_asked_about():
    documents = [Document(f"text {index}", f"Name{index}", str(1000 + index)) for index in range(8)]
    spec = RagSpec(num_docs=4, num_prompts=8)
    prompts = make_prompts(documents, spec, random.Random(0))
    places = set()
    for segments, gold in prompts:
        assert len(segments) == 1 + spec.num_docs + 1  # instruction, documents, question
        assert gold.name in segments[-1] and len(set(segments[1:-1])) == spec.num_docs
        places.add(segments.index(gold.text) - 1)
    assert places == set(range(spec.num_docs))


def test_score_finds_the_number_and_weighs_extra_words():
    assert score(" 7311.\n\nMore text", "7311") == (True, 1.0)
    correct, f1 = score(" it is 7311 maybe", "7311")
    assert correct and 0 < f1 < 1
    assert score(" 7312.", "7311") == (False, 0.0)
