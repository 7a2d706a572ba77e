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
import importlib
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

from kvshelf.bench.zoo import FAMILIES, IMAGE_SIZE, IMAGE_TOKEN_ID, VOCAB_SIZE, zoo_model_dir

CHUNK_SIZE = 64  # a multiple of every family's block size
IMAGE_AT = CHUNK_SIZE + 6  # where an image goes: in the second chunk, the first one text alone
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
    outcome: str = "not run"  # pending (after the first phase), exact, WRONG, no hit, refused by vLLM or kvshelf, error
    detail: str = ""
    checks: dict[str, bool] = field(default_factory=dict)  # check -> greedy output identical
    hit_tokens: dict[str, int] = field(default_factory=dict)  # check -> prompt tokens kvshelf supplied
    kv_bytes_per_token: int = 0  # one token's KV, every layer
    stored_bytes_per_token: int = 0  # ... as stored (sliding-window layers keep only their window)
    seconds: float = 0.0


def prompts(images: bool = False, seed: int = 7) -> dict[str, dict]:
    """vLLM prompts of token ids (a random-weight model reads any ids): `full` of 3 chunks and a
    bit, `partial` sharing its first 2 chunks, `long` past the sliding window several times over,
    `fresh` as long and sharing nothing. With `images`, each has image "a" in its second chunk
    (IMAGE_AT), and `other image` is `full` with image "b" there."""
    rng = random.Random(seed)
    ids = [rng.randrange(3, VOCAB_SIZE) for _ in range(8 * CHUNK_SIZE)]
    partial = ids[: 2 * CHUNK_SIZE] + [rng.randrange(3, VOCAB_SIZE) for _ in range(CHUNK_SIZE + 9)]
    fresh = [rng.randrange(3, VOCAB_SIZE) for _ in range(6 * CHUNK_SIZE + 17)]
    texts = {"full": ids[: 3 * CHUNK_SIZE + 9], "partial": partial, "long": ids[: 7 * CHUNK_SIZE + 5], "fresh": fresh}
    if not images:
        return {name: {"prompt_token_ids": token_ids} for name, token_ids in texts.items()}
    texts["other image"] = texts["full"]
    return {name: {"prompt_token_ids": token_ids[:IMAGE_AT] + [IMAGE_TOKEN_ID] + token_ids[IMAGE_AT:],
                   "multi_modal_data": {"image": sample_image("b" if name == "other image" else "a")}}
            for name, token_ids in texts.items()}


def sample_image(name: str) -> Any:
    """A small picture (`a` or `b`), the same on every run."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    shift = {"a": 0, "b": 97}[name]
    pixels = np.stack([(x * 4 + shift) % 256, (y * 4 + 2 * shift) % 256, ((x + y) * 2 + shift) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


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
    test_prompts = prompts(FAMILIES[cell.family].images)
    if phase == "first":
        try:
            with _engine(cell.family, cell.kv_dtype, None) as llm:
                expected.update({name: _generate(llm, prompt)[0] for name, prompt in test_prompts.items()})
        except Exception as exc:  # noqa: BLE001 - vLLM cannot run it: record why
            cell.outcome, cell.detail = "refused by vLLM", _vllm_refusal(cell.family, exc)
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
    if "other image" in test_prompts:  # same text, another image: only the chunk before the image may hit
        engines[0][2].append(("other image", "other image"))
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
            layout = _kv_layout()
            cell.kv_bytes_per_token = layout.bytes_per_token
            cell.stored_bytes_per_token = layout.stored_bytes(CHUNK_SIZE) // CHUNK_SIZE
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


def _vllm_refusal(family: str, exc: Exception) -> str:
    """Why vLLM could not start `family`: the import error behind its "failed to be inspected"
    (raised in a subprocess, so not chained), else `exc` itself."""
    from vllm.model_executor.models.registry import ModelRegistry

    model = ModelRegistry.models.get(FAMILIES[family].architecture)
    try:
        if model is not None and hasattr(model, "module_name"):
            importlib.import_module(model.module_name)
    except Exception as import_error:  # noqa: BLE001 - this is the reason to report
        exc = import_error
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


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


def _generate(llm: Any, prompt: dict) -> tuple[list[int], int]:
    from vllm import SamplingParams

    out = llm.generate([prompt], SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0), use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), out.num_cached_tokens or 0


def _kv_layout() -> Any:
    """The running engine's kvshelf layout (its worker-side connector lives in this process)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group().kv_layout


def run_matrix(cells: list[tuple[str, str]], out_dir: Path, redis_url: str | None = None,
               together: bool = False) -> list[dict]:
    """The (family, KV dtype) `cells`, each phase of each in a process of its own: an engine that
    fails to start leaves a process unfit for the next. `together`: each phase of every cell in
    one process, for cells expected to run (a test), which saves a vLLM import per cell and
    phase. Writes compat.json and compat.md under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="kvshelf-compat-") as work:
        groups = [cells] if together else [[cell] for cell in cells]
        for group in groups:
            for phase in PHASES:
                pending = [cell for cell in group if results.get(cell, {}).get("outcome", "pending") == "pending"]
                if pending:
                    results.update(_run_phase_process(pending, work, redis_url, phase))
            for cell in group:
                print(json.dumps(results[cell]), file=sys.stderr, flush=True)
    ordered = [results[cell] for cell in cells]
    (out_dir / "compat.json").write_text(json.dumps(ordered, indent=2) + "\n")
    (out_dir / "compat.md").write_text(markdown_table(ordered))
    return ordered


def _run_phase_process(cells: list[tuple[str, str]], work: str, redis_url: str | None,
                       phase: str) -> dict[tuple[str, str], dict]:
    argv = [sys.executable, "-m", "kvshelf.bench.compat", ",".join(f"{f}:{d}" for f, d in cells), work, phase]
    argv += [redis_url] if redis_url else []
    done = subprocess.run(argv, capture_output=True, text=True, env=_cell_env())
    found = {}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT):])
            found[(result["family"], result["kv_dtype"])] = result
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    failed = f"{phase} phase: exit {done.returncode}: {tail[:300]}"
    return {cell: found.get(cell) or asdict(Cell(*cell, "error", failed)) for cell in cells}


def _cell_env() -> dict[str, str]:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def markdown_table(cells: list[dict]) -> str:
    """The README's compatibility table."""
    rows = ["| family | KV layout | KV dtype | result | KV bytes/token stored (of) | checks | why |",
            "|---|---|---|---|---|---|---|"]
    for cell in cells:
        family = FAMILIES[cell["family"]]
        passed = sum(cell["checks"].values())
        checks = f"{passed}/{len(cell['checks'])}" if cell["checks"] else ""
        detail = cell["detail"].replace("|", "/")
        stored, full = cell.get("stored_bytes_per_token", 0), cell["kv_bytes_per_token"]
        size = "" if not full else f"{stored} ({full})" if stored != full else str(full)
        rows.append(f"| {family.name} ({family.architecture}) | {family.layout} | {cell['kv_dtype']} | "
                    f"{cell['outcome']} | {size} | {checks} | {detail} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    # One phase of some cells: FAMILY:KV_DTYPE,... WORK_DIR PHASE [REDIS_URL]; vLLM runs in this process.
    cells, work_dir, phase = sys.argv[1:4]
    for family, kv_dtype in (cell.split(":") for cell in cells.split(",")):
        cell = run_cell(family, kv_dtype, Path(work_dir), sys.argv[4] if len(sys.argv) > 4 else None, phase)
        print(RESULT + json.dumps(asdict(cell)), flush=True)
