"""Direct KV transfer from a prefill instance to a decode instance, over ZeroMQ (TCP).

The producer's `KVPusher` offers a request's chunk keys; the consumer's `KVReceiver` answers
which it lacks (neither in memory nor already in its inbox); the producer sends only those,
framed and tagged like any stored chunk, in messages of up to PUT_BATCH_BYTES (or one chunk,
when a chunk alone is larger) with one acknowledgement each. (The receiver is a thread in a busy
engine process: every message costs it a turn at the GIL, so few large messages beat one per
chunk several times over.) A receiver whose inbox has no room for a message answers "full" and
the pusher retries until its timeout, so a slow decode instance slows the pushes instead of
losing memory. A push that times out or fails is given up: the decode instance then misses and
recomputes, so the request still succeeds.

Who may push: with a keyed deployment the receive port is a CURVE server admitting only holders
of the secret (see kvshelf.ports), so only they learn from an offer what the decode instance holds,
and the wire is encrypted (chunks travel unencrypted inside it). Each pushed chunk's framing and
tag are verified on arrival, before it enters the inbox: a chunk that fails (forged, damaged,
framed under another key or with another secret) is refused, counted, never stored. With
`security.key: none` the port is open to anyone who reaches it and the tag is a checksum
anyone can compute: keep the port on loopback or a private network then.

Bounds: no frame may exceed the receiver's `max_frame_bytes` (PUT_BATCH_BYTES plus one framed
chunk plus slack; ZeroMQ disconnects a peer declaring more, before buffering it), and few
messages are queued per peer (RECEIVE_HWM). Bad messages are logged in one line, at most once
per LOG_PERIOD_S per kind.

Messages: [seq, op, JSON header, *frame parts]; replies [seq, status, JSON]. Nothing is
unpickled.
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
from kvshelf.codecs.framing import HEADER_BYTES, verify
from kvshelf.errors import CorruptChunk, ForeignChunk
from kvshelf.keys import ChunkKey
from kvshelf.layout import KVLayout
from kvshelf.ports import QuietLog, secure_client, secure_server, zmq_context
from kvshelf.security import Keyring
from kvshelf.threads import background_thread
from kvshelf.tiers.inbox import InboxTier

logger = logging.getLogger(__name__)
POLL_MS = 100
FULL_RETRY_S = 0.02
DESTINATION_BACKOFF_S = 10.0  # after a failed push, send nothing to that destination for this long
PUT_BATCH_BYTES = 64 * 2**20
FRAME_SLACK_BYTES = 64 * 2**10  # room for a JSON header and CURVE's framing
RECEIVE_HWM = 4  # messages queued per pushing peer (a pusher waits for each answer)
MAX_REPLY_BYTES = 16 * 2**20  # a receiver's answers are short
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
    push_ms: int = 0  # time spent pushing (after the step, on the saver thread, with transfer.mode async)
    received_chunks: int = 0
    refused_chunks: int = 0  # pushes the receiver refused because its inbox was full
    received_corrupt_chunks: int = 0  # pushed chunks refused on arrival: failed verification, never stored


def max_frame_bytes(chunk_bytes: int) -> int:
    """The largest frame a receiver accepts when whole chunks hold `chunk_bytes` of KV: the
    pusher's batch, or one framed chunk when a chunk alone is larger, and slack."""
    return PUT_BATCH_BYTES + HEADER_BYTES + chunk_bytes + FRAME_SLACK_BYTES


