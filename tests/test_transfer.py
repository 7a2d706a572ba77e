"""Prefill/decode transfer: the inbox tier, the ZeroMQ pusher and receiver, and a receiving Shelf.

Real sockets on free loopback ports; no engine, no model.
"""

import json
import struct
import threading
import time

import pytest
import torch
import zmq

from kvshelf import Shelf, load_config
from kvshelf.codecs import CODECS, frame_parts
from kvshelf.codecs.framing import HEADER_BYTES
from kvshelf.disagg import transfer
from kvshelf.disagg.handover import HandOver
from kvshelf.disagg.transfer import KVPusher, KVReceiver, TransferCounters
from kvshelf.keys import ChunkKey, Prompt
from kvshelf.keys import chunk_keys as keyed_chunk_keys
from kvshelf.ports import free_port, secure_client
from kvshelf.security import Keyring
from kvshelf.tiers.inbox import InboxTier
from tests.conftest import CHUNK_SIZE, LAYOUT, random_kv

TOKENS = list(range(200, 210))  # 2 full chunks of 4 and a tail of 2
CHUNK_BYTES = LAYOUT.bytes_per_token * CHUNK_SIZE
CHUNK_FRAMED_BYTES = HEADER_BYTES + CHUNK_BYTES
SECRET = "transfer-tests-" + "s" * 32  # the deployment secret of every shelf, pusher and peer here
KEYRING = Keyring.from_config(load_config(environ={}, security_key=SECRET).security)
TIMEOUT_S = 0.5
REPLY_TIMEOUT_MS = 5000


def chunk_keys(token_ids, namespace, chunk_size, tail=False):
    return keyed_chunk_keys(token_ids, namespace, chunk_size, tail=tail, keyring=KEYRING)


def loopback() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def chunks_of(kv: torch.Tensor) -> list[torch.Tensor]:
    """`kv` (layers, 2, tokens, kv_heads, head_dim) cut into chunks, the last possibly a shorter tail."""
    return [kv[:, :, start : start + CHUNK_SIZE].clone() for start in range(0, kv.shape[2], CHUNK_SIZE)]


class Receiving:
    """A decode instance: a shelf (memory + inbox) and the receiver that fills its inbox."""

    def __init__(self, held=None, **overrides) -> None:
        """`held`: what the receiver asks about an offer's keys (the shelf's memory and inbox)."""
        self.address = overrides.pop("address", None) or loopback()
        config = load_config(environ={}, chunk_size=CHUNK_SIZE, pd_receive_address=self.address, security_key=SECRET,
                             **overrides)
        self.shelf = Shelf(config)
        self.counters = TransferCounters()
        try:
            self.receiver = KVReceiver(self.shelf.inbox, self.address, held or self.shelf.held_nearby, self.counters,
                                       self.shelf.keyring, CHUNK_BYTES)
        except ValueError:
            self.shelf.close()
            raise

    def close(self) -> None:
        self.receiver.close()
        self.shelf.close()


@pytest.fixture
def make_receiving(opened):
    def make(**overrides) -> Receiving:
        receiving = Receiving(**overrides)
        opened.append(receiving)
        return receiving

    return make


@pytest.fixture
def make_pusher(opened):
    def make(timeout_s: float = 5.0) -> KVPusher:
        pusher = KVPusher(timeout_s, TransferCounters(), KEYRING)
        opened.append(pusher)
        return pusher

    return make


@pytest.fixture
def raw_dealer(opened):
    """A bare DEALER socket holding the secret, speaking the wire format by hand: [seq, op, JSON header, *parts]."""

    def connect(address: str) -> zmq.Socket:
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        secure_client(socket, KEYRING)
        socket.connect(address)
        opened.append(socket)
        return socket

    return connect


def ask(socket: zmq.Socket, seq: int, frames: list) -> tuple[bytes, bytes, object]:
    socket.send_multipart([struct.pack("<Q", seq), *frames])
    assert socket.poll(REPLY_TIMEOUT_MS), "the receiver did not answer"
    reply_seq, status, answer = socket.recv_multipart()
    return reply_seq, status, json.loads(answer)


