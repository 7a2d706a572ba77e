import json

import pytest

from kvshelf import Namespace
from kvshelf.cli import main
from kvshelf.keys import chunk_keys
from kvshelf.tiers.disk import chunk_path
from tests.conftest import CHUNK_SIZE, LAYOUT, random_kv

TOKENS = list(range(12))


@pytest.fixture
def store(make_shelf, namespace):
    """A disk store with two namespaces, one damaged chunk and one stray file."""
    shelf = make_shelf()
    tenant = Namespace(namespace.model_id, LAYOUT, cache_salt="tenant-b")
    shelf.save(TOKENS, random_kv(12), namespace)
    shelf.save(TOKENS, random_kv(12, seed=1), tenant)
    shelf.flush()
    root = shelf.config.disk.path
    damaged = chunk_path(root, chunk_keys(TOKENS, tenant, CHUNK_SIZE)[2])
    damaged.write_bytes(damaged.read_bytes()[:-1])
    (root / namespace.id / "notes.txt").write_text("not a chunk")
    return root, namespace, tenant


def test_inspect_json_counts_namespaces_and_damage(store, capsys):
    root, namespace, tenant = store
    assert main(["inspect", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_chunks"] == 5
    assert report["namespaces"][namespace.id]["num_chunks"] == 3
    assert report["namespaces"][tenant.id]["description"]["cache_salt"] == "tenant-b"
    reasons = sorted(entry["reason"] for entry in report["damaged"])
    assert len(reasons) == 2 and "not a chunk file name" in reasons
    assert any(reason.startswith("object has") for reason in reasons)


def test_inspect_table(store, capsys):
    root, namespace, _ = store
    assert main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{root}: 5 chunks" in out
    assert "cache_salt=tenant-b" in out and "damaged:" in out and namespace.model_id in out


def test_inspect_without_verify_does_not_read_chunks(store, capsys):
    root, _, _ = store
    assert main(["inspect", str(root), "--json", "--no-verify"]) == 0
    assert json.loads(capsys.readouterr().out)["num_chunks"] == 6


def test_inspect_of_a_missing_directory_says_what_to_give(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "disk.path" in capsys.readouterr().err


def test_serve_refuses_a_bad_config_before_starting_vllm(capsys):
    assert main(["serve", "--memory-size", "lots"]) == 2
    assert "memory.size must be a size like" in capsys.readouterr().err
