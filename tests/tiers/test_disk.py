import os
import subprocess
import sys

import torch

from kvshelf.codecs import frame_parts, get_codec
from kvshelf.tiers.disk import DiskTier, chunk_path
from tests.tiers.test_memory import key


def blob(index: int, num_bytes: int = 100) -> bytes:
    return bytes([index % 256]) * num_bytes


def test_survives_restart(tmp_path):
    DiskTier(tmp_path, 10_000).put_many([(key(i), [blob(i)]) for i in range(3)])
    reopened = DiskTier(tmp_path, 10_000)
    assert reopened.contains_prefix([key(i) for i in range(3)]) == 3
    assert reopened.get_many([key(1)]) == [bytearray(blob(1))]
    assert reopened.used_bytes == 300


def test_evicts_least_recently_used_under_cap_across_restarts(tmp_path):
    tier = DiskTier(tmp_path, capacity_bytes=300)
    for i in range(3):
        tier.put_many([(key(i), [blob(i)])])
    tier.get_many([key(0)])  # refreshes 0; 1 is now the oldest
    restarted = DiskTier(tmp_path, capacity_bytes=300)
    restarted.put_many([(key(3), [blob(3)])])
    assert restarted.used_bytes <= 300
    assert [chunk_path(tmp_path, key(i)).exists() for i in range(4)] == [True, False, True, True]
    assert restarted.counters.num_evictions == 1


def test_chunk_written_by_another_process_is_found(tmp_path):
    tier = DiskTier(tmp_path, 10_000)
    assert tier.contains_prefix([key(7)]) == 0
    script = (
        "import sys; from kvshelf.tiers.disk import DiskTier; from tests.tiers.test_memory import key;"
        "DiskTier(sys.argv[1], 10_000).put_many([(key(7), [b'x' * 50])])"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    assert tier.contains_prefix([key(7)]) == 1
    assert tier.get_many([key(7)]) == [bytearray(b"x" * 50)]


def test_chunk_removed_by_another_process_is_a_miss(tmp_path):
    tier = DiskTier(tmp_path, 10_000)
    tier.put_many([(key(1), [blob(1)])])
    chunk_path(tmp_path, key(1)).unlink()
    assert tier.get_many([key(1)]) == [None]
    assert tier.used_bytes == 0


def test_no_temp_files_left_and_abandoned_ones_removed(tmp_path):
    tier = DiskTier(tmp_path, 10_000)
    tier.put_many([(key(1), [blob(1)])])
    assert list((tmp_path / ".tmp").iterdir()) == []
    abandoned = tmp_path / ".tmp" / "dead.tmp"
    abandoned.write_bytes(b"half")
    os.utime(abandoned, (0, 0))
    DiskTier(tmp_path, 10_000)
    assert not abandoned.exists()


def test_real_chunk_file_is_framed(tmp_path):
    tier = DiskTier(tmp_path, 10_000_000)
    kv = torch.ones(2, 2, 4, 2, 4)
    tier.put_many([(key(1), frame_parts(kv, key(1).digest, get_codec("raw")))])
    assert chunk_path(tmp_path, key(1)).read_bytes()[:4] == b"KVSH"