def keys_json(key: ChunkKey) -> bytes:
    return json.dumps({"keys": [[key.namespace_id, key.hex]]}).encode()


# ---- the inbox tier on its own ----


def fake_key(index: int) -> ChunkKey:
    return ChunkKey("ns", bytes([index]) * 32)


def test_inbox_offer_and_put_many_keep_within_capacity():
    inbox = InboxTier(capacity_bytes=100, ttl_s=60)
    assert inbox.offer(100)
    assert not inbox.offer(101)
    inbox.put_many([(fake_key(1), [b"a" * 30, b"b" * 10]), (fake_key(2), [b"c" * 70]), (fake_key(3), [b"d" * 50])])
    assert inbox.used_bytes == 90  # chunk 2 did not fit after chunk 1; chunk 3 did
    assert inbox.counters.num_rejected_writes == 1
    assert inbox.contains_each([fake_key(1), fake_key(2), fake_key(3)]) == [True, False, True]
    assert inbox.offer(10)
    assert not inbox.offer(11)


def test_inbox_get_many_hands_over_and_removes():
    inbox = InboxTier(capacity_bytes=100, ttl_s=60)
    inbox.put_many([(fake_key(1), [b"head", memoryview(b"payload")]), (fake_key(2), [b"xy"])])
    assert inbox.get_many([fake_key(1), fake_key(3)]) == [b"headpayload", None]
    assert inbox.get_many([fake_key(1)]) == [None]  # consumed
    assert inbox.used_bytes == 2
    assert len(inbox) == 1
    assert inbox.counters.num_evictions == 0  # consumed is not evicted
    inbox.delete([fake_key(2)])
    assert (inbox.used_bytes, len(inbox)) == (0, 0)


def test_inbox_re_put_replaces_without_double_counting():
    inbox = InboxTier(capacity_bytes=100, ttl_s=60)
    inbox.put_many([(fake_key(1), [b"x" * 40])])
    inbox.put_many([(fake_key(1), [b"x" * 40])])
    assert (inbox.used_bytes, len(inbox)) == (40, 1)
    inbox.put_many([(fake_key(1), [b"y" * 25])])
    assert inbox.used_bytes == 25
    assert inbox.get_many([fake_key(1)]) == [b"y" * 25]
    assert inbox.used_bytes == 0
    assert inbox.counters.num_rejected_writes == 0


def test_inbox_expiry_counts_evictions():
    inbox = InboxTier(capacity_bytes=100, ttl_s=0.1)
    inbox.put_many([(fake_key(1), [b"x" * 30]), (fake_key(2), [b"y" * 20])])
    assert inbox.contains_prefix([fake_key(1), fake_key(2)]) == 2
    time.sleep(0.2)
    assert inbox.offer(100)  # expired chunks free their room
    assert inbox.get_many([fake_key(1), fake_key(2)]) == [None, None]
    assert inbox.used_bytes == 0
    assert (inbox.counters.num_evictions, inbox.counters.evicted_bytes) == (2, 50)


# ---- tail keys ----


def test_tail_key_only_when_a_partial_chunk_is_left(namespace):
    assert len(chunk_keys(TOKENS, namespace, CHUNK_SIZE, tail=True)) == 3
    assert len(chunk_keys(TOKENS, namespace, CHUNK_SIZE)) == 2
    whole = TOKENS[:8]
    assert chunk_keys(whole, namespace, CHUNK_SIZE, tail=True) == chunk_keys(whole, namespace, CHUNK_SIZE)
    # The full-chunk keys do not depend on whether a tail is asked for.
    assert chunk_keys(TOKENS, namespace, CHUNK_SIZE, tail=True)[:2] == chunk_keys(TOKENS, namespace, CHUNK_SIZE)


def test_tail_key_differs_from_a_full_chunk_of_the_same_tokens(namespace):
    # The same two tokens after the same previous digest: a tail (chunk size 4) or a full chunk (size 2).
    (tail_key,) = chunk_keys([7, 8], namespace, 4, tail=True)
    (full_key,) = chunk_keys([7, 8], namespace, 2)
    assert tail_key != full_key


