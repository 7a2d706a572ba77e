"""The scheduler's lookups, answered by the workers that hold the KV; and a router's.

vLLM runs its scheduler and its workers in different processes, and a chunk saved by a worker
may live only in that worker's memory tier. So each worker serves its shelf on a local ZeroMQ
socket (`LookupServer`), and the scheduler asks every tensor-parallel rank (`LookupClient`):
- locate: the tier of each leading chunk of a prompt the rank holds (`Shelf.locate`, stored tails
  counted), as the worker's `on_located` hook (prefetch, load-or-recompute) leaves it. The ranks'
  answers combine to the shortest, each chunk at the slowest rank's tier (memory < inbox < disk <
  redis). The request id travels in the header, for the hook.
- reset: empty each rank's shelf, and drop the model's KV from a shared Redis (`Shelf.clear`);
  done only if every rank says so in time.
- held: the keys each rank's own tiers hold, for a router's index.
A message is a JSON header and raw int32 token ids; an answer is JSON, or JSON counts and raw
32-byte key digests; never pickles. The local sockets live in a directory only this user can
enter (`private_socket_dir`): their messages carry tenants' salts and prompts.

`RoutingLookupServer` answers a KV-aware router (`kvshelf proxy`) over TCP:
- `{"cache_salt": null or a string}` and int32 token ids: how many leading tokens this instance
  holds, in decimal digits. These probes count only the instance's own tiers (memory, disk,
  inbox), not a shared Redis, and are left out of the hit statistics.
- `{"op": "describe"}`: the instance's namespace without salt, and its chunk_size (JSON), so that
  the router can compute prompts' chunk keys itself.
- `{"op": "held"}`: what every rank's own tiers hold, per tier (the `held` answer above): the
  router's index starts from it and follows vLLM's KV events from there (kvshelf.disagg.kv_index).
It answers the exact count of held tokens for a salt the asker picks: a membership oracle, which
is why, with a keyed deployment, it is a CURVE server that only holders of the secret (the proxy)
can reach at all (see kvshelf.ports). With `security.key: none` anyone who reaches the port may
ask; keep it on loopback or a private network then. A message is bounded (MAX_LOOKUP_TOKENS); a
bad one is answered as a miss (`0`) and logged in one line, at most once per LOG_PERIOD_S.
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
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import zmq

from kvshelf.disagg.kv_index import DESCRIBE_OP, HELD_OP, decode_held, encode_held
from kvshelf.keys import ChunkKey, Namespace, Prompt
from kvshelf.ports import QuietLog, secure_server, zmq_context
from kvshelf.security import Keyring
from kvshelf.shelf import Shelf
from kvshelf.threads import background_thread

logger = logging.getLogger(__name__)
POLL_MS = 100
MAX_LOOKUP_TOKENS = 1 << 20  # a longer prompt is answered as a miss
MAX_LOOKUP_FRAME_BYTES = MAX_LOOKUP_TOKENS * 4 + 64 * 2**10  # int32 token ids, or a JSON header, plus slack
LOOKUP_RECEIVE_HWM = 16  # questions queued per asker
MAX_SOCKET_PATH_CHARS = 100  # under the 107 bytes of a unix socket path
RESET_TIMEOUT_S = 120.0  # a reset waits for queued writes first
# Slowest last: a chunk held by two ranks in different tiers loads as fast as the slower one.
TIER_ORDER = {"memory": 0, "inbox": 1, "disk": 2, "redis": 3}
_PLAIN_ENGINE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MISS = b"0"  # a router's bad question: 0 tokens; to the scheduler, an answer it refuses (a miss)
# (request id or None for a router's probe, prompt, the tier of each leading chunk held) -> the chunks to claim
OnLocated = Callable[[str | None, Prompt, list[str]], list[str]]


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


def locate_message(prompt: Prompt, request_id: str | None, probe: bool) -> list[bytes]:
    header = {"op": "locate", "namespace": prompt.namespace.describe(), "request_id": request_id, "probe": probe,
              "mm_hashes": [[position, digest.hex()] for position, digest in prompt.mm_hashes]}
    return [json.dumps(header).encode(), np.asarray(prompt.token_ids, dtype="<i4").tobytes()]


def op_message(op: str, namespace: Namespace | None = None) -> list[bytes]:
    header = {"op": op, "namespace": namespace.describe() if namespace is not None else None}
    return [json.dumps(header).encode(), b""]


def combine(answers: Sequence[list[str]]) -> list[str]:
    """The ranks' answers as one: the chunks all of them hold, each at the slowest rank's tier."""
    num_chunks = min(len(answer) for answer in answers)
    slowest = len(TIER_ORDER)
    return [max((answer[index] for answer in answers), key=lambda tier: TIER_ORDER.get(tier, slowest))
            for index in range(num_chunks)]


def held_digests(held: dict[str, list[ChunkKey]]) -> dict[str, list[bytes]]:
    return {tier: [key.digest for key in keys] for tier, keys in held.items()}


class BadLookup(ValueError):
    """A lookup message that is not a question: answered as a miss."""


class _Server:
    """A REP socket answering each message on a thread of its own; a bad message is answered as a
    miss, never a dead server."""

    def __init__(self, socket: zmq.Socket, address: str, thread_name: str, setting: str) -> None:
        self._socket = socket
        try:
            self._socket.bind(address)
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)
            raise ValueError(f"cannot answer lookups on {address} ({exc}); {setting}") from exc
        self._log = QuietLog(logger)
        self._stopped = threading.Event()
        self._thread = background_thread(self._serve, thread_name)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        raise NotImplementedError

    def _serve(self) -> None:
        while not self._stopped.is_set():
            if not self._socket.poll(POLL_MS):
                continue
            frames = self._socket.recv_multipart()
            try:
                answer = self._answer(frames)
            except Exception as exc:  # noqa: BLE001 - a bad message is a miss, never a dead server
                self._log.warning(type(exc).__name__, "kvshelf: %s answered a bad lookup message as a miss: %s: %.200s",
                                  self._thread.name, type(exc).__name__, exc)
                answer = [_MISS]
            self._socket.send_multipart(answer)

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()
        self._socket.close(linger=0)


class LookupServer(_Server):
    """Answers the scheduler from one worker's shelf, on an ipc:// address in `private_socket_dir()`;
    its socket file is removed on close. `on_located` sees each lookup's answer and says what to
    claim instead (see OnLocated); without it the shelf's answer goes back as it is."""

    def __init__(self, shelf: Shelf, address: str, on_located: OnLocated | None = None) -> None:
        self._shelf = shelf
        self._on_located = on_located
        self._path = Path(address.removeprefix("ipc://")) if address.startswith("ipc://") else None
        super().__init__(zmq_context().socket(zmq.REP), address, "kvshelf-lookup",
                         "is another engine with this engine_id running?")

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        header = json.loads(frames[0])
        op = header["op"]
        if op == "locate":
            return [json.dumps(self._locate(header, frames[1])).encode()]
        if op == "reset":
            model = Namespace.from_description(header["namespace"]) if header["namespace"] is not None else None
            return [json.dumps(self._shelf.clear(model)).encode()]
        if op == "held":
            return encode_held(held_digests(self._shelf.events.held_keys()))
        raise BadLookup(f"unknown op {op!r}")

    def _locate(self, header: dict, token_bytes: bytes) -> list[str]:
        mm_hashes = [(position, bytes.fromhex(digest)) for position, digest in header["mm_hashes"]]
        token_ids = np.frombuffer(token_bytes, dtype="<i4").tolist()
        prompt = Prompt(token_ids, Namespace.from_description(header["namespace"]), mm_hashes)
        located = self._shelf.locate(prompt, tail=True, probe=header["probe"], request_id=header["request_id"])
        if self._on_located is None or header["probe"]:  # a router's probe: what is held, claimed or not
            return located
        return self._on_located(header["request_id"], prompt, located)

    def close(self) -> None:
        super().close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)


