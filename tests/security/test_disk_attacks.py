"""Attacks on the disk tier by someone who can put entries into its directory.

Each planted entry must end as a counted miss or refusal: never followed, never blocking, never
allocated whole, and nothing outside the cache directory changed. The directory is `tmp_path/disk`;
`tmp_path/outside` holds what an attacker would want read, overwritten or deleted.
"""

import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from kvshelf.errors import ConfigError
from kvshelf.keys import ChunkKey
from kvshelf.tiers.disk import DiskTier
from kvshelf.tiers.disk_files import chunk_path, iter_chunk_files
from tests.tiers.test_disk import blob
from tests.tiers.test_memory import key

NAMESPACE_ID = key(0).namespace_id
OLD_S = 0  # an mtime far older than the abandoned-temp-file age


def snapshot(directory: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under `directory`: its mode and its bytes (or a link's target)."""
    found = {}
    for path in sorted(directory.rglob("*")):
        status = path.lstat()
        if stat.S_ISLNK(status.st_mode):
            content: bytes | str = os.readlink(path)
        elif stat.S_ISREG(status.st_mode):
            content = path.read_bytes()
        else:
            content = ""
        found[str(path.relative_to(directory))] = (status.st_mode, content)
    return found


@pytest.fixture
def outside(tmp_path) -> Path:
    """Files an attacker would like kvshelf to read, overwrite or delete: old, and one a valid chunk."""
    directory = tmp_path / "outside"
    (directory / key(1).hex[:2]).mkdir(parents=True)
    (directory / "old-secret.txt").write_bytes(b"keep me")
    (directory / key(1).hex[:2] / f"{key(1).hex}.kvs").write_bytes(blob(7))
    for path in directory.rglob("*"):
        os.utime(path, (OLD_S, OLD_S), follow_symlinks=False)
    return directory


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "disk"


def plant_parents(root: Path, chunk_key: ChunkKey) -> Path:
    """The chunk's path, with its directories made as the tier makes them."""
    path = chunk_path(root, chunk_key)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def plant_sparse_terabyte(path: Path) -> None:
    with open(path, "wb") as file:
        file.truncate(2**40)  # a hole: no block is allocated


# --- .tmp and start-up ---


def test_tmp_symlink_does_not_delete_old_files_elsewhere(root, outside):
    before = snapshot(outside)
    root.mkdir(mode=0o700)
    (root / ".tmp").symlink_to(outside)
    tier = DiskTier(root, 10_000)
    assert snapshot(outside) == before
    assert (root / ".tmp").is_dir() and not (root / ".tmp").is_symlink()
    assert tier.num_refused_entries == 1


def test_tmp_that_is_a_file_is_replaced_by_a_directory(root):
    root.mkdir(mode=0o700)
    (root / ".tmp").write_bytes(b"not a directory")
    tier = DiskTier(root, 10_000)
    tier.put_many([(key(1), [blob(1)])])
    assert (root / ".tmp").is_dir() and tier.get_many([key(1)]) == [bytearray(blob(1))]


def test_directories_and_links_inside_tmp_are_left_and_only_old_regular_files_removed(root, outside):
    before = snapshot(outside)
    (root / ".tmp" / "subdir").mkdir(mode=0o700, parents=True)
    (root / ".tmp" / "subdir" / "old.tmp").write_bytes(b"x")
    (root / ".tmp" / "link.tmp").symlink_to(outside / "old-secret.txt")
    (root / ".tmp" / "abandoned.tmp").write_bytes(b"half")
    for path in (root / ".tmp").rglob("*"):
        os.utime(path, (OLD_S, OLD_S), follow_symlinks=False)
    DiskTier(root, 10_000)
    assert sorted(path.name for path in (root / ".tmp").iterdir()) == ["link.tmp", "subdir"]
    assert (root / ".tmp" / "subdir" / "old.tmp").exists()
    assert snapshot(outside) == before


def test_start_up_skips_every_kind_of_planted_entry(root, outside):
    DiskTier(root, 10_000).put_many([(key(1), [blob(1)])])
    fan_out = chunk_path(root, key(1)).parent
    os.mkfifo(fan_out / f"{key(257).hex}.kvs")  # key(257) shares key(1)'s fan-out directory
    (fan_out / f"{key(513).hex}.kvs").symlink_to(outside / "old-secret.txt")
    plant_sparse_terabyte(plant_parents(root, key(2)))
    plant_parents(root, key(3)).mkdir()
    (root / "fedcba9876543210").symlink_to(outside)
    os.close(os.open(bytes(fan_out) + b"/\xff\xfe.kvs", os.O_CREAT | os.O_WRONLY, 0o600))  # not UTF-8
    restarted = DiskTier(root, 10_000)
    assert (len(restarted), restarted.used_bytes, restarted.num_refused_entries) == (1, 100, 0)


def test_chunk_listing_skips_links_fifos_and_non_utf8_names_and_reports_misnamed_files(root, outside):
    DiskTier(root, 10_000).put_many([(key(1), [blob(1)])])
    fan_out = chunk_path(root, key(1)).parent
    os.mkfifo(fan_out / f"{key(257).hex}.kvs")
    (fan_out / f"{key(513).hex}.kvs").symlink_to(outside / "old-secret.txt")
    misnamed = fan_out / f"{key(0xAB01).hex.upper()}.kvs"  # 01AB00…: right place, wrong spelling
    misnamed.write_bytes(b"upper-case name")
    os.close(os.open(bytes(fan_out) + b"/\xff\xfe.kvs", os.O_CREAT | os.O_WRONLY, 0o600))
    (root / "fedcba9876543210").symlink_to(outside)
    assert list(iter_chunk_files(root)) == [(chunk_path(root, key(1)), key(1)), (misnamed, None)]


def test_chunk_listing_tolerates_entries_vanishing_after_they_were_listed(root):
    other_namespace = ChunkKey("fedcba9876543210", key(1).digest)
    DiskTier(root, 10_000).put_many([(k, [blob(1)]) for k in (key(0), key(256), key(1), other_namespace)])
    listing = iter_chunk_files(root)
    assert next(listing) == (chunk_path(root, key(0)), key(0))
    # All three were listed already: a file in this fan-out, the next fan-out, the next namespace.
    chunk_path(root, key(256)).unlink()
    shutil.rmtree(chunk_path(root, key(1)).parent)
    shutil.rmtree(root / other_namespace.namespace_id)
    assert list(listing) == []


# --- reads of planted entries ---


def refused_read(tier: DiskTier, chunk_key: ChunkKey) -> list:
    """get_many in a thread, so a read that blocked would fail this test instead of hanging the suite."""
    result: list = []
    reader = threading.Thread(target=lambda: result.extend(tier.get_many([chunk_key])), daemon=True)
    reader.start()
    reader.join(timeout=120)  # a hang guard, not a time limit: the read does not wait on anything
    assert not reader.is_alive(), "the read blocked"
    return result


def test_chunk_symlink_is_a_counted_miss_and_only_the_link_is_removed(root, outside):
    before = snapshot(outside)
    tier = DiskTier(root, 10_000)
    link = plant_parents(root, key(1))
    link.symlink_to(outside / key(1).hex[:2] / f"{key(1).hex}.kvs")
    assert refused_read(tier, key(1)) == [None]
    assert (tier.num_refused_entries, os.path.lexists(link)) == (1, False)
    link.symlink_to(outside / "old-secret.txt")
    assert tier.contains_prefix([key(1)]) == 0
    assert (tier.num_refused_entries, os.path.lexists(link)) == (2, False)
    assert snapshot(outside) == before


@pytest.mark.parametrize("level", ["namespace", "fan-out"])
def test_symlinked_directory_on_the_way_is_not_followed(root, outside, level):
    before = snapshot(outside)
    tier = DiskTier(root, 10_000)
    if level == "namespace":
        link = root / NAMESPACE_ID
        link.symlink_to(outside)  # outside/<2 hex>/<key hex>.kvs is a well-formed chunk file
    else:
        link = chunk_path(root, key(1)).parent
        link.parent.mkdir(mode=0o700)
        link.symlink_to(outside / key(1).hex[:2])
    assert tier.contains_prefix([key(1)]) == 0
    link.symlink_to(outside if level == "namespace" else outside / key(1).hex[:2])
    assert refused_read(tier, key(1)) == [None]
    assert (tier.num_refused_entries, os.path.lexists(link)) == (2, False)
    assert snapshot(outside) == before


def test_fifo_under_a_chunk_name_never_blocks(root):
    tier = DiskTier(root, 10_000)
    os.mkfifo(plant_parents(root, key(1)))
    assert refused_read(tier, key(1)) == [None]
    os.mkfifo(plant_parents(root, key(2)))
    assert tier.contains_prefix([key(2)]) == 0
    assert tier.num_refused_entries == 2
    assert not os.path.lexists(chunk_path(root, key(1))) and not os.path.lexists(chunk_path(root, key(2)))


def test_sparse_terabyte_file_is_never_allocated(root):
    tier = DiskTier(root, 10_000)
    plant_sparse_terabyte(plant_parents(root, key(1)))
    assert refused_read(tier, key(1)) == [None]
    assert (tier.num_refused_entries, tier.used_bytes, chunk_path(root, key(1)).exists()) == (1, 0, False)


def test_file_larger_than_max_object_bytes_is_refused(root):
    tier = DiskTier(root, 10_000, max_object_bytes=1000)
    plant_parents(root, key(1)).write_bytes(b"x" * 1001)
    plant_parents(root, key(2)).write_bytes(b"x" * 1000)
    assert [blob is not None for blob in tier.get_many([key(1), key(2)])] == [False, True]
    assert tier.num_refused_entries == 1


def test_directory_under_a_chunk_name_is_removed_as_a_tree(root):
    tier = DiskTier(root, 10_000)
    planted = plant_parents(root, key(1))
    planted.mkdir()
    (planted / "inner").write_bytes(b"x")
    assert refused_read(tier, key(1)) == [None]
    assert (tier.num_refused_entries, os.path.lexists(planted)) == (1, False)


def test_device_node_under_a_chunk_name_is_never_opened(root):
    tier = DiskTier(root, 10_000)
    try:
        os.mknod(plant_parents(root, key(1)), 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: reads forever
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD")
    assert refused_read(tier, key(1)) == [None]
    assert (tier.num_refused_entries, os.path.lexists(chunk_path(root, key(1)))) == (1, False)


# --- writes through planted entries ---


@pytest.mark.parametrize("level", ["namespace", "fan-out", "chunk"])
def test_a_planted_link_never_redirects_a_write(root, outside, level):
    before = snapshot(outside)
    tier = DiskTier(root, 10_000)
    path = chunk_path(root, key(1))
    if level == "namespace":
        (root / NAMESPACE_ID).symlink_to(outside)
    elif level == "fan-out":
        path.parent.parent.mkdir(mode=0o700)
        path.parent.symlink_to(outside / key(1).hex[:2])
    else:
        path.parent.mkdir(mode=0o700, parents=True)
        path.symlink_to(outside / key(1).hex[:2] / f"{key(1).hex}.kvs")
    tier.put_many([(key(1), [blob(1)])])
    assert not path.is_symlink() and not path.parent.is_symlink() and not path.parent.parent.is_symlink()
    assert path.read_bytes() == blob(1) and tier.get_many([key(1)]) == [bytearray(blob(1))]
    assert snapshot(outside) == before


def test_namespace_description_is_not_written_through_a_link(root, outside):
    before = snapshot(outside)
    tier = DiskTier(root, 10_000)
    (root / NAMESPACE_ID).symlink_to(outside)
    tier.note_namespace(NAMESPACE_ID, {"model_id": "m"})
    assert (root / NAMESPACE_ID / "namespace.json").read_text() == '{\n  "model_id": "m"\n}'
    assert snapshot(outside) == before


def test_a_directory_planted_as_namespace_json_is_replaced(root):
    tier = DiskTier(root, 10_000)
    (root / NAMESPACE_ID / "namespace.json" / "inner").mkdir(mode=0o700, parents=True)
    tier.note_namespace(NAMESPACE_ID, {"model_id": "m"})
    assert (root / NAMESPACE_ID / "namespace.json").read_text() == '{\n  "model_id": "m"\n}'
    assert tier.num_refused_entries == 1


@pytest.mark.parametrize("namespace_id", ["..", "../outside", "/tmp", "0123456789abcdeF", ""])
def test_a_namespace_id_that_is_a_path_never_reaches_the_filesystem(tmp_path, root, outside, namespace_id):
    before = snapshot(tmp_path)
    tier = DiskTier(root, 10_000)
    tier_files = snapshot(root)
    hostile = ChunkKey(namespace_id, key(1).digest)
    tier.note_namespace(namespace_id, {"model_id": "m"})
    tier.put_many([(hostile, [blob(1)])])
    assert (tier.get_many([hostile]), tier.contains_prefix([hostile]), len(tier)) == ([None], 0, 0)
    tier.delete([hostile])
    assert snapshot(root) == tier_files
    assert {path: entry for path, entry in snapshot(tmp_path).items() if not path.startswith("disk")} == before


# --- the root itself ---


def test_symlinked_root_is_refused(tmp_path, outside):
    before = snapshot(outside)
    (tmp_path / "disk").symlink_to(outside)
    with pytest.raises(ConfigError, match="disk.path .* is a symbolic link, .* set disk.path to the real directory"):
        DiskTier(tmp_path / "disk", 10_000)
    assert snapshot(outside) == before


def test_world_writable_root_is_refused(root):
    root.mkdir()
    os.chmod(root, 0o777)
    with pytest.raises(ConfigError, match=r"disk.path .* is writable by every user \(mode 777\).*chmod o-w"):
        DiskTier(root, 10_000, "group")
    assert list(root.iterdir()) == []


def test_root_owned_by_another_user_is_refused(root):
    root.mkdir(mode=0o700)
    try:
        os.chown(root, 65534, 65534)
    except PermissionError:
        pytest.skip("giving a directory to another user needs root")
    with pytest.raises(ConfigError, match="disk.path .* belongs to uid 65534, not to this user"):
        DiskTier(root, 10_000)
    assert list(root.iterdir()) == []


def test_group_mode_accepts_a_root_of_another_member_of_its_group(root):
    root.mkdir()
    try:
        os.chown(root, 65534, os.getegid())
    except PermissionError:
        pytest.skip("giving a directory to another user needs root")
    os.chmod(root, 0o2770)
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        DiskTier(root, 10_000)  # private: only this user's own directory
    DiskTier(root, 10_000, "group").put_many([(key(1), [blob(1)])])
    assert stat.S_IMODE(chunk_path(root, key(1)).stat().st_mode) == 0o660