def test_saved_tail_is_found_only_when_asked_for(make_shelf, namespace):
    shelf = make_shelf()
    parts = chunks_of(random_kv(len(TOKENS)))
    assert shelf.save_chunks(TOKENS, namespace, parts.__getitem__, tail=True) == 3
    assert shelf.lookup(TOKENS, namespace) == 8
    assert shelf.lookup(TOKENS, namespace, tail=True) == len(TOKENS)
    assert shelf.load(TOKENS, namespace, upto=len(TOKENS) - 1).num_tokens == 8
    assert shelf.load(TOKENS, namespace, upto=len(TOKENS) - 1, tail=True).num_tokens == len(TOKENS)


# ---- pushing into a receiving shelf ----


def test_push_round_trip_then_consumed_into_memory(make_receiving, make_pusher, namespace):
    receiving = make_receiving()
    pusher = make_pusher()
    kv = random_kv(len(TOKENS))
    parts = chunks_of(kv)
    keys = chunk_keys(TOKENS, namespace, CHUNK_SIZE, tail=True)
    assert pusher.push(receiving.address, keys, parts.__getitem__)
    assert (pusher.counters.pushed_chunks, receiving.counters.received_chunks) == (3, 3)
    assert len(receiving.shelf.inbox) == 3
    shelf = receiving.shelf
    assert shelf.lookup(TOKENS, namespace, tail=True) == len(TOKENS)
    assert shelf.lookup(TOKENS, namespace) == 8
    loaded = shelf.load(TOKENS, namespace, upto=len(TOKENS) - 1, tail=True)
    assert (loaded.start, loaded.num_tokens) == (0, len(TOKENS))
    assert torch.equal(loaded.kv(), kv)
    assert len(shelf.inbox) == 0
    assert shelf.inbox.used_bytes == 0
    assert shelf.stats()["tiers"]["inbox"]["evictions"] == 0
    assert len(shelf._stack.memory) == 3
    again = shelf.load(TOKENS, namespace, upto=len(TOKENS) - 1, tail=True)
    assert torch.equal(again.kv(), kv)



def test_a_hand_over_pushes_before_the_prefill_side_stores(make_shelf, opened, namespace):
    """The decode instance waits for the push; a write-through to the shared tiers landing first
    would win the race for its load and leave the push wasted."""
    prefill = make_shelf(security_key=SECRET)
    prompt = Prompt(TOKENS, namespace)
    stored_at_offer = []

    def held(keys):
        stored_at_offer.append(prefill.holds(prompt, len(TOKENS)))
        return decode.shelf.held_nearby(keys)

    decode = Receiving(held)
    opened.append(decode)
    hand_over = HandOver(prefill, TransferCounters())
    opened.append(hand_over)
    kv = random_kv(len(TOKENS))
    hand_over.send(prompt, chunks_of(kv), decode.address)
    assert stored_at_offer == [False]
    assert decode.counters.received_chunks == 3
    assert prefill.holds(prompt, len(TOKENS))  # then stored on the prefill side too, for later prompts
    loaded = decode.shelf.load(TOKENS, namespace, upto=len(TOKENS) - 1, tail=True)
    assert torch.equal(loaded.kv(), kv)

def test_second_push_sends_nothing_the_receiver_holds(make_receiving, make_pusher, namespace):
    receiving = make_receiving()
    pusher = make_pusher()
    parts = chunks_of(random_kv(len(TOKENS)))
    keys = chunk_keys(TOKENS, namespace, CHUNK_SIZE, tail=True)
    assert pusher.push(receiving.address, keys, parts.__getitem__)
    pushed_bytes = pusher.counters.pushed_bytes
    assert pusher.push(receiving.address, keys, parts.__getitem__)  # all in the inbox
    assert (pusher.counters.pushed_chunks, pusher.counters.pushed_bytes) == (3, pushed_bytes)
    receiving.shelf.load(TOKENS, namespace, upto=len(TOKENS), tail=True)
    assert pusher.push(receiving.address, keys, parts.__getitem__)  # all in memory now
    assert pusher.counters.pushed_chunks == 3
    assert receiving.counters.received_chunks == 3
    assert pusher.counters.push_failures == 0


