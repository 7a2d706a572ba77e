"""`kvshelf bench compare`: which set-ups get chunked prefill, and kvshelf's ratios against each other set-up."""

import pytest

from kvshelf.bench.compare import KVSHELF, Engine, server_specs, versus


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_every_set_up_but_example_connector_runs_chunked_prefill(tmp_path):
    engine = Engine(max_model_len=4256, kv_cache_tokens=4608, prefill_step_tokens=512)
    specs = {spec.name: spec for spec in server_specs(tmp_path, engine, lmcache_python="/lmcache/bin/python")}
    assert list(specs) == ["vllm", "vllm+ExampleConnector", "vllm+LMCache", KVSHELF]
    for name, spec in specs.items():
        chunked = name != "vllm+ExampleConnector"
        assert spec.chunked_prefill is chunked
        assert ("--enable-chunked-prefill" in spec.argv) is chunked
        assert ("--no-enable-chunked-prefill" in spec.argv) is not chunked
        assert option(spec.argv, "--max-num-batched-tokens") == ("512" if chunked else "4256")
        assert option(spec.argv, "--num-gpu-blocks-override") == "36"


def rounds(mean_ttft_s: float, after_first_s: float, requests_per_s: float) -> dict:
    return {"multi_round_qa": {"mean_ttft_s": mean_ttft_s, "mean_ttft_after_first_round_s": after_first_s,
                               "requests_per_s": requests_per_s}}


def test_versus_sets_kvshelf_against_every_other_set_up():
    results = {"vllm": rounds(12.0, 10.0, 0.2), "vllm+LMCache": rounds(4.0, 3.0, 0.5), KVSHELF: rounds(2.0, 1.0, 1.0)}
    assert versus(results, KVSHELF) == {
        "vllm": {"mean_ttft_speedup": 6.0, "mean_ttft_speedup_after_first_round": 10.0,
                 "throughput_ratio": pytest.approx(5.0)},
        "vllm+LMCache": {"mean_ttft_speedup": 2.0, "mean_ttft_speedup_after_first_round": 3.0,
                         "throughput_ratio": 2.0},
    }
