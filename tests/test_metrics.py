"""Metrics that answer operators' questions: hits per tier, misses by reason, tenants, latencies,
time saved, chunk ages, pins and per-request traces, on a real shelf (memory and disk tiers)."""

import json
import logging
import threading
import time

import pytest
import torch
from prometheus_client import generate_latest

from kvshelf import Namespace
from kvshelf.keys import Prompt
from kvshelf.metrics import MISS_REASONS, OTHER_TENANTS
from kvshelf.ports import free_port
from kvshelf.shelf.misses import ChunkHistory
from kvshelf.tiers.disk import chunk_path
from tests.conftest import CHUNK_SIZE, LAYOUT, random_kv

TOKENS = list(range(100, 118))  # 4 full chunks of 4 and a partial one
CHUNK_BYTES = LAYOUT.bytes_per_token * CHUNK_SIZE


def misses(shelf) -> dict[str, int]:
    return {reason: count for reason, count in shelf.stats()["misses_by_reason"].items() if count}


def exposition(shelf) -> str:
    return generate_latest(shelf.metrics.registry).decode()


def test_hits_are_counted_by_the_tier_that_held_them(make_shelf, namespace):
    shelf = make_shelf()
    shelf.save(TOKENS, random_kv(len(TOKENS)), namespace)
    shelf.flush()
    shelf._stack.memory.delete(shelf.chunk_keys(TOKENS, namespace)[2:])  # as if evicted; the disk has all 4
    assert shelf.lookup(TOKENS, namespace) == 16
    tiers = shelf.stats()["tiers"]
    assert (tiers["memory"]["hit_tokens"], tiers["disk"]["hit_tokens"]) == (8, 8)
    assert 'kvshelf_tier_hit_tokens_total{tier="disk"} 8.0' in exposition(shelf)
    assert misses(shelf) == {"partial_chunk": 2}


def test_misses_are_told_apart_by_reason(make_shelf, namespace):
    shelf = make_shelf(memory_size=2 * CHUNK_BYTES, disk_path=None)
    other = [7] * 8
    assert shelf.lookup(other, namespace) == 0
    assert misses(shelf) == {"not_stored": 8}
    shelf.save(other, random_kv(8), namespace)
    shelf.save(TOKENS[:8], random_kv(8), namespace)  # evicts `other`
    assert shelf.lookup(other, namespace) == 0
    assert misses(shelf) == {"not_stored": 8, "evicted": 8}


def test_a_corrupt_chunk_is_a_load_miss_then_a_lookup_miss_by_reason(make_shelf, namespace):
    first = make_shelf()
    first.save(TOKENS, random_kv(len(TOKENS)), namespace)
    first.flush()
    path = chunk_path(first.config.disk.path, first.chunk_keys(TOKENS, namespace)[2])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(data)
    second = make_shelf()
    assert second.lookup(TOKENS, namespace) == 16  # the damage shows only when read
    assert second.load(TOKENS, namespace, 16).num_tokens == 8
    assert misses(second) == {"partial_chunk": 2, "corrupt": 8}
    assert second.lookup(TOKENS, namespace) == 8  # it was deleted: the next lookup says why
    assert misses(second) == {"partial_chunk": 4, "corrupt": 16}


def test_a_tier_that_is_down_is_a_miss_for_tier_down(make_shelf, namespace):
    # A Redis nobody listens on, started with on_start_failure: warn: the tier backs off at once.
    shelf = make_shelf(disk_path=None, redis_url=f"redis://127.0.0.1:{free_port()}", redis_on_start_failure="warn",
                       tier_backoff_s=60)
    assert shelf.lookup(TOKENS, namespace) == 0
    assert misses(shelf) == {"tier_down": 16, "partial_chunk": 2}


def test_expired_means_last_used_longer_ago_than_the_ttl(namespace, make_shelf):
    key = make_shelf().chunk_keys(TOKENS, namespace)[0]
    history = ChunkHistory(ttl_s=0.05)
    assert history.reason(key) == "not_stored"
    history.note_used([key])
    assert history.reason(key) == "evicted"
    time.sleep(0.1)
    assert history.reason(key) == "expired"
    history.note_corrupt([key])
    assert history.reason(key) == "corrupt"


