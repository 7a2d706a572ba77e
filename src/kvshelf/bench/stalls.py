"""`kvshelf bench stalls`: do other requests' KV loads and saves hold up users streaming tokens?

vLLM with kvshelf (memory, disk and Redis tiers of its own) in each transfer mode, side by side in
one run: `transfer.mode: sync` (loads and saves inside the engine's step) and `async`. Both servers
run at once and take turns, pass by pass. In each, a few users stream long answers without pause
while long prompts (documents of ~1.9k tokens, `num_senders` in flight at a time) arrive, in passes:

  miss    new documents: a whole prefill each, and its KV saved
  memory  the same documents, another question: hits in the memory tier
  disk    after a restart (memory tier empty) with the page cache dropped: hits in the disk tier
  redis   other documents, stored before the restart, whose files were then removed: hits in Redis

Per pass: each user's inter-token latency (p50, p99, max) and stalls (gaps longer than its p50
plus STALL_MARGIN_S), the long prompts' TTFT and cached tokens, requests/s, and the KV each tier
loaded (the server's /metrics), which shows a pass that missed its tier. Ratios: async over sync
per pass, and the disk and Redis hits' TTFT over the memory hits'.

vLLM's own prefix cache is off, so every hit is kvshelf's; prefill steps keep vLLM's defaults
(chunked, 2048 tokens a step on the CPU).
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from kvshelf.bench.client import Completion, CompletionClient
from kvshelf.bench.compare import ServerSpec, port_of, running
from kvshelf.bench.documents import QUESTIONS
from kvshelf.bench.pd_bench import percentile
from kvshelf.bench.redis_servers import RedisServer
from kvshelf.bench.serving import Texts
from kvshelf.config import connector_config
from kvshelf.ports import free_port
from kvshelf.serve import connector_extra_config, vllm_serve_argv

MODES = ("sync", "async")
PASSES = ("miss", "memory", "disk", "redis")
STALL_MARGIN_S = 0.1  # a token gap this much longer than the user's ITL p50 is a stall
MEMORY_SIZE = "1GiB"  # holds both document sets: the memory pass hits memory only
CHUNK_SUFFIX = ".kvs"
SAVE_SETTLE_S = 10.0  # stop waiting for saves once the stores stopped growing this long
PASS_METRICS = ("itl_p99_ms", "itl_max_ms", "max_over_p50_ms", "ttft_p50_s", "ttft_mean_s", "requests_per_s")


@dataclass(frozen=True)
class StallWorkload:
    num_users: int = 2  # streaming without pause
    user_prompt_tokens: int = 64  # under one chunk: the users store and load nothing
    user_answer_tokens: int = 128
    num_docs: int = 6  # per document set (one set hits memory and disk, the other Redis)
    doc_tokens: int = 1850  # with a question, ~1.9k tokens: 14 chunks of 128
    doc_answer_tokens: int = 8
    num_senders: int = 2  # long prompts in flight at once
    pause_s: float = 1.0  # a sender's pause between its long prompts
    warmup_s: float = 2.0  # users stream alone before the long prompts come

    def __post_init__(self) -> None:
        for name in ("num_users", "num_docs", "num_senders", "doc_tokens", "user_answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


QUICK = StallWorkload(num_users=1, user_answer_tokens=48, num_docs=2, doc_tokens=600, num_senders=1, pause_s=0.2,
                      warmup_s=1.0)


@dataclass
class PassRecords:
    """What one pass measured: every user's token gaps in the window, and the long prompts' answers."""

    user_gaps_s: list[list[float]]
    long_answers: list[Completion]
    window_s: float


def itl_stats(gaps_s: list[float], stall_margin_s: float = STALL_MARGIN_S) -> dict:
    """One user's inter-token latency over a window; a stall is a gap over its p50 + `stall_margin_s`."""
    if not gaps_s:
        return {"num_gaps": 0, "itl_p50_ms": None, "itl_p99_ms": None, "itl_max_ms": None,
                "max_over_p50_ms": None, "stalls": 0}
    p50_s = percentile(gaps_s, 0.5)
    return {
        "num_gaps": len(gaps_s),
        "itl_p50_ms": 1000 * p50_s,
        "itl_p99_ms": 1000 * percentile(gaps_s, 0.99),
        "itl_max_ms": 1000 * max(gaps_s),
        "max_over_p50_ms": 1000 * (max(gaps_s) - p50_s),
        "stalls": sum(gap > p50_s + stall_margin_s for gap in gaps_s),
    }


