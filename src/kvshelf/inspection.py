"""What a store holds — a disk tier's directory or a Redis — and removing one namespace from it.

`open_store` takes a directory (disk.path) or a redis:// / rediss:// URL; `inspect_store` counts
chunks and bytes per namespace and, with `verify`, reads every chunk and lists the damaged ones:
authenticated with the deployment key (security.*), and shaped as its namespace's layout says.
"""

import functools
import json
import os
import re
import shutil
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvshelf.codecs import CODECS_BY_ID, unframe
from kvshelf.codecs.framing import Expected, verify
from kvshelf.config import load_config
from kvshelf.errors import CorruptChunk, ForeignChunk, TierUnavailable
from kvshelf.keys import NAMESPACE_ID_CHARS, ChunkKey
from kvshelf.layout import KVLayout
from kvshelf.security import Keyring
from kvshelf.tiers.disk import DiskTier
from kvshelf.tiers.disk_files import NAMESPACE_FILE, TMP_DIR, iter_chunk_files
from kvshelf.tiers.redis import NAMESPACE_FIELD, SCAN_BATCH, RedisTier

REDIS_SCHEMES = ("redis://", "rediss://")
GONE = "gone"  # evicted or removed between listing and reading: not damage
MAX_DESCRIPTION_BYTES = 1 << 20


@dataclass(slots=True)
class StoredObject:
    where: str  # a file path, or a Redis key name
    key: ChunkKey | None  # None: the name is not a chunk's
    num_bytes: int


class Store(ABC):
    name: str
    keyring: Keyring  # what verifies chunks: the deployment's key (see open_store)

    @abstractmethod
    def objects(self) -> Iterator[StoredObject]:
        """Everything stored, in batches' worth of round trips."""

    @abstractmethod
    def read(self, objects: Sequence[StoredObject]) -> list[bytes | None]: ...

    @abstractmethod
    def description(self, namespace_id: str) -> dict | None:
        """What the namespace means, as its first writer recorded it; None if unknown."""

    def clear(self, namespace_id: str) -> int:
        """Remove one namespace's chunks; returns how many objects were removed."""
        if not re.fullmatch(f"[0-9a-f]{{{NAMESPACE_ID_CHARS}}}", namespace_id):
            raise ValueError(
                f"{namespace_id!r} is not a namespace id ({NAMESPACE_ID_CHARS} hex digits; `kvshelf stats` lists them)"
            )
        return self._clear(namespace_id)

    @abstractmethod
    def _clear(self, namespace_id: str) -> int: ...

    @abstractmethod
    def info(self) -> dict:
        """The store's own state: free space, or each Redis node's memory and evictions."""

    def close(self) -> None:  # noqa: B027 - optional, like Tier.close
        """Release connections. Optional."""


class DiskStore(Store):
    """A disk tier's directory, read through a DiskTier: no link is followed, only regular files of a
    plausible size are read (a planted link, FIFO or device is removed, as the tier would)."""

    def __init__(self, root: Path, keyring: Keyring) -> None:
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory; give the disk tier's path (disk.path) or a redis:// URL")
        self.root = root
        self.name = str(root)
        self.keyring = keyring
        self.tier = DiskTier(root, capacity_bytes=2**62)

    def objects(self) -> Iterator[StoredObject]:
        for path, key in iter_chunk_files(self.root):
            try:
                yield StoredObject(str(path), key, os.stat(path, follow_symlinks=False).st_size)
            except FileNotFoundError:
                continue  # evicted since it was listed

    def read(self, objects: Sequence[StoredObject]) -> list[bytes | memoryview | None]:
        return [self.tier.get_many([stored.key])[0] if stored.key is not None else None for stored in objects]

    def description(self, namespace_id: str) -> dict | None:
        path = self.root / namespace_id / NAMESPACE_FILE
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with open(descriptor, "rb") as file:
                return json.loads(file.read(MAX_DESCRIPTION_BYTES))
        except (OSError, ValueError):
            return None

    def _clear(self, namespace_id: str) -> int:
        directory = self.root / namespace_id
        try:
            status = os.stat(directory, follow_symlinks=False)
        except FileNotFoundError:
            return 0
        if not stat.S_ISDIR(status.st_mode):
            directory.unlink()  # a planted link or file: remove the name, never what it points to
            return 1
        num_files = sum(1 for path in directory.rglob("*") if not path.is_dir())
        shutil.rmtree(directory)  # refuses a symlinked root and never descends through links
        return num_files

    def info(self) -> dict:
        tmp_dir = self.root / TMP_DIR
        usage = shutil.disk_usage(self.root)
        return {
            "filesystem_free_bytes": usage.free,
            "filesystem_total_bytes": usage.total,
            "num_temp_files": sum(1 for _ in tmp_dir.iterdir()) if tmp_dir.is_dir() else 0,
        }

    def close(self) -> None:
        self.tier.close()


