"""The disk tier's files: their names, a walk from a held root fd that never follows a link,
the checks a root must pass, and OS errors worded by what the operator can do (see disk.py)."""

import errno
import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvshelf.errors import ConfigError, TierUnavailable
from kvshelf.keys import NAMESPACE_ID_CHARS, ChunkKey

SUFFIX = ".kvs"
TMP_DIR = ".tmp"
NAMESPACE_FILE = "namespace.json"
# disk.mode -> (file mode, directory mode). The setgid bit on directories makes what a group
# member creates belong to the directory's group, not to that member's primary group.
MODES = {"private": (0o600, 0o700), "group": (0o660, 0o2770)}
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in under a chunk's name opens at once instead of waiting for a writer.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# An open that met another kind of entry than it asked for: a link (ELOOP; ENOTDIR with
# O_DIRECTORY), a file where a directory belongs (ENOTDIR), a socket (ENXIO).
_WRONG_KIND_ERRNOS = (errno.ELOOP, errno.ENOTDIR, errno.ENXIO)
_NAMESPACE_ID = re.compile(f"[0-9a-f]{{{NAMESPACE_ID_CHARS}}}")
_KEY_HEX = re.compile("[0-9a-f]{64}")


def _filesystem_of(path: Path) -> Path:
    """The mount point that holds `path`, to name in messages."""
    place = Path(os.path.abspath(path))
    while place != place.parent and not os.path.ismount(place):
        place = place.parent
    return place


def _advice(exc: OSError, path: Path) -> str:
    """What the operator can do about `exc`, by errno."""
    if exc.errno in DISK_FULL_ERRNOS:
        return f"disk full: free space on {_filesystem_of(path)} or lower disk.size"
    if exc.errno == errno.EROFS:
        return f"filesystem is read-only: remount {_filesystem_of(path)} read-write or choose another disk.path"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied: check the owner and mode of disk.path"
    if exc.errno == errno.ENOENT:
        return "the path vanished while in use: check that nothing else removes disk.path or its contents"
    if exc.errno == errno.EIO:
        return "I/O error on the device: check the disk and the kernel log"
    return "check that disk.path exists, is writable and has free space"


@contextmanager
def io_errors_as_unavailable(action: str, path: Path) -> Iterator[None]:
    """The one place OS errors become TierUnavailable (with what to do about it)."""
    try:
        yield
    except OSError as exc:
        advice = _advice(exc, path)
        raise TierUnavailable(f"disk tier cannot {action} {path}: {advice} ({exc.strerror or exc})") from exc


@contextmanager
def start_errors_as_config_errors(root: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise ConfigError(f"disk.path {root} cannot be prepared: {_advice(exc, root)} ({exc.strerror or exc})") from exc


def is_wrong_kind(exc: OSError) -> bool:
    return exc.errno in _WRONG_KIND_ERRNOS


def is_namespace_id(name: str) -> bool:
    """Only such names become paths: a key naming "../x" never reaches the filesystem."""
    return _NAMESPACE_ID.fullmatch(name) is not None


def _is_utf8(name: str) -> bool:
    try:
        name.encode()  # a non-UTF-8 name was decoded with surrogates, which do not encode
    except UnicodeEncodeError:
        return False
    return True


def chunk_name(key: ChunkKey) -> str:
    return f"{key.hex}{SUFFIX}"


def chunk_path(root: Path, key: ChunkKey) -> Path:
    return root / key.namespace_id / key.hex[:2] / chunk_name(key)


def key_from_path(path: Path) -> ChunkKey | None:
    namespace_id = path.parent.parent.name
    stem = path.name.removesuffix(SUFFIX)
    if path.suffix != SUFFIX or not _KEY_HEX.fullmatch(stem) or not is_namespace_id(namespace_id):
        return None
    if path.parent.name != stem[:2]:
        return None
    return ChunkKey(namespace_id, bytes.fromhex(stem))


def remove_entry(dir_fd: int, name: str) -> None:
    """Remove `name` from the directory: a link itself (never its target), a file, or a directory tree."""
    try:
        if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)  # the fd-based walk: never descends through a link
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass  # removed by another process first


