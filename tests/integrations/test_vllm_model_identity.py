"""vLLM names a model's KV by its content: the same weights at two paths share, changed weights never do.

The fast tests call the connector's namespace code on real files. The slow one runs real
`kvshelf serve` processes over a real redis-server: the bundled model at path a and a copy at
path b (shares the chunks a stored), then b with one weight tensor changed in place (shares nothing).
"""

import contextlib
import json
import os
import shutil
import sys
import time
from types import SimpleNamespace

import httpx
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kvshelf import KVLayout, Namespace
from kvshelf.children import stop
from kvshelf.disagg.launch import start_process, wait_healthy
from kvshelf.fingerprint import model_fingerprint
from kvshelf.integrations.vllm.context import default_model_id, request_namespace
from kvshelf.ports import free_port

CHUNK_SIZE = 128
PROMPT_TOKENS = 300  # two full chunks and a tail
MAX_TOKENS = 12
CHANGED_TENSOR = "model.layers.0.self_attn.k_proj.weight"
BASE = Namespace("model", KVLayout(30, 3, 64), extra=(("engine", "vllm"),))


def write_adapter(adapter_dir, rank=8) -> None:
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 16}))
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\0" * 64 * rank)


def lora_namespace(name, path) -> Namespace:
    request = SimpleNamespace(lora_request=SimpleNamespace(lora_name=name, lora_path=str(path)), cache_salt=None)
    return request_namespace(BASE, request)