class KVReceiver:
    """Accepts pushed chunks into `inbox`, on a thread of its own.

    `chunk_bytes` is the KV in one whole chunk (layout bytes per token x chunk_size): it bounds
    the frames accepted. With a keyed `keyring` only holders of the secret reach the port (CURVE),
    and every chunk is verified against its key with `keyring` before it is stored.
    """

    def __init__(
        self, inbox: InboxTier, address: str, held: Callable[[Sequence[ChunkKey]], list[bool]],
        counters: TransferCounters, keyring: Keyring, chunk_bytes: int,
    ) -> None:
        self._inbox = inbox
        self._held = held
        self._keyring = keyring
        self.counters = counters
        self._log = QuietLog(logger)
        self._socket = zmq_context().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        secure_server(self._socket, keyring, max_frame_bytes(chunk_bytes), RECEIVE_HWM)
        try:
            self._socket.bind(address)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ValueError(f"cannot listen for pushed KV on {address} ({exc}); set pd.receive_address") from exc
        self._stopped = threading.Event()
        self._thread = background_thread(self._serve, "kvshelf-receive")

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
                self._log.warning(type(exc).__name__, "kvshelf: refused a bad push message: %s: %.200s",
                                  type(exc).__name__, exc)
                status, answer = b"error", f"{exc}"[:1000]
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
            return self._store(keys, parts)
        raise ValueError(f"unknown operation {op!r}")

    def _store(self, keys: list[ChunkKey], parts: list[memoryview]) -> tuple[bytes, object]:
        """Put the chunks that verify under their keys; refuse the others (never stored)."""
        verified, num_refused = [], 0
        for index, key in enumerate(keys):
            blob = b"".join(parts[2 * index : 2 * index + 2])  # the inbox keeps one bytes object per chunk
            try:
                verify(blob, key.digest, self._keyring)
            except (CorruptChunk, ForeignChunk) as exc:
                num_refused += 1
                self._log.warning("unverified chunk", "kvshelf: refused a pushed chunk: %s", exc)
                continue
            verified.append((key, [blob]))
        self._inbox.put_many(verified)
        self.counters.received_chunks += len(verified)
        self.counters.received_corrupt_chunks += num_refused
        if num_refused:
            return b"error", f"refused {num_refused} of {len(keys)} chunks that failed verification"
        return b"ok", None

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()
        self._socket.close(linger=0)


class PushFailed(Exception):
    pass


class KVPusher:
    """Pushes chunks to decode instances; one socket per destination, made on first use.

    Chunks are framed and tagged with `keyring` (which the receiver checks), not encrypted: with a
    keyed `keyring` the connection itself is CURVE, encrypted and open only to holders of the secret.
    """

    def __init__(self, timeout_s: float, counters: TransferCounters, keyring: Keyring) -> None:
        self.timeout_s = timeout_s
        self.counters = counters
        self._keyring = keyring
        self._sockets: dict[str, zmq.Socket] = {}
        self._down_until_s: dict[str, float] = {}  # destinations backing off after a failure
        self._seq = 0

    def push(self, address: str, keys: Sequence[ChunkKey], chunk_at: Callable[[int], torch.Tensor],
             layout: KVLayout | None = None) -> bool:
        """Send the chunks of `keys` (of `layout`) that `address` lacks; `chunk_at(i)` makes the
        i-th. True if all arrived."""
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
            for index in needed:
                parts = frame_parts(chunk_at(index), keys[index].digest, CODECS["raw"], self._keyring, layout=layout)
                chunk_bytes = sum(memoryview(part).nbytes for part in parts)
                # A message holds up to PUT_BATCH_BYTES, or one chunk alone larger than that.
                if batch and batch_bytes + chunk_bytes > PUT_BATCH_BYTES:
                    self._put(address, batch, batch_bytes, deadline_s)
                    batch, batch_bytes = [], 0
                batch.append((keys[index], parts))
                batch_bytes += chunk_bytes
            if batch:
                self._put(address, batch, batch_bytes, deadline_s)
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

    def _put(self, address: str, batch: list[tuple[ChunkKey, list]], batch_bytes: int, deadline_s: float) -> None:
        header = {"keys": [_key_json(key) for key, _ in batch]}
        frames = [part for _, parts in batch for part in parts]
        while True:
            status, answer = self._ask(address, b"put", header, frames, deadline_s)
            if status == b"ok":
                self.counters.pushed_chunks += len(batch)
                self.counters.pushed_bytes += batch_bytes
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
        socket = zmq_context().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
        secure_client(socket, self._keyring)
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
