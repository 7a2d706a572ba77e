"""`kvshelf bench stalls`: its statistics from token arrival times, its summary, and one small run on vLLM."""

import json

import pytest

from kvshelf.bench.client import Completion
from kvshelf.bench.stalls import (
    PASSES,
    PassRecords,
    gaps_in_window,
    itl_stats,
    ratios,
    stalls_table,
    summarize_pass,
)
from kvshelf.cli import main

BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # the bundled model's float32 KV


def answer(token_times_s: list[float], ttft_s: float = 0.5, prompt_tokens: int = 600, cached_tokens: int = 512):
    return Completion("", ttft_s, token_times_s[-1], token_times_s, prompt_tokens, cached_tokens)


def test_itl_stats_counts_gaps_over_the_median_plus_the_margin_as_stalls():
    gaps_s = [0.02] * 98 + [0.5, 0.3]
    stats = itl_stats(gaps_s, stall_margin_s=0.1)
    assert stats["num_gaps"] == 100
    assert stats["itl_p50_ms"] == pytest.approx(20)
    assert stats["itl_p99_ms"] == pytest.approx(300)
    assert stats["itl_max_ms"] == pytest.approx(500)
    assert stats["max_over_p50_ms"] == pytest.approx(480)
    assert stats["stalls"] == 2
    assert itl_stats([0.02, 0.02, 0.02, 0.11, 0.13], stall_margin_s=0.1)["stalls"] == 1  # only past p50 + margin


def test_itl_stats_of_a_user_without_gaps_in_the_window():
    assert itl_stats([]) == {"num_gaps": 0, "itl_p50_ms": None, "itl_p99_ms": None, "itl_max_ms": None,
                             "max_over_p50_ms": None, "stalls": 0}


def test_gaps_in_window_keeps_gaps_ending_inside_it_and_never_spans_two_answers():
    first, second = answer([1.0, 1.1, 1.3]), answer([2.0, 2.5, 2.6])
    assert gaps_in_window([first, second], 1.05, 2.5) == pytest.approx([0.1, 0.2, 0.5])
    assert gaps_in_window([first, second], 0.0, 10.0) == pytest.approx([0.1, 0.2, 0.5, 0.1])
    assert gaps_in_window([first], 1.3, 2.0) == []


def test_summarize_pass_reports_the_worst_user_and_the_long_prompts():
    records = PassRecords(
        user_gaps_s=[[0.02] * 10 + [0.5], [0.03] * 11, []],
        long_answers=[answer([0.0], ttft_s=0.2), answer([0.0], ttft_s=0.4, cached_tokens=0)],
        window_s=4.0,
    )
    summary = summarize_pass(records, {"memory": 0.0, "disk": 2.0 * 2**20})
    assert [user["num_gaps"] for user in summary["users"]] == [11, 11, 0]
    assert summary["itl_max_ms"] == pytest.approx(500)
    assert summary["max_over_p50_ms"] == pytest.approx(480)
    assert summary["stalls"] == 1
    assert summary["ttft_mean_s"] == pytest.approx(0.3)
    assert summary["cached_tokens_mean"] == 256
    assert summary["prompt_tokens_mean"] == 600
    assert summary["requests_per_s"] == pytest.approx(0.5)
    assert summary["loaded_mib"] == {"memory": 0.0, "disk": 2.0}


def pass_summary(ttft_mean_s: float, itl_max_ms: float) -> dict:
    return {"itl_p99_ms": itl_max_ms, "itl_max_ms": itl_max_ms, "max_over_p50_ms": itl_max_ms - 20,
            "ttft_p50_s": ttft_mean_s, "ttft_mean_s": ttft_mean_s, "requests_per_s": 1.0, "stalls": 0,
            "users": [], "cached_tokens_mean": None, "prompt_tokens_mean": None, "loaded_mib": {}}


def test_ratios_set_async_against_sync_and_lower_tiers_against_memory():
    ttft_s = {"miss": 3.0, "memory": 0.2, "disk": 0.4, "redis": 0.5}
    modes = {
        "sync": {name: pass_summary(ttft_s[name], 300) for name in PASSES},
        "async": {name: pass_summary(ttft_s[name] / 2, 60) for name in PASSES},
    }
    table = ratios(modes)
    assert table["hit_ttft_over_memory"]["sync"] == pytest.approx({"disk": 2.0, "redis": 2.5})
    assert table["async_over_sync"]["disk"]["ttft_mean_s"] == pytest.approx(0.5)
    assert table["async_over_sync"]["redis"]["itl_max_ms"] == pytest.approx(0.2)
    assert "async_over_sync" not in ratios({"sync": modes["sync"]})
    assert "| async | redis |" in stalls_table({"modes": modes})


def test_bench_stalls_refuses_an_unknown_mode(capsys):
    assert main(["bench", "stalls", "--modes", "sync,fast"]) == 2
    assert "--modes takes sync and/or async" in capsys.readouterr().err


def test_a_quick_run_hits_each_pass_in_its_own_tier(tmp_path, monkeypatch):
    """Real vLLM + kvshelf (one mode: sync, the path the other vLLM tests do not take): every pass's long
    prompts hit exactly where the pass says (every hit claimed: load-or-recompute off, since its choice
    depends on measured speeds)."""
    monkeypatch.setenv("KVSHELF_TRANSFER_LOAD_OR_RECOMPUTE", "false")
    out = tmp_path / "out"
    assert main(["bench", "stalls", "--quick", "--modes", "sync", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    passes = summary["modes"]["sync"]
    assert list(passes) == list(PASSES)
    assert summary["page_cache_drop"] in ("drop_caches", "fadvise")
    assert summary["transfer"]["sync"]["mode"] == "sync"
    for result in passes.values():
        assert [user["num_gaps"] > 0 for user in result["users"]] == [True]
        assert result["ttft_mean_s"] > 0 and result["requests_per_s"] > 0
    hit_tokens = passes["memory"]["prompt_tokens_mean"] // 128 * 128
    assert passes["miss"]["cached_tokens_mean"] == 0
    expected_mib = summary["workload"]["num_docs"] * hit_tokens * BYTES_PER_TOKEN / 2**20
    for name, tier in (("memory", "memory"), ("disk", "disk"), ("redis", "redis")):
        assert passes[name]["cached_tokens_mean"] == hit_tokens
        loaded = passes[name]["loaded_mib"]
        assert loaded[tier] == pytest.approx(expected_mib, rel=1e-3)  # stored chunks carry a header and a tag
        assert all(not mib for other, mib in loaded.items() if other not in (tier, "memory"))
