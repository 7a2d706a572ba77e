"""Requests with images through a real `kvshelf serve` (the zoo's LLaVA, OpenAI chat API).

An image's content hash is part of the key of its chunk and of every chunk after it: the same
text with another image reuses only the chunks before the image; the same image hits all.
(That the hits give vLLM alone's tokens is checked in test_zoo / `kvshelf bench compat`.)

vLLM's vision models need torchvision (they load transformers' pixtral image processor), and no
torchvision runs next to the CPU build of torch 2.13 this project installs: the test runs where
one does.
"""

import base64
import io
import os
import sys

import httpx
import pytest

pytest.importorskip("torchvision", reason="vLLM's vision models need torchvision, which this torch build cannot take")

from kvshelf.bench.compat import sample_image
from kvshelf.bench.zoo import IMAGE_TOKEN_ID, zoo_model_dir
from kvshelf.children import stop
from kvshelf.disagg.launch import start_process, wait_healthy
from kvshelf.ports import free_port
from tests.integrations.test_vllm_model_identity import prompt_tokens_by_source

CHUNK_SIZE = 64
BEFORE = "Describe this picture of the harbour at dawn, its boats, cranes and the fog over the water. " * 2
AFTER = "List every colour you can see, then say which boat is the largest and where it is moored. " * 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("images")
    port = free_port()
    argv = [sys.executable, "-m", "kvshelf.cli", "serve", "--model", str(zoo_model_dir("llava")), "--port", str(port),
            "--disk-path", str(work / "disk"), "--chunk-size", str(CHUNK_SIZE), "--memory-size", "256MiB", "--",
            "--served-model-name", "llava", "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
            "--block-size", "32", "--no-enable-prefix-caching"]  # hits can then only come from kvshelf
    env = dict(os.environ, KVSHELF_HOME=str(work / "home"), VLLM_CPU_KVCACHE_SPACE="1")
    process = start_process(argv, work / "serve", env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, work / "serve")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def messages(image_name):
    buffer = io.BytesIO()
    sample_image(image_name).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    parts = [{"type": "text", "text": BEFORE}, {"type": "image_url", "image_url": {"url": url}},
             {"type": "text", "text": AFTER}]
    return [{"role": "user", "content": parts}]


def ask(url, image_name) -> tuple[str, float]:
    """The answer, and the prompt tokens kvshelf supplied for it."""
    before = prompt_tokens_by_source(url)["external_kv_transfer"]
    body = {"model": "llava", "messages": messages(image_name), "max_tokens": 8, "temperature": 0.0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    loaded = prompt_tokens_by_source(url)["external_kv_transfer"] - before
    return response.json()["choices"][0]["message"]["content"], loaded


def test_only_the_same_image_reuses_the_chunks_from_the_image_on(server):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo_model_dir("llava"))
    prompt = tokenizer.apply_chat_template(messages("a"), add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) else prompt
    before_image = prompt.index(IMAGE_TOKEN_ID) // CHUNK_SIZE * CHUNK_SIZE  # whole chunks of text alone
    assert before_image >= CHUNK_SIZE and len(prompt) > before_image + 2 * CHUNK_SIZE

    first, loaded = ask(server, "a")
    assert loaded == 0
    again, loaded = ask(server, "a")
    assert again == first and loaded > before_image + CHUNK_SIZE  # chunks with and after the image
    other, loaded = ask(server, "b")  # the same text, another image
    assert loaded == before_image and other != first
    other_again, loaded = ask(server, "b")
    assert other_again == other and loaded > before_image + CHUNK_SIZE
