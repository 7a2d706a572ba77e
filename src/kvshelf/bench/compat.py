"""The compatibility matrix: every zoo family x KV dtype x tier, run for real on vLLM.

    kvshelf bench compat [--families qwen2,gemma3] [--kv-dtypes float32,bfloat16,fp8_e4m3] [--out out/compat]

For each (family, KV dtype) it runs vLLM alone, then vLLM with kvshelf, on the same prompts, and
checks that greedy output is token-for-token the same: a full hit (from memory), a partial hit (a
prompt sharing only its first chunks), a prompt longer than the sliding window, and a hit from a
second engine that starts with an empty memory tier (from disk, then from Redis). Each cell runs
in a process of its own, its engines in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0), one
after another. What vLLM itself cannot run is recorded with its reason; what kvshelf refuses,
with kvshelf's message. It writes `compat.json` and `compat.md` (the README's table) and prints
the JSON summary.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvshelf.bench.zoo import FAMILIES, VOCAB_SIZE, zoo_model_dir

CHUNK_SIZE = 64  # a multiple of every family's block size
CHUNKED_PREFILL_TOKENS = 96  # a step's token budget in the second process: prefills take several steps
MAX_NEW_TOKENS = 8
RESULT = "COMPAT-CELL "  # the line a cell process ends with
PHASES = ("first", "second")
KV_DTYPES = {  # name in the table -> (vLLM dtype, kv_cache_dtype)
    "float32": ("float32", "auto"),
    "bfloat16": ("bfloat16", "auto"),
    "fp8_e4m3": ("float32", "fp8_e4m3"),
    "fp8_e5m2": ("float32", "fp8_e5m2"),
}


@dataclass
class Cell:
    family: str
    kv_dtype: str
    outcome: str = "not run"  # exact | WRONG | refused by vLLM | refused by kvshelf | error
    detail: str = ""
    checks: dict[str, bool] = field(default_factory=dict)  # check -> greedy output identical
    hit_tokens: dict[str, int] = field(default_factory=dict)  # check -> prompt tokens kvshelf supplied
    kv_bytes_per_token: int = 0  # one token's stored KV, every layer
    seconds: float = 0.0


def prompts(seed: int = 7) -> dict[str, list[int]]:
    """Prompts of token ids (a random-weight model reads any ids): `full` of 3 chunks and a bit,
    `partial` sharing its first 2 chunks, `long` past the sliding window several times over,
    `fresh` as long and sharing nothing."""
    rng = random.Random(seed)
    ids = [rng.randrange(3, VOCAB_SIZE) for _ in range(8 * CHUNK_SIZE)]
    partial = ids[: 2 * CHUNK_SIZE] + [rng.randrange(3, VOCAB_SIZE) for _ in range(CHUNK_SIZE + 9)]
    fresh = [rng.randrange(3, VOCAB_SIZE) for _ in range(6 * CHUNK_SIZE + 17)]
    return {"full": ids[: 3 * CHUNK_SIZE + 9], "partial": partial, "long": ids[: 7 * CHUNK_SIZE + 5], "fresh": fresh}


def run_cell(family: str, kv_dtype: str, work_dir: Path, redis_url: str | None, phase: str) -> Cell:
    """One phase of one (family, KV dtype), each in a process of its own. `first`: vLLM alone,
    then kvshelf's hits from memory; `second`: hits from disk and Redis in engines of a new
    process, and the outcome. What a phase learned is kept in `work_dir` for the next."""
    state_path = work_dir / f"{family}-{kv_dtype}.json"
    if phase == "first":
        cell, expected = Cell(family, kv_dtype), {}
    else:
        state = json.loads(state_path.read_text())
        cell, expected = Cell(**state["cell"]), state["expected"]
    started_s = time.monotonic()
    try:
        _run_phase(cell, expected, phase, work_dir, redis_url)
    except Exception as exc:  # noqa: BLE001 - a matrix records what failed and goes on
        message = f"{type(exc).__name__}: {exc}".strip()
        cell.outcome = "refused by kvshelf" if "kvshelf" in message else "error"
        cell.detail = message.splitlines()[0][:300] if message else traceback.format_exc(limit=1)
    cell.seconds = round(cell.seconds + time.monotonic() - started_s, 1)
    state_path.write_text(json.dumps({"cell": asdict(cell), "expected": expected}))
    return cell


def _run_phase(cell: Cell, expected: dict, phase: str, work_dir: Path, redis_url: str | None) -> None:
    test_prompts = prompts()
    if phase == "first":
        try:
            with _engine(cell.family, cell.kv_dtype, None) as llm:
                expected.update({name: _generate(llm, ids)[0] for name, ids in test_prompts.items()})
        except Exception as exc:  # noqa: BLE001 - vLLM cannot run it: record why
            cell.outcome, cell.detail = "refused by vLLM", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            return
        if len({tuple(output) for output in expected.values()}) < len(expected):
            raise RuntimeError("vLLM alone answers different prompts alike: the checkpoint is degenerate (weights "
                               "vLLM left unloaded?), so its outputs cannot tell right KV from wrong")
    shelf_config = {"chunk_size": CHUNK_SIZE, "disk.path": str(work_dir / f"{cell.family}-{cell.kv_dtype}-disk"),
                    "model_id": f"zoo-{cell.family}", "redis.url": redis_url}
    # (engine config, engine options, [(check, prompt)]), one engine after another: each starts
    # with an empty memory tier.
    engines: list[tuple[dict, dict, list[tuple[str, str]]]] = [
        (shelf_config, {}, [("cold", "full"), ("memory hit", "full"), ("partial hit", "partial"),
                            ("long cold", "long"), ("long hit", "long")]),
    ]
    if phase == "second":
        # A prefill in steps of CHUNKED_PREFILL_TOKENS: each step saves what it completed.
        engines = [({**shelf_config, "redis.url": None}, {"max_num_batched_tokens": CHUNKED_PREFILL_TOKENS},
                    [("disk hit, new process", "full"), ("chunked prefill cold", "fresh"),
                     ("chunked prefill hit", "fresh")])]
        if redis_url:
            engines.append(({**shelf_config, "disk.path": None}, {}, [("redis hit, new engine", "full")]))
    for config, options, runs in engines:
        with _engine(cell.family, cell.kv_dtype, config, **options) as llm:
            for check, prompt_name in runs:
                output, cached = _generate(llm, test_prompts[prompt_name])
                cell.checks[check] = output == expected[prompt_name]
                cell.hit_tokens[check] = cached
            cell.kv_bytes_per_token = _kv_layout().bytes_per_token
    if phase == "first":
        cell.outcome = "pending"
        return
    hits_expected = [check for check in cell.checks if "hit" in check]
    if not all(cell.checks.values()):
        cell.outcome = "WRONG"
        cell.detail = "output differs from vLLM alone: " + ", ".join(c for c, ok in cell.checks.items() if not ok)
    elif not all(cell.hit_tokens[check] for check in hits_expected):
        cell.outcome = "no hit"
        cell.detail = "no KV loaded in: " + ", ".join(c for c in hits_expected if not cell.hit_tokens[c])
    else:
        cell.outcome = "exact"


@contextlib.contextmanager
def _engine(family: str, kv_dtype: str, shelf_config: dict | None, **options: Any) -> Iterator[Any]:
    """A vLLM engine in this process (with kvshelf if `shelf_config`), shut down on exit."""
    from vllm import LLM

    dtype, cache_dtype = KV_DTYPES[kv_dtype]
    transfer_config = None
    if shelf_config is not None:
        transfer_config = {"kv_connector": "KVShelfConnector", "kv_connector_module_path": "kvshelf.integrations.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {k: v for k, v in shelf_config.items() if v is not None}}
    llm = LLM(model=str(zoo_model_dir(family)), dtype=dtype, kv_cache_dtype=cache_dtype, enforce_eager=True,
              max_model_len=1024, block_size=FAMILIES[family].block_size, enable_prefix_caching=False,
              kv_transfer_config=transfer_config, seed=0, **options)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def _generate(llm: Any, prompt_ids: list[int]) -> tuple[list[int], int]:
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": prompt_ids}], SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0),
                       use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), out.num_cached_tokens or 0


def _kv_layout() -> Any:
    """The running engine's kvshelf layout (its worker-side connector lives in this process)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group().kv_layout