def test_push_sends_only_the_missing_chunks(make_receiving, make_pusher, namespace):
    receiving = make_receiving()
    pusher = make_pusher()
    kv = random_kv(len(TOKENS))
    parts = chunks_of(kv)
    keys = chunk_keys(TOKENS, namespace, CHUNK_SIZE, tail=True)
    receiving.shelf.save_chunks(TOKENS[:4], namespace, parts.__getitem__)  # chunk 0 is in memory
    asked = []

    def chunk_at(index: int) -> torch.Tensor:
        asked.append(index)
        return parts[index]

    assert pusher.push(receiving.address, keys, chunk_at)
    assert asked == [1, 2]
    assert receiving.shelf.held_nearby(keys) == [True, True, True]
    assert torch.equal(receiving.shelf.load(TOKENS, namespace, upto=len(TOKENS), tail=True).kv(), kv)


def test_held_nearby_sees_memory_and_inbox(make_receiving, namespace):
    shelf = make_receiving().shelf
    parts = chunks_of(random_kv(len(TOKENS)))
    keys = chunk_keys(TOKENS, namespace, CHUNK_SIZE, tail=True)
    shelf.save_chunks(TOKENS[:4], namespace, parts.__getitem__)
    shelf.inbox.put_many([(keys[2], frame_parts(parts[2], keys[2].digest, CODECS["raw"], KEYRING))])
    assert shelf.held_nearby(keys) == [True, False, True]


def test_full_inbox_refuses_and_the_push_times_out(make_receiving, make_pusher, namespace):
    receiving = make_receiving(pd_inbox_size=CHUNK_FRAMED_BYTES)
    receiving.shelf.inbox.put_many([(fake_key(9), [b"w" * CHUNK_FRAMED_BYTES])])  # full, and nobody loads it
    pusher = make_pusher(TIMEOUT_S)
    parts = chunks_of(random_kv(8))
    keys = chunk_keys(TOKENS[:8], namespace, CHUNK_SIZE)[:1]
    started_s = time.monotonic()
    assert not pusher.push(receiving.address, keys, parts.__getitem__)
    assert time.monotonic() - started_s >= TIMEOUT_S * 0.9  # it retried until its timeout, not less
    assert pusher.counters.push_failures == 1
    assert pusher.counters.pushed_chunks == 0
    assert receiving.counters.refused_chunks > 1  # refused, retried, refused again
    assert receiving.counters.received_chunks == 0
    assert len(receiving.shelf.inbox) == 1


def test_a_push_larger_than_the_whole_inbox_is_refused_at_once(make_receiving, make_pusher, namespace):
    receiving = make_receiving(pd_inbox_size=CHUNK_FRAMED_BYTES - 1)
    pusher = make_pusher(TIMEOUT_S * 4)
    parts = chunks_of(random_kv(8))
    started_s = time.monotonic()
    assert not pusher.push(receiving.address, chunk_keys(TOKENS[:8], namespace, CHUNK_SIZE), parts.__getitem__)
    assert time.monotonic() - started_s < TIMEOUT_S  # no waiting for room that can never come
    assert pusher.counters.push_failures == 1 and len(receiving.shelf.inbox) == 0


def test_push_waits_for_the_inbox_to_make_room(make_receiving, make_pusher, namespace):
    receiving = make_receiving(pd_inbox_size=CHUNK_FRAMED_BYTES)
    inbox = receiving.shelf.inbox
    kv = random_kv(8)
    parts = chunks_of(kv)
    keys = chunk_keys(TOKENS[:8], namespace, CHUNK_SIZE)
    waiting = fake_key(9)
    inbox.put_many([(waiting, [b"w" * CHUNK_FRAMED_BYTES])])  # the inbox is full
    refused = threading.Event()

    def consume_once_refused() -> None:
        deadline_s = time.monotonic() + 5
        while receiving.counters.refused_chunks == 0 and time.monotonic() < deadline_s:
            time.sleep(0.01)
        refused.set()
        inbox.get_many([waiting])

    consumer = threading.Thread(target=consume_once_refused)
    consumer.start()
    pushed = make_pusher(5.0).push(receiving.address, keys[:1], parts.__getitem__)
    consumer.join()
    assert refused.is_set()
    assert pushed
    assert receiving.counters.refused_chunks > 0
    assert receiving.counters.received_chunks == 1
    assert torch.equal(receiving.shelf.load(TOKENS, namespace, upto=4).kv(), kv[:, :, :4])


