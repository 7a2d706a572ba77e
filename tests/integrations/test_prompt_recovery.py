"""Stored KV is the prompt: an attacker who reads a chunk file recovers its tokens, unless it is
encrypted (or, as created, unreadable to them; see tests/security/test_chunk_attacks.py).

Layer 0's values are v_proj(input_layernorm(embedding(token))): no position enters them, so each
stored value vector maps back to its token by nearest neighbour over the (public) vocabulary.
"""

import pytest
import torch

from kvshelf import Shelf, load_config
from kvshelf.codecs.framing import HEADER_BYTES
from kvshelf.integrations.hf import HFEngine

CHUNK_SIZE = 64
SECRET = "prompt-recovery-test-deployment-secret-0123456789"


def value_table(model) -> torch.Tensor:
    """Layer-0 value vector of every vocabulary token: (vocab, kv_heads * head_dim)."""
    layer = model.model.layers[0]
    with torch.no_grad():
        return layer.self_attn.v_proj(layer.input_layernorm(model.model.embed_tokens.weight))


def recovered_tokens(blob: bytes, num_tokens: int, model, table: torch.Tensor) -> list[int]:
    """What an attacker reads out of a raw chunk file: layer 0's values, matched to the vocabulary."""
    config = model.config
    kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    num_values = config.num_hidden_layers * 2 * num_tokens * kv_heads * head_dim
    payload = blob[HEADER_BYTES : HEADER_BYTES + 4 * num_values]  # raw KV, or as many bytes of ciphertext
    values = torch.frombuffer(bytearray(payload), dtype=torch.float32)
    values = values.view(config.num_hidden_layers, 2, num_tokens, kv_heads * head_dim)[0, 1]
    return torch.cdist(values.nan_to_num(), table).argmin(dim=1).tolist()


@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
def test_prompt_recovery_from_stored_kv(bundled, tmp_path, corpus_ids, encrypt):
    model, tokenizer = bundled
    prompt = corpus_ids[9000 : 9000 + CHUNK_SIZE + 10]
    config = load_config(environ={}, chunk_size=CHUNK_SIZE, disk_path=str(tmp_path / "disk"),
                         security_key=SECRET, security_encrypt=encrypt)
    with Shelf(config) as shelf:
        engine = HFEngine(model, tokenizer, shelf)
        engine.generate(prompt, 1, cache_salt="private-tenant")
    (chunk_file,) = (tmp_path / "disk").rglob("*.kvs")
    guesses = recovered_tokens(chunk_file.read_bytes(), CHUNK_SIZE, model, value_table(model))
    num_right = sum(guess == token for guess, token in zip(guesses, prompt[:CHUNK_SIZE]))
    if encrypt:
        assert num_right <= 2  # chance
    else:  # the threat is real: plain stored KV gives the prompt back
        assert num_right >= CHUNK_SIZE * 0.9
