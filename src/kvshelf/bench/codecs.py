"""`kvshelf bench codecs`: size, speed and quality of every codec on real KV of the bundled model.

For each of `num_prompts` windows of real prose, the prefix's exact KV is computed once, cut into
chunks and, per codec, framed and unframed chunk by chunk as the shelf would (with the chunk MAC
of a keyed deployment, the default). Quality is measured on the decoded KV against the exact KV,
side by side:

- perplexity of the next `continuation_tokens` tokens of the text, given the prefix's KV;
- greedy agreement: `generate_tokens` tokens decoded greedily after the prefix, compared with
  those the exact KV gives (positions that agree, and prompts whose tokens all agree).

Sizes are framed bytes per token; speeds are MB/s of raw (float32) KV. Load against recompute:
each codec's chunks of the first prompt are written to files, dropped from the page cache, then
read and decoded one by one; recomputing is the exact prefill's time per chunk.
"""

import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from kvshelf.bench.long_doc_qa import drop_page_cache
from kvshelf.codecs import CODECS, CODECS_BY_ID, frame, unframe
from kvshelf.codecs.framing import Expected
from kvshelf.integrations.hf import cache_to_canonical
from kvshelf.layout import DTYPE_NAMES, KVLayout
from kvshelf.security import Keyring

KEY = bytes(32)
# Keyed, as a deployment is by default: frame and unframe times include the chunk MAC.
KEYRING = Keyring(bytes(range(32)))


def run_codec_bench(
    model,
    token_ids: list[int],
    codec_names: list[str],
    num_prompts: int,
    prefix_tokens: int,
    chunk_size: int,
    continuation_tokens: int,
    generate_tokens: int,
    progress=print,
) -> dict:
    window = prefix_tokens + continuation_tokens
    prompts = [token_ids[index * window : (index + 1) * window] for index in range(num_prompts)]
    exact, prefill_s = [], []
    prefix_kv(model, prompts[0][:prefix_tokens])  # untimed: the first forward pass pays one-time costs
    for index, prompt in enumerate(prompts):
        progress(f"exact KV of prompt {index + 1}/{num_prompts}")
        started_s = time.perf_counter()
        kv = prefix_kv(model, prompt[:prefix_tokens])
        prefill_s.append(time.perf_counter() - started_s)
        exact.append({"kv": kv, "nll": nll(model, kv, prompt[prefix_tokens:]),
                      "greedy": greedy(model, kv, prompt[prefix_tokens], generate_tokens)})
    results = {}
    for name in dict.fromkeys(["raw", "int8", *codec_names]):  # raw and int8: the references for sizes
        progress(f"codec {name}")
        results[name] = measure_codec(model, name, prompts, exact, prefix_tokens, chunk_size, generate_tokens)
    recompute_s = statistics.median(prefill_s) / (prefix_tokens / chunk_size)
    exact_nll = sum(entry["nll"] for entry in exact) / len(exact)
    for result in results.values():
        result["perplexity_vs_exact"] = result["perplexity"] / math.exp(exact_nll)
        result["ratio_vs_raw"] = results["raw"]["bytes_per_token"] / result["bytes_per_token"]
        result["ratio_vs_int8"] = results["int8"]["bytes_per_token"] / result["bytes_per_token"]
        result["recompute_vs_disk_load"] = recompute_s / result["disk_load_s_per_chunk"]
    return {
        "num_prompts": num_prompts,
        "prefix_tokens": prefix_tokens,
        "chunk_size": chunk_size,
        "continuation_tokens": continuation_tokens,
        "generate_tokens": generate_tokens,
        "exact_perplexity": math.exp(exact_nll),
        "recompute_s_per_chunk": recompute_s,
        "codecs": results,
    }


def layout_of_kv(kv: torch.Tensor) -> KVLayout:
    """The layout of `kv` (layers, 2, tokens, kv_heads, head_dim)."""
    return KVLayout(kv.shape[0], kv.shape[3], kv.shape[4], DTYPE_NAMES[kv.dtype])