def test_unreachable_destination_fails_then_the_pusher_recovers(make_receiving, make_pusher, namespace, monkeypatch):
    monkeypatch.setattr(transfer, "DESTINATION_BACKOFF_S", 1.0)
    pusher = make_pusher(TIMEOUT_S)
    kv = random_kv(8)
    parts = chunks_of(kv)
    keys = chunk_keys(TOKENS[:8], namespace, CHUNK_SIZE)
    nobody = loopback()
    started_s = time.monotonic()
    assert not pusher.push(nobody, keys, parts.__getitem__)
    assert time.monotonic() - started_s < TIMEOUT_S + 4  # gave up, did not hang
    assert pusher.counters.push_failures == 1
    assert pusher.counters.pushed_chunks == 0
    # Someone listens there now; while the destination backs off, pushes fail at once, then they go.
    receiving = make_receiving(address=nobody)
    started_s = time.monotonic()
    assert not pusher.push(nobody, keys, parts.__getitem__)
    assert time.monotonic() - started_s < 0.1 and pusher.counters.push_failures == 2
    time.sleep(1.0)
    assert pusher.push(nobody, keys, parts.__getitem__)
    assert pusher.counters.push_failures == 2
    assert pusher.counters.pushed_chunks == 2
    assert torch.equal(receiving.shelf.load(TOKENS, namespace, upto=8).kv(), kv)


def test_unloaded_pushed_chunk_expires(make_receiving, make_pusher, namespace):
    receiving = make_receiving(pd_inbox_ttl_s=0.2)
    parts = chunks_of(random_kv(len(TOKENS)))
    keys = chunk_keys(TOKENS, namespace, CHUNK_SIZE, tail=True)
    assert make_pusher().push(receiving.address, keys, parts.__getitem__)
    shelf = receiving.shelf
    time.sleep(0.4)
    assert shelf.lookup(TOKENS, namespace, tail=True) == 0
    assert shelf.load(TOKENS, namespace, upto=len(TOKENS), tail=True).num_tokens == 0
    inbox_stats = shelf.stats()["tiers"]["inbox"]
    assert inbox_stats["evictions"] == 3
    assert inbox_stats["used_bytes"] == 0
    assert shelf.held_nearby(keys) == [False, False, False]  # a new push would send them again


def test_receiver_address_in_use_is_a_clear_error(make_receiving):
    first = make_receiving()
    with pytest.raises(ValueError, match="pd.receive_address"):
        make_receiving(address=first.address)


# ---- damaged and malformed messages ----


