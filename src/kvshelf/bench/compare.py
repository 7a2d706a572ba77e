"""`kvshelf bench compare`: the same serving workloads against several vLLM set-ups, one run.

Every set-up gets the same small KV space (`--num-gpu-blocks-override`; VLLM_CPU_KVCACHE_SPACE
only takes whole GiB), smaller than the workloads' working set, so vLLM's own prefix cache
must evict; what a set-up keeps outside vLLM decides its hits. Each set-up runs as its users
would: chunked prefill (vLLM's default, `prefill_step_tokens` a step), except ExampleConnector,
which saves only a chunked prefill's first step, so it gets whole-prompt prefill steps.
Servers start one after another on a free loopback port.
"""

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvshelf import children
from kvshelf.bench.client import CompletionClient
from kvshelf.bench.serving import LongDocServing, MultiRoundQA, Texts, run_long_doc, run_multi_round, summarize
from kvshelf.models import bundled_model_dir
from kvshelf.ports import free_port
from kvshelf.serve import connector_extra_config, vllm_serve_argv

SERVED_MODEL = "smollm2"
KVSHELF = "vllm+kvshelf"
START_TIMEOUT_S = 600.0
CPU_BLOCK_SIZE = 128  # vLLM's default on the CPU backend
DEFAULT_PREFILL_STEP_TOKENS = 2048  # vLLM's max_num_batched_tokens for its API server on the CPU


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: list[str]
    sidecar_argv: list[str] | None = None  # a store the server needs, started first (LMCache's server)
    chunked_prefill: bool = True
    env: dict[str, str] = field(default_factory=dict)  # more environment (e.g. the cores it may use)


@dataclass(frozen=True)
class Engine:
    """The same engine for every set-up: prefix caching on, a KV space of `kv_cache_tokens`, and prefill
    steps of `prefill_step_tokens` (chunked) or of a whole prompt (`args(chunked_prefill=False)`)."""

    max_model_len: int
    kv_cache_tokens: int
    prefill_step_tokens: int = DEFAULT_PREFILL_STEP_TOKENS

    def args(self, chunked_prefill: bool = True) -> list[str]:
        num_blocks = str(self.kv_cache_tokens // CPU_BLOCK_SIZE)
        if chunked_prefill:
            steps = ["--enable-chunked-prefill", "--max-num-batched-tokens", str(self.prefill_step_tokens)]
        else:
            steps = ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(self.max_model_len)]
        report = ["--enable-prompt-tokens-details"]  # cached prompt tokens in each response's usage
        limits = ["--max-model-len", str(self.max_model_len), *steps]
        return limits + report + ["--enable-prefix-caching", "--num-gpu-blocks-override", num_blocks]


def vllm_argv(port: int, engine: list[str], transfer_config: dict | None) -> list[str]:
    server = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(bundled_model_dir())]
    model = ["--served-model-name", SERVED_MODEL, "--dtype", "float32", "--enforce-eager"]
    argv = server + model + ["--host", "127.0.0.1", "--port", str(port), *engine]
    return argv + (["--kv-transfer-config", json.dumps(transfer_config)] if transfer_config else [])


def lmcache_spec(python: str, engine: list[str]) -> ServerSpec:
    """vLLM with LMCache (LMCacheMPConnector), both from the environment of `python`: lmcache
    pins numpy, protobuf and grpcio to versions that kvshelf's environment does not have."""
    store_port, http_port = free_port(), free_port()
    store = ["--chunk-size", "256", "--l1-size-gb", "2", "--eviction-policy", "LRU"]
    store += ["--supported-transfer-mode", "auto"]
    ports = ["--host", "127.0.0.1", "--port", str(store_port)]
    ports += ["--http-host", "127.0.0.1", "--http-port", str(http_port)]
    sidecar = [python, "-m", "lmcache.v1.multiprocess.http_server", *store, *ports]
    transfer = {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": store_port}}
    argv = vllm_argv(free_port(), engine, transfer)
    return ServerSpec("vllm+LMCache", [python, *argv[1:]], sidecar)


def server_specs(work_dir: Path, engine: Engine, lmcache_python: str | None = None) -> list[ServerSpec]:
    example = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": {"shared_storage_path": str(work_dir / "example-connector")}}
    kvshelf_extra = connector_extra_config(None, str(work_dir / "kvshelf-disk"), "2GiB", None)
    whole_prompt = engine.args(chunked_prefill=False)
    return [
        ServerSpec("vllm", vllm_argv(free_port(), engine.args(), None)),
        ServerSpec("vllm+ExampleConnector", vllm_argv(free_port(), whole_prompt, example), chunked_prefill=False),
        *([lmcache_spec(lmcache_python, engine.args())] if lmcache_python else []),
        ServerSpec(KVSHELF, vllm_serve_argv(None, "127.0.0.1", free_port(), kvshelf_extra, engine.args())),
    ]


def port_of(argv: list[str]) -> int:
    return int(argv[argv.index("--port") + 1])


@contextlib.contextmanager
def running(spec: ServerSpec, log_path: Path) -> Iterator[CompletionClient]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **spec.env)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        sidecar = spec.sidecar_argv and children.start(spec.sidecar_argv, env, log)
        server = children.start(spec.argv, env, log)
    # Fixed-length answers, so every set-up decodes the same number of tokens.
    client = CompletionClient(f"http://127.0.0.1:{port_of(spec.argv)}", SERVED_MODEL, extra_body={"ignore_eos": True})
    processes = [process for process in (server, sidecar) if process]
    try:
        client.wait_ready(START_TIMEOUT_S, is_alive=lambda: all(process.poll() is None for process in processes))
        yield client
    finally:
        client.close()
        children.stop(*processes)