def gaps_in_window(answers: list[Completion], start_s: float, end_s: float) -> list[float]:
    """Gaps between consecutive tokens of each answer whose later token arrived in (start_s, end_s]."""
    return [later - earlier for answer in answers
            for earlier, later in zip(answer.token_times_s, answer.token_times_s[1:]) if start_s < later <= end_s]


def summarize_pass(records: PassRecords, loaded_bytes: dict[str, float]) -> dict:
    users = [itl_stats(gaps) for gaps in records.user_gaps_s]
    measured = [user for user in users if user["num_gaps"]]
    ttfts = [answer.ttft_s for answer in records.long_answers]
    return {
        "users": users,
        "itl_p99_ms": max((user["itl_p99_ms"] for user in measured), default=None),
        "itl_max_ms": max((user["itl_max_ms"] for user in measured), default=None),
        "max_over_p50_ms": max((user["max_over_p50_ms"] for user in measured), default=None),
        "stalls": sum(user["stalls"] for user in users),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_mean_s": statistics.mean(ttfts) if ttfts else None,
        "prompt_tokens_mean": _mean(answer.num_prompt_tokens for answer in records.long_answers),
        "cached_tokens_mean": _mean(answer.num_cached_tokens for answer in records.long_answers),
        "requests_per_s": len(ttfts) / records.window_s,
        "window_s": records.window_s,
        "loaded_mib": {tier: loaded / 2**20 for tier, loaded in loaded_bytes.items()},
    }