def test_held_chunks_refused_as_slower_are_counted(make_shelf, namespace):
    shelf = make_shelf()
    shelf.cost._counters.load_refused_tokens += 8  # what LoadCostModel.worth_loading counts when it refuses
    assert misses(shelf) == {"slower": 8}
    assert set(shelf.stats()["misses_by_reason"]) == set(MISS_REASONS)
    assert 'kvshelf_miss_tokens_total{reason="slower"} 8.0' in exposition(shelf)


def test_tenants_are_labelled_by_a_keyed_hash_and_bounded(make_shelf, namespace):
    shelf = make_shelf(metrics_max_tenants=2)
    for salt in ("acme-secret-salt", "globex-secret-salt", "initech-secret-salt"):
        tenant = Namespace(namespace.model_id, namespace.layout, cache_salt=salt)
        shelf.save(TOKENS[:8], random_kv(8), tenant)
        shelf.lookup(TOKENS, tenant)
    tenants = shelf.stats()["tenants"]
    acme = shelf.keyring.salt_tag("acme-secret-salt")
    assert set(tenants) == {acme, shelf.keyring.salt_tag("globex-secret-salt"), OTHER_TENANTS}
    assert tenants[acme] == {"lookup_tokens": 18, "hit_tokens": 8, "stored_bytes": 2 * CHUNK_BYTES}
    text = exposition(shelf)
    assert f'kvshelf_tenant_lookup_tokens_total{{result="hit",tenant="{acme}"}} 8.0' in text
    assert "secret" not in text


def test_latencies_per_tier_and_time_saved(make_shelf, namespace):
    first = make_shelf()
    first.save(TOKENS, random_kv(len(TOKENS)), namespace)
    first.flush()
    second = make_shelf()
    second.cost.note_prefill(1000, 2.0)  # 2 ms a token, as an engine's steps would measure
    second.lookup(TOKENS, namespace)
    assert second.load(TOKENS, namespace, 16).num_tokens == 16
    second.load(TOKENS, namespace, 16, prefetch=True)  # promotes only: not counted as handed over
    text = exposition(second)
    for histogram in ("lookup", "load", "decode"):
        assert f'kvshelf_{histogram}_seconds_count{{tier="disk"}}' in text
    assert 'kvshelf_decode_seconds_count{tier="disk"} 4.0' in text
    assert 'kvshelf_store_seconds_count{tier="disk"} 1.0' in exposition(first)
    stats = second.stats()
    assert stats["loaded_tokens"] == 16
    assert stats["saved_prefill_s"] == pytest.approx(16 * 0.002)


def test_evicted_chunks_ages_are_observed(make_shelf, namespace):
    shelf = make_shelf(memory_size=2 * CHUNK_BYTES)
    shelf.save(TOKENS[:8], random_kv(8), namespace)
    shelf.save([7] * 8, random_kv(8), namespace)
    assert 'kvshelf_evicted_age_seconds_count{tier="memory"} 2.0' in exposition(shelf)


