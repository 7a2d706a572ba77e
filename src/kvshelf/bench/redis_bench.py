"""`kvshelf bench redis`: the redis tier against plain redis-py, one node against a cluster, and TTFT.

1. Throughput of chunk-sized values: kvshelf's save (frame + checksum + pipelined SET) and load
   (pipelined GET + verify + decode) against redis-py pipelining SET and GET of the very same
   framed bytes, side by side in each repetition, on one redis-server and on a 3-node cluster.
2. End to end: vLLM with kvshelf over Redis (no disk tier); TTFT cold, warm from memory, and
   warm from Redis after a server restart.

Every Redis here is private: started on a free loopback port and stopped at the end.
"""

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import torch
from redis.cluster import RedisCluster

from kvshelf.bench.demo import cold_warm_restart
from kvshelf.bench.redis_servers import RedisClusterServers, RedisServer
from kvshelf.codecs import frame, get_codec
from kvshelf.config import load_config
from kvshelf.keys import Namespace, chunk_keys
from kvshelf.layout import KVLayout
from kvshelf.shelf import Shelf

BUNDLED_LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64)  # SmolLM2-135M, float32
TTFT_PHASES = {
    "cold": "cold (first request)",
    "warm_memory": "warm, memory tier",
    "warm_redis": "warm, Redis after restart",
}


def run_redis_bench(
    out_dir: Path, num_chunks: int, chunk_tokens: int, repeats: int, num_docs: int, doc_tokens: int, progress=print
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
                         redis_cluster=cluster, writer_queue_size=4)
    client = RedisCluster.from_url(urls[0]) if cluster else redis.Redis.from_url(urls[0])
    # Long-lived, like an engine's; the memory tier (1 KiB) holds no chunk, so every byte goes
    # to Redis and comes back from it.
    writer, reader = Shelf(config), Shelf(config)
    samples: dict[str, dict[str, list[float]]] = {"kvshelf": {"put": [], "get": []}, "redis_py": {"put": [], "get": []}}
    for repeat in range(repeats):
        tokens = list(range(repeat * len(chunks) * chunk_tokens, (repeat + 1) * len(chunks) * chunk_tokens))
        keys = chunk_keys(tokens, namespace, chunk_tokens)
        # The very bytes kvshelf stores, under other names: redis-py moves them as they are.
        blobs = [frame(chunk, key.digest, get_codec("raw")) for chunk, key in zip(chunks, keys)]
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
        if len(loaded.chunks) != len(chunks) or not all(map(torch.equal, loaded.chunks, chunks)):
            raise RuntimeError("kvshelf loaded other bytes than it saved")
        del loaded
        _flush_all(client, cluster)
    for closing in (writer, reader, client):
        closing.close()
    return {who: {op: statistics.median(values) for op, values in ops.items()} for who, ops in samples.items()}


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
    if "ttft" in summary:
        ttft = summary["ttft"]
        lines += ["", f"vLLM + kvshelf over Redis, {ttft['num_docs']} documents of ~{ttft['doc_tokens']} tokens"]
        for phase, label in TTFT_PHASES.items():
            lines.append(f"  {label:<30}{ttft['ttft_s'][phase] * 1000:>8.0f} ms{ttft['speedup_vs_cold'][phase]:>8.1f}x")
    return "\n".join(lines)