def test_an_adapter_is_named_by_its_content(tmp_path):
    write_adapter(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    first = lora_namespace("sql", tmp_path / "a")
    assert first.lora_id == f"sql:{model_fingerprint(tmp_path / 'a')}"
    assert lora_namespace("sql", tmp_path / "copy") == first
    write_adapter(tmp_path / "a", rank=16)  # rewritten in place, at the same path
    assert lora_namespace("sql", tmp_path / "a").id != first.id
    assert lora_namespace("sql", "/not/here/adapter").lora_id == "sql:/not/here/adapter"


def model_config(model, tokenizer=None, revision=None, weights=""):
    return SimpleNamespace(model=model, tokenizer=tokenizer or model, revision=revision, tokenizer_revision=None,
                           model_weights=weights)


def test_the_default_model_id_is_the_content_of_the_model_and_its_tokenizer(tmp_path):
    write_adapter(tmp_path / "model")  # any fingerprintable directory will do
    write_adapter(tmp_path / "tokenizer", rank=4)
    load_config = SimpleNamespace(download_dir=None)
    assert default_model_id(model_config(str(tmp_path / "model")), load_config) == model_fingerprint(tmp_path / "model")
    with_tokenizer = default_model_id(model_config(str(tmp_path / "model"), str(tmp_path / "tokenizer")), load_config)
    tokenizer_id = model_fingerprint(tmp_path / "tokenizer")
    assert with_tokenizer == f"{model_fingerprint(tmp_path / 'model')}+tokenizer={tokenizer_id}"
    assert default_model_id(model_config("no-such-org/no-such-model", revision="r1"), load_config) == (
        "no-such-org/no-such-model@r1")
    # Weights streamed from object storage: the local directory vLLM made holds only configs.
    streamed = model_config(str(tmp_path / "model"), weights="s3://bucket/model")
    assert default_model_id(streamed, load_config) == "s3://bucket/model@local"


# --- real servers --------------------------------------------------------------------------------

def serve_argv(model_dir, port, redis_url, disk_path) -> list[str]:
    return [sys.executable, "-m", "kvshelf.cli", "serve", "--model", str(model_dir), "--port", str(port),
            "--redis-url", redis_url, "--disk-path", str(disk_path), "--chunk-size", str(CHUNK_SIZE),
            "--memory-size", "1GiB", "--",
            "--served-model-name", "smollm2", "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
            "--no-enable-prefix-caching"]  # hits can then only come from kvshelf


@contextlib.contextmanager
def serving(models, work, redis_url):
    """`kvshelf serve` of each (model_dir, name) in `models`, started together, each with its own
    disk tier; every instance shares KVSHELF_HOME (the deployment secret) and `redis_url`. Yields
    their URLs."""
    env = dict(os.environ, KVSHELF_HOME=str(work / "home"), VLLM_CPU_KVCACHE_SPACE="1")
    started = []
    try:
        for model_dir, name in models:
            port = free_port()
            process = start_process(serve_argv(model_dir, port, redis_url, work / f"disk-{name}"), work / name, env)
            started.append((f"http://127.0.0.1:{port}", name, process))
        for url, name, process in started:
            wait_healthy(url, process, work / name)
        yield [url for url, _, _ in started]
    finally:
        stop(*(process for _, _, process in started))


def complete(url, prompt_ids) -> str:
    body = {"model": "smollm2", "prompt": prompt_ids, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def prompt_tokens_by_source(url) -> dict[str, float]:
    totals = {"local_compute": 0.0, "external_kv_transfer": 0.0}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:prompt_tokens_by_source_total{"):
            for source in totals:
                if f'source="{source}"' in line:
                    totals[source] += float(line.rsplit(" ", 1)[1])
    return totals


def chunk_names(redis_server) -> set[bytes]:
    return {name for name in redis_server.client().keys("*") if not name.endswith(b":namespace")}


def namespace_ids(names: set[bytes]) -> set[bytes]:
    return {name.rsplit(b":", 2)[1] for name in names}  # <prefix>:<namespace id>:<key hex>


def wait_for_chunks(redis_server, at_least, timeout_s=120.0) -> set[bytes]:
    """Redis writes are in the background: wait until the instance's chunks are there."""
    deadline_s = time.monotonic() + timeout_s
    while len(names := chunk_names(redis_server)) < at_least:
        assert time.monotonic() < deadline_s, f"only {len(names)} chunks reached Redis"
        time.sleep(0.5)
    return names


def change_one_tensor_in_place(safetensors_path) -> None:
    with safe_open(safetensors_path, "pt") as file:
        metadata = file.metadata()
    weights = load_file(safetensors_path)
    weights[CHANGED_TENSOR] = weights[CHANGED_TENSOR] * 1.1
    save_file(weights, safetensors_path, metadata=metadata)


@pytest.fixture(scope="module")
def prompt_ids():
    from transformers import AutoTokenizer

    from kvshelf.bench.documents import stdlib_corpus
    from kvshelf.models import bundled_model_dir

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    return tokenizer(stdlib_corpus()[:20_000], add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]


@pytest.mark.slow
def test_instances_share_kv_by_content_not_by_path(tmp_path, redis_server, prompt_ids):
    from kvshelf.models import bundled_model_dir

    bundled = bundled_model_dir()
    path_a, path_b = tmp_path / "a", tmp_path / "b"
    path_a.mkdir()
    for file in bundled.iterdir():  # a: symlinks, as in the HuggingFace cache; b: a real copy, to change
        (path_a / file.name).symlink_to(file)
    shutil.copytree(bundled, path_b)
    full_chunk_tokens = PROMPT_TOKENS // CHUNK_SIZE * CHUNK_SIZE

    with serving([(path_a, "a"), (path_b, "b")], tmp_path, redis_server.url) as (url_a, url_b):
        answer_a = complete(url_a, prompt_ids)
        chunks_of_a = wait_for_chunks(redis_server, PROMPT_TOKENS // CHUNK_SIZE)
        answer_b = complete(url_b, prompt_ids)
        sources_b = prompt_tokens_by_source(url_b)
    assert sources_b == {"local_compute": PROMPT_TOKENS - full_chunk_tokens, "external_kv_transfer": full_chunk_tokens}
    assert answer_b == answer_a
    assert chunk_names(redis_server) == chunks_of_a

    change_one_tensor_in_place(path_b / "model.safetensors")
    with serving([(path_b, "b-changed")], tmp_path, redis_server.url) as (url,):
        fresh = complete(url, prompt_ids)
        sources_fresh = prompt_tokens_by_source(url)
        again = complete(url, prompt_ids)  # now from its own chunks
        sources_again = prompt_tokens_by_source(url)
        chunks_after = wait_for_chunks(redis_server, len(chunks_of_a) + PROMPT_TOKENS // CHUNK_SIZE)
    assert sources_fresh == {"local_compute": PROMPT_TOKENS, "external_kv_transfer": 0}
    assert sources_again["external_kv_transfer"] == full_chunk_tokens
    assert again == fresh
    new_chunks = chunks_after - chunks_of_a
    assert len(new_chunks) == PROMPT_TOKENS // CHUNK_SIZE
    assert namespace_ids(new_chunks).isdisjoint(namespace_ids(chunks_of_a))
