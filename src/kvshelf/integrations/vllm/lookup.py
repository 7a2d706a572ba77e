"""The scheduler's lookups, answered by the workers that hold the KV.

vLLM runs its scheduler and its workers in different processes, and a chunk saved by a
worker may live only in that worker's memory tier. So each worker serves lookups on a local
ZeroMQ socket, and the scheduler asks every tensor-parallel rank, taking the smallest answer.
Messages are JSON and raw int32 token ids, never pickles. The local sockets live in a directory
only this user can enter (`private_socket_dir`): their messages carry tenants' salts and prompts.
Lookups count stored tails (see kvshelf.keys).

`RoutingLookupServer` answers the same question over TCP for a KV-aware router (`kvshelf
proxy`), which knows only token ids and the tenant's cache_salt; its probes are left out of the
hit statistics and count only the instance's own tiers (memory, disk, inbox), not a shared Redis.
Its answer is the exact count of held tokens for a salt the asker picks: a membership oracle,
which is why, with a keyed deployment, it is a CURVE server that only holders of the secret (the
proxy) can reach at all (see kvshelf.ports). With `security.key: none` anyone who reaches the port
may ask; keep it on loopback or a private network then. A message is bounded (MAX_LOOKUP_TOKENS);
a bad one is answered as a miss and logged in one line, at most once per LOG_PERIOD_S.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zmq

from kvshelf.keys import MMHashes, Namespace
from kvshelf.ports import QuietLog, secure_server
from kvshelf.security import Keyring
from kvshelf.shelf import Shelf

logger = logging.getLogger(__name__)
POLL_MS = 100
MAX_LOOKUP_TOKENS = 1 << 20  # a longer prompt is answered as a miss
MAX_LOOKUP_FRAME_BYTES = MAX_LOOKUP_TOKENS * 4 + 64 * 2**10  # int32 token ids, or a JSON header, plus slack
LOOKUP_RECEIVE_HWM = 16  # questions queued per asker
MAX_SOCKET_PATH_CHARS = 100  # under the 107 bytes of a unix socket path
_PLAIN_ENGINE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def private_socket_dir() -> Path:
    """`{tmp}/kvshelf-{uid}`, made 0700 on first use; refused unless it is a real directory of
    ours that no one else may enter (another user could otherwise bind our sockets or read them)."""
    path = Path(tempfile.gettempdir()) / f"kvshelf-{os.getuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path} (kvshelf's lookup socket directory) is not a directory but a symlink or file; "
                         "remove it, or set TMPDIR to another directory")
    if info.st_uid != os.getuid():
        raise ValueError(f"{path} (kvshelf's lookup socket directory) belongs to uid {info.st_uid}, not to you; "
                         "remove it, or set TMPDIR to another directory")
    if info.st_mode & 0o077:
        raise ValueError(f"{path} (kvshelf's lookup socket directory) is open to other users "
                         f"(mode {stat.S_IMODE(info.st_mode):o}); chmod 700 it, or remove it")
    return path


def lookup_address(engine_id: str, tp_rank: int) -> str:
    """The ipc:// address of one worker's lookup socket, in `private_socket_dir()`."""
    directory = private_socket_dir()
    name = engine_id if _PLAIN_ENGINE_ID.fullmatch(engine_id) else hashlib.sha256(engine_id.encode()).hexdigest()[:32]
    path = directory / f"{name}-{tp_rank}.ipc"
    if len(str(path)) > MAX_SOCKET_PATH_CHARS:
        path = directory / f"{hashlib.sha256(engine_id.encode()).hexdigest()[:16]}-{tp_rank}.ipc"
    if len(str(path)) > MAX_SOCKET_PATH_CHARS:
        raise ValueError(f"the lookup socket path {path} is longer than {MAX_SOCKET_PATH_CHARS} characters; "
                         "set TMPDIR to a shorter directory")
    return f"ipc://{path}"


def encode(token_ids: Sequence[int], namespace: Namespace, mm_hashes: MMHashes, probe: bool = False) -> list[bytes]:
    header = {"namespace": namespace.describe(), "mm_hashes": [[pos, digest.hex()] for pos, digest in mm_hashes],
              "probe": probe}
    return [json.dumps(header).encode(), np.asarray(token_ids, dtype="<i4").tobytes()]


def answer(shelf: Shelf, frames: list[bytes]) -> int:
    header = json.loads(frames[0])
    mm_hashes = [(position, bytes.fromhex(digest)) for position, digest in header["mm_hashes"]]
    token_ids = np.frombuffer(frames[1], dtype="<i4").tolist()
    namespace = Namespace.from_description(header["namespace"])
    return shelf.lookup(token_ids, namespace, mm_hashes, tail=True, probe=header.get("probe", False))


class BadLookup(ValueError):
    """A lookup message that is not a question: answered as a miss."""


