"""`kvshelf bench routing-index`: the proxy's kv-aware routing decision asked of every instance
against answered from its event index, side by side on the same instances and prompts.

Each instance is a real shelf (memory and disk tiers) behind its lookup sockets (the worker's
ipc:// socket and the CURVE-keyed routing port on loopback TCP), publishing its KV events through
vLLM's own ZmqEventPublisher, as vLLM's scheduler does once a step. Two proxies follow the same
instances, one with --kv-index ask, one with --kv-index events. Documents are spread over the
instances; prompts are whole documents, documents with a question after them, and misses.

A decision is `Proxy.held_by`: the leading tokens of one prompt that each instance holds, which
routing picks from (tokenizing, the same for both, is left out). Reported per mode: decision
latency p50, p99 and mean; the ratio ask / events; and agreement: the share of decisions whose
held tokens for every instance equal the ask answer exactly.

    python -m kvshelf.bench.routing_index [--instances 4] [--doc-tokens 2048] [--decisions 300]
"""

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from aiohttp import web
from vllm.distributed.kv_events import KVEventBatch, ZmqEventPublisher

from kvshelf.config import load_config
from kvshelf.disagg.proxy import Instance, Proxy, ProxyConfig
from kvshelf.integrations.vllm.events import SchedulerEvents, worker_events
from kvshelf.integrations.vllm.lookup import LookupClient, LookupServer, RoutingLookupServer, lookup_address
from kvshelf.keys import Namespace
from kvshelf.layout import KVLayout
from kvshelf.ports import free_port
from kvshelf.shelf import Shelf

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16)  # KV size does not enter a lookup
CHUNK_SIZE = 256
SECRET = "routing-index-benchmark-secret-of-32-characters"
PATIENCE_S = 60.0
VOCABULARY = 50_000


class BenchInstance:
    """One instance: its shelf, lookup servers, event publisher and a /health endpoint."""

    def __init__(self, work: Path, index: int) -> None:
        config = load_config(environ={}, chunk_size=CHUNK_SIZE, disk_path=str(work / f"disk{index}"),
                             memory_size="1GiB", security_key=SECRET)
        self.shelf = Shelf(config)
        engine_id = f"bench-{uuid.uuid4()}"
        self.lookup = f"tcp://127.0.0.1:{free_port()}"
        self.events = f"tcp://127.0.0.1:{free_port()}"
        self.namespace = Namespace("routing-bench", LAYOUT)
        self._servers = [
            LookupServer(self.shelf, lookup_address(engine_id, 0)),
            RoutingLookupServer(self.lookup, self.namespace, CHUNK_SIZE, LookupClient(engine_id, 1, 5.0),
                                self.shelf.keyring),
        ]
        self._publisher = ZmqEventPublisher(0, endpoint=self.events.replace("127.0.0.1", "*"))
        self._scheduler_events = SchedulerEvents()

    def save(self, token_ids: list[int]) -> None:
        import torch

        kv = torch.zeros(LAYOUT.shape(len(token_ids)), dtype=LAYOUT.torch_dtype)
        self.shelf.save(token_ids, kv, self.namespace)
        self.shelf.flush()

    def step(self) -> None:
        """What vLLM does once a step: the worker's events to the scheduler, then published."""
        self._scheduler_events.add(worker_events(self.shelf))
        if events := self._scheduler_events.take():
            self._publisher.publish(KVEventBatch(ts=time.time(), events=events))

    async def serve_health(self) -> str:
        app = web.Application()
        app.router.add_get("/health", lambda request: web.json_response({}))
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        await self._runner.cleanup()
        self._publisher.shutdown()
        for server in self._servers:
            server.close()
        self.shelf.close()


def prompts_of(documents: list[list[int]], num_decisions: int, seed: int) -> list[list[int]]:
    """Whole documents, documents and a question, and misses, in a fixed random order."""
    rng = random.Random(seed)
    prompts = []
    for index in range(num_decisions):
        kind = index % 3
        if kind == 2:
            prompts.append([rng.randrange(VOCABULARY) for _ in range(len(documents[0]))])
            continue
        document = rng.choice(documents)
        question = [rng.randrange(VOCABULARY) for _ in range(rng.randrange(10, 200))] if kind else []
        prompts.append(document + question)
    rng.shuffle(prompts)
    return prompts


