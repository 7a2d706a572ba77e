"""The proxy's index of what each instance's kvshelf holds, kept from vLLM's KV cache events.

With `--kv-index events` the proxy answers "how many leading tokens of this prompt does instance
X hold" itself, instead of asking every instance per request. For each instance given
`events=tcp://host:port` (its vLLM started with --kv-events-config '{"enable_kv_cache_events":
true, "publisher": "zmq", "endpoint": "tcp://*:PORT"}') and `lookup=`, a follower:
1. subscribes to the instance's event publisher and waits until the connection stands;
2. asks the instance's routing-lookup port once for its namespace and chunk_size (`describe`) and
   for the keys its own tiers hold now (`held`): the starting picture, taken after subscribing,
   so that no change after it is missed;
3. applies every event batch from then on: BlockStored and BlockRemoved of kvshelf's own tiers
   (ownership `kvshelf-memory`, `-disk`, `-inbox`; not the shared Redis, not vLLM's GPU cache).
A gap in the publisher's sequence numbers (batches dropped, or the instance restarted), a lost
connection or a bad batch starts over at 1. Until an instance's index is ready, and for an
instance without events=, the proxy asks (`--kv-index ask` always asks).

Holding the deployment secret, the proxy computes a prompt's chunk keys as the instance does: for
each tensor-parallel rank's namespace (the instance's, with the request's cache_salt), tails
counted; the instance holds the chunks that every rank holds.

Trust: vLLM publishes its events unauthenticated. A forged, lost or late event can only send a
prompt to an instance that does not hold it, or away from one that does: a slower answer, never a
wrong one, since instances verify every chunk they load. The digests in events reveal nothing to
a reader without the secret. What the proxy takes from the publisher is bounded: each frame
(MAX_EVENT_FRAME_BYTES), and the keys indexed per instance (MAX_INDEX_KEYS; beyond, it asks).

The `held` answer's wire format lives here too (the routing-lookup port sends it): a JSON object
of digest counts per tier, then the 32-byte digests in that order.
"""

import asyncio
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvshelf.errors import ConfigError
from kvshelf.keys import Namespace, chunk_keys
from kvshelf.ports import QuietLog, secure_client
from kvshelf.security import Keyring

logger = logging.getLogger(__name__)

DESCRIBE_OP, HELD_OP = "describe", "held"
OWNERSHIP_PREFIX = "kvshelf-"  # vLLM events' `ownership` for kvshelf's tiers: kvshelf-memory, ...
OWN_TIERS = ("memory", "disk", "inbox")  # the instance's own; the shared Redis says nothing of where KV is
DIGEST_BYTES = 32
MAX_INDEX_KEYS = 1 << 20  # per instance (~100 MB); an instance holding more is asked
MAX_EVENT_FRAME_BYTES = 64 * 2**20
EVENT_RECEIVE_HWM = 10_000  # batches queued while the proxy is busy; beyond, ZeroMQ drops them (a gap)
CONNECT_TIMEOUT_S = 10.0
ASK_TIMEOUT_S = 10.0  # describe and held (every rank lists its keys)
RETRY_S = 1.0  # between a follower's attempts
FULL_RETRY_S = 60.0  # after an instance held more than MAX_INDEX_KEYS
_TIER_BITS = {OWNERSHIP_PREFIX + tier: 1 << bit for bit, tier in enumerate(OWN_TIERS)}
_MONITORED = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


def encode_held(held: dict[str, list[bytes]]) -> list[bytes]:
    """Per tier, the digests of the keys it holds, as the `held` answer's two frames."""
    counts = {tier: len(digests) for tier, digests in held.items()}
    return [json.dumps(counts).encode(), b"".join(digest for digests in held.values() for digest in digests)]


def decode_held(frames: Sequence[bytes]) -> dict[str, list[bytes]]:
    """The inverse of `encode_held`; ValueError if `frames` are not such an answer."""
    if len(frames) != 2:
        raise ValueError(f"a held answer has 2 frames, got {len(frames)}")
    counts, digests = json.loads(frames[0]), frames[1]
    if not isinstance(counts, dict) or not all(type(count) is int and count >= 0 for count in counts.values()):
        raise ValueError("a held answer's first frame is not {tier: count}")
    if sum(counts.values()) * DIGEST_BYTES != len(digests):
        raise ValueError(f"{len(digests)} bytes of digests for {sum(counts.values())} keys")
    held, start = {}, 0
    for tier, count in counts.items():
        held[tier] = [digests[offset : offset + DIGEST_BYTES]
                      for offset in range(start, start + count * DIGEST_BYTES, DIGEST_BYTES)]
        start += count * DIGEST_BYTES
    return held


