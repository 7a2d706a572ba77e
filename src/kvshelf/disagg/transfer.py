"""Direct KV transfer from a prefill instance to a decode instance, over ZeroMQ (TCP).

The producer's `KVPusher` offers a request's chunk keys; the consumer's `KVReceiver` answers
which it lacks (neither in memory nor already in its inbox); the producer sends only those,
framed and checksummed like any stored chunk, in messages of up to PUT_BATCH_BYTES with one
acknowledgement each. (The receiver is a thread in a busy engine process: every message costs
it a turn at the GIL, so few large messages beat one per chunk several times over.) A receiver
whose inbox has no room for a message answers "full" and the pusher retries until its timeout,
so a slow decode instance slows the pushes instead of losing memory. A push that times out or fails
is given up: the decode instance then misses and recomputes, so the request still succeeds.

Messages: [seq, op, JSON header, *frame parts]; replies [seq, status, JSON]. Nothing is
unpickled, and every chunk is verified against its key when the decode side loads it.
"""

import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import zmq

from kvshelf.codecs import CODECS, frame_parts
from kvshelf.keys import ChunkKey
from kvshelf.tiers.inbox import InboxTier

logger = logging.getLogger(__name__)
POLL_MS = 100
FULL_RETRY_S = 0.02
DESTINATION_BACKOFF_S = 10.0  # after a failed push, send nothing to that destination for this long
PUT_BATCH_BYTES = 64 * 2**20
_SEQ = struct.Struct("<Q")


def _key_json(key: ChunkKey) -> list[str]:
    return [key.namespace_id, key.hex]


def _key_of(pair: Sequence[str]) -> ChunkKey:
    namespace_id, digest_hex = pair
    digest = bytes.fromhex(digest_hex)
    if len(digest) != 32 or not str(namespace_id):
        raise ValueError(f"bad chunk key {pair!r}")
    return ChunkKey(str(namespace_id), digest)


@dataclass(slots=True)
class TransferCounters:
    pushed_chunks: int = 0
    pushed_bytes: int = 0
    push_failures: int = 0  # pushes given up (timeout, refused, unreachable)
    push_ms: int = 0  # time spent pushing, in the prefill instance's step
    received_chunks: int = 0
    refused_chunks: int = 0  # pushes the receiver refused because its inbox was full


class KVReceiver:
    """Accepts pushed chunks into `inbox`, on a thread of its own."""

    def __init__(
        self, inbox: InboxTier, address: str, held: Callable[[Sequence[ChunkKey]], list[bool]],
        counters: TransferCounters,
    ) -> None:
        self._inbox = inbox
        self._held = held
        self.counters = counters
        self._socket = zmq.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(address)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ValueError(f"cannot listen for pushed KV on {address} ({exc}); set pd.receive_address") from exc
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kvshelf-receive", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            if not self._socket.poll(POLL_MS):
                continue
            peer, *frames = self._socket.recv_multipart(copy=False)
            seq = frames[0].bytes if frames else b""
            try:
                _, op, header, *parts = frames
                status, answer = self._handle(op.bytes, json.loads(header.bytes), [part.buffer for part in parts])
            except Exception as exc:  # noqa: BLE001 - a bad message is refused, never a dead receiver
                logger.warning("kvshelf: refused a bad push message: %s", exc)
                status, answer = b"error", str(exc)
            self._socket.send_multipart([peer, seq, status, json.dumps(answer).encode()])

    def _handle(self, op: bytes, header: dict, parts: list[memoryview]) -> tuple[bytes, object]:
        if op == b"offer":
            keys = [_key_of(pair) for pair in header["keys"]]
            return b"ok", [index for index, held in enumerate(self._held(keys)) if not held]
        if op == b"put":  # keys, then each chunk's framed object as two frames (header, payload)
            keys = [_key_of(pair) for pair in header["keys"]]
            if len(parts) != 2 * len(keys):
                raise ValueError(f"{len(keys)} keys but {len(parts)} frames; expected 2 per chunk")
            num_bytes = sum(part.nbytes for part in parts)
            if num_bytes > self._inbox.capacity_bytes:  # would never fit: refuse now, not after the timeout
                raise ValueError(f"{num_bytes} bytes will never fit an inbox of {self._inbox.capacity_bytes}"
                                 " (pd.inbox_size)")
            if not self._inbox.offer(num_bytes):
                self.counters.refused_chunks += len(keys)
                return b"full", None
            self._inbox.put_many([(key, parts[2 * index : 2 * index + 2]) for index, key in enumerate(keys)])
            self.counters.received_chunks += len(keys)
            return b"ok", None
        raise ValueError(f"unknown operation {op!r}")

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()
        self._socket.close(linger=0)


