"""The scheduler's lookups, answered by the workers that hold the KV.

vLLM runs its scheduler and its workers in different processes, and a chunk saved by a
worker may live only in that worker's memory tier. So each worker serves lookups on a local
ZeroMQ socket, and the scheduler asks every tensor-parallel rank, taking the smallest answer.
Messages are JSON and raw int32 token ids, never pickles: the socket is a local file anyone
on the machine might write to. Lookups count stored tails (see kvshelf.keys).

`RoutingLookupServer` answers the same question over TCP for a KV-aware router (`kvshelf
proxy`), which knows only token ids and the tenant's cache_salt; its probes are left out of the
hit statistics and count only the instance's own tiers (memory, disk, inbox), not a shared Redis.
"""

import dataclasses
import json
import logging
import tempfile
import threading
from collections.abc import Sequence

import numpy as np
import zmq

from kvshelf.keys import MMHashes, Namespace
from kvshelf.shelf import Shelf

logger = logging.getLogger(__name__)
POLL_MS = 100


def lookup_address(engine_id: str, tp_rank: int) -> str:
    return f"ipc://{tempfile.gettempdir()}/kvshelf-{engine_id}-{tp_rank}.ipc"


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


class _CountServer:
    """A REP socket answering each message with a count of tokens, on a thread of its own; a bad
    message is answered 0 (a miss), never a dead server."""

    def __init__(self, address: str, thread_name: str, setting: str) -> None:
        self._socket = zmq.Context.instance().socket(zmq.REP)
        try:
            self._socket.bind(address)
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)
            raise ValueError(f"cannot answer lookups on {address} ({exc}); {setting}") from exc
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
            except Exception:  # noqa: BLE001 - a bad message is a miss, never a dead server
                logger.exception("kvshelf: bad lookup message on %s", self._thread.name)
                num_tokens = 0
            self._socket.send(str(num_tokens).encode())

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()
        self._socket.close(linger=0)


class LookupServer(_CountServer):
    """Answers the scheduler's lookups from one worker's shelf."""

    def __init__(self, shelf: Shelf, address: str) -> None:
        self._shelf = shelf
        super().__init__(address, "kvshelf-lookup", "is another engine with this engine_id running?")

    def _count(self, frames: list[bytes]) -> int:
        return answer(self._shelf, frames)


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
    """Answers a router's `[{"cache_salt": ...}, int32 token ids]` with the leading tokens held."""

    def __init__(self, address: str, base_namespace: Namespace, client: LookupClient) -> None:
        self._base_namespace = base_namespace
        self._client = client
        super().__init__(address, "kvshelf-routing-lookup", "set lookup_address")

    def _count(self, frames: list[bytes]) -> int:
        salt = json.loads(frames[0]).get("cache_salt")
        namespace = dataclasses.replace(self._base_namespace, cache_salt=salt)
        token_ids = np.frombuffer(frames[1], dtype="<i4").tolist()
        return self._client.lookup(token_ids, namespace, (), probe=True) if token_ids else 0

    def close(self) -> None:
        super().close()
        self._client.close()