def measure_codec(model, name, prompts, exact, prefix_tokens, chunk_size, generate_tokens) -> dict:
    codec = CODECS[name]
    num_bytes = encode_s = decode_s = raw_bytes = 0
    nlls, agreeing_tokens, identical, blobs = [], 0, 0, []
    for prompt, reference in zip(prompts, exact):
        decoded_chunks = []
        for begin in range(0, prefix_tokens, chunk_size):
            chunk = reference["kv"][:, :, begin : begin + chunk_size].contiguous()
            started_s = time.perf_counter()
            blob = frame(chunk, KEY, codec, KEYRING)
            encode_s += time.perf_counter() - started_s
            expected = Expected(layout_of_kv(chunk), chunk.shape[2])
            started_s = time.perf_counter()
            decoded_chunks.append(unframe(blob, KEY, KEYRING, CODECS_BY_ID, expected))
            decode_s += time.perf_counter() - started_s
            num_bytes += len(blob)
            raw_bytes += chunk.nbytes
            if prompt is prompts[0]:
                blobs.append((blob, expected))  # timed loading from disk below
        decoded = torch.cat(decoded_chunks, dim=2)
        nlls.append(nll(model, decoded, prompt[prefix_tokens:]))
        tokens = greedy(model, decoded, prompt[prefix_tokens], generate_tokens)
        agreeing_tokens += sum(a == b for a, b in zip(tokens, reference["greedy"]))
        identical += tokens == reference["greedy"]
    return {
        "disk_load_s_per_chunk": disk_load_s(blobs),
        "bytes_per_token": num_bytes / (len(prompts) * prefix_tokens),
        "bits_per_value": num_bytes * 8 / (raw_bytes / 4),
        "encode_mb_s": raw_bytes / encode_s / 1e6,
        "decode_mb_s": raw_bytes / decode_s / 1e6,
        "perplexity": math.exp(sum(nlls) / len(nlls)),
        "greedy_token_agreement": agreeing_tokens / (len(prompts) * generate_tokens),
        "greedy_identical_prompts": identical / len(prompts),
    }


def disk_load_s(blobs: list[tuple[bytes, Expected]]) -> float:
    """Seconds per chunk to read `blobs` (each with what it must decode to) back from files out of
    the page cache, and decode them."""
    with tempfile.TemporaryDirectory(prefix="kvshelf-codecs-") as directory:
        paths = [Path(directory) / f"{index}.kvs" for index in range(len(blobs))]
        for path, (blob, _) in zip(paths, blobs):
            path.write_bytes(blob)
        drop_page_cache(paths)
        started_s = time.perf_counter()
        for path, (_, expected) in zip(paths, blobs):
            unframe(path.read_bytes(), KEY, KEYRING, CODECS_BY_ID, expected)
        return (time.perf_counter() - started_s) / len(paths)


def cache_of(kv: torch.Tensor) -> DynamicCache:
    """A DynamicCache holding `kv` (layers, 2, tokens, kv_heads, head_dim)."""
    cache = DynamicCache()
    for layer, layer_kv in enumerate(kv):
        cache.update(layer_kv[0].transpose(0, 1).unsqueeze(0), layer_kv[1].transpose(0, 1).unsqueeze(0), layer)
    return cache


@torch.no_grad()
def prefix_kv(model, token_ids: list[int]) -> torch.Tensor:
    cache = DynamicCache()
    model(torch.tensor([token_ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache_to_canonical(cache, 0, len(token_ids))


@torch.no_grad()
def nll(model, kv: torch.Tensor, continuation: list[int]) -> float:
    """Mean negative log-likelihood of `continuation[1:]` given the prefix's `kv` and `continuation[0]`."""
    logits = model(torch.tensor([continuation]), past_key_values=cache_of(kv), use_cache=True).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(continuation[1:])).item()


@torch.no_grad()
def greedy(model, kv: torch.Tensor, next_token: int, num_tokens: int) -> list[int]:
    cache, tokens = cache_of(kv), []
    for _ in range(num_tokens):
        logits = model(torch.tensor([[next_token]]), past_key_values=cache, use_cache=True).logits[0, -1]
        next_token = int(torch.argmax(logits))
        tokens.append(next_token)
    return tokens


def codecs_table(summary: dict) -> str:
    lines = [
        f"{summary['num_prompts']} prompts, {summary['prefix_tokens']}-token prefixes in {summary['chunk_size']}-token "
        f"chunks; exact perplexity {summary['exact_perplexity']:.3f}; recomputing a chunk takes "
        f"{summary['recompute_s_per_chunk'] * 1000:.0f} ms",
        "",
        f"{'codec':<14}{'bits/value':>11}{'vs raw':>8}{'vs int8':>8}{'enc MB/s':>10}{'dec MB/s':>10}"
        f"{'ppl':>9}{'vs exact':>9}{'greedy':>8}{'same':>6}{'load ms':>9}{'vs recompute':>13}",
    ]
    for name, result in summary["codecs"].items():
        lines.append(
            f"{name:<14}{result['bits_per_value']:>11.2f}{result['ratio_vs_raw']:>7.1f}x{result['ratio_vs_int8']:>7.2f}x"
            f"{result['encode_mb_s']:>10.0f}{result['decode_mb_s']:>10.0f}{result['perplexity']:>9.3f}"
            f"{result['perplexity_vs_exact'] - 1:>+9.1%}{result['greedy_token_agreement']:>8.0%}"
            f"{result['greedy_identical_prompts']:>6.0%}{result['disk_load_s_per_chunk'] * 1000:>9.1f}"
            f"{result['recompute_vs_disk_load']:>12.1f}x"
        )
    return "\n".join(lines)