def summary(latencies_s: list[float]) -> dict:
    ordered = sorted(latencies_s)
    return {"p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
            "mean_ms": 1000 * statistics.fmean(ordered)}


async def run_routing_index(num_instances: int = 4, doc_tokens: int = 2048, docs_per_instance: int = 4,
                            num_decisions: int = 300, seed: int = 0) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="kvshelf-routing-") as work:
        instances = [BenchInstance(Path(work), index) for index in range(num_instances)]
        try:
            urls = [await instance.serve_health() for instance in instances]
            specs = tuple(Instance(url, lookup=instance.lookup, events=instance.events)
                          for url, instance in zip(urls, instances))
            documents = [[rng.randrange(VOCABULARY) for _ in range(doc_tokens)]
                         for _ in range(num_instances * docs_per_instance)]
            # Half saved before the proxies start (their starting picture), half after (their events).
            for number, document in enumerate(documents[: len(documents) // 2]):
                instances[number % num_instances].save(document)
            proxies = {mode: Proxy(ProxyConfig(instances=specs, kv_index=mode, health_interval_s=3600.0),
                                   instances[0].shelf.keyring) for mode in ("ask", "events")}
            for proxy in proxies.values():
                await proxy.start(web.Application())
            try:
                await _until_ready(proxies["events"], num_instances)
                for number, document in enumerate(documents[len(documents) // 2 :], start=len(documents) // 2):
                    instances[number % num_instances].save(document)
                    instances[number % num_instances].step()
                prompts = prompts_of(documents, num_decisions, seed)
                candidates = {mode: proxy.pools["colocated"] for mode, proxy in proxies.items()}
                await _until_caught_up(proxies, candidates, documents)
                latencies_s: dict[str, list[float]] = {"ask": [], "events": []}
                agreeing = 0
                for prompt in prompts:
                    answers = {}
                    for mode in ("ask", "events"):  # interleaved: both see the same machine load
                        started_s = time.perf_counter()
                        answers[mode] = await proxies[mode].held_by(candidates[mode], prompt, None)
                        latencies_s[mode].append(time.perf_counter() - started_s)
                    agreeing += answers["ask"] == answers["events"]
                stats = {mode: summary(values) for mode, values in latencies_s.items()}
                asked = proxies["events"].kv_index_stats()["answers"]["ask"]
            finally:
                for proxy in proxies.values():
                    await proxy.stop(web.Application())
        finally:
            for instance in instances:
                await instance.close()
    return {
        "instances": num_instances, "doc_tokens": doc_tokens, "chunk_size": CHUNK_SIZE,
        "documents": len(documents), "decisions": num_decisions,
        "ask": stats["ask"], "events": stats["events"],
        "ask_over_events": {name: stats["ask"][name] / stats["events"][name] for name in stats["ask"]},
        "agreement": agreeing / num_decisions,
        "events_mode_fell_back_to_asking": asked,
    }


async def _until_ready(proxy: Proxy, num_instances: int) -> None:
    for _ in range(int(PATIENCE_S / 0.05)):
        if proxy.kv_index_stats()["ready_instances"] == num_instances:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the event index did not start; are the events endpoints reachable?")


async def _until_caught_up(proxies: dict[str, Proxy], candidates: dict, documents: list[list[int]]) -> None:
    """Until the index holds every document the instances hold (the last events have arrived)."""
    for _ in range(int(PATIENCE_S / 0.05)):
        answers = [[await proxies[mode].held_by(candidates[mode], document, None) for document in documents]
                   for mode in ("ask", "events")]
        if answers[0] == answers[1]:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the event index did not catch up with the instances")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--doc-tokens", type=int, default=2048)
    parser.add_argument("--docs-per-instance", type=int, default=4)
    parser.add_argument("--decisions", type=int, default=300)
    args = parser.parse_args()
    result = asyncio.run(run_routing_index(args.instances, args.doc_tokens, args.docs_per_instance, args.decisions))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
