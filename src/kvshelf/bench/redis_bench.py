"""`kvshelf bench redis`: the redis tier against plain redis-py, one node against a cluster, the
cost of authentication and encryption, and TTFT.

1. Throughput of chunk-sized values: kvshelf's save (frame + MAC + pipelined SET) and load
   (pipelined GET + verify + decode) against redis-py pipelining SET and GET of the very same
   framed bytes, side by side in each repetition, on one redis-server and on a 3-node cluster.
2. Security: the shelf's save (encode + frame + write) and load (read + verify + decode) through
   a disk tier only and through a redis tier only, in three modes: off (`security.key: none`, an
   xxh3-128 checksum), mac (a key: a per-chunk GMAC) and mac+encrypt (`security.encrypt: true`,
   AES-256-GCM too). Each round measures every mode, in an order rotated from round to round, on
   a fresh, empty tier; a mode's cost is the median over rounds of its MB/s over that round's MB/s
   with security off, so what slows a whole round on a noisy machine cancels out. The disk tier
   lives in a temp dir and is read back from the page cache (warm): no device time hides the CPU
   cost. Also the CPU time per chunk of `Keyring.tag` and of seal / open alone.
3. End to end: vLLM with kvshelf over Redis (no disk tier); TTFT cold, warm from memory, and
   warm from Redis after a server restart.

Every Redis here is private: started on a free loopback port and stopped at the end.
"""

import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import torch
from redis.cluster import RedisCluster

from kvshelf.bench.demo import cold_warm_restart
from kvshelf.bench.redis_servers import RedisClusterServers, RedisServer
from kvshelf.codecs import frame, get_codec
from kvshelf.codecs.framing import HEADER_BYTES
from kvshelf.config import KEY_NONE, SecurityConfig, ShelfConfig, load_config
from kvshelf.keys import Namespace
from kvshelf.layout import KVLayout
from kvshelf.security import TAG_BYTES, Keyring
from kvshelf.shelf import Shelf

BUNDLED_LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64)  # SmolLM2-135M, float32
TTFT_PHASES = {
    "cold": "cold (first request)",
    "warm_memory": "warm, memory tier",
    "warm_redis": "warm, Redis after restart",
}
SECURITY_MODES = ("off", "mac", "mac+encrypt")
OPS = ("save", "load")
LOADS_PER_SAVE = 3
CPU_REPEATS = 20
# One random secret per run: the bench's shelves are keyed without touching $KVSHELF_HOME's key file.
BENCH_SECRET = secrets.token_hex(32)


@dataclass(frozen=True)
class SecuritySpec:
    """The security section's workload; `rounds` 0 skips it."""

    num_chunks: int = 16
    chunk_tokens: int = 128  # 5.9 MB of the bundled model's float32 KV, its serving chunk
    rounds: int = 7


def run_redis_bench(
    out_dir: Path, num_chunks: int, chunk_tokens: int, repeats: int, num_docs: int, doc_tokens: int, progress=print,
    security: SecuritySpec = SecuritySpec(),
) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    chunks = [torch.randn(BUNDLED_LAYOUT.shape(chunk_tokens)) for _ in range(num_chunks)]
    throughput = {}
    progress("one redis-server")
    with RedisServer(out_dir / "servers") as server:
        throughput["single"] = measure_throughput([server.url], False, chunks, chunk_tokens, repeats)
    progress("a 3-node Redis Cluster")
    with RedisClusterServers(out_dir / "servers") as cluster:
        throughput["cluster"] = measure_throughput(cluster.urls, True, chunks, chunk_tokens, repeats)
    summary = {
        "chunk_bytes": chunks[0].nbytes,
        "num_chunks": num_chunks,
        "repeats": repeats,
        "throughput_mb_s": throughput,
        "kvshelf_vs_redis_py": {
            setup: {op: result["kvshelf"][op] / result["redis_py"][op] for op in ("put", "get")}
            for setup, result in throughput.items()
        },
        "cluster_vs_single": {
            op: throughput["cluster"]["kvshelf"][op] / throughput["single"]["kvshelf"][op] for op in ("put", "get")
        },
    }
    del chunks  # the security part makes its own
    if security.rounds:
        summary["security"] = measure_security_cost(out_dir, security, progress)
    if num_docs:
        with RedisServer(out_dir / "servers") as server:
            extra_config = {"chunk_size": 128, "redis.url": server.url, "memory.size": "2GiB"}
            summary["ttft"] = cold_warm_restart(out_dir, extra_config, TTFT_PHASES, num_docs, doc_tokens, progress)
    return summary


