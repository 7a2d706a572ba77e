import errno
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from kvshelf.codecs import frame_parts, get_codec
from kvshelf.errors import ConfigError, TierUnavailable
from kvshelf.security import Keyring
from kvshelf.tiers.disk import DiskTier, chunk_path, io_errors_as_unavailable
from tests.tiers.test_memory import key

NAMESPACE_ID = key(0).namespace_id


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
    tier.put_many([(key(1), frame_parts(kv, key(1).digest, get_codec("raw"), Keyring(bytes(range(32)))))])
    assert chunk_path(tmp_path, key(1)).read_bytes()[:4] == b"KVSH"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def written_paths(root: Path) -> list[Path]:
    """Everything a write and note_namespace create, root included."""
    return [root, root / ".tmp", root / NAMESPACE_ID, chunk_path(root, key(1)).parent,
            chunk_path(root, key(1)), root / NAMESPACE_ID / "namespace.json"]


def write_one_chunk_and_description(root: Path, mode: str) -> DiskTier:
    tier = DiskTier(root, 10_000, mode)
    tier.note_namespace(NAMESPACE_ID, {"model_id": "m"})
    tier.put_many([(key(1), [blob(1)])])
    return tier


def test_private_files_are_0600_and_directories_0700_even_under_umask_0(tmp_path):
    with umask(0):
        write_one_chunk_and_description(tmp_path / "disk", "private")
    assert [mode_of(path) for path in written_paths(tmp_path / "disk")] == [0o700] * 4 + [0o600] * 2


def test_group_mode_files_are_0660_and_directories_2770_even_under_umask_077(tmp_path):
    with umask(0o077):  # would cut the group's bits if modes came from open/mkdir alone
        write_one_chunk_and_description(tmp_path / "disk", "group")
    assert [mode_of(path) for path in written_paths(tmp_path / "disk")] == [0o2770] * 4 + [0o660] * 2


def test_existing_world_readable_root_is_tightened(tmp_path):
    root = tmp_path / "disk"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    DiskTier(root, 10_000)
    assert mode_of(root) == 0o700


def test_group_writable_root_is_accepted_in_group_mode_only(tmp_path):
    root = tmp_path / "disk"
    root.mkdir()
    os.chmod(root, 0o770)
    with pytest.raises(ConfigError, match="group-writable .* but disk.mode is private; run `chmod g-w"):
        DiskTier(root, 10_000)
    DiskTier(root, 10_000, "group")
    assert mode_of(root) == 0o2770


def test_unknown_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="disk.mode must be one of private, group, got 'world'"):
        DiskTier(tmp_path, 10_000, "world")


def test_note_namespace_keeps_the_first_description(tmp_path):
    tier = DiskTier(tmp_path, 10_000)
    tier.note_namespace(NAMESPACE_ID, {"model_id": "first"})
    DiskTier(tmp_path, 10_000).note_namespace(NAMESPACE_ID, {"model_id": "second"})
    assert json.loads((tmp_path / NAMESPACE_ID / "namespace.json").read_text()) == {"model_id": "first"}
    assert list((tmp_path / ".tmp").iterdir()) == []


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        (errno.EACCES, "permission denied: check the owner and mode of disk.path"),
        (errno.EPERM, "permission denied: check the owner and mode of disk.path"),
        (errno.ENOENT, "the path vanished while in use"),
        (errno.EIO, "I/O error on the device"),
        (errno.EROFS, "filesystem is read-only: remount / read-write"),
        (errno.EDQUOT, "disk full: free space on / or lower disk.size"),
    ],
)
def test_os_errors_are_worded_by_errno(code, advice):
    with pytest.raises(TierUnavailable) as raised:
        with io_errors_as_unavailable("write", Path("/no-such-dir/chunk.kvs")):
            raise OSError(code, os.strerror(code))
    assert str(raised.value).startswith(f"disk tier cannot write /no-such-dir/chunk.kvs: {advice}")


@contextmanager
def tmpfs(directory: Path, size: str = "1m") -> Iterator[Path]:
    """A real small filesystem at `directory`; skips the test where mounting is not permitted."""
    directory.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here: a full or read-only filesystem needs a real tmpfs")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


def fill(path: Path) -> None:
    """Write `path` until its filesystem is full."""
    with open(path, "wb", buffering=0) as file:
        try:
            while True:
                file.write(b"f" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


CHUNK_BYTES = 200 * 1024  # 50 pages: five fit a 1 MiB tmpfs, the sixth does not


def test_full_disk_evicts_own_least_recently_used_chunks_and_retries(tmp_path):
    with tmpfs(tmp_path / "fs") as fs:
        tier = DiskTier(fs / "disk", 10 * 2**20)  # the cap is far above the filesystem
        for i in range(6):
            tier.put_many([(key(i), [blob(i, CHUNK_BYTES)])])
        # Room for the chunk and as much again: two chunks evicted, then the retry fits.
        assert [chunk_path(tier.root, key(i)).exists() for i in range(6)] == [False] * 2 + [True] * 4
        assert (tier.counters.num_evictions, tier.counters.evicted_bytes) == (2, 2 * CHUNK_BYTES)
        assert tier.get_many([key(5)]) == [bytearray(blob(5, CHUNK_BYTES))]
        assert (tier.used_bytes, list((tier.root / ".tmp").iterdir())) == (4 * CHUNK_BYTES, [])
        tier.close()


def test_disk_full_of_other_files_fails_the_write_as_disk_full_and_harms_nothing(tmp_path):
    with tmpfs(tmp_path / "fs") as fs:
        tier = DiskTier(fs / "disk", 10 * 2**20)
        tier.put_many([(key(0), [blob(0, 4096)])])
        other = DiskTier(fs / "disk", 10 * 2**20)  # another process: it does not know key(1)
        other.put_many([(key(1), [blob(1, 4096)])])
        fill(fs / "someone-elses-file")
        with pytest.raises(TierUnavailable, match=f"disk full: free space on {fs} or lower disk.size"):
            tier.put_many([(key(1), [blob(9, CHUNK_BYTES)])])
        assert tier.counters.num_evictions == 1  # its one chunk went, and the retry still failed
        assert chunk_path(tier.root, key(1)).read_bytes() == blob(1, 4096)  # the file already there is whole
        assert list((tier.root / ".tmp").iterdir()) == []
        tier.close()
        other.close()


def test_read_only_filesystem_still_serves_reads_and_says_why_writes_fail(tmp_path):
    with tmpfs(tmp_path / "fs") as fs:
        tier = DiskTier(fs / "disk", 10_000)
        tier.put_many([(key(1), [blob(1)])])
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        assert tier.get_many([key(1)]) == [bytearray(blob(1))]  # the LRU touch failed, the read did not
        with pytest.raises(TierUnavailable, match=f"filesystem is read-only: remount {fs} read-write"):
            tier.put_many([(key(2), [blob(2)])])
        restarted = DiskTier(fs / "disk", 10_000)
        assert restarted.get_many([key(1)]) == [bytearray(blob(1))]
        tier.close()
        restarted.close()
