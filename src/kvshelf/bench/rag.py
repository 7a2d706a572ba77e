"""`kvshelf bench rag`: CacheBlend on retrieval-style prompts, against full prefill and prefix caching.

Documents are windows of real prose (the standard library's docstrings), each with one planted
fact: "The access code of the NAME archive is NUMBER." A prompt holds a short instruction, several
documents in a shuffled order with the gold document at a varying place, and a question whose
answer is the gold document's number. Side by side, on the same token ids:

- `full_prefill`: no cache, the reference;
- `prefix_caching`: kvshelf's ordinary prefix cache, warmed with every document right after the
  instruction (its best case: whichever document comes first hits, the rest is computed);
- `blend_<ratio>`: blend mode with every document's KV stored beforehand (CacheBlend's setting),
  at each recompute ratio; ratio 0 is plain concatenation of the stored KV.

Per set-up: mean TTFT, accuracy (the gold number in the answer), token F1 against the gold
answer, and agreement with full prefill (identical answers).
"""

import random
import re
import tempfile
from dataclasses import asdict, dataclass

from kvshelf.blend.engine import BlendSettings, split_prompt
from kvshelf.config import load_config
from kvshelf.integrations.hf import HFEngine
from kvshelf.models import BUNDLED_MODEL_ID
from kvshelf.shelf import Shelf

NAMES = ("Orion", "Basalt", "Juniper", "Cobalt", "Meridian", "Saffron", "Tundra", "Quartz", "Harbor", "Lattice",
         "Ember", "Falcon", "Glacier", "Indigo", "Kestrel", "Lumen")
INSTRUCTION = "Read the documents below, then answer the question with the number asked for."


@dataclass(frozen=True)
class RagSpec:
    num_docs: int = 4  # documents per prompt
    doc_tokens: int = 512
    num_prompts: int = 8
    ratios: tuple[float, ...] = (0.0, 0.05, 0.15, 0.3)
    check_layers: tuple[int, ...] = (1,)  # several: CacheBlend's gradual filtering
    chunk_size: int = 64
    max_new_tokens: int = 8
    seed: int = 0


@dataclass(frozen=True)
class Document:
    text: str
    name: str
    code: str


def make_documents(tokenizer, token_ids: list[int], count: int, doc_tokens: int, rng: random.Random) -> list[Document]:
    """`count` windows of `token_ids`, each with a fact planted between two of its sentences."""
    documents = []
    for index in range(count):
        text = tokenizer.decode(token_ids[index * doc_tokens : (index + 1) * doc_tokens])
        name, code = NAMES[index % len(NAMES)], str(rng.randrange(1000, 10000))
        sentences = re.split(r"(?<=[.!?])\s+", text)
        cut = rng.randrange(1, max(2, len(sentences) - 1))
        fact = f"The access code of the {name} archive is {code}."
        documents.append(Document(" ".join([*sentences[:cut], fact, *sentences[cut:]]), name, code))
    return documents


def make_prompts(documents: list[Document], spec: RagSpec, rng: random.Random) -> list[tuple[list[str], Document]]:
    """Segments (instruction, documents, question) of each prompt, and its gold document."""
    prompts = []
    for index in range(spec.num_prompts):
        gold = documents[index % len(documents)]
        others = rng.sample([doc for doc in documents if doc is not gold], spec.num_docs - 1)
        others.insert(index % spec.num_docs, gold)  # the gold document at every place in turn
        archive = f"access code of the {gold.name} archive"
        question = f"Question: What is the {archive}?\nAnswer: The {archive} is"
        prompts.append(([INSTRUCTION, *(doc.text for doc in others), question], gold))
    return prompts


def score(text: str, gold: str) -> tuple[bool, float]:
    """Whether `text` holds the gold answer, and token F1 of its first line against it."""
    answer_tokens = re.findall(r"\w+", text.split("\n")[0])
    f1 = 0.0
    if gold in answer_tokens:
        precision, recall = 1 / len(answer_tokens), 1.0
        f1 = 2 * precision * recall / (precision + recall)
    return gold in re.findall(r"\d+", text), f1