def measure_throughput(
    urls: list[str], cluster: bool, chunks: list[torch.Tensor], chunk_tokens: int, repeats: int
) -> dict:
    """Median MB/s (of framed bytes) over `repeats`, kvshelf and plain redis-py, each put and get."""
    namespace = Namespace("redis-bench", BUNDLED_LAYOUT)
    config = load_config(environ={}, chunk_size=chunk_tokens, memory_size="1KiB", redis_url=urls,
                         redis_cluster=cluster, writer_queue_size=4, security_key=BENCH_SECRET)
    client = RedisCluster.from_url(urls[0]) if cluster else redis.Redis.from_url(urls[0])
    # Long-lived, like an engine's; the memory tier (1 KiB) holds no chunk, so every byte goes
    # to Redis and comes back from it.
    writer, reader = Shelf(config), Shelf(config)
    samples: dict[str, dict[str, list[float]]] = {"kvshelf": {"put": [], "get": []}, "redis_py": {"put": [], "get": []}}
    for repeat in range(repeats):
        tokens = list(range(repeat * len(chunks) * chunk_tokens, (repeat + 1) * len(chunks) * chunk_tokens))
        keys = writer.chunk_keys(tokens, namespace)
        # The very bytes kvshelf stores, under other names: redis-py moves them as they are.
        blobs = [frame(chunk, key.digest, get_codec("raw"), writer.keyring) for chunk, key in zip(chunks, keys)]
        num_mb = sum(len(blob) for blob in blobs) / 1e6
        names = [f"plain:{repeat}:{index}" for index in range(len(blobs))]
        put_s, _ = _timed(_pipelined, client, names, blobs)
        get_s, _ = _timed(_pipelined, client, names)
        samples["redis_py"]["put"].append(num_mb / put_s)
        samples["redis_py"]["get"].append(num_mb / get_s)
        del blobs
        put_s, _ = _timed(_save, writer, tokens, namespace, chunks)
        get_s, loaded = _timed(reader.load, tokens, namespace, len(tokens))
        samples["kvshelf"]["put"].append(num_mb / put_s)
        samples["kvshelf"]["get"].append(num_mb / get_s)
        _check_loaded(loaded.chunks, chunks)
        del loaded
        _flush_all(client, cluster)
    for closing in (writer, reader, client):
        closing.close()
    return {who: {op: statistics.median(values) for op, values in ops.items()} for who, ops in samples.items()}


def measure_security_cost(out_dir: Path, spec: SecuritySpec, progress=print) -> dict:
    """Save and load MB/s of KV per tier and security mode, their ratios to mode off, and the CPU
    cost per chunk of the tag and of seal / open."""
    chunks = [torch.randn(BUNDLED_LAYOUT.shape(spec.chunk_tokens)) for _ in range(spec.num_chunks)]
    samples = {}
    with tempfile.TemporaryDirectory(prefix="kvshelf-bench-security-") as disk_root:
        progress(f"security: disk tier, {spec.rounds} rounds")
        disk_bytes = 2 * sum(chunk.nbytes for chunk in chunks)
        samples["disk"] = measure_modes(lambda: _fresh_disk(Path(disk_root), disk_bytes), chunks, spec)
    with RedisServer(out_dir / "servers") as server:
        progress(f"security: redis tier, {spec.rounds} rounds")
        samples["redis"] = measure_modes(lambda: _emptied_redis(server.url), chunks, spec)
    progress("security: CPU cost per chunk")
    ratios = {tier: _ratios_to_off(by_mode) for tier, by_mode in samples.items()}
    return {
        "chunk_bytes": chunks[0].nbytes,
        "chunk_tokens": spec.chunk_tokens,
        "num_chunks": spec.num_chunks,
        "rounds": spec.rounds,
        "loads_per_save": LOADS_PER_SAVE,
        "disk_reads": "page cache (warm)",
        "mb_s": {tier: _medians(by_mode) for tier, by_mode in samples.items()},
        "vs_off": {tier: _medians(by_op) for tier, by_op in ratios.items()},
        "vs_off_rounds": ratios,
        "cpu_per_chunk": measure_crypto_cpu(chunks[0], CPU_REPEATS),
    }