class RedisStore(Store):
    def __init__(self, tier: RedisTier, keyring: Keyring) -> None:
        self.tier = tier
        self.name = tier.where
        self.keyring = keyring

    def objects(self) -> Iterator[StoredObject]:
        batch: list[tuple[str, ChunkKey | None]] = []
        for entry in self.tier.iter_names():
            batch.append(entry)
            if len(batch) == SCAN_BATCH:
                yield from self._sized(batch)
                batch = []
        yield from self._sized(batch)

    def _sized(self, batch: list[tuple[str, ChunkKey | None]]) -> Iterator[StoredObject]:
        sizes = self.tier.sizes([name for name, _ in batch]) if batch else []
        for (name, key), num_bytes in zip(batch, sizes):
            if key is not None or not name.endswith(f":{NAMESPACE_FIELD}"):
                yield StoredObject(name, key, num_bytes)

    def read(self, objects: Sequence[StoredObject]) -> list[bytes | None]:
        return self.tier.read([stored.where for stored in objects])

    def description(self, namespace_id: str) -> dict | None:
        return self.tier.namespace_description(namespace_id)

    def _clear(self, namespace_id: str) -> int:
        return self.tier.clear(namespace_id)

    def info(self) -> dict:
        return {"nodes": self.tier.server_info()}

    def close(self) -> None:
        self.tier.close()


def open_store(target: str, cluster: bool = False, config_path: str | None = None) -> Store:
    """The store at `target`: a disk tier's directory, or a Redis URL (a Redis Cluster with `cluster`).

    The deployment key, and for Redis the login and timeouts, come from `config_path`, $KVSHELF_CONFIG
    or KVSHELF_* variables.
    """
    if not target.startswith(REDIS_SCHEMES):
        return DiskStore(Path(target).expanduser(), Keyring.from_config(load_config(config_path).security))
    config = load_config(config_path, redis_url=target, **({"redis_cluster": True} if cluster else {}))
    tier = RedisTier(config.redis, config.tier_backoff_s)
    try:
        tier.connect()
    except TierUnavailable as exc:
        raise ValueError(str(exc)) from exc
    return RedisStore(tier, Keyring.from_config(config.security))


@dataclass(slots=True)
class NamespaceReport:
    namespace_id: str
    description: dict | None  # None if the namespace's description is missing
    num_chunks: int = 0
    stored_bytes: int = 0


@dataclass(slots=True)
class StoreReport:
    store: str
    namespaces: dict[str, NamespaceReport] = field(default_factory=dict)
    damaged: list[dict] = field(default_factory=list)  # {"where", "reason"}
    info: dict = field(default_factory=dict)

    @property
    def num_chunks(self) -> int:
        return sum(report.num_chunks for report in self.namespaces.values())

    @property
    def stored_bytes(self) -> int:
        return sum(report.stored_bytes for report in self.namespaces.values())

    def as_json(self) -> dict:
        return {
            "store": self.store,
            "num_chunks": self.num_chunks,
            "stored_bytes": self.stored_bytes,
            "namespaces": {
                namespace_id: {name: getattr(report, name) for name in NamespaceReport.__slots__}
                for namespace_id, report in self.namespaces.items()
            },
            "damaged": self.damaged,
            "info": self.info,
        }


def inspect_store(
    store: Store, verify: bool = True, progress: Callable[[Iterable], Iterable] | None = None
) -> StoreReport:
    """Chunks and bytes per namespace; with `verify`, every chunk is read and checked (slow on big stores)."""
    report = StoreReport(store.name, info=store.info())
    objects = list(store.objects())
    batches = [objects[start : start + 64] for start in range(0, len(objects), 64)]
    expected_of = functools.cache(lambda namespace_id: _expected(store.description(namespace_id)))
    for batch in progress(batches) if progress else batches:
        reasons = _check(store, batch, expected_of) if verify else [None] * len(batch)
        for stored, reason in zip(batch, reasons):
            if stored.key is None:
                reason = "not a chunk's name"
            if reason == GONE:
                continue
            if reason:
                report.damaged.append({"where": stored.where, "reason": reason})
                continue
            namespace = report.namespaces.get(stored.key.namespace_id)
            if namespace is None:
                namespace_id = stored.key.namespace_id
                namespace = report.namespaces[namespace_id] = NamespaceReport(
                    namespace_id, store.description(namespace_id)
                )
            namespace.num_chunks += 1
            namespace.stored_bytes += stored.num_bytes
    return report


def _check(
    store: Store, batch: Sequence[StoredObject], expected_of: Callable[[str], Expected | None]
) -> list[str | None]:
    reasons = []
    for stored, blob in zip(batch, store.read(batch)):
        if stored.key is None:
            reasons.append(None)
        elif blob is None:
            reasons.append(GONE)
        else:
            try:
                expected = expected_of(stored.key.namespace_id)
                if expected is None:  # the layout is unknown: check framing and authentication only
                    verify(blob, stored.key.digest, store.keyring)
                else:
                    unframe(blob, stored.key.digest, store.keyring, CODECS_BY_ID, expected)
                reasons.append(None)
            except ForeignChunk as exc:
                reasons.append(f"written by another kvshelf version ({exc}); left alone by engines")
            except CorruptChunk as exc:
                reasons.append(str(exc))
    return reasons


def _expected(description: dict | None) -> Expected | None:
    """Any token count, in the layout the namespace's description records (None if it has none)."""
    try:
        return Expected(KVLayout(**description["layout"]), None)
    except (TypeError, KeyError, ValueError):
        return None