class LookupClient:
    """Asks every tensor-parallel rank at once; a rank that does not answer in time counts as a miss."""

    def __init__(self, engine_id: str, tp_size: int, timeout_s: float,
                 reset_timeout_s: float = RESET_TIMEOUT_S) -> None:
        self._addresses = [lookup_address(engine_id, rank) for rank in range(tp_size)]
        self._timeout_s = timeout_s
        self._reset_timeout_s = reset_timeout_s
        self._sockets: list[zmq.Socket | None] = [None] * tp_size

    def locate(self, prompt: Prompt, request_id: str | None = None, probe: bool = False) -> list[str]:
        """The tier of each leading chunk of `prompt` that every rank holds (see the module docstring)."""
        messages = [locate_message(prompt.with_rank(rank), request_id, probe) for rank in range(len(self._addresses))]
        return combine([_tiers(answer) for answer in self._ask_all(messages, self._timeout_s)])

    def reset(self, model: Namespace | None = None) -> bool:
        """Empty every rank's shelf, and drop `model`'s KV from the shared tiers (see Shelf.clear);
        True only if every rank answered that it did."""
        messages = [op_message("reset", dataclasses.replace(model, tp_rank=rank) if model is not None else None)
                    for rank in range(len(self._addresses))]
        answers = self._ask_all(messages, self._reset_timeout_s)
        return all(answer == [b"true"] for answer in answers)

    def held(self) -> dict[str, list[bytes]] | None:
        """Per tier, the key digests every rank's own tiers hold; None if a rank did not answer."""
        merged: dict[str, list[bytes]] = {}
        for answer in self._ask_all([op_message("held")] * len(self._addresses), self._timeout_s):
            try:
                held = decode_held(answer or [])
            except ValueError:
                return None
            for tier, digests in held.items():
                merged.setdefault(tier, []).extend(digests)
        return merged

    def _ask_all(self, messages: list[list[bytes]], timeout_s: float) -> list[list[bytes] | None]:
        """Each rank's answer to its message, all asked at once; None where none came in time."""
        sockets = [self._sockets[rank] or self._connect(rank) for rank in range(len(self._addresses))]
        for socket, message in zip(sockets, messages):
            socket.send_multipart(message)
        deadline_s = time.monotonic() + timeout_s
        answers: list[list[bytes] | None] = []
        for rank, socket in enumerate(sockets):
            if socket.poll(max(int((deadline_s - time.monotonic()) * 1000), 0)):
                answers.append(socket.recv_multipart())
                continue
            # A REQ socket that missed its reply is stuck; drop it and connect afresh next time.
            logger.warning("kvshelf: worker %d did not answer in %.1f s; treating it as a miss", rank, timeout_s)
            socket.close(linger=0)
            self._sockets[rank] = None
            answers.append(None)
        return answers

    def _connect(self, rank: int) -> zmq.Socket:
        socket = zmq_context().socket(zmq.REQ)
        socket.connect(self._addresses[rank])
        self._sockets[rank] = socket
        return socket

    def close(self) -> None:
        for socket in self._sockets:
            if socket is not None:
                socket.close(linger=0)