def run_compare(
    out_dir: Path,
    multi_round: MultiRoundQA,
    long_doc: LongDocServing,
    kv_cache_tokens: int,
    lmcache_python: str | None = None,
    progress=print,
    prefill_step_tokens: int = DEFAULT_PREFILL_STEP_TOKENS,
) -> dict:
    from transformers import AutoTokenizer

    texts = Texts(AutoTokenizer.from_pretrained(bundled_model_dir()))
    # Room for the longest prompt: a document, or a user's last round (~40 tokens per question).
    last_round_tokens = multi_round.system_prompt_tokens + multi_round.user_context_tokens
    last_round_tokens += multi_round.num_rounds * (multi_round.answer_tokens + 40)
    max_model_len = max(long_doc.doc_tokens, last_round_tokens) + 256
    results = {}
    with tempfile.TemporaryDirectory(dir=out_dir if out_dir.exists() else None) as scratch:
        engine = Engine(max_model_len, kv_cache_tokens, prefill_step_tokens)
        for spec in server_specs(Path(scratch), engine, lmcache_python):
            progress(f"{spec.name}: starting the server")
            with running(spec, out_dir / "logs" / f"{spec.name}.log") as client:
                progress(f"{spec.name}: long-doc-qa")
                records = run_long_doc(client, texts, long_doc)
                progress(f"{spec.name}: multi-round-qa")
                rounds, wall_s = run_multi_round(client, texts, multi_round)
            results[spec.name] = summarize(records + rounds, wall_s, multi_round, long_doc) | {
                "prefill": "chunked" if spec.chunked_prefill else "whole-prompt",
                "records": records + rounds,
            }
    return {"kv_cache_tokens": kv_cache_tokens, "prefill_step_tokens": prefill_step_tokens, "setups": results,
            "ratios": ratios(results), "kvshelf_vs": versus(results, KVSHELF)}


def ratios(results: dict) -> dict:
    """Each set-up against vLLM alone: TTFT (higher = faster), throughput, and its own warm vs cold."""
    base = results["vllm"]
    table = {}
    for name, summary in results.items():
        rounds, docs = summary["multi_round_qa"], summary["long_doc_qa"]
        base_rounds = base["multi_round_qa"]
        table[name] = {
            "mean_ttft_speedup": base_rounds["mean_ttft_s"] / rounds["mean_ttft_s"],
            "mean_ttft_speedup_after_first_round": (
                base_rounds["mean_ttft_after_first_round_s"] / rounds["mean_ttft_after_first_round_s"]
            ),
            "throughput_ratio": rounds["requests_per_s"] / base["multi_round_qa"]["requests_per_s"],
            "long_doc_warm_vs_cold": docs["cold_ttft_s"] / docs["warm_ttft_s"],
        }
    return table


def versus(results: dict, subject: str) -> dict:
    """`subject` against every other set-up: how many times lower its mean TTFT (all rounds, and rounds after
    the first) and how many times its requests/s."""
    rounds = {name: summary["multi_round_qa"] for name, summary in results.items()}
    mine = rounds[subject]
    return {
        name: {
            "mean_ttft_speedup": other["mean_ttft_s"] / mine["mean_ttft_s"],
            "mean_ttft_speedup_after_first_round": (
                other["mean_ttft_after_first_round_s"] / mine["mean_ttft_after_first_round_s"]
            ),
            "throughput_ratio": mine["requests_per_s"] / other["requests_per_s"],
        }
        for name, other in rounds.items()
        if name != subject
    }