def _mean(values) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.mean(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def ratios(modes: dict[str, dict[str, dict]]) -> dict:
    """Async over sync per pass and metric; per mode, each lower tier's hit TTFT over the memory tier's."""
    table: dict = {"hit_ttft_over_memory": {
        mode: {tier: ratio(passes[tier]["ttft_mean_s"], passes["memory"]["ttft_mean_s"]) for tier in ("disk", "redis")}
        for mode, passes in modes.items()
    }}
    if set(MODES) <= set(modes):
        table["async_over_sync"] = {
            name: {metric: ratio(modes["async"][name][metric], modes["sync"][name][metric]) for metric in PASS_METRICS}
            for name in PASSES
        }
    return table


def run_pass(
    client: CompletionClient, user_prompts: list[str], doc_prompts: list[str], spec: StallWorkload
) -> PassRecords:
    """Users stream; after `warmup_s`, `num_senders` senders send `doc_prompts` one after another."""
    done = threading.Event()
    user_answers: list[list[Completion]] = [[] for _ in user_prompts]
    long_answers: list[Completion] = []

    def stream(user: int) -> None:
        while not done.is_set():
            user_answers[user].append(client.complete(user_prompts[user], spec.user_answer_tokens))

    def send(sender: int) -> None:
        for index, prompt in enumerate(doc_prompts[sender :: spec.num_senders]):
            if index:
                time.sleep(spec.pause_s)
            long_answers.append(client.complete(prompt, spec.doc_answer_tokens))

    users = [threading.Thread(target=stream, args=(user,)) for user in range(len(user_prompts))]
    senders = [threading.Thread(target=send, args=(sender,)) for sender in range(spec.num_senders)]
    for thread in users:
        thread.start()
    time.sleep(spec.warmup_s)
    start_s = time.perf_counter()
    _run_all(senders)
    end_s = time.perf_counter()
    done.set()
    for thread in users:
        thread.join()
    gaps = [gaps_in_window(answers, start_s, end_s) for answers in user_answers]
    return PassRecords(gaps, long_answers, end_s - start_s)


def _run_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@dataclass(frozen=True)
class Prompts:
    users: list[str]
    memory_and_disk: list[str]  # documents; each pass asks them another question
    redis: list[str]

    @classmethod
    def build(cls, spec: StallWorkload) -> "Prompts":
        from transformers import AutoTokenizer

        from kvshelf.models import bundled_model_dir

        texts = Texts(AutoTokenizer.from_pretrained(bundled_model_dir()))
        docs = texts.windows(2 * spec.num_docs, spec.doc_tokens, skip=20_000)
        return cls(texts.windows(spec.num_users, spec.user_prompt_tokens), docs[: spec.num_docs], docs[spec.num_docs :])


def ask(docs: list[str], question: int) -> list[str]:
    return [f"{doc}\n\nQuestion: {QUESTIONS[question]}\nAnswer:" for doc in docs]


class Stores:
    """One mode's disk tier directory and the run's Redis, and what they hold."""

    def __init__(self, disk_dir: Path, redis: RedisServer) -> None:
        self.disk_dir = disk_dir
        self.redis = redis

    def empty(self) -> None:
        shutil.rmtree(self.disk_dir, ignore_errors=True)
        self.redis.client().flushall()

    def disk_chunks(self) -> set[Path]:
        return set(self.disk_dir.rglob(f"*{CHUNK_SUFFIX}"))

    def redis_chunks(self) -> int:
        """Chunk entries (`<prefix>:<namespace>:<64 hex digits>`), not namespace descriptions."""
        return sum(len(name.rsplit(b":", 1)[-1]) == 64 for name in self.redis.client().scan_iter(count=1000))

    def wait_stored(self, num_chunks: int, progress: Callable[[str], None]) -> None:
        """Until both lower tiers hold `num_chunks` chunks (saves run in the background), or stopped growing."""
        last, settled_s = None, time.monotonic()
        while min(counts := (len(self.disk_chunks()), self.redis_chunks())) < num_chunks:
            if counts != last:
                last, settled_s = counts, time.monotonic()
            elif time.monotonic() - settled_s > SAVE_SETTLE_S:
                progress(f"  saves settled at {counts[0]} chunks on disk and {counts[1]} in Redis, "
                         f"not {num_chunks}: some hits below will be partial")
                return
            time.sleep(0.5)


def drop_page_cache(paths: set[Path]) -> str:
    """Make the next reads of `paths` come from the device; returns how: `drop_caches` (as root: the
    whole page cache), else `fadvise` (POSIX_FADV_DONTNEED on each file, after writing it back)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in paths:
            with open(path, "rb") as file:
                os.fdatasync(file.fileno())
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return "fadvise"


def kvshelf_loaded_bytes(base_url: str) -> dict[str, float]:
    """KV bytes each tier has loaded so far: vLLM's `vllm:kvshelf_<tier>_loaded_bytes` counters."""
    loaded: dict[str, float] = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name.startswith("vllm:kvshelf_") and name.endswith("_loaded_bytes_total"):
            tier = name.removeprefix("vllm:kvshelf_").removesuffix("_loaded_bytes_total")
            loaded[tier] = loaded.get(tier, 0.0) + float(line.rsplit(" ", 1)[1])
    return loaded


class ModeRun:
    """One transfer mode: its Redis, its disk tier, its server (started twice: the restart empties the memory
    tier) and the passes measured on it."""

    def __init__(self, mode: str, spec: StallWorkload, prompts: Prompts, work_dir: Path,
                 progress: Callable[[str], None]) -> None:
        self.mode, self.spec, self.prompts, self.progress = mode, spec, prompts, progress
        self.work_dir = work_dir
        self.redis = RedisServer(work_dir / "servers")
        self.stores = Stores(work_dir / "disk", self.redis)
        self.passes: dict[str, dict] = {}
        self.stored: list[Completion] = []  # every long prompt answered so far: what the tiers must hold
        self.redis_only: set[Path] = set()
        self.page_cache_drop = ""
        self.client: CompletionClient | None = None
        self.url = ""

    @property
    def extra_config(self) -> dict:
        """kvshelf's settings; checked now (the Redis must be up)."""
        extra = connector_extra_config(None, str(self.stores.disk_dir), MEMORY_SIZE, None, self.redis.url)
        return extra | {"transfer.mode": self.mode}

    @property
    def transfer(self) -> dict:
        """The transfer settings in force, with what the environment sets (KVSHELF_TRANSFER_*)."""
        return asdict(connector_config(self.extra_config).transfer)

    @contextmanager
    def serving(self, which: str) -> Iterator[None]:
        vllm_args = ["--max-model-len", str(self.spec.doc_tokens + 256), "--no-enable-prefix-caching",
                     "--enable-prompt-tokens-details"]
        argv = vllm_serve_argv(None, "127.0.0.1", free_port(), self.extra_config, vllm_args)
        self.progress(f"{self.mode}: starting vLLM + kvshelf ({which})")
        log_path = self.work_dir / "logs" / f"{which}.log"
        with running(ServerSpec(f"{self.mode}-{which}", argv), log_path) as client:
            client.complete(self.prompts.users[0], 4)  # the first request pays one-time start-up costs
            self.client, self.url = client, f"http://127.0.0.1:{port_of(argv)}"
            try:
                yield
            finally:
                self.client = None

    def store_redis_set(self) -> None:
        """The Redis pass's documents, stored with no users streaming; their files are noted, to remove later."""
        self.progress(f"{self.mode}: storing the Redis pass's documents")
        prompts = ask(self.prompts.redis, 0)
        self.stored += [self.client.complete(prompt, self.spec.doc_answer_tokens) for prompt in prompts]
        self.finish_saves()
        self.redis_only = self.stores.disk_chunks()

    def finish_saves(self) -> None:
        chunk_size = connector_config(self.extra_config).chunk_size
        num_chunks = sum(answer.num_prompt_tokens // chunk_size for answer in self.stored)
        self.stores.wait_stored(num_chunks, self.progress)

    def forget_redis_set_on_disk(self) -> None:
        """With the server stopped: the Redis pass's documents then hit in Redis only."""
        for path in self.redis_only:
            path.unlink()

    def measure(self, name: str) -> None:
        docs, question = {"miss": (self.prompts.memory_and_disk, 0), "memory": (self.prompts.memory_and_disk, 1),
                          "disk": (self.prompts.memory_and_disk, 2), "redis": (self.prompts.redis, 1)}[name]
        if name == "disk":
            self.page_cache_drop = drop_page_cache(self.stores.disk_chunks())
        self.progress(f"{self.mode}: {name} pass")
        before = kvshelf_loaded_bytes(self.url)
        records = run_pass(self.client, self.prompts.users, ask(docs, question), self.spec)
        time.sleep(1.0)  # vLLM publishes the connector's counters with a later stats update
        after = kvshelf_loaded_bytes(self.url)
        self.passes[name] = summarize_pass(records, {tier: after[tier] - before.get(tier, 0.0) for tier in after})
        if name == "miss":
            self.stored += records.long_answers


def in_turns(runs: list[ModeRun], turn: int) -> list[ModeRun]:
    """The modes in the order of this turn: who goes first alternates, so neither always meets the same load."""
    return runs if turn % 2 == 0 else runs[::-1]


def run_pd(out_dir: Path, modes: tuple[str, ...], progress: Callable[[str], None]) -> dict:
    """`kvshelf bench pd` (colocated vs 1P1D, default workload) once per transfer mode, in a child process
    whose environment sets the mode; the prefill instance's push runs in the background only with async."""
    results: dict = {}
    for mode in modes:
        progress(f"{mode}: kvshelf bench pd")
        pd_out = out_dir / f"pd-{mode}"
        env = dict(os.environ, KVSHELF_TRANSFER_MODE=mode)
        argv = [sys.executable, "-m", "kvshelf.cli", "bench", "pd", "--out", str(pd_out)]
        if subprocess.run(argv, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            # The passes above stand on their own: report this part's failure instead of losing them.
            results[mode] = {"error": f"kvshelf bench pd failed; its servers' logs are in {pd_out / 'logs'}"}
            progress(f"{mode}: {results[mode]['error']}")
            continue
        results[mode] = json.loads((pd_out / "summary.json").read_text())["setups"]
    if all("error" not in results.get(mode, {"error": None}) for mode in MODES):
        results["async_over_sync"] = {
            setup: {metric: ratio(results["async"][setup].get(metric), results["sync"][setup].get(metric))
                    for metric in ("long_ttft_mean_s", "itl_p99_ms", "itl_max_ms", "push_ms_total")}
            for setup in results["sync"]
        }
    return results


def run_stalls(out_dir: Path, spec: StallWorkload, modes: tuple[str, ...] = MODES, pd: bool = False,
               progress: Callable[[str], None] = print) -> dict:
    """Both modes' servers run side by side and take turns, pass by pass: a load on this shared machine
    that comes and goes falls on both."""
    prompts = Prompts.build(spec)
    runs = [ModeRun(mode, spec, prompts, out_dir / mode, progress) for mode in modes]
    with ExitStack() as redis_servers:
        for run in runs:
            redis_servers.enter_context(run.redis)
            run.stores.empty()
        with ExitStack() as servers:
            for run in runs:
                servers.enter_context(run.serving("first"))
                run.store_redis_set()
            for turn, name in enumerate(("miss", "memory")):
                for run in in_turns(runs, turn):
                    run.measure(name)
            for run in runs:
                run.finish_saves()
        with ExitStack() as servers:
            for run in runs:
                run.forget_redis_set_on_disk()
                servers.enter_context(run.serving("restarted"))
            for turn, name in enumerate(("disk", "redis")):
                for run in in_turns(runs, turn):
                    run.measure(name)
        transfer = {run.mode: run.transfer for run in runs}
    for run in runs:
        shutil.rmtree(run.stores.disk_dir, ignore_errors=True)
    results = {run.mode: run.passes for run in runs}
    summary = {
        "benchmark": "stalls",
        "workload": asdict(spec),
        "stall_margin_ms": 1000 * STALL_MARGIN_S,
        "page_cache_drop": ",".join(sorted({run.page_cache_drop for run in runs})),
        "transfer": transfer,
        "modes": results,
        "ratios": ratios(results),
    }
    if pd:
        summary["pd"] = run_pd(out_dir, modes, progress)
    return summary


def stalls_table(summary: dict) -> str:
    lines = ["| mode | pass | users' ITL p50 ms | p99 ms | max ms | max - p50 ms | stalls | long TTFT p50 / mean s "
             "| cached / prompt tokens | req/s | loaded MiB by tier |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, passes in summary["modes"].items():
        for name, result in passes.items():
            cells = [
                mode, name, "/".join(_cell(user["itl_p50_ms"]) for user in result["users"]),
                _cell(result["itl_p99_ms"]), _cell(result["itl_max_ms"]), _cell(result["max_over_p50_ms"]),
                str(result["stalls"]), f"{_cell(result['ttft_p50_s'], 2)} / {_cell(result['ttft_mean_s'], 2)}",
                f"{_cell(result['cached_tokens_mean'])} / {_cell(result['prompt_tokens_mean'])}",
                _cell(result["requests_per_s"], 2),
                ", ".join(f"{tier} {mib:.0f}" for tier, mib in result["loaded_mib"].items() if mib),
            ]
            lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def _cell(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