def measure_modes(
    fresh_tier: Callable[[], AbstractContextManager[dict]], chunks: list[torch.Tensor], spec: SecuritySpec
) -> dict[str, dict[str, list[float]]]:
    """Save and load MB/s of each security mode in each round, through the tier `fresh_tier()`
    configures (config overrides); rounds interleave the modes in a rotating order, after one
    warm-up round."""
    samples = {mode: {op: [] for op in OPS} for mode in SECURITY_MODES}
    for round_index in range(-1, spec.rounds):  # round -1 warms up (thread pools, allocator) uncounted
        shift = round_index % len(SECURITY_MODES)
        for mode in SECURITY_MODES[shift:] + SECURITY_MODES[:shift]:
            with fresh_tier() as tier_overrides:
                config = load_config(environ={}, chunk_size=spec.chunk_tokens, memory_size="1KiB",
                                     writer_queue_size=4, **tier_overrides, **security_overrides(mode))
                save_mb_s, load_mb_s = save_load_mb_s(config, chunks)
            if round_index >= 0:
                samples[mode]["save"].append(save_mb_s)
                samples[mode]["load"].append(load_mb_s)
    return samples


def security_overrides(mode: str) -> dict:
    if mode == "off":
        return {"security_key": KEY_NONE}
    return {"security_key": BENCH_SECRET, "security_encrypt": mode == "mac+encrypt"}


def save_load_mb_s(config: ShelfConfig, chunks: list[torch.Tensor]) -> tuple[float, float]:
    """MB/s of KV that a new shelf of `config` saves (until written to its tiers) and loads back
    (the median of LOADS_PER_SAVE loads). The memory tier (1 KiB) holds no chunk: loads read the
    lower tier."""
    namespace = Namespace("redis-bench-security", BUNDLED_LAYOUT)
    tokens = list(range(len(chunks) * config.chunk_size))
    kv_mb = sum(chunk.nbytes for chunk in chunks) / 1e6
    load_mb_s = []
    with Shelf(config) as shelf:
        save_s, _ = _timed(_save, shelf, tokens, namespace, chunks)
        for _ in range(LOADS_PER_SAVE):
            load_s, loaded = _timed(shelf.load, tokens, namespace, len(tokens))
            _check_loaded(loaded.chunks, chunks)
            load_mb_s.append(kv_mb / load_s)
            del loaded  # before the next load, as an engine frees KV it has copied in
    return kv_mb / save_s, statistics.median(load_mb_s)


@contextmanager
def _fresh_disk(root: Path, size_bytes: int) -> Iterator[dict]:
    """An empty disk.path for one measurement, removed after it (its pages with it: no writeback
    of one measurement's files slows the next)."""
    path = Path(tempfile.mkdtemp(dir=root))
    try:
        yield {"disk_path": str(path), "disk_size": size_bytes}
    finally:
        shutil.rmtree(path)


@contextmanager
def _emptied_redis(url: str) -> Iterator[dict]:
    """The redis tier at `url` for one measurement, flushed after it."""
    try:
        yield {"redis_url": url}
    finally:
        with redis.Redis.from_url(url) as client:
            client.flushall()


def _ratios_to_off(by_mode: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, list[float]]]:
    """Each round's MB/s of each keyed mode over that same round's MB/s with security off: paired,
    so that what slowed a whole round cancels out."""
    return {
        op: {mode: [keyed / off for keyed, off in zip(by_mode[mode][op], by_mode["off"][op])]
             for mode in SECURITY_MODES[1:]}
        for op in OPS
    }