def run_matrix(families: list[str], kv_dtypes: list[str], out_dir: Path, redis_url: str | None = None) -> list[dict]:
    """Every cell in its own process (an engine that fails to start leaves a process unfit for the
    next); writes compat.json and compat.md under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = []
    with tempfile.TemporaryDirectory(prefix="kvshelf-compat-") as work:
        for family in families:
            for kv_dtype in kv_dtypes:
                for phase in PHASES:
                    cell = _run_phase_process(family, kv_dtype, work, redis_url, phase)
                    if cell["outcome"] != "pending":
                        break
                print(json.dumps(cell), file=sys.stderr, flush=True)
                cells.append(cell)
    (out_dir / "compat.json").write_text(json.dumps(cells, indent=2) + "\n")
    (out_dir / "compat.md").write_text(markdown_table(cells))
    return cells


def _run_phase_process(family: str, kv_dtype: str, work: str, redis_url: str | None, phase: str) -> dict:
    argv = [sys.executable, "-m", "kvshelf.bench.compat", family, kv_dtype, work, phase]
    argv += [redis_url] if redis_url else []
    done = subprocess.run(argv, capture_output=True, text=True, env=_cell_env())
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if lines:
        return json.loads(lines[-1][len(RESULT):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return asdict(Cell(family, kv_dtype, "error", f"{phase} phase: exit {done.returncode}: {tail[:300]}"))


def _cell_env() -> dict[str, str]:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def markdown_table(cells: list[dict]) -> str:
    """The README's compatibility table."""
    rows = ["| family | KV layout | KV dtype | result | KV bytes/token | checks | why |",
            "|---|---|---|---|---|---|---|"]
    for cell in cells:
        family = FAMILIES[cell["family"]]
        passed = sum(cell["checks"].values())
        checks = f"{passed}/{len(cell['checks'])}" if cell["checks"] else ""
        detail = cell["detail"].replace("|", "/")
        rows.append(f"| {family.name} ({family.architecture}) | {family.layout} | {cell['kv_dtype']} | "
                    f"{cell['outcome']} | {cell['kv_bytes_per_token'] or ''} | {checks} | {detail} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    # One phase of one cell: FAMILY KV_DTYPE WORK_DIR PHASE [REDIS_URL]; vLLM runs in this process.
    family, kv_dtype, work_dir, phase = sys.argv[1:5]
    cell = run_cell(family, kv_dtype, Path(work_dir), sys.argv[5] if len(sys.argv) > 5 else None, phase)
    print(RESULT + json.dumps(asdict(cell)), flush=True)
