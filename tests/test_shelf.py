import shutil
import threading

import pytest
import torch
from prometheus_client import generate_latest

from kvshelf import Namespace
from kvshelf.tiers.disk import chunk_path
from tests.conftest import CHUNK_SIZE, LAYOUT, random_kv

TOKENS = list(range(100, 118))  # 4 full chunks of 4 and a partial one


def test_save_then_load_gives_back_the_same_kv(make_shelf, namespace):
    shelf = make_shelf()
    kv = random_kv(len(TOKENS))
    assert shelf.save(TOKENS, kv, namespace) == 4
    assert shelf.lookup(TOKENS, namespace) == 16
    loaded = shelf.load(TOKENS, namespace, upto=16)
    assert loaded.num_tokens == 16
    assert torch.equal(loaded.kv(), kv[:, :, :16])


def test_saved_chunks_are_copies(make_shelf, namespace):
    shelf = make_shelf()
    kv = random_kv(8)
    expected = kv.clone()
    shelf.save(TOKENS[:8], kv, namespace)
    kv.zero_()
    assert torch.equal(shelf.load(TOKENS, namespace, 8).kv(), expected)


def test_partial_prefix_and_other_namespace(make_shelf, namespace):
    shelf = make_shelf()
    shelf.save(TOKENS, random_kv(len(TOKENS)), namespace)
    diverging = TOKENS[:9] + [0] * 9  # shares chunks 0 and 1
    assert shelf.lookup(diverging, namespace) == 8
    assert shelf.load(diverging, namespace, upto=16).num_tokens == 8
    tenant_b = Namespace(namespace.model_id, namespace.layout, cache_salt="tenant-b")
    assert shelf.lookup(TOKENS, tenant_b) == 0


def test_load_from_an_offset_reads_only_later_chunks(make_shelf, namespace):
    shelf = make_shelf()
    kv = random_kv(len(TOKENS))
    shelf.save(TOKENS, kv, namespace)
    keys = shelf.chunk_keys(TOKENS, namespace)
    shelf._stack.memory.delete(keys[:2])
    shelf.flush()
    loaded = shelf.load(TOKENS, namespace, upto=16, start=9)  # rounded down to chunk 2
    assert (loaded.start, loaded.end) == (8, 16)
    assert torch.equal(torch.cat(loaded.chunks, dim=2), kv[:, :, 8:16])
    assert shelf.stats()["tiers"]["disk"]["loaded_bytes"] == 0  # chunks 0-1 were not read back


def test_save_from_an_offset_stores_only_those_chunks(make_shelf, namespace):
    shelf = make_shelf()
    kv = random_kv(len(TOKENS))
    shelf.save(TOKENS, kv[:, :, 8:], namespace, start=8)
    keys = shelf.chunk_keys(TOKENS, namespace)
    assert shelf._stack.memory.contains_prefix(keys[2:]) == 2
    assert shelf.lookup(TOKENS, namespace) == 0  # chunks 0-1 were never given


def test_disk_hit_in_a_new_shelf_and_promotion(make_shelf, namespace):
    first = make_shelf()
    kv = random_kv(len(TOKENS))
    first.save(TOKENS, kv, namespace)
    first.flush()
    second = make_shelf()
    assert second.lookup(TOKENS, namespace) == 16
    assert torch.equal(second.load(TOKENS, namespace, 16).kv(), kv[:, :, :16])
    assert second.stats()["tiers"]["disk"]["loaded_bytes"] > 0
    assert len(second._stack.memory) == 4  # promoted


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "swap"])
def test_damaged_disk_chunk_is_a_counted_miss_and_removed(make_shelf, namespace, damage):
    first = make_shelf()
    kv = random_kv(len(TOKENS))
    first.save(TOKENS, kv, namespace)
    first.flush()
    keys = first.chunk_keys(TOKENS, namespace)
    path = chunk_path(first.config.disk.path, keys[2])
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    elif damage == "truncate":
        data = data[:-7]
    elif damage == "foreign":
        data = bytearray(b"not a kvshelf object at all")
    else:  # a whole, valid object of another chunk
        data = bytearray(chunk_path(first.config.disk.path, keys[3]).read_bytes())
    path.write_bytes(data)
    second = make_shelf()
    loaded = second.load(TOKENS, namespace, 16)
    assert loaded.num_tokens == 8
    assert torch.equal(loaded.kv(), kv[:, :, :8])
    assert second.stats()["tiers"]["disk"]["corrupt_chunks"] == 1
    assert not path.exists()