@pytest.mark.parametrize("damage", ["flip", "other_key"])
def test_damaged_pushed_chunk_is_refused_on_arrival_and_never_stored(
    make_receiving, make_pusher, raw_dealer, namespace, damage
):
    receiving = make_receiving()
    kv = random_kv(8)
    parts = chunks_of(kv)
    keys = chunk_keys(TOKENS[:8], namespace, CHUNK_SIZE)
    assert make_pusher().push(receiving.address, keys[:1], parts.__getitem__)
    if damage == "flip":
        header, payload = frame_parts(parts[1], keys[1].digest, CODECS["raw"], KEYRING)
        damaged = bytearray(payload)
        damaged[len(damaged) // 2] ^= 0x10
        frames = [header, bytes(damaged)]
    else:  # a whole, valid object framed under chunk 0's key
        frames = frame_parts(parts[1], keys[0].digest, CODECS["raw"], KEYRING)
    socket = raw_dealer(receiving.address)
    refused = (struct.pack("<Q", 1), b"error", "refused 1 of 1 chunks that failed verification")
    assert ask(socket, 1, [b"put", keys_json(keys[1]), *frames]) == refused
    assert (receiving.counters.received_corrupt_chunks, receiving.counters.received_chunks) == (1, 1)
    shelf = receiving.shelf
    assert len(shelf.inbox) == 1  # only the genuine chunk 0
    assert shelf.lookup(TOKENS[:8], namespace) == 4
    loaded = shelf.load(TOKENS[:8], namespace, upto=8)
    assert torch.equal(loaded.kv(), kv[:, :, :4])
    # The genuine chunk 1 is then accepted: the refused one never held its place.
    assert make_pusher().push(receiving.address, keys, parts.__getitem__)
    assert torch.equal(shelf.load(TOKENS[:8], namespace, upto=8).kv(), kv)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([b"offer", b"{not json"], "Expecting"),
        ([b"shred", b"{}"], "unknown operation"),
        ([b"offer", b"{}"], "keys"),
        ([b"offer", b'{"keys": [["ns", "zz"]]}'], "hex"),
        ([b"put", b'{"keys": [["ns", "00"]]}', b"head", b"blob"], "bad chunk key"),
        ([b"put", json.dumps({"keys": [["ns", "00" * 32]]}).encode(), b"blob"], "2 per chunk"),
    ],
    ids=["bad-json", "unknown-op", "no-keys", "bad-hex", "short-digest", "missing-frame"],
)
def test_malformed_message_gets_an_error_and_the_receiver_serves_on(
    make_receiving, make_pusher, raw_dealer, namespace, frames, message
):
    receiving = make_receiving()
    socket = raw_dealer(receiving.address)
    reply_seq, status, answer = ask(socket, 7, frames)
    assert (reply_seq, status) == (struct.pack("<Q", 7), b"error")
    assert message in answer
    assert len(receiving.shelf.inbox) == 0
    parts = chunks_of(random_kv(8))
    keys = chunk_keys(TOKENS[:8], namespace, CHUNK_SIZE)
    assert make_pusher(TIMEOUT_S * 4).push(receiving.address, keys, parts.__getitem__)
    assert receiving.counters.received_chunks == 2


def test_message_with_too_few_frames_gets_an_error_and_the_receiver_serves_on(
    make_receiving, make_pusher, raw_dealer, namespace
):
    receiving = make_receiving()
    socket = raw_dealer(receiving.address)
    socket.send_multipart([struct.pack("<Q", 1), b"offer"])  # no header frame
    parts = chunks_of(random_kv(8))
    keys = chunk_keys(TOKENS[:8], namespace, CHUNK_SIZE)
    assert make_pusher(TIMEOUT_S).push(receiving.address, keys, parts.__getitem__)


def test_malformed_destination_is_a_counted_failure(make_pusher, namespace):
    # A destination that is no tcp://host:port (here the port is missing) fails like an unreachable one.
    pusher = make_pusher(TIMEOUT_S)
    parts = chunks_of(random_kv(8))
    keys = chunk_keys(TOKENS[:8], namespace, CHUNK_SIZE)
    assert not pusher.push("tcp://decode-host", keys, parts.__getitem__)
    assert pusher.counters.push_failures == 1


def test_stats_show_expired_chunks_gone_without_another_access(make_receiving, make_pusher, namespace):
    receiving = make_receiving(pd_inbox_ttl_s=0.2)
    parts = chunks_of(random_kv(len(TOKENS)))
    assert make_pusher().push(receiving.address, chunk_keys(TOKENS, namespace, CHUNK_SIZE, tail=True),
                              parts.__getitem__)
    time.sleep(0.4)
    inbox_stats = receiving.shelf.stats()["tiers"]["inbox"]  # the first access since the push
    assert (inbox_stats["used_bytes"], inbox_stats["evictions"]) == (0, 3)


def test_an_error_answer_to_an_offer_is_a_failed_push_not_an_exception(make_pusher, namespace):
    def held(keys):
        raise RuntimeError("the receiving shelf broke")

    address = loopback()
    receiver = KVReceiver(InboxTier(2**20, 60), address, held, TransferCounters(), KEYRING, CHUNK_BYTES)
    try:
        pusher = make_pusher(TIMEOUT_S)
        parts = chunks_of(random_kv(8))
        assert not pusher.push(address, chunk_keys(TOKENS[:8], namespace, CHUNK_SIZE), parts.__getitem__)
        assert pusher.counters.push_failures == 1
    finally:
        receiver.close()
