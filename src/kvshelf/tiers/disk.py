"""The disk tier: one file per chunk, written atomically, evicted least-recently-used.

Layout under the root directory (disk.path):

    <namespace id>/namespace.json          what the namespace means (for `kvshelf inspect`)
    <namespace id>/<2 hex>/<key hex>.kvs   one framed chunk
    .tmp/                                  files being written; renamed into place when whole

Several processes may share one root: files appear whole or not at all (rename), a reader
that races an eviction reads the whole old file or gets a miss, and each process learns of
chunks written by others on a lookup miss (one stat). Each process enforces the byte cap
over the files it knows of; a restart rescans, ordering by modification time, which a hit
refreshes, so LRU order survives restarts.

The directory is a trust boundary: stored KV gives back the prompt, and a planted file must
never be followed, block, or be allocated whole. So:
- files are 0600 and directories 0700 (disk.mode group: 0660 and 2770, for one unix group);
  a root that others can write to, or that another user owns, is refused at start;
- every path is walked one directory at a time from a held fd of the root with O_NOFOLLOW, so
  no link is followed anywhere below the root;
- only regular files of at most `max_object_bytes` are read; anything else under a chunk's or
  a directory's name (a link, FIFO, device, directory, 1 TiB sparse file) is a miss, counted
  in `num_refused_entries`, and removed: the name itself, never what a link points to.

Chunks this tier writes are reported stored, and those it evicts or clears removed (its KV
cache events); chunks it finds on disk (at start, or written by another process) are not.
`clear` (vLLM's reset with reset_external) removes every chunk file the tier knows of, as its
eviction may: the chunks of every process sharing disk.path, which is one cache. Deployments
whose resets must not touch each other's KV need a disk.path each.
"""

import json
import logging
import os
import stat
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

from kvshelf.errors import ConfigError
from kvshelf.keys import ChunkKey
from kvshelf.tiers.arena import fresh_buffer
from kvshelf.tiers.base import Parts, Tier, parts_bytes
from kvshelf.tiers.disk_files import (
    CREATE_FLAGS,
    DIR_FLAGS,
    DISK_FULL_ERRNOS,
    MODES,
    NAMESPACE_FILE,
    READ_FLAGS,
    TMP_DIR,
    chunk_name,
    chunk_path,
    io_errors_as_unavailable,
    is_namespace_id,
    is_wrong_kind,
    list_dir,
    open_root,
    remove_entry,
    start_errors_as_config_errors,
    stat_regular,
    walk_chunk_files,
)

logger = logging.getLogger(__name__)

ABANDONED_TMP_AGE_S = 600.0
DEFAULT_MAX_OBJECT_BYTES = 2**30


