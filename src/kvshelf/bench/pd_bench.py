"""`kvshelf bench pd`: a mixed workload on one colocated instance vs 1P1D behind the proxy.

Chat users stream long answers to short prompts without pause, while long prompts arrive at
a fixed interval. Colocated, each long prefill runs in the same steps as the users' decodes
and stalls them; disaggregated, it runs on the prefill instance and its KV is pushed to the
decode instance. Measured side by side in one run, same prompts, same answer lengths:
inter-token latency of the users (p50, p99, max), TTFT of the long prompts, and from the
prefill instance's own metrics the push time against the prefill time it saves the decode
instance.

On a machine with two cores both set-ups get both: the colocated instance's threads use cores
0-1; the prefill instance's use core 0 and the decode instance's core 1.
"""

import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from kvshelf.bench.client import Completion, CompletionClient
from kvshelf.bench.serving import Texts
from kvshelf.disagg.launch import Running, new_instance, running

SERVED_MODEL = "smollm2"
STALL_FACTOR = 5  # a token gap this many times the median counts as a stall


@dataclass(frozen=True)
class MixedWorkload:
    num_users: int = 2  # decoding without pause
    user_prompt_tokens: int = 64
    user_answer_tokens: int = 96
    num_long_prompts: int = 6
    long_prompt_tokens: int = 1536
    long_answer_tokens: int = 8
    long_interval_s: float = 4.0  # between long prompts' arrivals
    warmup_s: float = 3.0  # users decode alone first


@dataclass(frozen=True)
class Setup:
    name: str
    roles: tuple[str, ...]
    cpus: tuple[str, ...]


SETUPS = (Setup("colocated", ("both",), ("0-1",)), Setup("1P1D", ("prefill", "decode"), ("0", "1")))


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def prefill_metrics(url: str) -> dict[str, float]:
    """Counters of the instance at `url` that the transfer share needs (summed over labels)."""
    wanted = {"vllm:request_prefill_time_seconds_sum": "prefill_s", "vllm:kvshelf_push_ms_total": "push_ms",
              "vllm:kvshelf_pushed_bytes_total": "pushed_bytes", "vllm:kvshelf_push_failures_total": "push_failures"}
    totals = dict.fromkeys(wanted.values(), 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in wanted:
            totals[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return totals


def run_workload(client: CompletionClient, texts: list[str], long_texts: list[str], spec: MixedWorkload) -> dict:
    user_answers: list[tuple[float, Completion]] = []
    long_answers: list[Completion] = []
    lock = threading.Lock()
    done = threading.Event()

    def user(index: int) -> None:
        while not done.is_set():
            started_s = time.perf_counter()
            completion = client.complete(texts[index], spec.user_answer_tokens)
            with lock:
                user_answers.append((started_s, completion))

    def long_prompt(index: int) -> None:
        completion = client.complete(long_texts[index], spec.long_answer_tokens)
        with lock:
            long_answers.append(completion)

    users = [threading.Thread(target=user, args=(index,)) for index in range(spec.num_users)]
    for thread in users:
        thread.start()
    time.sleep(spec.warmup_s)
    window_start_s = time.perf_counter()
    arrivals = []
    for index in range(spec.num_long_prompts):
        arrivals.append(threading.Thread(target=long_prompt, args=(index,)))
        arrivals[-1].start()
        time.sleep(spec.long_interval_s)
    for thread in arrivals:
        thread.join()
    window_end_s = time.perf_counter()
    done.set()
    for thread in users:
        thread.join()
    # Token gaps of the answers that overlapped the long prompts' window.
    gaps = [gap for started_s, answer in user_answers
            if started_s < window_end_s and started_s + answer.latency_s > window_start_s
            for gap in answer.token_gaps_s]
    median_s = percentile(gaps, 0.5)
    return {
        "itl_p50_ms": 1000 * median_s,
        "itl_p99_ms": 1000 * percentile(gaps, 0.99),
        "itl_max_ms": 1000 * max(gaps),
        "num_token_gaps": len(gaps),
        "stalls": sum(gap > STALL_FACTOR * median_s for gap in gaps),  # a decode step held up by a prefill
        "long_ttft_mean_s": statistics.mean(answer.ttft_s for answer in long_answers),
        "long_ttft_max_s": max(answer.ttft_s for answer in long_answers),
        "user_ttft_p50_s": percentile([answer.ttft_s for _, answer in user_answers], 0.5),
    }


def run_pd_bench(out_dir: Path, spec: MixedWorkload, progress=print) -> dict:
    from transformers import AutoTokenizer

    from kvshelf.models import bundled_model_dir

    texts = Texts(AutoTokenizer.from_pretrained(bundled_model_dir()))
    user_texts = texts.windows(spec.num_users, spec.user_prompt_tokens)
    long_texts = texts.windows(spec.num_long_prompts, spec.long_prompt_tokens, skip=20_000)
    max_model_len = spec.long_prompt_tokens + spec.long_answer_tokens + 256
    vllm_args = ["--max-model-len", str(max_model_len), "--max-num-batched-tokens", str(max_model_len)]
    results = {}
    for setup in SETUPS:
        progress(f"{setup.name}: starting {' + '.join(setup.roles)}")
        instances = [new_instance(role) for role in setup.roles]
        with running(instances, out_dir / "logs" / setup.name, "push", vllm_args=vllm_args, cpus=setup.cpus) as live:
            client = CompletionClient(live.proxy_url, SERVED_MODEL, extra_body={"ignore_eos": True})
            client.complete(user_texts[0], 4)  # first request pays one-time start-up costs
            before = prefill_metrics(instances[0].url)
            progress(f"{setup.name}: mixed workload")
            results[setup.name] = run_workload(client, user_texts, long_texts, spec)
            results[setup.name] |= transfer_share(before, prefill_metrics(instances[0].url), live)
            client.close()
    colocated, split = results["colocated"], results["1P1D"]
    return {
        "workload": asdict(spec),
        "setups": results,
        "ratios": {
            "itl_p99_colocated_over_1p1d": colocated["itl_p99_ms"] / split["itl_p99_ms"],
            "itl_p50_colocated_over_1p1d": colocated["itl_p50_ms"] / split["itl_p50_ms"],
            "long_ttft_1p1d_over_colocated": split["long_ttft_mean_s"] / colocated["long_ttft_mean_s"],
        },
    }


def transfer_share(before: dict[str, float], after: dict[str, float], live: Running) -> dict:
    """Push time against the prefill time it saves the decode instance (1P1D only)."""
    if len(live.instances) < 2:
        return {}
    delta = {name: after[name] - before[name] for name in after}
    return {
        "push_ms_total": delta["push_ms"],
        "pushed_mib": delta["pushed_bytes"] / 2**20,
        "push_failures": delta["push_failures"],
        "prefill_s_total": delta["prefill_s"],
        "transfer_share_of_prefill": delta["push_ms"] / 1000 / delta["prefill_s"] if delta["prefill_s"] else None,
    }


def pd_table(summary: dict) -> str:
    lines = ["| set-up | ITL p50 ms | ITL p99 ms | ITL max ms | stalls | long-prompt TTFT s | push / prefill |",
             "|---|---|---|---|---|---|---|"]
    for name, result in summary["setups"].items():
        share = result.get("transfer_share_of_prefill")
        share_text = "" if share is None else f"{share:.1%}"
        lines.append(f"| {name} | {result['itl_p50_ms']:.0f} | {result['itl_p99_ms']:.0f} | {result['itl_max_ms']:.0f}"
                     f" | {result['stalls']} | {result['long_ttft_mean_s']:.2f} | {share_text} |")
    return "\n".join(lines)
