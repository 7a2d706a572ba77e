"""The disk tier: one file per chunk, written atomically, evicted least-recently-used.

Layout under the root directory:

    <namespace id>/namespace.json          what the namespace means (for `kvshelf inspect`)
    <namespace id>/<2 hex>/<key hex>.kvs   one framed chunk
    .tmp/                                  files being written; renamed into place when whole

Several processes may share one root: files appear whole or not at all (rename), a reader
that races an eviction reads the whole old file or gets a miss, and each process learns of
chunks written by others on a lookup miss (one stat). Each process enforces the byte cap
over the files it knows of; a restart rescans, ordering by modification time, which a hit
refreshes, so LRU order survives restarts.
"""

import json
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from kvshelf.errors import TierUnavailable
from kvshelf.keys import NAMESPACE_ID_CHARS, ChunkKey, Namespace
from kvshelf.tiers.base import Parts, Tier, parts_bytes

SUFFIX = ".kvs"
TMP_DIR = ".tmp"
ABANDONED_TMP_AGE_S = 600.0


@contextmanager
def _io_errors_as_unavailable(action: str, path: Path) -> Iterator[None]:
    """The one place OS errors become TierUnavailable (with what to do about it)."""
    try:
        yield
    except OSError as exc:
        raise TierUnavailable(
            f"disk tier cannot {action} {path}: {exc}; check that it exists and has free space"
        ) from exc


def chunk_path(root: Path, key: ChunkKey) -> Path:
    return root / key.namespace_id / key.hex[:2] / f"{key.hex}{SUFFIX}"


def iter_chunk_files(root: Path) -> Iterator[tuple[Path, ChunkKey | None]]:
    """Every file under the namespace directories, with its key, or None for a misnamed file."""
    for namespace_dir in sorted(root.iterdir()):
        if not namespace_dir.is_dir() or namespace_dir.name == TMP_DIR:
            continue
        for path in sorted(namespace_dir.rglob("*")):
            if path.is_file() and path.name != "namespace.json":
                yield path, key_from_path(path)


def key_from_path(path: Path) -> ChunkKey | None:
    namespace_id = path.parent.parent.name
    stem = path.name.removesuffix(SUFFIX)
    try:
        digest = bytes.fromhex(stem)
    except ValueError:
        return None
    if path.suffix != SUFFIX or len(digest) != 32 or len(namespace_id) != NAMESPACE_ID_CHARS:
        return None
    if path.parent.name != stem[:2]:
        return None
    return ChunkKey(namespace_id, digest)


class DiskTier(Tier[memoryview]):
    name = "disk"

    def __init__(self, root: Path, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self.root = Path(root)
        self._tmp_dir = self.root / TMP_DIR
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._noted_namespace_ids: set[str] = set()
        # key -> file size; oldest access first.
        self._index: OrderedDict[ChunkKey, int] = OrderedDict()
        self._remove_abandoned_tmp_files()
        self._scan()

    def __len__(self) -> int:
        return len(self._index)

    def _scan(self) -> None:
        found = []
        for path, key in iter_chunk_files(self.root):
            if key is not None:
                stat = path.stat()
                found.append((stat.st_mtime, key, stat.st_size))
        for _, key, size_bytes in sorted(found, key=lambda entry: entry[0]):
            self._index_add(key, size_bytes)

    def _remove_abandoned_tmp_files(self) -> None:
        cutoff = time.time() - ABANDONED_TMP_AGE_S
        for path in self._tmp_dir.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass  # another process cleaned it up first

    def _index_add(self, key: ChunkKey, size_bytes: int) -> None:
        self._index_remove(key)
        self._index[key] = size_bytes
        self._used_bytes += size_bytes

    def _index_remove(self, key: ChunkKey) -> None:
        size_bytes = self._index.pop(key, None)
        if size_bytes is not None:
            self._used_bytes -= size_bytes

    def _knows(self, key: ChunkKey) -> bool:
        """In the index, or written by another process since (then indexed now)."""
        with self._lock:
            if key in self._index:
                return True
        path = chunk_path(self.root, key)
        with _io_errors_as_unavailable("check", path):
            if not path.is_file():
                return False
            size_bytes = path.stat().st_size
        with self._lock:
            self._index_add(key, size_bytes)
        return True

    def contains_prefix(self, keys: Sequence[ChunkKey]) -> int:
        for count, key in enumerate(keys):
            if not self._knows(key):
                return count
        return len(keys)

    def get_many(self, keys: Sequence[ChunkKey]) -> list[memoryview | None]:
        return [self._get(key) for key in keys]

    def _get(self, key: ChunkKey) -> memoryview | None:
        path = chunk_path(self.root, key)
        try:
            with _io_errors_as_unavailable("read", path):
                with open(path, "rb", buffering=0) as file:
                    # Uninitialised and writable: no zero-fill, and decoders can share it without a copy.
                    blob = memoryview(np.empty(os.fstat(file.fileno()).st_size, dtype=np.uint8))
                    num_read = file.readinto(blob)
                os.utime(path)  # the file's mtime is its LRU position across restarts
        except TierUnavailable as exc:
            if not isinstance(exc.__cause__, FileNotFoundError):
                raise
            with self._lock:  # evicted by another process
                self._index_remove(key)
            return None
        if num_read != len(blob):  # shrank under us: treat like a missing file
            return None
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
            else:
                self._index_add(key, len(blob))
        return blob

    def put_many(self, items: Sequence[tuple[ChunkKey, Parts]]) -> None:
        for key, parts in items:
            self._put(key, parts)

    def _put(self, key: ChunkKey, parts: Parts) -> None:
        size_bytes = parts_bytes(parts)
        if size_bytes > self._capacity_bytes:
            return
        with self._lock:
            if key in self._index:
                return
        self._evict_until_free(size_bytes)
        path = chunk_path(self.root, key)
        tmp_path = self._tmp_dir / f"{uuid.uuid4().hex}.tmp"
        try:
            with _io_errors_as_unavailable("write", path):
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp_path, "wb") as file:
                    for part in parts:
                        file.write(part)
                os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)  # a failed write leaves nothing behind
        with self._lock:
            self._index_add(key, size_bytes)

    def _evict_until_free(self, size_bytes: int) -> None:
        while True:
            with self._lock:
                if self._used_bytes + size_bytes <= self._capacity_bytes or not self._index:
                    return
                key, evicted_bytes = self._index.popitem(last=False)
                self._used_bytes -= evicted_bytes
                self.counters.num_evictions += 1
                self.counters.evicted_bytes += evicted_bytes
            self._unlink(chunk_path(self.root, key))

    def _unlink(self, path: Path) -> None:
        with _io_errors_as_unavailable("remove", path):
            path.unlink(missing_ok=True)

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        for key in keys:
            with self._lock:
                self._index_remove(key)
            self._unlink(chunk_path(self.root, key))

    def note_namespace(self, namespace: Namespace) -> None:
        if namespace.id in self._noted_namespace_ids:
            return
        path = self.root / namespace.id / "namespace.json"
        with _io_errors_as_unavailable("write", path):
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp_path = self._tmp_dir / f"{uuid.uuid4().hex}.tmp"
                tmp_path.write_text(json.dumps(namespace.describe(), indent=2, sort_keys=True))
                os.replace(tmp_path, path)
        self._noted_namespace_ids.add(namespace.id)