class DiskTier(Tier[memoryview]):
    name = "disk"
    read_group_chunks = 1  # one file is one read: verify it while the next is read

    def __init__(
        self,
        root: Path,
        capacity_bytes: int,
        mode: str = "private",
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    ) -> None:
        super().__init__(capacity_bytes)
        if mode not in MODES:
            raise ConfigError(f"disk.mode must be one of {', '.join(MODES)}, got {mode!r}")
        if max_object_bytes <= 0:
            raise ValueError(f"max_object_bytes must be positive, got {max_object_bytes}")
        self.root = Path(root)
        self.mode = mode
        self._file_mode, self._dir_mode = MODES[mode]
        # A larger file was never written by a tier of this capacity: it is planted or damaged.
        self.max_object_bytes = min(max_object_bytes, capacity_bytes)
        # Entries under the root that were not what kvshelf writes there (links, FIFOs, devices,
        # directories or oversized files where a chunk belongs): removed and counted here.
        self.num_refused_entries = 0
        self._lock = threading.Lock()
        self._noted_namespace_ids: set[str] = set()
        # key -> file size; oldest access first.
        self._index: OrderedDict[ChunkKey, int] = OrderedDict()
        # Held for the tier's life: every path is walked from it, so the root cannot be swapped later.
        self._root_fd = open_root(self.root, mode)
        self._close_root_fd = weakref.finalize(self, os.close, self._root_fd)
        with start_errors_as_config_errors(self.root):
            self._prepare_tmp_dir()
            self._scan()

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        self._close_root_fd()
        self._root_fd = -1  # later calls fail with EBADF instead of using a reused descriptor number

    # --- start-up ---

    def _prepare_tmp_dir(self) -> None:
        tmp_fd = self._make_subdir(self._root_fd, TMP_DIR)  # a link or file named .tmp is replaced
        try:
            self._remove_abandoned_tmp_files(tmp_fd)
        finally:
            os.close(tmp_fd)

    def _remove_abandoned_tmp_files(self, tmp_fd: int) -> None:
        """Regular files older than ABANDONED_TMP_AGE_S (a writer died); links and directories are left."""
        cutoff = time.time() - ABANDONED_TMP_AGE_S
        for name in list_dir(tmp_fd)[1]:
            status = stat_regular(tmp_fd, name)
            if status is None or status.st_mtime >= cutoff:
                continue
            try:
                os.unlink(name, dir_fd=tmp_fd)
            except FileNotFoundError:
                pass  # another process cleaned it up first
            except OSError as exc:  # e.g. a read-only filesystem: the tier can still serve reads
                logger.warning("kvshelf: cannot remove abandoned temp file %s: %s", self.root / TMP_DIR / name, exc)
                return

    def _scan(self) -> None:
        scan_fd = os.open(".", DIR_FLAGS, dir_fd=self._root_fd)  # its own read position
        try:
            found = [
                (status.st_mtime, key, status.st_size)
                for _, key, status in walk_chunk_files(scan_fd, self.root)
                if key is not None and status.st_size <= self.max_object_bytes
            ]
        finally:
            os.close(scan_fd)
        for _, key, size_bytes in sorted(found, key=lambda entry: entry[0]):
            self._index_add(key, size_bytes)

    # --- the index (under self._lock) ---

    def _index_add(self, key: ChunkKey, size_bytes: int) -> None:
        self._index_remove(key)
        self._index[key] = size_bytes
        self._used_bytes += size_bytes

    def _index_remove(self, key: ChunkKey) -> None:
        size_bytes = self._index.pop(key, None)
        if size_bytes is not None:
            self._used_bytes -= size_bytes

    # --- walking the directory without following links ---

    def _refuse(self, dir_fd: int, name: str) -> None:
        """Count and remove an entry kvshelf did not write: a link goes, never what it points to."""
        with self._lock:
            self.num_refused_entries += 1
        logger.warning("kvshelf: disk tier %s: removing %r, which is not a regular chunk file or directory",
                       self.root, name)
        try:
            remove_entry(dir_fd, name)
        except OSError as exc:  # e.g. a read-only filesystem: it stays refused on every read
            logger.warning("kvshelf: disk tier %s: cannot remove %r: %s", self.root, name, exc)

    def _open_subdir(self, parent_fd: int, name: str) -> int | None:
        """fd of directory `name`, never through a link; None if missing or refused."""
        try:
            return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if not is_wrong_kind(exc):
                raise
        self._refuse(parent_fd, name)
        return None

    def _make_subdir(self, parent_fd: int, name: str) -> int:
        """fd of directory `name`, created if missing.

        A link planted where the directory belongs is removed and a real directory made: writes
        are never redirected, and the tier heals instead of failing every write (and tripping
        its breaker) until someone removes the link by hand."""
        subdir_fd = self._open_subdir(parent_fd, name)
        if subdir_fd is not None:
            return subdir_fd
        try:
            os.mkdir(name, self._dir_mode, dir_fd=parent_fd)
        except FileExistsError:
            return os.open(name, DIR_FLAGS, dir_fd=parent_fd)  # made meanwhile by another process
        subdir_fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        try:
            os.fchmod(subdir_fd, self._dir_mode)  # mkdir's mode is cut by the umask
        except BaseException:
            os.close(subdir_fd)
            raise
        return subdir_fd

    def _open_chunk_dir(self, key: ChunkKey) -> int | None:
        namespace_fd = self._open_subdir(self._root_fd, key.namespace_id)
        if namespace_fd is None:
            return None
        try:
            return self._open_subdir(namespace_fd, key.hex[:2])
        finally:
            os.close(namespace_fd)

    def _make_chunk_dir(self, key: ChunkKey) -> int:
        namespace_fd = self._make_subdir(self._root_fd, key.namespace_id)
        try:
            return self._make_subdir(namespace_fd, key.hex[:2])
        finally:
            os.close(namespace_fd)

    def _is_acceptable(self, status: os.stat_result) -> bool:
        return stat.S_ISREG(status.st_mode) and status.st_size <= self.max_object_bytes

    # --- lookups and reads ---

    def _knows(self, key: ChunkKey) -> bool:
        """In the index, or written by another process since (then indexed now)."""
        if not is_namespace_id(key.namespace_id):
            return False
        with self._lock:
            if key in self._index:
                return True
        with io_errors_as_unavailable("check", chunk_path(self.root, key)):
            size_bytes = self._stat_chunk(key)
        if size_bytes is None:
            return False
        with self._lock:
            self._index_add(key, size_bytes)
        return True

    def _stat_chunk(self, key: ChunkKey) -> int | None:
        """The chunk file's size; None if there is none (or only a refused entry)."""
        dir_fd = self._open_chunk_dir(key)
        if dir_fd is None:
            return None
        try:
            status = os.stat(chunk_name(key), dir_fd=dir_fd, follow_symlinks=False)
            if self._is_acceptable(status):
                return status.st_size
            self._refuse(dir_fd, chunk_name(key))
            return None
        except FileNotFoundError:
            return None
        finally:
            os.close(dir_fd)

    def contains_prefix(self, keys: Sequence[ChunkKey]) -> int:
        for count, key in enumerate(keys):
            if not self._knows(key):
                return count
        return len(keys)

    def get_many(
        self, keys: Sequence[ChunkKey], into: Callable[[int], memoryview] | None = None
    ) -> list[memoryview | None]:
        """Each file is read into `into(its size)` (the memory tier's arena), or into fresh memory."""
        return [self._get(key, into or fresh_buffer) for key in keys]

    def _get(self, key: ChunkKey, into: Callable[[int], memoryview]) -> memoryview | None:
        if not is_namespace_id(key.namespace_id):
            return None
        with io_errors_as_unavailable("read", chunk_path(self.root, key)):
            blob = self._read_chunk(key, into)
        with self._lock:
            if blob is None:  # evicted by another process, or refused
                self._index_remove(key)
            else:
                self._index_add(key, len(blob))  # also moves it to the recent end
        return blob

    def _read_chunk(self, key: ChunkKey, into: Callable[[int], memoryview]) -> memoryview | None:
        dir_fd = self._open_chunk_dir(key)
        if dir_fd is None:
            return None
        try:
            opened = self._open_chunk(dir_fd, chunk_name(key))
        finally:
            os.close(dir_fd)
        if opened is None:
            return None
        fd, size_bytes = opened
        try:
            return _read_whole(fd, into(size_bytes))
        finally:
            os.close(fd)

    def _open_chunk(self, dir_fd: int, name: str) -> tuple[int, int] | None:
        """(fd, size) of a regular chunk file of acceptable size; None if missing or refused.

        Checked before the open, so a FIFO or device is never opened at all, and again on what
        was opened, since the name may have been swapped in between."""
        try:
            if not self._is_acceptable(os.stat(name, dir_fd=dir_fd, follow_symlinks=False)):
                self._refuse(dir_fd, name)
                return None
            fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if not is_wrong_kind(exc):
                raise
            self._refuse(dir_fd, name)
            return None
        status = os.fstat(fd)
        if self._is_acceptable(status):
            return fd, status.st_size
        os.close(fd)
        self._refuse(dir_fd, name)
        return None

    # --- writes ---

    def put_many(self, items: Sequence[tuple[ChunkKey, Parts]]) -> None:
        stored: list[ChunkKey] = []
        evicted: list[ChunkKey] = []
        try:
            for key, parts in items:
                if self._put(key, parts, evicted):
                    stored.append(key)
        finally:
            self._note_changes(stored, evicted)

    def _put(self, key: ChunkKey, parts: Parts, evicted: list[ChunkKey]) -> bool:
        """Write one chunk, evicting as needed (their keys appended to `evicted`); False if it was not
        written (too large, or held already)."""
        size_bytes = parts_bytes(parts)
        if size_bytes > self.max_object_bytes or not is_namespace_id(key.namespace_id):
            return False
        with self._lock:
            if key in self._index:
                return False
        self._evict_until_free(size_bytes, evicted)
        with io_errors_as_unavailable("write", chunk_path(self.root, key)):
            try:
                self._write_chunk(key, parts)
            except OSError as exc:
                if exc.errno not in DISK_FULL_ERRNOS or not self._evict_for_room(size_bytes, evicted):
                    raise
                self._write_chunk(key, parts)  # once: if the disk is still full, it is others' files
        with self._lock:
            self._index_add(key, size_bytes)
        return True

    def _write_chunk(self, key: ChunkKey, parts: Parts) -> None:
        tmp_fd = self._make_subdir(self._root_fd, TMP_DIR)
        try:
            dir_fd = self._make_chunk_dir(key)
            try:
                self._write_file(tmp_fd, dir_fd, chunk_name(key), parts)
            finally:
                os.close(dir_fd)
        finally:
            os.close(tmp_fd)

    def _write_file(self, tmp_fd: int, dir_fd: int, name: str, parts: Parts) -> None:
        """Write `parts` to a new file in .tmp, then rename it to `name`: readers see all of it or
        none, and a failure leaves no temp file and the file already there (if any) as it was."""
        tmp_name = f"{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp_name, CREATE_FLAGS, self._file_mode, dir_fd=tmp_fd)
        try:
            with open(fd, "wb") as file:
                os.fchmod(fd, self._file_mode)  # the create mode is cut by the umask
                for part in parts:
                    file.write(part)
            os.replace(tmp_name, name, src_dir_fd=tmp_fd, dst_dir_fd=dir_fd)  # replaces a link, never follows it
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp_name, dir_fd=tmp_fd)
            raise

    def _evict_until_free(self, size_bytes: int, evicted: list[ChunkKey]) -> None:
        while True:
            with self._lock:
                if self._used_bytes + size_bytes <= self._capacity_bytes:
                    return
            if self._evict_oldest(evicted) is None:
                return

    def _evict_for_room(self, size_bytes: int, evicted: list[ChunkKey]) -> bool:
        """On a full filesystem, evict own chunks worth the object plus as much again (at least 1%
        of capacity), so the next writes do not each hit a full disk. False: nothing to evict."""
        target_bytes = size_bytes + max(size_bytes, self._capacity_bytes // 100)
        freed_bytes = 0
        while freed_bytes < target_bytes:
            evicted_bytes = self._evict_oldest(evicted)
            if evicted_bytes is None:
                break
            freed_bytes += evicted_bytes
        return freed_bytes > 0

    def _evict_oldest(self, evicted: list[ChunkKey]) -> int | None:
        """Evict the least recently used chunk (its key appended to `evicted`); returns its size, or
        None if the index is empty."""
        with self._lock:
            if not self._index:
                return None
            key, evicted_bytes = self._index.popitem(last=False)
            self._used_bytes -= evicted_bytes
            self.counters.num_evictions += 1
            self.counters.evicted_bytes += evicted_bytes
        evicted.append(key)  # out of the index, so no longer held, even if removing its file fails
        self._remove_chunk(key)
        return evicted_bytes

    def _remove_chunk(self, key: ChunkKey) -> None:
        with io_errors_as_unavailable("remove", chunk_path(self.root, key)):
            dir_fd = self._open_chunk_dir(key)
            if dir_fd is None:
                return
            try:
                remove_entry(dir_fd, chunk_name(key))
            finally:
                os.close(dir_fd)

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        for key in keys:
            if not is_namespace_id(key.namespace_id):
                continue
            with self._lock:
                self._index_remove(key)
            self._remove_chunk(key)

    def clear(self) -> None:
        """Remove every chunk file the tier knows of (see the module docstring); on a failure the
        chunks not yet removed stay, and the error is raised."""
        with self._lock:
            keys = list(self._index)
        removed = []
        try:
            for key in keys:
                with self._lock:
                    self._index_remove(key)
                removed.append(key)  # out of the index, so no longer held, even if its file stays
                self._remove_chunk(key)
        finally:
            self._note_removed(removed)

    def list_keys(self) -> list[ChunkKey]:
        with self._lock:
            return list(self._index)

    def note_namespace(self, namespace_id: str, description: dict) -> None:
        if namespace_id in self._noted_namespace_ids or not is_namespace_id(namespace_id):
            return
        with io_errors_as_unavailable("write", self.root / namespace_id / NAMESPACE_FILE):
            namespace_fd = self._make_subdir(self._root_fd, namespace_id)
            try:
                if not self._holds_regular_file(namespace_fd, NAMESPACE_FILE):
                    self._write_description(namespace_fd, description)
            finally:
                os.close(namespace_fd)
        self._noted_namespace_ids.add(namespace_id)

    def _holds_regular_file(self, dir_fd: int, name: str) -> bool:
        """Whether `name` is a regular file; another kind of entry there is refused, so a planted
        directory cannot make every later write of the name fail."""
        try:
            status = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISREG(status.st_mode):
            return True
        self._refuse(dir_fd, name)
        return False

    def _write_description(self, namespace_fd: int, description: dict) -> None:
        text = json.dumps(description, indent=2, sort_keys=True)
        tmp_fd = self._make_subdir(self._root_fd, TMP_DIR)
        try:
            self._write_file(tmp_fd, namespace_fd, NAMESPACE_FILE, [text.encode()])
        finally:
            os.close(tmp_fd)


def _read_whole(fd: int, blob: memoryview) -> memoryview | None:
    """`blob` filled with the file's bytes (as many as it holds: the file's size); None if the file
    shrank under us (like a missing file)."""
    with open(fd, "rb", buffering=0, closefd=False) as file:
        num_read = 0
        while num_read < len(blob):
            count = file.readinto(blob[num_read:])
            if not count:
                return None
            num_read += count
    # The file's mtime is its LRU position across restarts. A failed touch (a read-only
    # filesystem, another owner's file) must not fail the read it follows.
    with suppress(OSError):
        os.utime(fd)
    return blob