def test_pinned_chunks_survive_eviction_within_the_pin_budget(make_shelf, namespace):
    shelf = make_shelf(memory_size=4 * CHUNK_BYTES, memory_pin_size=2 * CHUNK_BYTES, disk_path=None)
    kv = random_kv(len(TOKENS))
    shelf.save(TOKENS, kv, namespace)
    prompt = Prompt(TOKENS, namespace)
    assert shelf.pin(prompt) == 8  # the budget holds 2 of the 4 chunks
    for seed in range(8):  # traffic that would evict every unpinned chunk
        shelf.save([seed] * 4, random_kv(4, seed=seed), namespace)
    assert shelf.lookup(TOKENS, namespace) == 8
    assert torch.equal(shelf.load(TOKENS, namespace, 8).kv(), kv[:, :, :8])
    assert shelf.stats()["tiers"]["memory"]["pinned_bytes"] == 2 * CHUNK_BYTES
    assert shelf.unpin(prompt) == 8
    for seed in range(8):
        shelf.save([seed + 10] * 4, random_kv(4, seed=seed), namespace)
    assert shelf.lookup(TOKENS, namespace) == 0
    assert shelf.stats()["tiers"]["memory"]["pinned_bytes"] == 0


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_trace_tells_one_requests_story_as_a_json_line(make_shelf, namespace):
    shelf = make_shelf(metrics_trace=True)
    tenant = Namespace(namespace.model_id, namespace.layout, cache_salt="acme-secret-salt")
    shelf.save(TOKENS[:8], random_kv(8), tenant)
    shelf.locate(Prompt(TOKENS, tenant), tail=False, request_id="r1")
    shelf.load(TOKENS, tenant, 16, request_id="r1")
    shelf.save_chunks(TOKENS, tenant, lambda index: random_kv(CHUNK_SIZE, seed=index), start=8, request_id="r1")
    lines = Lines()
    logging.getLogger("kvshelf.trace").addHandler(lines)
    try:
        shelf.tracer.finish("r1")
    finally:
        logging.getLogger("kvshelf.trace").removeHandler(lines)
    [line] = lines.lines
    trace = json.loads(line.removeprefix("kvshelf trace "))
    assert trace["request_id"] == "r1" and trace["tenant"] == shelf.keyring.salt_tag("acme-secret-salt")
    assert (trace["prompt_tokens"], trace["hit_tokens"], trace["lookup_chunks"]) == (18, 8, {"memory": 2})
    assert trace["miss_reason"] == "not_stored"
    assert (trace["loaded_tokens"], trace["loaded_bytes"]) == (8, {"memory": 2 * CHUNK_BYTES})
    assert trace["stored_chunks"] == 2
    assert "secret" not in line and "100" not in line.replace('"request_id"', "")
    assert shelf.tracer.finish("r1") is None  # emitted once


def test_without_tracing_nothing_is_kept(make_shelf, namespace):
    shelf = make_shelf()
    shelf.locate(Prompt(TOKENS, namespace), request_id="r1")
    assert shelf.tracer.trace("r1") is None and shelf.tracer.finish("r1") is None


def test_with_metrics_off_only_the_counters_are_kept(make_shelf, namespace):
    shelf = make_shelf(metrics_enabled=False)
    tenant = Namespace(namespace.model_id, namespace.layout, cache_salt="acme")
    shelf.save(TOKENS, random_kv(len(TOKENS)), tenant)
    shelf.locate(Prompt(TOKENS, tenant), request_id="r1")
    shelf.load(TOKENS, tenant, 16, request_id="r1")
    shelf.metrics.first_token("r1", True)
    stats = shelf.stats()
    assert stats["hit_tokens"] == 16 and stats["tenants"] == {} and stats["misses_by_reason"]["partial_chunk"] == 2
    text = exposition(shelf)
    assert "kvshelf_lookup_tokens_total" in text and "_seconds_bucket" not in text


def test_tracing_needs_metrics_on(make_shelf):
    from kvshelf.errors import ConfigError

    with pytest.raises(ConfigError, match="metrics.enabled"):
        make_shelf(metrics_enabled=False, metrics_trace=True)


def test_traces_go_to_an_otlp_collector_as_spans(make_shelf, namespace):
    """The real OTLP/HTTP exporter, against a receiver that decodes what it posts (protobuf)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            received.extend(span for resource in request.resource_spans for scope in resource.scope_spans
                            for span in scope.spans)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        shelf = make_shelf(metrics_otlp_endpoint=f"http://127.0.0.1:{server.server_port}/v1/traces")
        shelf.save(TOKENS, random_kv(len(TOKENS)), namespace)
        shelf.locate(Prompt(TOKENS, namespace), request_id="r7")
        shelf.load(TOKENS, namespace, 16, request_id="r7")
        shelf.tracer.finish("r7")
        shelf.tracer.close()  # flushes the batch
    finally:
        server.shutdown()
    spans = {span.name: span for span in received}
    assert set(spans) == {"kvshelf.request", "kvshelf.lookup", "kvshelf.load"}
    root = spans["kvshelf.request"]
    assert spans["kvshelf.load"].parent_span_id == root.span_id and spans["kvshelf.load"].trace_id == root.trace_id
    attributes = {attribute.key: attribute.value for attribute in root.attributes}
    assert attributes["kvshelf.request_id"].string_value == "r7"
    assert attributes["kvshelf.loaded_tokens"].int_value == 16
