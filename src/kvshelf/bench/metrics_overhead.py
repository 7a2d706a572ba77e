"""`kvshelf bench metrics`: what the metrics and traces cost on the hit path.

Two measurements, each side by side in one run:
- vLLM: two `kvshelf serve` instances up at once, one with `metrics.enabled: false` (the plain
  counters only), one with everything on (histograms, tenants, TTFT, a JSON trace line per
  request), each on a core of its own (VLLM_CPU_OMP_THREADS_BIND: an idle vLLM's OpenMP threads
  keep spinning a while, and on shared cores would slow the other's step). Each document is
  computed once on each, then asked again round after round, alternating which instance goes
  first, one request at a time. Reported: median TTFT of the memory hits (every one checked to
  be a hit of the whole stored prefix), and on/off.
- the shelf alone: a memory hit of a prompt of the bundled model's KV (locate, load, finish the
  request's trace) in two shelves, off and on, interleaved many times: the cost in microseconds,
  without the noise of a whole engine step.
"""

import logging
import os
import statistics
import time
from pathlib import Path

import torch

from kvshelf.bench.compare import ServerSpec, running
from kvshelf.bench.serving import Texts
from kvshelf.bench.tier_hits import BUNDLED_LAYOUT
from kvshelf.config import load_config
from kvshelf.keys import Namespace, Prompt
from kvshelf.models import bundled_model_dir
from kvshelf.ports import free_port
from kvshelf.serve import connector_extra_config, vllm_serve_argv
from kvshelf.shelf import Shelf

MODES = {"off": {"metrics.enabled": False}, "on": {"metrics.enabled": True, "metrics.trace": True}}
QUESTION = "\n\nQuestion: what is this text about?\nAnswer:"


def run_metrics_overhead(out_dir: Path, num_docs: int = 3, doc_tokens: int = 1024, rounds: int = 5,
                         shelf_hits: int = 200, progress=print) -> dict:
    shelf_part = shelf_hit_overhead(shelf_hits)
    progress(f"shelf memory hit: off {shelf_part['hit_us']['off']:.0f} us, on {shelf_part['hit_us']['on']:.0f} us")
    vllm_part = vllm_hit_overhead(out_dir, num_docs, doc_tokens, rounds, progress)
    return {"vllm": vllm_part, "shelf": shelf_part}


def vllm_hit_overhead(out_dir: Path, num_docs: int, doc_tokens: int, rounds: int, progress=print) -> dict:
    from transformers import AutoTokenizer

    docs = Texts(AutoTokenizer.from_pretrained(bundled_model_dir())).windows(num_docs, doc_tokens)
    vllm_args = ["--max-model-len", str(doc_tokens + 256), "--no-enable-prefix-caching",
                 "--enable-prompt-tokens-details"]
    ttft: dict[str, list[float]] = {mode: [] for mode in MODES}
    progress("starting two vLLM servers with kvshelf: metrics off and on")
    cores = {mode: str(index % os.cpu_count()) for index, mode in enumerate(MODES)}
    specs = {mode: ServerSpec(f"metrics-{mode}", vllm_serve_argv(
        None, "127.0.0.1", free_port(), connector_extra_config(None, str(out_dir / mode / "disk"), "2GiB", None)
        | settings, vllm_args), env={"VLLM_CPU_OMP_THREADS_BIND": cores[mode]})
        for mode, settings in MODES.items()}
    logs = out_dir / "logs"
    with running(specs["off"], logs / "off.log") as off, running(specs["on"], logs / "on.log") as on:
        clients = {"off": off, "on": on}
        for doc in docs:  # computed once on each
            for client in clients.values():
                client.complete(doc + QUESTION, max_tokens=4)
        for round_index in range(rounds):
            progress(f"round {round_index + 1}/{rounds}")
            order = list(MODES) if round_index % 2 == 0 else list(reversed(MODES))
            for doc in docs:
                for mode in order:
                    completion = clients[mode].complete(doc + QUESTION, max_tokens=4)
                    if not completion.num_cached_tokens:
                        raise RuntimeError(f"a memory hit expected, the {mode} server computed the whole prompt")
                    ttft[mode].append(completion.ttft_s)
    medians = {mode: statistics.median(values) for mode, values in ttft.items()}
    return {"num_docs": num_docs, "doc_tokens": doc_tokens, "rounds": rounds,
            "memory_hit_ttft_ms": {mode: value * 1000 for mode, value in medians.items()},
            "on_vs_off": medians["on"] / medians["off"],
            "samples_ms": {mode: [value * 1000 for value in values] for mode, values in ttft.items()}}


def shelf_hit_overhead(num_hits: int = 200, num_tokens: int = 1024) -> dict:
    """Microseconds of a memory hit (locate, load, trace) with metrics off and on, interleaved."""
    trace_log = logging.getLogger("kvshelf.trace")
    handler = logging.FileHandler(os.devnull)  # the JSON line is formatted and written, as in a deployment
    trace_log.addHandler(handler)
    trace_log.setLevel(logging.INFO)
    namespace = Namespace("metrics-overhead@1", BUNDLED_LAYOUT, cache_salt="tenant")
    tokens = list(range(1, num_tokens + 1))
    kv = torch.randn(BUNDLED_LAYOUT.shape(num_tokens))
    shelves = {mode: Shelf(load_config(environ={}, chunk_size=256, security_key="metrics-overhead-secret-0123456789",
                                       **{key.replace(".", "_"): value for key, value in settings.items()}))
               for mode, settings in MODES.items()}
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for shelf in shelves.values():
            shelf.save(tokens, kv, namespace)
        for index in range(num_hits):
            for mode in (MODES if index % 2 == 0 else reversed(MODES)):
                shelf, request_id = shelves[mode], f"request-{index}"
                started_s = time.perf_counter()
                located = shelf.locate(Prompt(tokens, namespace), request_id=request_id)
                loaded = shelf.load(tokens, namespace, len(located) * shelf.chunk_size, request_id=request_id)
                shelf.metrics.first_token(request_id, True)
                shelf.tracer.finish(request_id)
                samples[mode].append((time.perf_counter() - started_s) * 1e6)
                assert loaded.num_tokens == num_tokens
    finally:
        for shelf in shelves.values():
            shelf.close()
        trace_log.removeHandler(handler)
    medians = {mode: statistics.median(values) for mode, values in samples.items()}
    return {"num_tokens": num_tokens, "num_hits": num_hits, "hit_us": medians,
            "added_us": medians["on"] - medians["off"]}


def metrics_table(summary: dict) -> str:
    vllm, shelf = summary["vllm"], summary["shelf"]
    ttft = vllm["memory_hit_ttft_ms"]
    return "\n".join([
        f"memory-hit TTFT, {vllm['num_docs']} documents of ~{vllm['doc_tokens']} tokens, {vllm['rounds']} rounds",
        f"  metrics off {ttft['off']:8.1f} ms   on (histograms, tenants, TTFT, trace lines) {ttft['on']:8.1f} ms"
        f"   on/off {vllm['on_vs_off']:.3f}",
        f"shelf memory hit of {shelf['num_tokens']} tokens: off {shelf['hit_us']['off']:.0f} us, "
        f"on {shelf['hit_us']['on']:.0f} us (+{shelf['added_us']:.0f} us)",
    ])
