"""Model identity from content: small synthetic checkpoints in tmp_path, no model hub."""

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvshelf.fingerprint import FingerprintCache, model_fingerprint, model_identity, module_fingerprint

NUM_LARGE_TENSORS = 40
LARGE_TENSOR_ELEMENTS = 32 * 1024  # 128 KiB of float32 each: 5 MiB in all, so the file is sampled, not read whole


def tensors(num_tensors=4, num_elements=256, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"layers.{index}.weight": torch.randn(num_elements, generator=generator) for index in range(num_tensors)}


def write_checkpoint(model_dir, weights=None) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "rope_theta": 1e4}))
    (model_dir / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    save_file(weights if weights is not None else tensors(), model_dir / "model.safetensors")


def change_tensor_in_place(model_dir, name) -> None:
    weights = load_file(model_dir / "model.safetensors")
    weights[name] = weights[name] + 1.0
    save_file(weights, model_dir / "model.safetensors")


@pytest.fixture
def checkpoint(tmp_path):
    model_dir = tmp_path / "model"
    write_checkpoint(model_dir)
    return model_dir


def test_the_same_content_at_two_paths_has_one_id(checkpoint, tmp_path):
    shutil.copytree(checkpoint, tmp_path / "elsewhere" / "renamed")
    fingerprint = model_fingerprint(checkpoint)
    assert fingerprint.startswith("content:") and len(fingerprint) == len("content:") + 32
    assert model_fingerprint(tmp_path / "elsewhere" / "renamed") == fingerprint


def test_a_symlinked_copy_has_the_same_id(checkpoint, tmp_path):
    linked = tmp_path / "linked"  # like the HuggingFace cache: each file a symlink to a blob
    linked.mkdir()
    for file in checkpoint.iterdir():
        (linked / file.name).symlink_to(file)
    (tmp_path / "dir-link").symlink_to(checkpoint, target_is_directory=True)
    assert model_fingerprint(linked) == model_fingerprint(tmp_path / "dir-link") == model_fingerprint(checkpoint)


def test_one_tensor_changed_in_place_changes_the_id(checkpoint):
    before = model_fingerprint(checkpoint)
    change_tensor_in_place(checkpoint, "layers.2.weight")
    assert model_fingerprint(checkpoint) != before


def test_every_tensor_of_a_sampled_file_is_covered(tmp_path):
    """The file is too large to read whole: replacing any one tensor must still change the id."""
    model_dir = tmp_path / "large"
    write_checkpoint(model_dir, tensors(NUM_LARGE_TENSORS, LARGE_TENSOR_ELEMENTS))
    assert (model_dir / "model.safetensors").stat().st_size > 4 * 1024 * 1024
    seen = {model_fingerprint(model_dir)}
    for index in range(NUM_LARGE_TENSORS):
        change_tensor_in_place(model_dir, f"layers.{index}.weight")
        seen.add(model_fingerprint(model_dir))
    assert len(seen) == NUM_LARGE_TENSORS + 1


def test_a_changed_dtype_or_shape_changes_the_id(checkpoint):
    before = model_fingerprint(checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    reshaped_weight = weights["layers.0.weight"].reshape(16, 16)
    save_file({**weights, "layers.0.weight": reshaped_weight}, checkpoint / "model.safetensors")
    reshaped = model_fingerprint(checkpoint)
    save_file({**weights, "layers.0.weight": weights["layers.0.weight"].half()}, checkpoint / "model.safetensors")
    assert len({before, reshaped, model_fingerprint(checkpoint)}) == 3


@pytest.mark.parametrize("file_name", ["tokenizer.json", "tokenizer_config.json", "config.json"])
def test_a_tokenizer_or_config_change_changes_the_id(checkpoint, file_name):
    before = model_fingerprint(checkpoint)
    path = checkpoint / file_name
    path.write_text(path.read_text().replace("}", ', "changed": true}', 1))
    assert model_fingerprint(checkpoint) != before


def test_added_weights_and_index_files_count_but_other_files_do_not(checkpoint):
    before = model_fingerprint(checkpoint)
    (checkpoint / "README.md").write_text("notes")
    (checkpoint / ".lock").write_text("")
    assert model_fingerprint(checkpoint) == before
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with_index = model_fingerprint(checkpoint)
    save_file(tensors(seed=1), checkpoint / "model-00002-of-00002.safetensors")
    assert len({before, with_index, model_fingerprint(checkpoint)}) == 3


def test_a_single_file_is_named_by_content_not_by_its_name(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 40)
    (tmp_path / "b.gguf").write_bytes((tmp_path / "a.gguf").read_bytes())
    (tmp_path / "c.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 39 + bytes(256))
    assert model_fingerprint(tmp_path / "a.gguf") == model_fingerprint(tmp_path / "b.gguf")
    assert model_fingerprint(tmp_path / "c.gguf") != model_fingerprint(tmp_path / "a.gguf")


def test_nothing_to_fingerprint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model files"):
        model_fingerprint(tmp_path / "empty")


def test_a_name_that_is_not_local_falls_back_to_name_and_revision(checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="kvshelf.fingerprint"):
        assert model_identity("some-org/some-model", "abc123") == "some-org/some-model@abc123"
        assert model_identity("some-org/some-model") == "some-org/some-model@local"
    assert "cannot fingerprint 'some-org/some-model'" in caplog.text
    assert model_identity(str(checkpoint), "abc123") == model_fingerprint(checkpoint)


def test_the_cache_rereads_a_rewritten_adapter(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    save_file(tensors(seed=1), adapter / "adapter_model.safetensors")
    cache = FingerprintCache()
    first = cache.fingerprint(adapter)
    assert cache.fingerprint(adapter) == first == model_fingerprint(adapter)
    # Same size, and the old mtime put back: the inode's change time still tells.
    stat = (adapter / "adapter_model.safetensors").stat()
    save_file(tensors(seed=2), adapter / "adapter_model.safetensors")
    os.utime(adapter / "adapter_model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (adapter / "adapter_model.safetensors").stat().st_size == stat.st_size
    assert cache.fingerprint(adapter) == model_fingerprint(adapter) != first


class TinyModel(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(64, 64)
        self.register_buffer("inv_freq", torch.arange(8.0), persistent=False)


def test_weights_in_memory_are_named_by_content():
    settings = {"rope_theta": 1e4, "_name_or_path": "/one/path", "transformers_version": "5.0"}
    moved = {**settings, "_name_or_path": "/another/path", "transformers_version": "5.1"}
    fingerprint = module_fingerprint(TinyModel(), settings)
    assert module_fingerprint(TinyModel(), moved) == fingerprint
    assert module_fingerprint(TinyModel(seed=1), settings) != fingerprint
    assert module_fingerprint(TinyModel(), {**settings, "rope_theta": 5e5}) != fingerprint
    changed = TinyModel()
    with torch.no_grad():
        changed.proj.weight.mul_(1.01)  # every value changes, as a merged LoRA adapter's would
    assert module_fingerprint(changed, settings) != fingerprint
    rope_changed = TinyModel()
    rope_changed.inv_freq.mul_(2)
    assert module_fingerprint(rope_changed, settings) != fingerprint


def test_offloaded_weights_use_the_files_or_ask_for_a_model_id(checkpoint):
    with torch.device("meta"):
        offloaded = TinyModel()
    assert module_fingerprint(offloaded, {}, str(checkpoint)) == model_fingerprint(checkpoint)
    with pytest.raises(ValueError, match="pass model_id"):
        module_fingerprint(offloaded, {}, "some-org/some-model")


def test_hf_engines_default_model_id_follows_the_weights():
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kvshelf.integrations.hf import HFEngine

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))

    def model(seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()

    same = [HFEngine(model(0), tokenizer, None).model_id for _ in range(2)]
    other = HFEngine(model(1), tokenizer, None).model_id
    assert same[0] == same[1] != other
    assert same[0].startswith("content:")
    assert HFEngine(model(0), tokenizer, None, model_id="mine@1").model_id == "mine@1"