def list_dir(dir_fd: int) -> tuple[list[str], list[str]]:
    """Sorted names of the real subdirectories and of the regular files in a directory.

    Links, FIFOs, devices, sockets, names that are not UTF-8 and entries gone before they could
    be looked at are left out."""
    subdir_names, file_names = [], []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if not _is_utf8(entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdir_names.append(entry.name)
                elif entry.is_file(follow_symlinks=False):
                    file_names.append(entry.name)
            except FileNotFoundError:
                continue  # removed since it was listed
    return sorted(subdir_names), sorted(file_names)


def stat_regular(dir_fd: int, name: str) -> os.stat_result | None:
    """The file's stat if it is still a regular file; None if it vanished or changed kind."""
    try:
        status = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return status if stat.S_ISREG(status.st_mode) else None


def _open_listed_dir(parent_fd: int, name: str) -> int | None:
    """fd of a directory found by a listing; None if it vanished or was swapped for a link since."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if is_wrong_kind(exc):
            return None
        raise


def walk_chunk_files(root_fd: int, root: Path) -> Iterator[tuple[Path, ChunkKey | None, os.stat_result]]:
    subdir_names, _ = list_dir(root_fd)
    for namespace_name in subdir_names:
        if namespace_name != TMP_DIR:
            yield from _walk_namespace(root_fd, namespace_name, root / namespace_name)


@contextmanager
def _listing(parent_fd: int, name: str) -> Iterator[tuple[int, list[str], Iterator[tuple[str, os.stat_result]]] | None]:
    """(fd, subdirectory names, (name, stat) of each regular file, looked at as it is reached) of a
    directory found by a listing; None if it vanished or was swapped for a link since."""
    fd = _open_listed_dir(parent_fd, name)
    if fd is None:
        yield None
        return
    try:
        subdir_names, file_names = list_dir(fd)
        files = ((file_name, status) for file_name in file_names if (status := stat_regular(fd, file_name)))
        yield fd, subdir_names, files
    finally:
        os.close(fd)


def _walk_namespace(
    root_fd: int, name: str, namespace_dir: Path
) -> Iterator[tuple[Path, ChunkKey | None, os.stat_result]]:
    with _listing(root_fd, name) as namespace:
        if namespace is None:
            return
        namespace_fd, fan_out_names, loose_files = namespace
        for file_name, status in loose_files:
            if file_name != NAMESPACE_FILE:
                yield namespace_dir / file_name, None, status  # not where a chunk belongs
        for fan_out_name in fan_out_names:
            with _listing(namespace_fd, fan_out_name) as fan_out:
                for file_name, status in fan_out[2] if fan_out is not None else ():
                    path = namespace_dir / fan_out_name / file_name
                    yield path, key_from_path(path), status


def iter_chunk_files(root: Path) -> Iterator[tuple[Path, ChunkKey | None]]:
    """Every regular file under the namespace directories, with its key, or None for a misnamed file.

    No link below `root` is followed; links, FIFOs and other non-regular entries, names that are
    not UTF-8, and entries that vanish during the walk (evicted by a running tier) are skipped."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for path, key, _ in walk_chunk_files(root_fd, Path(root)):
            yield path, key
    finally:
        os.close(root_fd)


def _check_root(status: os.stat_result, root: Path, mode: str) -> None:
    """Refuse a root that someone else could write to: they could plant or replace chunks."""
    permissions = stat.S_IMODE(status.st_mode)
    shared_by_group = mode == "group" and status.st_gid in {os.getegid(), *os.getgroups()}
    if status.st_uid != os.geteuid() and not shared_by_group:
        raise ConfigError(
            f"disk.path {root} belongs to uid {status.st_uid}, not to this user (uid {os.geteuid()}), who "
            "could read and replace the cache; choose a directory of your own for disk.path, or chown it"
        )
    if permissions & stat.S_IWOTH:
        raise ConfigError(
            f"disk.path {root} is writable by every user (mode {permissions:o}), who could plant chunks; "
            f"run `chmod o-w {root}` or choose another disk.path"
        )
    if mode == "private" and permissions & stat.S_IWGRP:
        raise ConfigError(
            f"disk.path {root} is group-writable (mode {permissions:o}) but disk.mode is private; run "
            f"`chmod g-w {root}`, or set disk.mode: group to share the cache with the directory's group"
        )


def open_root(root: Path, mode: str) -> int:
    """fd of the cache directory, created if missing, checked, and set to the mode's permissions."""
    dir_mode = MODES[mode][1]
    if root.is_symlink():
        raise ConfigError(
            f"disk.path {root} is a symbolic link, which kvshelf does not follow; "
            f"set disk.path to the real directory ({root.resolve()})"
        )
    try:
        root.mkdir(mode=dir_mode, parents=True, exist_ok=True)
        root_fd = os.open(root, DIR_FLAGS)
    except OSError as exc:
        if is_wrong_kind(exc) or isinstance(exc, FileExistsError):
            raise ConfigError(f"disk.path {root} is not a directory; choose another disk.path") from exc
        raise ConfigError(f"disk.path {root} cannot be opened: {_advice(exc, root)} ({exc.strerror or exc})") from exc
    try:
        status = os.fstat(root_fd)
        _check_root(status, root, mode)
        # Tightens a cache made by an older kvshelf (0755); a group-shared root of another owner is theirs.
        if status.st_uid == os.geteuid() and stat.S_IMODE(status.st_mode) != dir_mode:
            with start_errors_as_config_errors(root):
                os.fchmod(root_fd, dir_mode)
    except BaseException:
        os.close(root_fd)
        raise
    return root_fd