def _medians(nested: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {outer: {inner: statistics.median(values) for inner, values in by_inner.items()}
            for outer, by_inner in nested.items()}


def measure_crypto_cpu(chunk: torch.Tensor, repeats: int) -> dict:
    """Median (and best) ms and GB/s per chunk payload of the tag without a key (xxh3 checksum) and
    with one (a per-chunk GMAC), and of AES-GCM seal and open, interleaved over `repeats`."""
    payload = get_codec("raw").encode(chunk)
    key_digest, header = bytes(32), bytes(HEADER_BYTES - TAG_BYTES)  # the sizes of a chunk key and a header
    unkeyed = Keyring(None)
    keyed = Keyring.from_config(SecurityConfig(key=BENCH_SECRET, encrypt=True))
    nonce, sealed = keyed.seal(payload, key_digest + header)
    actions = {
        "checksum_off": lambda: unkeyed.tag(key_digest, header, payload),
        "mac": lambda: keyed.tag(key_digest, header, payload),
        "seal": lambda: keyed.seal(payload, key_digest + header),
        "open": lambda: keyed.open(nonce, memoryview(sealed), key_digest + header),
    }
    samples = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            samples[name].append(_timed(action)[0])
    return {
        name: {"ms": statistics.median(seconds) * 1000, "best_ms": min(seconds) * 1000,
               "gb_s": chunk.nbytes / statistics.median(seconds) / 1e9}
        for name, seconds in samples.items()
    }


def _check_loaded(loaded: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    if len(loaded) != len(saved) or not all(map(torch.equal, loaded, saved)):
        raise RuntimeError("kvshelf loaded other bytes than it saved")


def _save(shelf: Shelf, tokens: list[int], namespace: Namespace, chunks: list[torch.Tensor]) -> None:
    shelf.save_chunks(tokens, namespace, lambda index: chunks[index])
    shelf.flush()


def _pipelined(client, names: list[str], blobs: list[bytes] | None = None) -> list:
    pipeline = client.pipeline(transaction=False)
    for index, name in enumerate(names):
        pipeline.set(name, blobs[index]) if blobs is not None else pipeline.get(name)
    return pipeline.execute()


def _timed(action: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    started_s = time.perf_counter()
    result = action(*args)
    return time.perf_counter() - started_s, result


def _flush_all(client, cluster: bool) -> None:
    if cluster:
        client.flushall(target_nodes=RedisCluster.PRIMARIES)
    else:
        client.flushall()


def redis_table(summary: dict) -> str:
    lines = [
        f"{summary['num_chunks']} chunks of {summary['chunk_bytes'] / 2**20:.1f} MiB, median of {summary['repeats']}",
        "",
        f"{'set-up':<10}{'who':<10}{'put MB/s':>10}{'get MB/s':>10}",
    ]
    for setup, result in summary["throughput_mb_s"].items():
        for who, ops in result.items():
            lines.append(f"{setup:<10}{who:<10}{ops['put']:>10.0f}{ops['get']:>10.0f}")
        ratio = summary["kvshelf_vs_redis_py"][setup]
        lines.append(f"{'':<10}{'ratio':<10}{ratio['put']:>9.0%} {ratio['get']:>9.0%}")
    cluster = summary["cluster_vs_single"]
    lines.append(f"cluster vs single (kvshelf): put {cluster['put']:.2f}x, get {cluster['get']:.2f}x")
    if "security" in summary:
        lines += ["", *security_table(summary["security"])]
    if "ttft" in summary:
        ttft = summary["ttft"]
        lines += ["", f"vLLM + kvshelf over Redis, {ttft['num_docs']} documents of ~{ttft['doc_tokens']} tokens"]
        for phase, label in TTFT_PHASES.items():
            lines.append(f"  {label:<30}{ttft['ttft_s'][phase] * 1000:>8.0f} ms{ttft['speedup_vs_cold'][phase]:>8.1f}x")
    return "\n".join(lines)


def security_table(security: dict) -> list[str]:
    lines = [
        f"security: {security['num_chunks']} chunks of {security['chunk_bytes'] / 1e6:.1f} MB "
        f"({security['chunk_tokens']} tokens), {security['rounds']} interleaved rounds; MB/s of KV (medians);",
        "vs off: median of each round's ratio [lowest-highest]; disk tier in a temp dir, read back from the "
        f"{security['disk_reads']}",
        f"{'tier':<7}{'mode':<13}{'save MB/s':>10}{'load MB/s':>10}{'save vs off':>20}{'load vs off':>20}",
    ]
    for tier, by_mode in security["mb_s"].items():
        for mode, ops in by_mode.items():
            ratios = "".join(_ratio_cell(security, tier, op, mode) for op in OPS) if mode != "off" else ""
            lines.append(f"{tier:<7}{mode:<13}{ops['save']:>10.0f}{ops['load']:>10.0f}{ratios}")
    lines.append(f"CPU per {security['chunk_bytes'] / 1e6:.1f} MB chunk (median, best):")
    for name, cost in security["cpu_per_chunk"].items():
        lines.append(f"  {name:<14}{cost['ms']:>8.2f} ms{cost['best_ms']:>8.2f} ms{cost['gb_s']:>8.2f} GB/s")
    return lines


def _ratio_cell(security: dict, tier: str, op: str, mode: str) -> str:
    rounds = security["vs_off_rounds"][tier][op][mode]
    return f"{security['vs_off'][tier][op][mode]:>7.0%} [{min(rounds):.0%}-{max(rounds):.0%}]".rjust(20)