class _CountServer:
    """A REP socket answering each message with a count of tokens, on a thread of its own; a bad
    message is answered 0 (a miss), never a dead server."""

    def __init__(self, socket: zmq.Socket, address: str, thread_name: str, setting: str) -> None:
        self._socket = socket
        try:
            self._socket.bind(address)
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)
            raise ValueError(f"cannot answer lookups on {address} ({exc}); {setting}") from exc
        self._log = QuietLog(logger)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=thread_name, daemon=True)
        self._thread.start()

    def _count(self, frames: list[bytes]) -> int:
        raise NotImplementedError

    def _serve(self) -> None:
        while not self._stopped.is_set():
            if not self._socket.poll(POLL_MS):
                continue
            frames = self._socket.recv_multipart()
            try:
                num_tokens = self._count(frames)
            except Exception as exc:  # noqa: BLE001 - a bad message is a miss, never a dead server
                self._log.warning(type(exc).__name__, "kvshelf: %s answered a bad lookup message as a miss: %s: %.200s",
                                  self._thread.name, type(exc).__name__, exc)
                num_tokens = 0
            self._socket.send(str(num_tokens).encode())

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()
        self._socket.close(linger=0)


class LookupServer(_CountServer):
    """Answers the scheduler's lookups from one worker's shelf, on an ipc:// address in
    `private_socket_dir()`; its socket file is removed on close."""

    def __init__(self, shelf: Shelf, address: str) -> None:
        self._shelf = shelf
        self._path = Path(address.removeprefix("ipc://")) if address.startswith("ipc://") else None
        super().__init__(zmq.Context.instance().socket(zmq.REP), address, "kvshelf-lookup",
                         "is another engine with this engine_id running?")

    def _count(self, frames: list[bytes]) -> int:
        return answer(self._shelf, frames)

    def close(self) -> None:
        super().close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)


class LookupClient:
    """Asks every tensor-parallel rank; a rank that does not answer in time counts as a miss."""

    def __init__(self, engine_id: str, tp_size: int, timeout_s: float) -> None:
        self._addresses = [lookup_address(engine_id, rank) for rank in range(tp_size)]
        self._timeout_ms = int(timeout_s * 1000)
        self._sockets: list[zmq.Socket | None] = [None] * tp_size

    def lookup(self, token_ids: Sequence[int], namespace: Namespace, mm_hashes: MMHashes, probe: bool = False) -> int:
        answers = [
            self._ask(rank, encode(token_ids, dataclasses.replace(namespace, tp_rank=rank), mm_hashes, probe))
            for rank in range(len(self._addresses))
        ]
        return min(answers)

    def _ask(self, rank: int, message: list[bytes]) -> int:
        socket = self._sockets[rank] or self._connect(rank)
        socket.send_multipart(message)
        if socket.poll(self._timeout_ms):
            return int(socket.recv())
        # A REQ socket that missed its reply is stuck; drop it and connect afresh next time.
        logger.warning(
            "kvshelf: worker %d did not answer a lookup in %d ms; treating it as a miss", rank, self._timeout_ms
        )
        socket.close(linger=0)
        self._sockets[rank] = None
        return 0

    def _connect(self, rank: int) -> zmq.Socket:
        socket = zmq.Context.instance().socket(zmq.REQ)
        socket.connect(self._addresses[rank])
        self._sockets[rank] = socket
        return socket

    def close(self) -> None:
        for socket in self._sockets:
            if socket is not None:
                socket.close(linger=0)


class RoutingLookupServer(_CountServer):
    """Answers a router's `[{"cache_salt": ...}, int32 token ids]` with the leading tokens held.

    With a keyed `keyring` only peers holding the deployment secret are answered (CURVE); with
    `security.key: none` anyone who reaches `address` is. Prompts over MAX_LOOKUP_TOKENS are a miss.
    """

    def __init__(self, address: str, base_namespace: Namespace, client: LookupClient, keyring: Keyring) -> None:
        self._base_namespace = base_namespace
        self._client = client
        socket = zmq.Context.instance().socket(zmq.REP)
        secure_server(socket, keyring, MAX_LOOKUP_FRAME_BYTES, LOOKUP_RECEIVE_HWM)
        super().__init__(socket, address, "kvshelf-routing-lookup", "set lookup_address")

    def _count(self, frames: list[bytes]) -> int:
        if len(frames) != 2:
            raise BadLookup(f"{len(frames)} frames, expected 2 (a JSON header and int32 token ids)")
        header, token_bytes = frames
        question = json.loads(header)
        salt = question.get("cache_salt") if isinstance(question, dict) else None
        if not isinstance(question, dict) or not (salt is None or isinstance(salt, str)):
            raise BadLookup('the header is not {"cache_salt": null or a string}')
        if len(token_bytes) % 4 or len(token_bytes) // 4 > MAX_LOOKUP_TOKENS:
            raise BadLookup(f"{len(token_bytes)} bytes of token ids: not int32s, or over {MAX_LOOKUP_TOKENS} tokens")
        token_ids = np.frombuffer(token_bytes, dtype="<i4").tolist()
        namespace = dataclasses.replace(self._base_namespace, cache_salt=salt)
        return self._client.lookup(token_ids, namespace, (), probe=True) if token_ids else 0

    def close(self) -> None:
        super().close()
        self._client.close()
