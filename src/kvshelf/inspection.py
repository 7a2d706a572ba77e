"""What a disk store holds: chunks and bytes per namespace, and which files are damaged."""

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kvshelf.codecs import CODECS_BY_ID, unframe
from kvshelf.errors import CorruptChunk
from kvshelf.tiers.disk import TMP_DIR, iter_chunk_files


@dataclass(slots=True)
class NamespaceReport:
    namespace_id: str
    description: dict | None  # from namespace.json; None if it is missing
    num_chunks: int = 0
    stored_bytes: int = 0


@dataclass(slots=True)
class StoreReport:
    root: str
    namespaces: dict[str, NamespaceReport] = field(default_factory=dict)
    damaged: list[dict] = field(default_factory=list)  # {"path", "reason"}
    num_temp_files: int = 0

    @property
    def num_chunks(self) -> int:
        return sum(report.num_chunks for report in self.namespaces.values())

    @property
    def stored_bytes(self) -> int:
        return sum(report.stored_bytes for report in self.namespaces.values())


def inspect_disk_store(root: Path, verify: bool = True, progress: Iterable | None = None) -> StoreReport:
    """Walk a disk tier's directory; with `verify`, read and check every chunk (slow on big stores)."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory; give the disk tier's path (disk.path)")
    report = StoreReport(str(root))
    tmp_dir = root / TMP_DIR
    report.num_temp_files = sum(1 for _ in tmp_dir.iterdir()) if tmp_dir.is_dir() else 0
    files = list(iter_chunk_files(root))
    for path, key in progress(files) if progress else files:
        if key is None:
            report.damaged.append({"path": str(path), "reason": "not a chunk file name"})
            continue
        reason = _check(path, key.digest) if verify else None
        if reason:
            report.damaged.append({"path": str(path), "reason": reason})
            continue
        namespace = report.namespaces.get(key.namespace_id)
        if namespace is None:
            namespace = report.namespaces[key.namespace_id] = NamespaceReport(
                key.namespace_id, _description(root / key.namespace_id / "namespace.json")
            )
        namespace.num_chunks += 1
        namespace.stored_bytes += path.stat().st_size
    return report


def _check(path: Path, digest: bytes) -> str | None:
    try:
        unframe(path.read_bytes(), digest, CODECS_BY_ID)
    except CorruptChunk as exc:
        return str(exc)
    return None


def _description(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