class Resync(Exception):
    """The index no longer matches the instance (a gap, a lost connection, a bad batch): start over."""


class IndexFull(Resync):
    """The instance holds more than MAX_INDEX_KEYS."""


@dataclass(slots=True, eq=False)
class InstanceIndex:
    """What one instance's own tiers hold: each chunk key digest, with a bit per tier holding it."""

    namespace: Namespace  # the instance's, without salt, rank 0
    chunk_size: int
    held: dict[bytes, int] = field(default_factory=dict)
    last_seq: int | None = None

    def store(self, tier_bit: int, digests: Sequence[bytes]) -> None:
        for digest in digests:
            self.held[digest] = self.held.get(digest, 0) | tier_bit
        if len(self.held) > MAX_INDEX_KEYS:
            raise IndexFull(f"holds over {MAX_INDEX_KEYS} chunks")

    def remove(self, tier_bit: int, digests: Sequence[bytes]) -> None:
        for digest in digests:
            bits = self.held.get(digest, 0) & ~tier_bit
            if bits:
                self.held[digest] = bits
            else:
                self.held.pop(digest, None)

    def apply(self, seq: int, events: object) -> None:
        """One event batch's events (vLLM's msgpack, decoded to lists and dicts), published as `seq`."""
        if self.last_seq is not None and seq != self.last_seq + 1:
            raise Resync(f"event batch {seq} after {self.last_seq}")
        self.last_seq = seq
        if not isinstance(events, list):
            raise Resync("an event batch without a list of events")
        for event in events:
            tier_bit = _TIER_BITS.get(event.get("ownership")) if isinstance(event, dict) else None
            digests = event.get("block_hashes") if tier_bit else None
            if not isinstance(digests, list):
                continue  # vLLM's own events, the shared Redis's, or ones kvshelf does not send
            digests = [digest for digest in digests if isinstance(digest, bytes) and len(digest) == DIGEST_BYTES]
            if event.get("type") == "BlockStored":
                self.store(tier_bit, digests)
            elif event.get("type") == "BlockRemoved":
                self.remove(tier_bit, digests)

    def held_chunks(self, digests_by_rank: Sequence[Sequence[bytes]]) -> int:
        """How many leading chunks every rank holds, given each rank's chunk key digests."""
        num_chunks = min(len(digests) for digests in digests_by_rank)
        for digests in digests_by_rank:
            num_chunks = next((index for index, digest in enumerate(digests[:num_chunks]) if digest not in self.held),
                              num_chunks)
        return num_chunks


@dataclass(slots=True)
class Follower:
    """One instance's event stream and its index, ready or not."""

    lookup: str  # the instance's routing-lookup address
    events: str  # its vLLM KV event publisher
    index: InstanceIndex | None = None
    ready: bool = False
    task: asyncio.Task | None = None


