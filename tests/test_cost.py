"""Load or recompute: the prefix of held chunks worth loading, from measured reads and prefill steps."""

import pytest
from prometheus_client import generate_latest

from kvshelf.codecs import CODECS
from kvshelf.metrics import ShelfCounters, ShelfMetrics
from kvshelf.shelf.codec_choice import CodecChoice
from kvshelf.shelf.cost import MIN_MEASURED_TOKENS, REMEASURE_EVERY, LoadCostModel, num_attention_pairs

CHUNK_TOKENS = 100
CHUNK_BYTES = 10_000_000
PER_TOKEN_S = 0.001  # 100 ms a chunk, before attention


def tier_reading_at(bytes_per_s: float, decode_s: float = 0.0) -> CodecChoice:
    """A raw tier whose reads, as the stack reports them, ran at `bytes_per_s`, each chunk decoding in `decode_s`."""
    choice = CodecChoice.of("raw", None)
    choice.note_read(CHUNK_BYTES, CHUNK_BYTES / bytes_per_s)
    if decode_s:
        choice.note_decoded(CODECS["raw"].id, CHUNK_BYTES, decode_s)
    return choice


def model_with(tiers: dict[str, CodecChoice], per_pair_s: float = 0.0) -> tuple[LoadCostModel, ShelfCounters]:
    """A model that has seen prefill steps costing PER_TOKEN_S a token and `per_pair_s` an attended pair."""
    counters = ShelfCounters()
    model = LoadCostModel(tiers, counters)
    for start, num_tokens in ((0, 512), (512, 512), (1024, 256), (0, 128), (128, 1000)):
        pairs = num_attention_pairs(start, num_tokens)
        model.note_prefill(num_tokens, PER_TOKEN_S * num_tokens + per_pair_s * pairs, pairs)
    return model, counters


def test_attention_pairs_count_each_token_attending_to_itself_and_all_before():
    assert num_attention_pairs(0, 3) == 1 + 2 + 3
    assert num_attention_pairs(10, 2) == 11 + 12


def test_the_fit_recovers_both_rates_from_the_steps():
    model, _ = model_with({}, per_pair_s=2e-7)
    assert model.compute_rates() == pytest.approx((PER_TOKEN_S, 2e-7), rel=1e-6)


def test_steps_reported_without_pairs_give_a_per_token_rate():
    model = LoadCostModel({}, ShelfCounters())
    model.note_prefill(500, 0.5)
    model.note_prefill(200, 0.2)
    assert model.compute_rates() == pytest.approx((0.001, 0.0))


def test_no_rate_is_ever_negative():
    model = LoadCostModel({}, ShelfCounters())
    # Longer contexts measured faster (noise): the best non-negative fit charges per token only.
    model.note_prefill(200, 0.4, num_attention_pairs(0, 200))
    model.note_prefill(200, 0.2, num_attention_pairs(5000, 200))
    per_token_s, per_pair_s = model.compute_rates()
    assert per_token_s > 0 and per_pair_s == 0


def test_small_steps_are_left_out_as_their_time_is_mostly_fixed_cost():
    model = LoadCostModel({}, ShelfCounters())
    model.note_prefill(MIN_MEASURED_TOKENS - 1, 1.0)
    assert model.compute_rates() is None
    model.note_prefill(MIN_MEASURED_TOKENS, 0.1)
    assert model.compute_rates() == pytest.approx((0.1 / MIN_MEASURED_TOKENS, 0.0))


def test_before_any_prefill_is_measured_everything_held_is_loaded():
    model = LoadCostModel({"redis": tier_reading_at(1.0)}, ShelfCounters())  # 1 byte/s: hopeless
    assert model.worth_loading(["redis"] * 5, CHUNK_BYTES, CHUNK_TOKENS) == 5


def test_a_tier_not_read_yet_counts_as_free():
    model, counters = model_with({"disk": CodecChoice.of("raw", None)})
    assert model.worth_loading(["disk"] * 3, CHUNK_BYTES, CHUNK_TOKENS) == 3
    assert counters.load_refused_tokens == 0


def test_chunks_slower_to_load_than_to_compute_are_refused_and_counted():
    model, counters = model_with({"redis": tier_reading_at(CHUNK_BYTES / 0.5)})  # 500 ms a chunk, 100 to compute
    assert model.worth_loading(["redis"] * 4, CHUNK_BYTES, CHUNK_TOKENS) == 0
    assert counters.load_refused_tokens == 4 * CHUNK_TOKENS


def test_load_time_includes_the_codecs_decode_time():
    fast_read = tier_reading_at(CHUNK_BYTES / 0.01)  # 10 ms a chunk
    slow_decode = tier_reading_at(CHUNK_BYTES / 0.01, decode_s=0.2)
    model, _ = model_with({"disk": fast_read, "redis": slow_decode})
    assert model.load_s("redis", CHUNK_BYTES) == pytest.approx(0.21)
    assert model.worth_loading(["disk"] * 2, CHUNK_BYTES, CHUNK_TOKENS) == 2
    assert model.worth_loading(["redis"] * 2, CHUNK_BYTES, CHUNK_TOKENS) == 0


def test_memory_chunks_are_always_loaded_and_a_slow_chunk_only_with_what_repays_it():
    located = ["memory", "memory", "redis", "memory", "memory"]
    slow, _ = model_with({"redis": tier_reading_at(CHUNK_BYTES / 10.0)})  # 10 s: more than all the rest saves
    assert slow.worth_loading(located, CHUNK_BYTES, CHUNK_TOKENS) == 2
    repaid, _ = model_with({"redis": tier_reading_at(CHUNK_BYTES / 0.25)})  # 250 ms: the next two chunks repay it
    assert repaid.worth_loading(located, CHUNK_BYTES, CHUNK_TOKENS) == 5


def test_later_chunks_cost_more_to_compute_so_a_long_prefix_can_pay_where_a_short_one_does_not():
    located = ["disk"] * 8
    disk = tier_reading_at(CHUNK_BYTES / 0.15)  # 150 ms a chunk
    per_token_only, _ = model_with({"disk": disk})  # 100 ms a chunk wherever it stands
    assert per_token_only.worth_loading(located, CHUNK_BYTES, CHUNK_TOKENS) == 0
    # Attention: chunk i costs 110 ms + 2e-6 s x (its 100 tokens x 100 i positions before them), 20 ms more
    # per chunk: the first two lose 80 ms, all eight save 240 ms.
    with_attention, _ = model_with({"disk": disk}, per_pair_s=2e-6)
    assert with_attention.worth_loading(located[:2], CHUNK_BYTES, CHUNK_TOKENS) == 0
    assert with_attention.worth_loading(located, CHUNK_BYTES, CHUNK_TOKENS) == 8


def test_every_so_often_a_refused_tier_is_read_again_to_refresh_its_estimate():
    model, counters = model_with({"redis": tier_reading_at(CHUNK_BYTES / 1.0)})
    answers = [model.worth_loading(["redis"], CHUNK_BYTES, CHUNK_TOKENS) for _ in range(REMEASURE_EVERY)]
    assert answers == [0] * (REMEASURE_EVERY - 1) + [1]
    assert counters.load_refused_tokens == (REMEASURE_EVERY - 1) * CHUNK_TOKENS


def test_refused_tokens_are_in_stats_and_prometheus():
    counters = ShelfCounters(load_refused_tokens=300)
    metrics = ShelfMetrics(counters, [])
    assert metrics.snapshot()["load_refused_tokens"] == 300
    assert "kvshelf_load_refused_tokens_total 300.0" in generate_latest(metrics.registry).decode()
