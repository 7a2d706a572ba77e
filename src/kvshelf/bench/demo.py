"""`kvshelf demo`: vLLM's server with kvshelf on long documents — cold, warm, warm after a restart.

The server runs with vLLM's own prefix caching off, so every warm hit below comes from kvshelf:
from its memory tier while the server lives, from its disk tier after the restart.
"""

import shutil
from pathlib import Path

from kvshelf.bench.compare import SERVED_MODEL, ServerSpec, running
from kvshelf.bench.documents import QUESTIONS
from kvshelf.bench.serving import Texts, record
from kvshelf.models import bundled_model_dir
from kvshelf.ports import free_port
from kvshelf.serve import connector_extra_config, vllm_serve_argv

PHASES = {
    "cold": "cold (first request)",
    "warm_memory": "warm, memory tier",
    "warm_disk": "warm, disk tier after restart",
}


def run_demo(out_dir: Path, num_docs: int, doc_tokens: int, progress=print) -> dict:
    disk_path = out_dir / "disk"
    shutil.rmtree(disk_path, ignore_errors=True)
    extra_config = connector_extra_config(None, str(disk_path), "2GiB", None)
    return cold_warm_restart(out_dir, extra_config, PHASES, num_docs, doc_tokens, progress)


def cold_warm_restart(
    out_dir: Path, extra_config: dict, phases: dict[str, str], num_docs: int, doc_tokens: int, progress=print
) -> dict:
    """TTFT of each document cold, then warm while the server lives, then warm after a restart.

    `phases` names and labels those three phases, in that order; the restart empties the memory
    tier, so the last phase hits whatever lower tier `extra_config` gives kvshelf.
    """
    from transformers import AutoTokenizer

    vllm_args = ["--max-model-len", str(doc_tokens + 256), "--no-enable-prefix-caching"]
    docs = Texts(AutoTokenizer.from_pretrained(bundled_model_dir())).windows(num_docs, doc_tokens)
    cold, warm, after_restart = phases
    records = []
    for server_run, run_phases in enumerate(((cold, warm), (after_restart,))):
        spec = ServerSpec("kvshelf", vllm_serve_argv(None, "127.0.0.1", free_port(), extra_config, vllm_args))
        progress("starting vLLM with kvshelf" if server_run == 0 else "restarting the server (memory tier is gone)")
        with running(spec, out_dir / "logs" / f"server-{server_run}.log") as client:
            for phase in run_phases:
                question = QUESTIONS[list(phases).index(phase)]
                for index, doc in enumerate(docs):
                    progress(f"{phases[phase]}: document {index + 1}/{num_docs}")
                    completion = client.complete(f"{doc}\n\nQuestion: {question}\nAnswer:", max_tokens=16)
                    records.append(record("demo", phase, completion, doc=index) | {"answer": completion.text})
    ttft = {phase: _mean([r["ttft_s"] for r in records if r["phase"] == phase]) for phase in phases}
    return {
        "model": SERVED_MODEL,
        "num_docs": num_docs,
        "doc_tokens": doc_tokens,
        "ttft_s": ttft,
        "speedup_vs_cold": {phase: ttft[cold] / ttft[phase] for phase in phases},
        "records": records,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def demo_table(summary: dict, phases: dict[str, str] = PHASES) -> str:
    lines = [
        f"vLLM + kvshelf, {summary['num_docs']} documents of ~{summary['doc_tokens']} tokens",
        "",
        f"{'phase':<34}{'mean TTFT':>12}{'vs cold':>10}",
    ]
    for phase, label in phases.items():
        lines.append(f"{label:<34}{summary['ttft_s'][phase] * 1000:>9.0f} ms{summary['speedup_vs_cold'][phase]:>9.1f}x")
    return "\n".join(lines)