def _tiers(answer: list[bytes] | None) -> list[str]:
    """A rank's locate answer; a missing or malformed one is a miss."""
    try:
        tiers = json.loads(answer[0]) if answer and len(answer) == 1 else []
    except ValueError:
        return []
    return tiers if isinstance(tiers, list) and all(isinstance(tier, str) for tier in tiers) else []


class RoutingLookupServer(_Server):
    """Answers a router (see the module docstring) for the instance whose workers `client` asks.

    With a keyed `keyring` only peers holding the deployment secret are answered (CURVE); with
    `security.key: none` anyone who reaches `address` is. Prompts over MAX_LOOKUP_TOKENS are a miss.
    """

    def __init__(self, address: str, base_namespace: Namespace, chunk_size: int, client: LookupClient,
                 keyring: Keyring) -> None:
        self._base_namespace = base_namespace
        self._chunk_size = chunk_size
        self._client = client
        socket = zmq_context().socket(zmq.REP)
        secure_server(socket, keyring, MAX_LOOKUP_FRAME_BYTES, LOOKUP_RECEIVE_HWM)
        super().__init__(socket, address, "kvshelf-routing-lookup", "set lookup_address")

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) != 2:
            raise BadLookup(f"{len(frames)} frames, expected 2 (a JSON header and int32 token ids)")
        header, token_bytes = frames
        question = json.loads(header)
        op = question.get("op", "lookup") if isinstance(question, dict) else None
        if op == DESCRIBE_OP:
            description = {"namespace": self._base_namespace.describe(), "chunk_size": self._chunk_size}
            return [json.dumps(description).encode()]
        if op == HELD_OP:
            held = self._client.held()
            return encode_held(held) if held is not None else [_MISS]
        salt = question.get("cache_salt") if op == "lookup" else None
        if op != "lookup" or not (salt is None or isinstance(salt, str)):
            raise BadLookup('the header is not {"cache_salt": null or a string} nor {"op": "describe" or "held"}')
        if len(token_bytes) % 4 or len(token_bytes) // 4 > MAX_LOOKUP_TOKENS:
            raise BadLookup(f"{len(token_bytes)} bytes of token ids: not int32s, or over {MAX_LOOKUP_TOKENS} tokens")
        token_ids = np.frombuffer(token_bytes, dtype="<i4").tolist()
        if not token_ids:
            return [b"0"]
        prompt = Prompt(token_ids, dataclasses.replace(self._base_namespace, cache_salt=salt))
        located = self._client.locate(prompt, probe=True)
        return [str(min(len(located) * self._chunk_size, len(token_ids))).encode()]

    def close(self) -> None:
        super().close()
        self._client.close()