class EventIndex:
    """The index of every instance given events=, each kept by a follower task (see the module docstring)."""

    def __init__(self, keyring: Keyring, context: zmq.asyncio.Context) -> None:
        try:
            import msgspec.msgpack
        except ImportError as exc:
            raise ConfigError("--kv-index events decodes vLLM's events with msgspec (installed with vLLM): "
                              "pip install msgspec, or run the proxy with --kv-index ask") from exc
        self._decode = msgspec.msgpack.Decoder().decode
        self._keyring = keyring
        self._context = context
        self._followers: dict[str, Follower] = {}  # by instance URL
        self._log = QuietLog(logger)

    def follow(self, url: str, lookup: str, events: str) -> None:
        follower = Follower(lookup, events)
        follower.task = asyncio.create_task(self._follow(url, follower))
        self._followers[url] = follower

    async def stop(self) -> None:
        tasks = [follower.task for follower in self._followers.values() if follower.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def num_ready(self) -> int:
        return sum(follower.ready for follower in self._followers.values())

    def held_tokens(self, urls: Sequence[str], token_ids: Sequence[int], cache_salt: str | None) -> dict[str, int]:
        """Leading tokens of the prompt each instance holds, for those of `urls` whose index is ready."""
        digests_by_namespace: dict[tuple[bytes, int], list[list[bytes]]] = {}  # instances often share one
        answers = {}
        for url in urls:
            follower = self._followers.get(url)
            if follower is None or not follower.ready:
                continue
            index = follower.index
            namespace = dataclasses.replace(index.namespace, cache_salt=cache_salt)
            cache_key = (namespace.digest, index.chunk_size)
            if cache_key not in digests_by_namespace:
                digests_by_namespace[cache_key] = [self._digests(token_ids, namespace, rank, index.chunk_size)
                                                   for rank in range(namespace.tp_size)]
            num_chunks = index.held_chunks(digests_by_namespace[cache_key])
            answers[url] = min(num_chunks * index.chunk_size, len(token_ids))
        return answers

    def _digests(self, token_ids: Sequence[int], namespace: Namespace, tp_rank: int, chunk_size: int) -> list[bytes]:
        ranked = dataclasses.replace(namespace, tp_rank=tp_rank)
        return [key.digest for key in chunk_keys(token_ids, ranked, chunk_size, tail=True, keyring=self._keyring)]

    # -- following one instance --

    async def _follow(self, url: str, follower: Follower) -> None:
        while True:
            retry_s = RETRY_S
            try:
                await self._sync_and_apply(follower)
            except IndexFull as exc:
                self._log.warning("full", "kvshelf proxy: %s %s; asking it instead for %.0f s", url, exc, FULL_RETRY_S)
                retry_s = FULL_RETRY_S
            except Exception as exc:  # noqa: BLE001 - a follower outlives any bad answer, batch or connection
                self._log.warning(type(exc).__name__, "kvshelf proxy: the event index of %s starts over (%s: %s); "
                                  "asking it meanwhile", url, type(exc).__name__, exc)
            finally:
                follower.ready = False
                follower.index = None
            await asyncio.sleep(retry_s)

    async def _sync_and_apply(self, follower: Follower) -> None:
        subscriber = self._context.socket(zmq.SUB)
        subscriber.setsockopt(zmq.MAXMSGSIZE, MAX_EVENT_FRAME_BYTES)
        subscriber.setsockopt(zmq.RCVHWM, EVENT_RECEIVE_HWM)
        subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        monitor = subscriber.get_monitor_socket(_MONITORED)
        try:
            subscriber.connect(follower.events)
            await asyncio.wait_for(_connected(monitor), CONNECT_TIMEOUT_S)
            follower.index = await self._starting_picture(follower.lookup)
            follower.ready = True
            poller = zmq.asyncio.Poller()
            poller.register(subscriber, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            while True:
                for socket, _ in await poller.poll():
                    if socket is monitor:
                        _check_still_connected(await monitor.recv_multipart())
                    else:
                        self._apply(follower.index, await subscriber.recv_multipart())
        finally:
            subscriber.disable_monitor()
            monitor.close(linger=0)
            subscriber.close(linger=0)

    def _apply(self, index: InstanceIndex, frames: list[bytes]) -> None:
        """vLLM's (topic, 8-byte big-endian sequence number, msgpack EventBatch)."""
        if len(frames) != 3 or len(frames[1]) != 8:
            raise Resync(f"an event message of {len(frames)} frames, expected topic, sequence number, batch")
        try:
            batch = self._decode(frames[2])
        except Exception as exc:  # noqa: BLE001 - msgspec's DecodeError or anything a bad payload raises
            raise Resync(f"an event batch that is not msgpack ({exc})") from exc
        if not isinstance(batch, list) or len(batch) < 2:
            raise Resync("an event batch that is not [ts, events, ...]")
        index.apply(int.from_bytes(frames[1], "big"), batch[1])

    async def _starting_picture(self, lookup: str) -> InstanceIndex:
        description = json.loads((await self._ask(lookup, DESCRIBE_OP))[0])
        chunk_size = description["chunk_size"]
        if type(chunk_size) is not int or chunk_size <= 0:
            raise ValueError(f"chunk_size {chunk_size!r} is not a positive integer")
        index = InstanceIndex(Namespace.from_description(description["namespace"]), chunk_size)
        for tier, digests in decode_held(await self._ask(lookup, HELD_OP)).items():
            if OWNERSHIP_PREFIX + tier in _TIER_BITS:
                index.store(_TIER_BITS[OWNERSHIP_PREFIX + tier], digests)
        return index

    async def _ask(self, lookup: str, op: str) -> list[bytes]:
        socket = self._context.socket(zmq.REQ)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_INDEX_KEYS * DIGEST_BYTES + 2**20)
        secure_client(socket, self._keyring)
        socket.connect(lookup)
        try:
            await socket.send_multipart([json.dumps({"op": op}).encode(), b""])
            return await asyncio.wait_for(socket.recv_multipart(), ASK_TIMEOUT_S)
        finally:
            socket.close(linger=0)


async def _connected(monitor: zmq.asyncio.Socket) -> None:
    while parse_monitor_message(await monitor.recv_multipart())["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED:
        pass


def _check_still_connected(message: list[bytes]) -> None:
    if parse_monitor_message(message)["event"] == zmq.EVENT_DISCONNECTED:
        raise Resync("the event publisher went away")
