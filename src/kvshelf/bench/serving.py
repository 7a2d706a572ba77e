"""Serving benchmarks against OpenAI-compatible servers: long-doc-qa and multi-round-qa.

multi-round-qa follows LMCache's benchmark shape, scaled to a 2-core machine: U users chat
concurrently for R rounds; every prompt is a shared system prompt, the user's own long
context, and the conversation so far (questions and the model's answers), so each round
reuses everything the user's previous round computed. long-doc-qa asks each of D documents
one question cold, then, after all documents, another question (a hit if the KV survived).
"""

import statistics
import threading
import time
from dataclasses import asdict, dataclass

from kvshelf.bench.client import Completion, CompletionClient
from kvshelf.bench.documents import QUESTIONS, documents, stdlib_corpus


@dataclass(frozen=True)
class MultiRoundQA:
    num_users: int = 4
    num_rounds: int = 4
    system_prompt_tokens: int = 512
    user_context_tokens: int = 1536
    answer_tokens: int = 24


@dataclass(frozen=True)
class LongDocServing:
    num_docs: int = 3
    doc_tokens: int = 4000
    answer_tokens: int = 8


class Texts:
    """Windows of real prose of about N tokens, from the standard library's docstrings."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._corpus_ids = tokenizer(stdlib_corpus(), add_special_tokens=False)["input_ids"]

    def windows(self, count: int, num_tokens: int, skip: int = 0) -> list[str]:
        windows = documents(self._corpus_ids[skip:], count, num_tokens)
        return [self._tokenizer.decode(window) for window in windows]


def record(workload: str, phase: str, completion: Completion, **labels) -> dict:
    return {
        "workload": workload,
        "phase": phase,
        "ttft_s": completion.ttft_s,
        "latency_s": completion.latency_s,
        "mean_itl_s": completion.mean_itl_s,
        "prompt_tokens": completion.num_prompt_tokens,
        "cached_tokens": completion.num_cached_tokens,
        **labels,
    }


def run_long_doc(client: CompletionClient, texts: Texts, spec: LongDocServing) -> list[dict]:
    docs = texts.windows(spec.num_docs, spec.doc_tokens, skip=50_000)
    records = []
    for phase, question in (("cold", QUESTIONS[0]), ("warm", QUESTIONS[1])):
        for doc_index, doc in enumerate(docs):
            completion = client.complete(f"{doc}\n\nQuestion: {question}\nAnswer:", spec.answer_tokens)
            records.append(record("long-doc-qa", phase, completion, doc=doc_index))
    return records


def run_multi_round(client: CompletionClient, texts: Texts, spec: MultiRoundQA) -> tuple[list[dict], float]:
    """Records of every request, and the wall time of the whole run."""
    (system_prompt,) = texts.windows(1, spec.system_prompt_tokens)
    contexts = texts.windows(spec.num_users, spec.user_context_tokens, skip=spec.system_prompt_tokens)
    records: list[dict] = []
    lock = threading.Lock()

    def chat(user: int) -> None:
        history = f"{system_prompt}\n\n{contexts[user]}"
        for round_index in range(spec.num_rounds):
            question = QUESTIONS[(user + round_index) % len(QUESTIONS)]
            history += f"\n\nUser: {question}\nAssistant:"
            completion = client.complete(history, spec.answer_tokens)
            history += completion.text
            with lock:
                records.append(
                    record("multi-round-qa", f"round {round_index}", completion, user=user, round=round_index)
                )

    started_s = time.perf_counter()
    users = [threading.Thread(target=chat, args=(user,)) for user in range(spec.num_users)]
    for thread in users:
        thread.start()
    for thread in users:
        thread.join()
    return records, time.perf_counter() - started_s


def summarize(
    records: list[dict], multi_round_wall_s: float, multi_round: MultiRoundQA, long_doc: LongDocServing
) -> dict:
    def mean(values) -> float | None:
        values = [value for value in values if value is not None]
        return statistics.mean(values) if values else None

    rounds = [r for r in records if r["workload"] == "multi-round-qa"]
    docs = {
        phase: [r for r in records if r["workload"] == "long-doc-qa" and r["phase"] == phase]
        for phase in ("cold", "warm")
    }
    return {
        "multi_round_qa": {
            "shape": asdict(multi_round),
            "mean_ttft_s": mean(r["ttft_s"] for r in rounds),
            "mean_ttft_after_first_round_s": mean(r["ttft_s"] for r in rounds if r["round"] > 0),
            "mean_itl_s": mean(r["mean_itl_s"] for r in rounds),
            "requests_per_s": len(rounds) / multi_round_wall_s,
            "wall_s": multi_round_wall_s,
        },
        "long_doc_qa": {
            "shape": asdict(long_doc),
            "cold_ttft_s": mean(r["ttft_s"] for r in docs["cold"]),
            "warm_ttft_s": mean(r["ttft_s"] for r in docs["warm"]),
        },
    }
