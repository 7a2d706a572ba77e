"""`kvshelf bench redis`, run end to end at a tiny size (no vLLM): its summary and table."""

import json
import statistics

import pytest

from kvshelf.bench.redis_bench import BENCH_SECRET, OPS, SECURITY_MODES, security_overrides
from kvshelf.cli import main
from kvshelf.config import load_config


@pytest.mark.parametrize(
    "mode, keyed, encrypt", [("off", False, False), ("mac", True, False), ("mac+encrypt", True, True)]
)
def test_each_security_mode_configures_the_shelf_it_names(mode, keyed, encrypt):
    security = load_config(environ={}, **security_overrides(mode)).security
    assert security.disabled is not keyed
    assert security.key == (BENCH_SECRET if keyed else None)
    assert security.encrypt is encrypt


def test_bench_redis_reports_security_cost_side_by_side(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["bench", "redis", "--num-chunks", "2", "--chunk-tokens", "4", "--repeats", "1", "--num-docs", "0",
            "--security-chunks", "2", "--security-chunk-tokens", "4", "--security-rounds", "2", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["throughput_mb_s"]) == {"single", "cluster"}
    security = summary["security"]
    assert (security["num_chunks"], security["chunk_tokens"], security["rounds"]) == (2, 4, 2)
    assert security["chunk_bytes"] == 30 * 2 * 4 * 3 * 64 * 4
    assert set(security["mb_s"]) == {"disk", "redis"}
    for tier, by_mode in security["mb_s"].items():
        assert list(by_mode) == list(SECURITY_MODES)
        assert all(by_mode[mode][op] > 0 for mode in SECURITY_MODES for op in OPS)
        for op in OPS:
            rounds = security["vs_off_rounds"][tier][op]
            assert list(rounds) == ["mac", "mac+encrypt"] and all(len(ratios) == 2 for ratios in rounds.values())
            assert security["vs_off"][tier][op] == {mode: statistics.median(ratios) for mode, ratios in rounds.items()}
    assert set(security["cpu_per_chunk"]) == {"checksum_off", "mac", "seal", "open"}
    table = capsys.readouterr().out
    for tier in ("disk", "redis"):
        for mode in SECURITY_MODES:
            assert sum(line.split()[:2] == [tier, mode] for line in table.splitlines()) == 1