class PushFailed(Exception):
    pass


class KVPusher:
    """Pushes chunks to decode instances; one socket per destination, made on first use."""

    def __init__(self, timeout_s: float, counters: TransferCounters) -> None:
        self.timeout_s = timeout_s
        self.counters = counters
        self._sockets: dict[str, zmq.Socket] = {}
        self._down_until_s: dict[str, float] = {}  # destinations backing off after a failure
        self._seq = 0

    def push(self, address: str, keys: Sequence[ChunkKey], chunk_at: Callable[[int], torch.Tensor]) -> bool:
        """Send the chunks of `keys` that `address` lacks; `chunk_at(i)` makes the i-th. True if all arrived."""
        if time.monotonic() < self._down_until_s.get(address, 0.0):
            self.counters.push_failures += 1  # it failed moments ago: do not hold up another step for it
            return False
        started_s = time.perf_counter()
        deadline_s = time.monotonic() + self.timeout_s
        try:
            status, needed = self._ask(address, b"offer", {"keys": [_key_json(key) for key in keys]}, [], deadline_s)
            if status != b"ok" or not isinstance(needed, list) or not all(
                type(index) is int and 0 <= index < len(keys) for index in needed
            ):
                raise PushFailed(f"bad answer to an offer: {status.decode(errors='replace')} {needed!r:.200}")
            batch: list[tuple[ChunkKey, list]] = []
            batch_bytes = 0
            for position, index in enumerate(needed):
                parts = frame_parts(chunk_at(index), keys[index].digest, CODECS["raw"])
                batch.append((keys[index], parts))
                batch_bytes += sum(memoryview(part).nbytes for part in parts)
                if batch_bytes >= PUT_BATCH_BYTES or position == len(needed) - 1:
                    self._put(address, batch, deadline_s)
                    self.counters.pushed_chunks += len(batch)
                    self.counters.pushed_bytes += batch_bytes
                    batch, batch_bytes = [], 0
            return True
        except Exception as exc:  # noqa: BLE001 - a failed push is a fallback, never a failed engine step
            logger.warning("kvshelf: pushing KV to %s failed (%s); handing it over through the shared tiers, "
                           "if any, and sending nothing there for %.0f s", address, exc, DESTINATION_BACKOFF_S)
            self.counters.push_failures += 1
            self._down_until_s[address] = time.monotonic() + DESTINATION_BACKOFF_S
            self._drop(address)
            return False
        finally:
            self.counters.push_ms += round((time.perf_counter() - started_s) * 1000)

    def _put(self, address: str, batch: list[tuple[ChunkKey, list]], deadline_s: float) -> None:
        header = {"keys": [_key_json(key) for key, _ in batch]}
        frames = [part for _, parts in batch for part in parts]
        while True:
            status, answer = self._ask(address, b"put", header, frames, deadline_s)
            if status == b"ok":
                return
            if status != b"full":
                raise PushFailed(f"refused: {status.decode(errors='replace')} {answer}")
            time.sleep(FULL_RETRY_S)  # back-pressure: the decode side has no room yet

    def _ask(self, address: str, op: bytes, header: dict, parts: list, deadline_s: float) -> tuple[bytes, object]:
        socket = self._sockets.get(address) or self._connect(address)
        self._seq += 1
        seq = _SEQ.pack(self._seq)
        socket.send_multipart([seq, op, json.dumps(header).encode(), *parts], copy=False)
        while True:
            remaining_ms = int((deadline_s - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not socket.poll(remaining_ms):
                raise PushFailed(f"no answer within {self.timeout_s:.1f} s (pd.push_timeout_s)")
            reply_seq, status, answer = socket.recv_multipart()
            if reply_seq == seq:  # an older reply belongs to a request already given up
                return status, json.loads(answer)

    def _connect(self, address: str) -> zmq.Socket:
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.connect(address)
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            raise PushFailed(f"cannot connect ({exc})") from exc
        self._sockets[address] = socket
        return socket

    def _drop(self, address: str) -> None:
        """Unsent messages to a failed destination must not reach it later."""
        socket = self._sockets.pop(address, None)
        if socket is not None:
            socket.close(linger=0)

    def close(self) -> None:
        for address in list(self._sockets):
            self._drop(address)
