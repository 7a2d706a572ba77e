"""Background transfers inside real vLLM: requests aborted while their KV loads, and preempted
while it is saved, lose nothing and leak no blocks; every answer is vLLM's own.

One engine with kvshelf (a disk tier and a memory tier too small for a chunk, so every hit
loads from disk in the background) and one without, each driven step by step
(vllm_stepper.py) through the same phases on a KV cache small enough that four long requests
preempt each other. (`transfer.mode: sync` runs in tests/bench/test_stalls.py.)
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

STEPPER = Path(__file__).with_name("vllm_stepper.py")
CHUNK_SIZE = 128
# Blocks of 128 tokens: two 250-token prompts fill 4 of the 5 usable ones, and both need a third
# when their output crosses token 256, so one of them is preempted while the others wait.
NUM_BLOCKS = 6
LONG_OUTPUT = 12


def run_stepper(extra_config: dict | None, phases: list[dict]) -> dict:
    job = json.dumps({"extra_config": extra_config, "num_blocks": NUM_BLOCKS, "phases": phases})
    done = subprocess.run([sys.executable, str(STEPPER), job], capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def prompts(corpus_ids):
    return {"doc": corpus_ids[:300], **{f"p{i}": corpus_ids[1000 + 400 * i : 1250 + 400 * i] for i in range(4)}}


def phases(prompts: dict, abort: bool) -> list[dict]:
    doc = {"prompt_token_ids": prompts["doc"], "max_tokens": 8}
    longs = [{"prompt_token_ids": prompts[f"p{i}"], "max_tokens": LONG_OUTPUT} for i in range(4)]
    return [
        {"add": [{"id": "store-doc", **doc}]},
        *([{"add": [{"id": "aborted-doc", **doc}], "abort_when_loading": "aborted-doc"}] if abort else []),
        {"add": [{"id": "hit-doc", **doc}]},
        {"add": [{"id": f"miss-{i}", **request} for i, request in enumerate(longs)]},  # saved while preempted
        {"add": [{"id": f"hit-{i}", **request} for i, request in enumerate(longs)]},  # loaded while preempted
    ]


@pytest.fixture(scope="module")
def runs(prompts, tmp_path_factory):
    config = {"chunk_size": CHUNK_SIZE, "disk.path": str(tmp_path_factory.mktemp("async-disk")),
              "memory.size": "1MiB", "model_id": "smollm2-test"}
    return {
        "reference": run_stepper(None, phases(prompts, abort=False)),
        "async": run_stepper(config, phases(prompts, abort=True)),
    }


def test_every_answer_is_vllms_own(runs):
    reference, outputs = runs["reference"]["outputs"], runs["async"]["outputs"]
    assert "hit-doc" in outputs and outputs == {name: reference[name] for name in outputs}


@pytest.mark.parametrize("mode", ["async", "reference"])
def test_no_block_is_left_held_after_any_phase(runs, mode):
    for phase in runs[mode]["phases"]:
        assert phase["free_blocks"] == phase["initially_free"]


def test_the_scenario_really_aborts_during_a_load_and_preempts(runs):
    _, aborting, _, missing, hitting = runs["async"]["phases"]
    assert aborting["aborted"]
    assert "aborted-doc" not in runs["async"]["outputs"]
    assert missing["max_preemptions"] > 0 and hitting["max_preemptions"] > 0