def run_rag(model, tokenizer, token_ids: list[int], spec: RagSpec, progress=print) -> dict:
    rng = random.Random(spec.seed)
    documents = make_documents(tokenizer, token_ids, max(spec.num_docs * 2, spec.num_prompts), spec.doc_tokens, rng)
    prompts = make_prompts(documents, spec, rng)
    # Every set-up sees the same token ids: the segments tokenized alone, as blend mode does.
    ids_of = [split_prompt(tokenizer, segments, BlendSettings()).token_ids for segments, _ in prompts]
    records: dict[str, list[dict]] = {}

    def measure(setup: str, generate) -> None:
        progress(f"{setup}: {len(prompts)} prompts")
        records[setup] = []
        for (segments, gold), ids in zip(prompts, ids_of):
            result = generate(segments, ids)
            correct, f1 = score(result.text, gold.code)
            records[setup].append({"ttft_s": result.ttft_s, "hit_tokens": result.hit_tokens, "text": result.text,
                                   "output_ids": result.output_ids,
                                   "correct": correct, "f1": f1, "blend": result.blend and asdict(result.blend)})

    reference = HFEngine(model, tokenizer, None, BUNDLED_MODEL_ID)
    measure("full_prefill", lambda segments, ids: reference.generate(ids, spec.max_new_tokens))
    with tempfile.TemporaryDirectory(prefix="kvshelf-rag-") as directory:
        config = load_config(environ={}, chunk_size=spec.chunk_size, disk_path=directory, memory_size="4GiB")
        with Shelf(config) as shelf:
            engine = HFEngine(model, tokenizer, shelf, BUNDLED_MODEL_ID)
            progress("warming the prefix cache: every document right after the instruction")
            for document in documents:
                warm_up = [INSTRUCTION, document.text, "?"]
                engine.generate(split_prompt(tokenizer, warm_up, BlendSettings()).token_ids, 1)
            shelf.flush()
            measure("prefix_caching", lambda segments, ids: engine.generate(ids, spec.max_new_tokens))
            progress("storing every document's own KV (blend mode)")
            engine.generate([*(document.text for document in documents), "?"], 1, blend=BlendSettings())
            shelf.flush()
            for ratio in spec.ratios:
                settings = BlendSettings(recompute_ratio=ratio, check_layers=spec.check_layers)
                measure(f"blend_{ratio}", lambda segments, ids, s=settings: engine.generate(
                    segments, spec.max_new_tokens, blend=s))
    return summarize(spec, records)


def summarize(spec: RagSpec, records: dict[str, list[dict]]) -> dict:
    reference = records["full_prefill"]
    reference_ttft_s = mean_ttft_s(reference)
    setups = {}
    for setup, rows in records.items():
        ttft_s = mean_ttft_s(rows)
        setups[setup] = {
            "mean_ttft_s": ttft_s,
            "ttft_vs_full_prefill": reference_ttft_s / ttft_s,
            "accuracy": sum(row["correct"] for row in rows) / len(rows),
            "f1": sum(row["f1"] for row in rows) / len(rows),
            "agreement_with_full_prefill": sum(
                row["output_ids"] == ref["output_ids"] for row, ref in zip(rows, reference)
            ) / len(rows),
        }
    spec_json = vars(spec) | {"ratios": list(spec.ratios), "check_layers": list(spec.check_layers)}
    return {"spec": spec_json, "setups": setups, "records": records}


def mean_ttft_s(rows: list[dict]) -> float:
    return sum(row["ttft_s"] for row in rows) / len(rows)


def rag_table(summary: dict) -> str:
    spec = summary["spec"]
    lines = [
        f"{spec['num_prompts']} prompts of {spec['num_docs']} documents x ~{spec['doc_tokens']} tokens",
        "",
        f"{'set-up':<16}{'mean TTFT':>11}{'vs full':>9}{'accuracy':>10}{'F1':>7}{'= full':>8}",
    ]
    for setup, row in summary["setups"].items():
        lines.append(
            f"{setup:<16}{row['mean_ttft_s'] * 1000:>8.0f} ms{row['ttft_vs_full_prefill']:>8.2f}x"
            f"{row['accuracy']:>10.0%}{row['f1']:>7.2f}{row['agreement_with_full_prefill']:>8.0%}"
        )
    return "\n".join(lines)
