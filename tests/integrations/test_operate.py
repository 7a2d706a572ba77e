"""Operating kvshelf, all real: one `kvshelf serve` (vLLM, the bundled model) with its admin API,
a redis-server it shares, Debian's Prometheus scraping it, and Chromium loading its dashboard.

One module, one engine: traffic goes through hits, misses of each reason (not stored, evicted,
expired, corrupt, tier down, a partial chunk) and a tier failure, and every answer with a hit
equals the same prompt's computed answer. Then the metrics must say what happened; Prometheus
must find data for every expression of the Grafana dashboard and the alerts that the failures
should fire; the dashboard must show the numbers /metrics reports.
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from kvshelf.bench.redis_servers import RedisServer
from kvshelf.children import stop
from kvshelf.codecs.framing import frame
from kvshelf.codecs.raw import RawCodec
from kvshelf.config import load_config
from kvshelf.disagg.launch import start_process, wait_healthy
from kvshelf.layout import KVLayout
from kvshelf.ports import free_port
from kvshelf.security import Keyring
from tests.integrations.test_vllm_model_identity import prompt_tokens_by_source

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHUNK_SIZE = 64
LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64)  # the bundled model's KV, float32
CHUNK_BYTES = LAYOUT.bytes_per_token * CHUNK_SIZE
ADMIN_KEY = "operators-admin-key-for-this-test"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
REDIS_TTL_S = 15
PROMPT_TOKENS = 3 * CHUNK_SIZE + 8  # 3 chunks and a partial one
SALT = "acme-tenant-secret-salt"
TEXT = " ".join(f"Item {i} on the list is the number {i * 7 % 23}." for i in range(16))  # 3 chunks and more
CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")


def prompt(seed: int) -> list[int]:
    generator = random.Random(seed)
    return [generator.randrange(1000, 40000) for _ in range(PROMPT_TOKENS)]


class NewerCodec(RawCodec):
    """A codec id this kvshelf does not know, as a newer version would write."""

    id = 200


class Instance:
    def __init__(self, url: str, admin_url: str, redis: RedisServer, log: Path, home: Path) -> None:
        self.url, self.admin_url, self.redis, self.log, self.home = url, admin_url, redis, log, home

    def complete(self, prompt_ids: list[int] | str, cache_salt: str | None = None) -> tuple[list[int], float]:
        """The answer's tokens, and the prompt tokens kvshelf supplied for it."""
        before = prompt_tokens_by_source(self.url)["external_kv_transfer"]
        body = {"model": "smollm2", "prompt": prompt_ids, "max_tokens": 4, "temperature": 0.0, "logprobs": 0}
        if cache_salt is not None:
            body["cache_salt"] = cache_salt
        answer = httpx.post(f"{self.url}/v1/completions", json=body, timeout=300)
        assert answer.status_code == 200, answer.text
        tokens = answer.json()["choices"][0]["logprobs"]["tokens"]
        return tokens, prompt_tokens_by_source(self.url)["external_kv_transfer"] - before

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{self.admin_url}{path}", headers=ADMIN, timeout=300, **kwargs)

    def metrics(self) -> dict[str, float]:
        """The admin API's /metrics as {'name{labels}': value}."""
        text = self.admin("GET", "/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    work = tmp_path_factory.mktemp("operate")
    with RedisServer(work) as redis:
        port, admin_port = free_port(), free_port()
        config = work / "kvshelf.yaml"
        config.write_text(yaml.safe_dump({
            "chunk_size": CHUNK_SIZE, "tier_backoff_s": 2,
            "memory": {"size": 8 * CHUNK_BYTES + 2**20, "pin_size": 2 * CHUNK_BYTES},
            "redis": {"url": redis.url, "ttl_s": REDIS_TTL_S}, "metrics": {"trace": True}}))
        argv = [sys.executable, "-m", "kvshelf.cli", "serve", "--port", str(port), "--admin-port", str(admin_port),
                "--config", str(config), "--", "--max-model-len", "1024", "--block-size", "32",
                "--no-enable-prefix-caching"]  # hits can then only come from kvshelf
        env = dict(os.environ, KVSHELF_HOME=str(work / "home"), VLLM_CPU_KVCACHE_SPACE="1",
                   KVSHELF_ADMIN_KEY=ADMIN_KEY)
        process = start_process(argv, work / "serve", env)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", process, work / "serve")
            yield Instance(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", redis,
                           (work / "serve").with_suffix(".log"), work / "home")
        finally:
            stop(process)


@pytest.fixture(scope="module")
def prometheus(instance, tmp_path_factory):
    """Debian's prometheus scraping the instance every second, with the repository's scrape config
    and rules (targets and the key file pointed at this instance)."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is missing: `make setup` installs it (apt-get install prometheus)")
    work = tmp_path_factory.mktemp("prometheus")
    (work / "admin-key").write_text(ADMIN_KEY)
    shutil.copy(DEPLOY / "prometheus" / "kvshelf-alerts.yml", work)
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    targets = {"kvshelf": instance.admin_url, "vllm": instance.url}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]].removeprefix("http://")]}]
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(work / "admin-key")
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(work / "prometheus.log", "w") as log:
        process = subprocess.Popen(
            ["prometheus", f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline_s = time.monotonic() + 60
        while not _ready(url):
            assert process.poll() is None and time.monotonic() < deadline_s, (work / "prometheus.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def traffic(instance, prometheus):
    """Drives the instance through every kind of hit and miss once; returns what it saw."""
    seen: dict = {}
    cold = {seed: instance.complete(prompt(seed)) for seed in (0,)}
    seen["cold"] = cold
    # A hit from memory; pin the prompt (the budget holds 2 of its 3 chunks); a tenant's own namespace.
    seen["hit"] = instance.complete(prompt(0))
    seen["pin"] = instance.admin("POST", "/kvshelf/pin", json={"token_ids": prompt(0)}).json()
    seen["tenant_cold"] = instance.complete(prompt(1), SALT)
    seen["tenant_hit"] = instance.complete(prompt(1), SALT)
    tenant_stored_s = time.monotonic()
    # Warm a text prompt through the admin API (the engine computes it), use it, clear it, recompute it.
    seen["warm"] = instance.admin("POST", "/kvshelf/warm", json={"text": TEXT}).json()
    seen["warmed_hit"] = instance.complete(TEXT)
    seen["clear"] = instance.admin("POST", "/kvshelf/clear", json={"text": TEXT}).json()
    seen["after_clear"] = instance.complete(TEXT)
    # Corrupt prompt 3's chunks in Redis.
    names_before = set(instance.redis.client().keys("*"))
    seen["corrupt_cold"] = instance.complete(prompt(3))
    _wait_for(lambda: len(set(instance.redis.client().keys("*")) - names_before) >= 3)
    for name in set(instance.redis.client().keys("*")) - names_before:
        if not name.endswith(b":namespace"):
            instance.redis.client().setrange(name, 200, b"\xff" * 16)
    # Prompt 8's chunks in Redis replaced by authentic ones of a codec this kvshelf lacks (a newer
    # version's, during a rolling upgrade): left alone, and recomputed.
    names_before = set(instance.redis.client().keys("*"))
    seen["foreign_cold"] = instance.complete(prompt(8))
    _wait_for(lambda: len(set(instance.redis.client().keys("*")) - names_before) >= 3)
    keyring = Keyring.from_config(load_config(environ={"KVSHELF_HOME": str(instance.home)}).security)
    for name in set(instance.redis.client().keys("*")) - names_before:
        if not name.endswith(b":namespace"):
            digest = bytes.fromhex(name.rsplit(b":", 1)[1].decode())
            instance.redis.client().set(name, frame(torch.zeros(LAYOUT.shape(CHUNK_SIZE)), digest, NewerCodec(),
                                                    keyring))
    # Other traffic evicts everything unpinned from memory.
    seen["flood"] = {seed: instance.complete(prompt(seed)) for seed in (4, 5, 6)}
    seen["redis_hit"] = instance.complete(prompt(4))  # evicted from memory by now, still in Redis
    seen["pinned_hit"] = instance.complete(prompt(0))
    seen["corrupt_again"] = instance.complete(prompt(3))
    seen["foreign_again"] = instance.complete(prompt(8))
    # The tenant's chunks, evicted from memory, expired in Redis.
    time.sleep(max(0.0, tenant_stored_s + REDIS_TTL_S + 1 - time.monotonic()))
    seen["expired"] = instance.complete(prompt(1), SALT)
    # Redis goes down: misses for tier_down, writes dropped; answers stay right.
    instance.redis.stop()
    seen["redis_down_cold"] = instance.complete(prompt(7))
    seen["redis_down_again"] = instance.complete(prompt(5))
    time.sleep(3)  # Prometheus scrapes the last counts
    return seen


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline_s, "timed out"
        time.sleep(0.1)


def test_answers_with_hits_are_the_computed_answers(traffic):
    cold_tokens, cold_loaded = traffic["cold"][0]
    assert cold_loaded == 0
    assert traffic["hit"] == (cold_tokens, 3 * CHUNK_SIZE)
    assert traffic["tenant_cold"][1] == 0 and traffic["tenant_hit"] == (traffic["tenant_cold"][0], 3 * CHUNK_SIZE)
    assert traffic["warm"]["computed"] and traffic["warm"]["held_tokens"] >= 2 * CHUNK_SIZE
    assert traffic["warmed_hit"][1] == traffic["warm"]["held_tokens"]
    assert traffic["clear"]["dropped_chunks"]["redis"] == traffic["warm"]["held_tokens"] // CHUNK_SIZE
    assert traffic["after_clear"] == (traffic["warmed_hit"][0], 0)
    assert traffic["pin"]["pinned_tokens"] == 2 * CHUNK_SIZE
    pinned_answer, pinned_loaded = traffic["pinned_hit"]  # the pinned chunks outlived the flood (and Redis's TTL)
    assert pinned_answer == cold_tokens and pinned_loaded >= 2 * CHUNK_SIZE
    assert traffic["corrupt_again"] == (traffic["corrupt_cold"][0], 0)  # promised, failed verification, recomputed
    assert traffic["foreign_again"] == (traffic["foreign_cold"][0], 0)
    assert traffic["expired"] == (traffic["tenant_cold"][0], 0)
    assert traffic["redis_hit"] == (traffic["flood"][4][0], 3 * CHUNK_SIZE)
    assert traffic["redis_down_again"] == (traffic["flood"][5][0], 0)


def test_metrics_tell_why_each_miss_happened(instance, traffic):
    metrics = instance.metrics()
    misses = {reason: metrics.get(f'kvshelf_miss_tokens_total{{reason="{reason}"}}', 0) for reason in
              ("not_stored", "evicted", "expired", "corrupt", "foreign", "tier_down", "partial_chunk")}
    assert all(count > 0 for count in misses.values()), misses
    assert metrics['kvshelf_tier_hit_tokens_total{tier="memory"}'] > 0
    assert metrics['kvshelf_tier_hit_tokens_total{tier="redis"}'] >= 6 * CHUNK_SIZE  # a hit, and the corrupt one
    assert metrics['kvshelf_corrupt_chunks_total{tier="redis"}'] >= 1
    assert metrics['kvshelf_foreign_chunks_total{tier="redis"}'] >= 1
    assert metrics['kvshelf_tier_errors_total{tier="redis"}'] >= 1 and metrics["kvshelf_dropped_writes_total"] >= 1
    for histogram in ("lookup", "load", "decode", "store"):
        assert metrics[f'kvshelf_{histogram}_seconds_count{{tier="redis"}}'] > 0, histogram
    for hit in ("true", "false"):
        assert metrics[f'kvshelf_ttft_seconds_count{{hit="{hit}"}}'] > 0
    assert metrics['kvshelf_evicted_age_seconds_count{tier="memory"}'] > 0
    assert metrics['kvshelf_tier_pinned_bytes{tier="memory"}'] == 2 * CHUNK_BYTES
    assert metrics["kvshelf_loaded_tokens_total"] > 0 and metrics["kvshelf_saved_prefill_seconds_total"] > 0
    tenants = {key for key in metrics if key.startswith("kvshelf_tenant_lookup_tokens_total")}
    assert any('tenant="none"' in key for key in tenants) and len({re.search(r'tenant="(\w+)"', key)[1]
                                                                    for key in tenants}) == 2
    assert SALT not in instance.admin("GET", "/metrics").text
    # vLLM's own /metrics carries kvshelf's counters too, the misses by reason among them.
    vllm_metrics = httpx.get(f"{instance.url}/metrics", timeout=10).text
    for counter in ("hit_tokens", "redis_hit_tokens", "miss_tokens_corrupt", "miss_tokens_tier_down"):
        assert re.search(rf"^vllm:kvshelf_{counter}_total{{.*}} [1-9]", vllm_metrics, re.MULTILINE), counter


def test_each_request_is_traced_as_one_json_line(instance, traffic):
    traces = [json.loads(line.split("kvshelf trace ", 1)[1]) for line in instance.log.read_text().splitlines()
              if "kvshelf trace {" in line]
    reasons = {trace["miss_reason"] for trace in traces} | {trace["load_miss_reason"] for trace in traces}
    assert {"not_stored", "corrupt", "foreign", "expired", "tier_down"} <= reasons
    hit = next(trace for trace in traces if trace["loaded_tokens"] == 3 * CHUNK_SIZE)
    assert hit["lookup_chunks"] == {"memory": 3} and hit["loaded_bytes"] == {"memory": 3 * CHUNK_BYTES}
    assert all(SALT not in json.dumps(trace) for trace in traces)


def test_admin_api_needs_the_admin_key(instance):
    for headers in ({}, {"Authorization": "Bearer some-client-key"}):
        assert httpx.get(f"{instance.admin_url}/metrics", headers=headers, timeout=10).status_code == 401
    namespaces = instance.admin("GET", "/kvshelf/namespaces").json()["namespaces"]
    assert any(entry["chunks"].get("memory") for entry in namespaces.values())


def _query(prometheus: str, expression: str) -> list:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expression}, timeout=30).json()
    assert answer["status"] == "success", (expression, answer)
    return answer["data"]["result"]


def test_every_dashboard_panel_and_alert_works_in_prometheus(prometheus, traffic):
    dashboard = json.loads((DEPLOY / "grafana" / "kvshelf-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(expressions) >= 15
    for expression in expressions:
        concrete = expression.replace("$__rate_interval", "2m").replace("$instance", ".*")
        assert _query(prometheus, concrete), f"no data for the dashboard's {expression}"
    rules = yaml.safe_load((DEPLOY / "prometheus" / "kvshelf-alerts.yml").read_text())["groups"][0]["rules"]
    for rule in rules:  # its comparison as 0 or 1: the series it reads exist, firing or not
        measured = re.sub(r"([<>])", r"\1 bool", rule["expr"])
        assert _query(prometheus, measured), f"no data for {rule['alert']}: {measured}"
    fired = {rule["alert"]: bool(_query(prometheus, rule["expr"])) for rule in rules}
    # The failures this module caused; the hit rate cannot collapse against its own short history.
    assert fired == {"KvshelfHitRateCollapse": False, "KvshelfTierDown": True, "KvshelfCorruptChunks": True,
                     "KvshelfDroppedWrites": True}


def test_alert_rules_pass_promtool():
    rules = DEPLOY / "prometheus"
    for argv in (["promtool", "check", "rules", "kvshelf-alerts.yml"],
                 ["promtool", "test", "rules", "kvshelf-alerts.test.yml"]):
        done = subprocess.run(argv, cwd=rules, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_shows_what_the_metrics_report(instance, traffic, tmp_path):
    assert CHROMIUM, "chromium is missing: `make setup` installs it (apt-get install chromium-headless-shell)"
    metrics = instance.metrics()
    page = f"{instance.admin_url}/dashboard#key={ADMIN_KEY}"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
              f"--user-data-dir={tmp_path / 'profile'}"]
    done = subprocess.run([*common, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = {}  # data-metric -> data-value, of every element showing a number
    for tag in re.findall(r'<[^>]*data-metric="[^"]*"[^>]*>', done.stdout):
        value = re.search(r'data-value="([^"]*)"', tag)
        shown[re.search(r'data-metric="(\w+)"', tag)[1]] = value[1] if value else None
    text = dict(re.findall(r'id="([\w-]+)" data-metric="\w+">([^<]*)<', done.stdout))
    assert int(text["hit-tokens"]) == metrics['kvshelf_lookup_tokens_total{result="hit"}']
    assert int(text["lookup-tokens"]) == (metrics['kvshelf_lookup_tokens_total{result="hit"}']
                                          + metrics['kvshelf_lookup_tokens_total{result="miss"}'])
    assert float(shown["saved_prefill_s"]) == pytest.approx(metrics["kvshelf_saved_prefill_seconds_total"])
    for reason in ("not_stored", "evicted", "expired", "corrupt", "foreign", "tier_down"):
        assert float(shown[f"miss_tokens_{reason}"]) == metrics[f'kvshelf_miss_tokens_total{{reason="{reason}"}}']
    assert float(shown["tier_used_bytes_memory"]) == metrics['kvshelf_tier_used_bytes{tier="memory"}']
    ttft = metrics['kvshelf_ttft_seconds_sum{hit="true"}'] / metrics['kvshelf_ttft_seconds_count{hit="true"}']
    assert float(shown["ttft_hit_s"]) == pytest.approx(ttft)
    screenshot = tmp_path / "dashboard.png"
    subprocess.run([*common, "--window-size=1300,1000", f"--screenshot={screenshot}", page],
                   capture_output=True, timeout=120, check=True)
    assert screenshot.stat().st_size > 10_000
