"""Long-document QA on the HF engine: TTFT cold, warm from memory, warm from disk after a restart.

D documents of L tokens, each asked Q questions (prompt = document ++ question). In one run:
  cold         no kvshelf: full prefill
  first_pass   kvshelf on a miss: full prefill plus saving (its overhead over cold)
  warm_memory  every question again; the document's KV comes from the memory tier
  warm_disk    a fresh process (empty memory, page cache dropped) asks each document's first
               question; the KV comes from the disk tier
and the physical limits on the same bytes: an in-memory copy, and a cold read of the files.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvshelf.bench.documents import QUESTIONS, documents, stdlib_corpus
from kvshelf.config import DiskConfig, MemoryConfig, ShelfConfig
from kvshelf.integrations.hf import HFEngine
from kvshelf.models import BUNDLED_MODEL_ID, load_bundled
from kvshelf.shelf import Shelf
from kvshelf.tiers.disk import chunk_path


@dataclass(frozen=True)
class LongDocQA:
    num_docs: int = 3
    doc_tokens: int = 4096
    num_questions: int = 3
    chunk_size: int = 256
    max_new_tokens: int = 8
    work_dir: str = "out/long-doc-qa"

    def __post_init__(self) -> None:
        if not 1 <= self.num_questions <= len(QUESTIONS):
            raise ValueError(f"num_questions must be between 1 and {len(QUESTIONS)}, got {self.num_questions}")
        if self.doc_tokens < self.chunk_size:
            raise ValueError(f"doc_tokens ({self.doc_tokens}) must be at least one chunk ({self.chunk_size})")

    @property
    def disk_dir(self) -> Path:
        return Path(self.work_dir) / "disk"

    def shelf_config(self, layout_bytes_per_token: int) -> ShelfConfig:
        working_set_bytes = 2 * self.num_docs * (self.doc_tokens + 64) * layout_bytes_per_token
        return ShelfConfig(
            chunk_size=self.chunk_size,
            memory=MemoryConfig(working_set_bytes),
            disk=DiskConfig(self.disk_dir, size_bytes=working_set_bytes),
        )


class Workload:
    def __init__(self, spec: LongDocQA, tokenizer) -> None:
        corpus_ids = tokenizer(stdlib_corpus(), add_special_tokens=False)["input_ids"]
        self.docs = documents(corpus_ids, spec.num_docs, spec.doc_tokens)
        self.questions = [
            tokenizer(f"\n\nQuestion: {question}\nAnswer:", add_special_tokens=False)["input_ids"]
            for question in QUESTIONS[: spec.num_questions]
        ]

    def prompt(self, doc: int, question: int) -> list[int]:
        return self.docs[doc] + self.questions[question]


def record(phase: str, doc: int, question: int, result) -> dict:
    return {
        "phase": phase,
        "doc": doc,
        "question": question,
        "ttft_s": result.ttft_s,
        "load_s": result.load_s,
        "hit_tokens": result.hit_tokens,
        "prompt_tokens": result.num_prompt_tokens,
        "output_ids": result.output_ids,
    }


def drop_page_cache(paths: Iterable[Path]) -> None:
    """Ask the kernel to forget cached pages of `paths`, so the next read comes from the device.

    Dirty pages cannot be dropped, so write them back first (a fresh file stays dirty for ~30 s).
    """
    for path in paths:
        with open(path, "rb") as file:
            os.fdatasync(file.fileno())
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_cold(paths: list[Path]) -> None:
    drop_page_cache(paths)
    for path in paths:
        path.read_bytes()


def elapsed_s(action: Callable[..., object], *args: object) -> float:
    started_s = time.perf_counter()
    action(*args)
    return time.perf_counter() - started_s


def doc_chunk_files(spec: LongDocQA, engine: HFEngine, workload: Workload, doc: int) -> list[Path]:
    keys = engine.shelf.chunk_keys(workload.prompt(doc, 0), engine.namespace())
    return [chunk_path(spec.disk_dir, key) for key in keys]


def run_in_memory_phases(spec: LongDocQA, model, tokenizer, model_id: str, progress) -> tuple[list[dict], list[dict]]:
    """cold, first_pass and warm_memory records, and the memcpy limit per document."""
    workload = Workload(spec, tokenizer)
    plain = HFEngine(model, tokenizer, None, model_id)
    plain.generate(workload.questions[0], max_new_tokens=2)  # warm up kernels and allocator
    shutil.rmtree(spec.disk_dir, ignore_errors=True)
    records, limits = [], []
    with Shelf(spec.shelf_config(plain.layout.bytes_per_token)) as shelf:
        cached = HFEngine(model, tokenizer, shelf, model_id)
        for doc in progress(range(spec.num_docs), desc="cold + first pass"):
            prompt = workload.prompt(doc, 0)
            records.append(record("cold", doc, 0, plain.generate(prompt, spec.max_new_tokens)))
            records.append(record("first_pass", doc, 0, cached.generate(prompt, spec.max_new_tokens)))
        shelf.flush()
        pairs = [(doc, question) for doc in range(spec.num_docs) for question in range(spec.num_questions)]
        for doc, question in progress(pairs, desc="warm from memory"):
            result = cached.generate(workload.prompt(doc, question), spec.max_new_tokens)
            records.append(record("warm_memory", doc, question, result))
        for doc in range(spec.num_docs):
            hit_tokens = next(r["hit_tokens"] for r in records if r["phase"] == "warm_memory" and r["doc"] == doc)
            source = torch.empty(plain.layout.shape(hit_tokens), dtype=plain.layout.torch_dtype)
            memcpy_s = statistics.median(elapsed_s(source.clone) for _ in range(5))
            limits.append({"doc": doc, "bytes": source.nbytes, "memcpy_s": memcpy_s})
    return records, limits


def run_disk_phase(spec: LongDocQA, model, tokenizer, model_id: str) -> tuple[list[dict], list[dict]]:
    """In a fresh process: each document's first question from the disk tier, then the load path
    (disk -> DynamicCache, empty memory tier) and a cold read of the same files, alternated."""
    workload = Workload(spec, tokenizer)
    config = spec.shelf_config(HFEngine(model, tokenizer, None, model_id).layout.bytes_per_token)
    records, limits = [], []
    with Shelf(config) as shelf:
        cached = HFEngine(model, tokenizer, shelf, model_id)
        cached.generate(workload.questions[0], max_new_tokens=2)  # warm-up on a prompt with no full chunk
        for doc in range(spec.num_docs):
            drop_page_cache(doc_chunk_files(spec, cached, workload, doc))
            records.append(record("warm_disk", doc, 0, cached.generate(workload.prompt(doc, 0), spec.max_new_tokens)))
    for doc in range(spec.num_docs):
        prompt = workload.prompt(doc, 0)
        files = doc_chunk_files(spec, cached, workload, doc)[: records[doc]["hit_tokens"] // spec.chunk_size]
        load_times, read_times = [], []
        for _ in range(3):
            read_times.append(elapsed_s(read_cold, files))
            with Shelf(config) as fresh:  # empty memory tier
                engine = HFEngine(model, tokenizer, fresh, model_id)
                drop_page_cache(files)
                load_times.append(elapsed_s(engine.load_prefix, prompt, engine.namespace()))
        limits.append(
            {
                "doc": doc,
                "bytes": sum(path.stat().st_size for path in files),
                "read_s": statistics.median(read_times),
                "load_s": statistics.median(load_times),
            }
        )
    return records, limits


def run(spec: LongDocQA, progress) -> dict:
    """The whole benchmark on the bundled model; the disk phase runs in a child process."""
    model, tokenizer = load_bundled()
    records, memcpy_limits = run_in_memory_phases(spec, model, tokenizer, BUNDLED_MODEL_ID, progress)
    disk = subprocess.run(
        [sys.executable, "-m", "kvshelf.bench.long_doc_qa", "--disk-phase", json.dumps(asdict(spec))],
        check=True,
        capture_output=True,
        text=True,
    )
    disk_records, read_limits = json.loads(disk.stdout.strip().splitlines()[-1])
    return summarize(spec, records + disk_records, memcpy_limits, read_limits)


def summarize(spec: LongDocQA, records: list[dict], memcpy_limits: list[dict], read_limits: list[dict]) -> dict:
    def median_of(phase: str, field: str) -> float:
        return statistics.median(r[field] for r in records if r["phase"] == phase)

    cold_outputs = {r["doc"]: r["output_ids"] for r in records if r["phase"] == "cold"}
    first_question = [r for r in records if r["question"] == 0 and r["phase"] != "cold"]
    ttft = {phase: median_of(phase, "ttft_s") for phase in ("cold", "first_pass", "warm_memory", "warm_disk")}
    memory_load_s = median_of("warm_memory", "load_s")
    memcpy_s = statistics.median(limit["memcpy_s"] for limit in memcpy_limits)
    disk_load_s = statistics.median(limit["load_s"] for limit in read_limits)
    read_s = statistics.median(limit["read_s"] for limit in read_limits)
    return {
        "benchmark": "long-doc-qa",
        "engine": "hf-transformers",
        "workload": asdict(spec),
        "ttft_s": ttft,
        "speedup_vs_cold": {
            "warm_memory": ttft["cold"] / ttft["warm_memory"],
            "warm_disk": ttft["cold"] / ttft["warm_disk"],
        },
        "first_pass_overhead": ttft["first_pass"] / ttft["cold"],
        "load_path": {
            "memory_load_s": memory_load_s,
            "memcpy_s": memcpy_s,
            "memory_vs_memcpy": memory_load_s / memcpy_s,
            "disk_load_s": disk_load_s,
            "cold_file_read_s": read_s,
            "disk_vs_file_read": disk_load_s / read_s,
            "bytes_per_doc": memcpy_limits[0]["bytes"],
        },
        "hit_tokens_median": {phase: median_of(phase, "hit_tokens") for phase in ("warm_memory", "warm_disk")},
        "outputs_match_cold": all(r["output_ids"] == cold_outputs[r["doc"]] for r in first_question),
        "records": [{k: v for k, v in r.items() if k != "output_ids"} for r in records],
    }


def _disk_phase_main(spec_json: str) -> None:
    model, tokenizer = load_bundled()
    records, limits = run_disk_phase(LongDocQA(**json.loads(spec_json)), model, tokenizer, BUNDLED_MODEL_ID)
    print(json.dumps([records, limits]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: the fresh-process disk phase of long-doc-qa")
    parser.add_argument("--disk-phase", required=True, help="the LongDocQA spec as JSON")
    _disk_phase_main(parser.parse_args().disk_phase)