def test_full_writer_queue_drops_and_counts_but_memory_keeps_it(make_shelf, namespace):
    shelf = make_shelf(writer_queue_size=1)
    started, release = threading.Event(), threading.Event()
    shelf._writer.submit(lambda: (started.set(), release.wait()))  # occupies the writer thread
    started.wait()
    shelf._writer.submit(lambda: None)  # fills the queue
    shelf.save(TOKENS, random_kv(len(TOKENS)), namespace)
    release.set()
    shelf.flush()
    assert shelf.stats()["dropped_writes"] == 1
    assert shelf.lookup(TOKENS, namespace) == 16
    assert shelf.stats()["tiers"]["disk"]["used_bytes"] == 0


def test_failing_disk_backs_off_and_engine_keeps_going(make_shelf, namespace, tmp_path):
    shelf = make_shelf(tier_backoff_s=60)
    disk_root = shelf.config.disk.path
    shutil.rmtree(disk_root)
    disk_root.write_bytes(b"")  # the tier's directory is now a file: every write fails
    kv = random_kv(len(TOKENS))
    shelf.save(TOKENS, kv, namespace)
    shelf.flush()
    shelf.save(TOKENS[:8] + [1] * 8, random_kv(16, seed=1), namespace)
    shelf.flush()
    stats = shelf.stats()
    assert stats["tiers"]["disk"]["errors"] == 1  # backed off after the first failure
    assert stats["tiers"]["disk"]["skipped"] == 1
    assert stats["dropped_writes"] == 2  # the failed write, and the one skipped while backing off
    assert torch.equal(shelf.load(TOKENS, namespace, 16).kv(), kv[:, :, :16])


def test_memory_eviction_falls_back_to_disk(make_shelf, namespace):
    chunk_bytes = LAYOUT.bytes_per_token * CHUNK_SIZE
    shelf = make_shelf(memory_size=2 * chunk_bytes)
    kv = random_kv(len(TOKENS))
    shelf.save(TOKENS, kv, namespace)
    shelf.flush()
    assert shelf.stats()["tiers"]["memory"]["used_bytes"] <= 2 * chunk_bytes
    assert torch.equal(shelf.load(TOKENS, namespace, 16).kv(), kv[:, :, :16])


def test_wrong_kv_shape_or_offset_is_refused(make_shelf, namespace):
    shelf = make_shelf()
    with pytest.raises(ValueError, match="kv_heads"):
        shelf.save(TOKENS, torch.zeros(2, 2, 8, 3, 4), namespace)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        shelf.save(TOKENS, random_kv(8), namespace, start=2)


def test_stats_and_prometheus_agree(make_shelf, namespace):
    shelf = make_shelf()
    shelf.save(TOKENS, random_kv(len(TOKENS)), namespace)
    shelf.lookup(TOKENS, namespace)
    shelf.load(TOKENS, namespace, 16)
    exposition = generate_latest(shelf.metrics.registry).decode()
    assert 'kvshelf_lookup_tokens_total{result="hit"} 16.0' in exposition
    assert 'kvshelf_lookup_tokens_total{result="miss"} 2.0' in exposition
    assert "kvshelf_prompt_load_seconds_count 1.0" in exposition
    assert 'kvshelf_load_seconds_count{tier="memory"} 1.0' in exposition
    assert shelf.stats()["hit_tokens"] == 16
