"""The lookup and push ports as an attacker on the network would try them (issue 13, items 6, 7, 10, 16).

Real sockets on loopback: kvshelf's own servers (routing lookup, worker lookup, push receiver),
peers that hold the deployment secret, peers that do not (another secret, no CURVE at all, or
raw TCP speaking ZeroMQ's wire protocol by hand), and the scheduler's choice of push destination.
"""

import json
import logging
import os
import socket
import stat
import struct
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zmq

from kvshelf import Shelf, load_config
from kvshelf.codecs import CODECS, frame_parts
from kvshelf.disagg.transfer import KVPusher, KVReceiver, TransferCounters, max_frame_bytes
from kvshelf.integrations.vllm import lookup
from kvshelf.integrations.vllm.lookup import (
    MAX_LOOKUP_FRAME_BYTES,
    MAX_LOOKUP_TOKENS,
    LookupClient,
    LookupServer,
    RoutingLookupServer,
    lookup_address,
    private_socket_dir,
)
from kvshelf.integrations.vllm.scheduler import Role, SchedulerSide
from kvshelf.keys import Prompt
from kvshelf.ports import CLUSTER_BUS_OFFSET, QuietLog, free_port, secure_client, sign_push_to
from kvshelf.security import Keyring
from tests.conftest import CHUNK_SIZE, LAYOUT, random_kv

SECRET = "the deployment's secret, shared by every instance and the proxy"
KEYRING = Keyring.from_config(load_config(environ={}, security_key=SECRET).security)
STRANGER = Keyring(os.urandom(32))  # an attacker's own secret
TOKENS = list(range(300, 310))  # two full chunks of 4 and a tail
CHUNK_BYTES = LAYOUT.bytes_per_token * CHUNK_SIZE
SILENCE_MS = 1500  # how long a peer that must get no answer waits for one
ANSWER_MS = 10_000


def loopback() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def config(security_key: str, **overrides):
    return load_config(environ={}, chunk_size=CHUNK_SIZE, security_key=security_key, **overrides)


@pytest.fixture
def make_instance(opened, namespace):
    """An instance's scheduler-side routing lookup over one worker's shelf holding TOKENS' first 8 tokens."""

    def make(security_key: str = SECRET) -> SimpleNamespace:
        shelf = Shelf(config(security_key))
        opened.append(shelf)
        shelf.save(TOKENS[:8], random_kv(8), namespace)
        engine_id = f"test-{uuid.uuid4()}"
        opened.append(LookupServer(shelf, lookup_address(engine_id, 0)))
        address = loopback()
        routing = RoutingLookupServer(address, namespace, CHUNK_SIZE, LookupClient(engine_id, 1, 5.0), shelf.keyring)
        opened.append(routing)
        return SimpleNamespace(shelf=shelf, address=address, routing=routing)

    return make


@pytest.fixture
def make_receiving(opened):
    """A decode instance: a shelf with an inbox and its push receiver."""

    def make(security_key: str = SECRET) -> SimpleNamespace:
        address = loopback()
        shelf = Shelf(config(security_key, pd_receive_address=address))
        opened.append(shelf)
        counters = TransferCounters()
        opened.append(KVReceiver(shelf.inbox, address, shelf.held_nearby, counters, shelf.keyring, CHUNK_BYTES))
        return SimpleNamespace(shelf=shelf, address=address, counters=counters)

    return make


@pytest.fixture
def peer(opened):
    """A ZeroMQ socket of `kind` connected to `address`, holding `keyring`'s client keys (None: plain NULL)."""

    def connect(kind: int, address: str, keyring: Keyring | None) -> zmq.Socket:
        sock = zmq.Context.instance().socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if keyring is not None:
            secure_client(sock, keyring)
        sock.connect(address)
        opened.append(sock)
        return sock

    return connect


def server_key_with_own_client_keys(sock: zmq.Socket) -> None:
    """An attacker who somehow learned the server's public key, presenting a client key pair of their own."""
    public, secret = zmq.curve_keypair()
    sock.setsockopt(zmq.CURVE_SERVERKEY, KEYRING.curve_keys("server")[0])
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


def question(token_ids, salt=None) -> list[bytes]:
    return [json.dumps({"cache_salt": salt}).encode(), np.asarray(token_ids, dtype="<i4").tobytes()]


def answer_within(sock: zmq.Socket, timeout_ms: int) -> bytes | None:
    return sock.recv() if sock.poll(timeout_ms) else None


def routing_answer(sock: zmq.Socket, frames: list[bytes], timeout_ms: int = ANSWER_MS) -> bytes | None:
    sock.send_multipart(frames)
    return answer_within(sock, timeout_ms)


def push_message(seq: int, op: bytes, header: dict, parts=()) -> list:
    return [struct.pack("<Q", seq), op, json.dumps(header).encode(), *parts]


def keys_header(keys) -> dict:
    return {"keys": [[key.namespace_id, key.hex] for key in keys]}


# ---- a raw TCP peer speaking ZMTP 3.0 with the NULL mechanism ----


def _read_exactly(sock: socket.socket, num_bytes: int) -> bytes:
    data = b""
    while len(data) < num_bytes:
        more = sock.recv(num_bytes - len(data))
        if not more:
            raise ConnectionError("closed during the handshake")
        data += more
    return data


def zmtp_null_peer(address: str, socket_type: bytes) -> socket.socket:
    """A plain TCP connection that has completed ZeroMQ's NULL handshake as a `socket_type` peer."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=ANSWER_MS / 1000)
    sock.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" * 32)
    _read_exactly(sock, 64)  # the server's greeting
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    sock.sendall(bytes([0x04, len(ready)]) + ready)
    flags, size = _read_exactly(sock, 2)
    assert flags == 0x04  # a short command: the server's READY
    _read_exactly(sock, size)
    return sock


def disconnected_after_declaring(sock: socket.socket, frame_bytes: int) -> bool:
    """Declare one frame of `frame_bytes` and send 1 KiB of it: whether the server hangs up on us
    (rather than waiting for, and buffering, the rest)."""
    try:
        sock.sendall(b"\x02" + struct.pack(">Q", frame_bytes) + b"x" * 1024)
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


# ---- the routing-lookup port ----


def test_routing_lookup_answers_holders_of_the_secret_and_no_one_else(make_instance, peer):
    instance = make_instance()
    assert routing_answer(peer(zmq.REQ, instance.address, KEYRING), question(TOKENS)) == b"8"
    for keyring in (STRANGER, None):
        assert routing_answer(peer(zmq.REQ, instance.address, keyring), question(TOKENS), SILENCE_MS) is None
    impostor = zmq.Context.instance().socket(zmq.REQ)
    impostor.setsockopt(zmq.LINGER, 0)
    server_key_with_own_client_keys(impostor)
    impostor.connect(instance.address)
    try:
        assert routing_answer(impostor, question(TOKENS), SILENCE_MS) is None  # refused by the ZAP handler
    finally:
        impostor.close()
    assert routing_answer(peer(zmq.REQ, instance.address, KEYRING), question(TOKENS)) == b"8"


def test_describe_and_held_answer_holders_of_the_secret_and_no_one_else(make_instance, peer):
    instance = make_instance()
    for op in ("describe", "held"):
        op_question = [json.dumps({"op": op}).encode(), b""]
        assert routing_answer(peer(zmq.REQ, instance.address, KEYRING), op_question) is not None
        for keyring in (STRANGER, None):
            assert routing_answer(peer(zmq.REQ, instance.address, keyring), op_question, SILENCE_MS) is None


def test_an_unkeyed_routing_lookup_is_open_as_documented(make_instance, peer):
    instance = make_instance("none")
    assert routing_answer(peer(zmq.REQ, instance.address, None), question(TOKENS)) == b"8"


def test_a_lookup_over_the_token_cap_is_a_miss(make_instance, peer):
    instance = make_instance()
    asker = peer(zmq.REQ, instance.address, KEYRING)
    assert routing_answer(asker, question(TOKENS[:8] + [1] * (MAX_LOOKUP_TOKENS - 7))) == b"0"
    assert routing_answer(asker, question(TOKENS)) == b"8"


def test_an_oversized_lookup_frame_is_dropped_unanswered_and_the_port_serves_on(make_instance, peer):
    instance = make_instance()
    asker = peer(zmq.REQ, instance.address, KEYRING)
    assert routing_answer(asker, [b"{}", b"\0" * (MAX_LOOKUP_FRAME_BYTES + 1)], SILENCE_MS) is None
    assert routing_answer(peer(zmq.REQ, instance.address, KEYRING), question(TOKENS)) == b"8"


def test_an_open_lookup_port_hangs_up_on_a_declared_oversized_frame_before_reading_it(make_instance, peer):
    instance = make_instance("none")
    assert disconnected_after_declaring(zmtp_null_peer(instance.address, b"REQ"), MAX_LOOKUP_FRAME_BYTES + 1)
    assert routing_answer(peer(zmq.REQ, instance.address, None), question(TOKENS)) == b"8"


@pytest.mark.parametrize("frames", [
    [b"{not json", b""],
    [b'["a list"]', b""],
    [b'{"cache_salt": 7}', b""],
    [b"{}", b"\0" * 5],
    [b"{}"],
], ids=["bad-json", "not-a-dict", "salt-not-a-string", "not-int32", "one-frame"])
def test_a_bad_lookup_is_a_miss_logged_once_per_period_without_traceback(make_instance, peer, caplog, frames):
    instance = make_instance()
    asker = peer(zmq.REQ, instance.address, KEYRING)
    with caplog.at_level(logging.WARNING, logger=lookup.__name__):
        for _ in range(5):
            assert routing_answer(asker, frames) == b"0"
    lines = [record for record in caplog.records if record.name == lookup.__name__]
    assert len(lines) == 1
    assert "bad lookup message" in lines[0].getMessage()
    assert lines[0].exc_info is None
    assert routing_answer(asker, question(TOKENS)) == b"8"


# ---- the push port ----


def test_push_port_admits_holders_of_the_secret_and_no_one_else(make_receiving, peer, namespace):
    receiving = make_receiving()
    keys = receiving.shelf.chunk_keys(TOKENS, namespace, tail=True)
    parts = [random_kv(4), random_kv(4, seed=1), random_kv(2, seed=2)]
    stranger = KVPusher(1.0, TransferCounters(), STRANGER)
    try:
        assert not stranger.push(receiving.address, keys, parts.__getitem__)
    finally:
        stranger.close()
    frames = [part for index, key in enumerate(keys) for part in frame_parts(parts[index], key.digest,
                                                                              CODECS["raw"], KEYRING)]
    for keyring in (STRANGER, None):
        # Each on a fresh socket: one whose handshake failed has no peer to queue a second message for.
        offering = peer(zmq.DEALER, receiving.address, keyring)
        offering.send_multipart(push_message(1, b"offer", keys_header(keys)))
        assert not offering.poll(SILENCE_MS)  # not even what the decode instance holds
        putting = peer(zmq.DEALER, receiving.address, keyring)
        putting.send_multipart(push_message(2, b"put", keys_header(keys), frames))
        assert not putting.poll(SILENCE_MS)
    assert (len(receiving.shelf.inbox), receiving.counters.received_chunks) == (0, 0)
    pusher = KVPusher(5.0, TransferCounters(), KEYRING)
    try:
        assert pusher.push(receiving.address, keys, parts.__getitem__)
    finally:
        pusher.close()
    assert receiving.counters.received_chunks == 3
    loaded = receiving.shelf.load(TOKENS, namespace, upto=len(TOKENS), tail=True)
    assert torch.equal(loaded.kv(), torch.cat(parts, dim=2))


def test_a_forged_chunk_from_an_authenticated_peer_is_refused_and_the_genuine_one_lands(
    make_receiving, peer, namespace
):
    receiving = make_receiving()
    keys = receiving.shelf.chunk_keys(TOKENS[:4], namespace)
    genuine, forged = random_kv(4), random_kv(4, seed=9)
    dealer = peer(zmq.DEALER, receiving.address, KEYRING)
    dealer.send_multipart(push_message(1, b"put", keys_header(keys),
                                       frame_parts(forged, keys[0].digest, CODECS["raw"], STRANGER)))
    assert dealer.poll(ANSWER_MS)
    seq, status, answer = dealer.recv_multipart()
    assert (status, json.loads(answer)) == (b"error", "refused 1 of 1 chunks that failed verification")
    assert (receiving.counters.received_corrupt_chunks, receiving.counters.received_chunks) == (1, 0)
    assert len(receiving.shelf.inbox) == 0
    assert receiving.shelf.held_nearby(keys) == [False]  # so a genuine push sends it
    pusher = KVPusher(5.0, TransferCounters(), KEYRING)
    try:
        assert pusher.push(receiving.address, keys, [genuine].__getitem__)
    finally:
        pusher.close()
    assert torch.equal(receiving.shelf.load(TOKENS[:4], namespace, upto=4).kv(), genuine)


def test_an_oversized_push_frame_is_dropped_and_the_receiver_serves_on(make_receiving, peer, namespace):
    receiving = make_receiving()
    keys = receiving.shelf.chunk_keys(TOKENS[:4], namespace)
    dealer = peer(zmq.DEALER, receiving.address, KEYRING)
    oversized = bytes(max_frame_bytes(CHUNK_BYTES) + 1)
    dealer.send_multipart(push_message(1, b"put", keys_header(keys), [oversized[:100], oversized]))
    del oversized
    assert not dealer.poll(SILENCE_MS)
    assert len(receiving.shelf.inbox) == 0
    pusher = KVPusher(5.0, TransferCounters(), KEYRING)
    try:
        assert pusher.push(receiving.address, keys, [random_kv(4)].__getitem__)
    finally:
        pusher.close()
    assert receiving.counters.received_chunks == 1


def test_an_open_push_port_hangs_up_on_a_declared_oversized_frame_before_reading_it(make_receiving, namespace):
    receiving = make_receiving("none")
    assert disconnected_after_declaring(zmtp_null_peer(receiving.address, b"DEALER"), 256 * 2**20)
    assert len(receiving.shelf.inbox) == 0
    keys = receiving.shelf.chunk_keys(TOKENS[:4], namespace)
    pusher = KVPusher(5.0, TransferCounters(), receiving.shelf.keyring)
    try:
        assert pusher.push(receiving.address, keys, [random_kv(4)].__getitem__)
    finally:
        pusher.close()


def test_the_pusher_sends_a_chunk_larger_than_a_batch_alone(make_receiving, namespace, monkeypatch):
    from kvshelf.disagg import transfer

    monkeypatch.setattr(transfer, "PUT_BATCH_BYTES", CHUNK_BYTES)  # each chunk alone fills a batch
    receiving = make_receiving()
    keys = receiving.shelf.chunk_keys(TOKENS, namespace, tail=True)
    parts = [random_kv(4), random_kv(4, seed=1), random_kv(2, seed=2)]
    counters = TransferCounters()
    pusher = KVPusher(5.0, counters, KEYRING)
    try:
        assert pusher.push(receiving.address, keys, parts.__getitem__)
    finally:
        pusher.close()
    assert receiving.counters.received_chunks == 3
    assert torch.equal(receiving.shelf.load(TOKENS, namespace, upto=10, tail=True).kv(), torch.cat(parts, dim=2))


def test_bad_push_messages_are_answered_and_logged_once_per_period(make_receiving, peer, caplog):
    from kvshelf.disagg import transfer

    receiving = make_receiving()
    dealer = peer(zmq.DEALER, receiving.address, KEYRING)
    with caplog.at_level(logging.WARNING, logger=transfer.__name__):
        for seq in range(5):
            dealer.send_multipart([struct.pack("<Q", seq), b"offer", b"{not json"])
            assert dealer.poll(ANSWER_MS)
            assert dealer.recv_multipart()[1] == b"error"
    lines = [record for record in caplog.records if record.name == transfer.__name__]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert "refused a bad push message" in lines[0].getMessage()


# ---- quiet logging ----


def test_quiet_log_says_one_line_per_reason_and_period_and_counts_the_rest(caplog):
    now_s = [0.0]
    log = QuietLog(logging.getLogger("kvshelf.test.quiet"), period_s=10.0, clock=lambda: now_s[0])
    with caplog.at_level(logging.WARNING, logger="kvshelf.test.quiet"):
        for second in range(10):
            now_s[0] = float(second)
            log.warning("bad json", "bad message %d", second)
        log.warning("oversized", "too big")
        now_s[0] = 10.0
        log.warning("bad json", "bad message %d", 10)
    assert [record.getMessage() for record in caplog.records] == [
        "bad message 0",
        "too big",
        "bad message 10 (9 more like it since the last such line, not logged)",
    ]


# ---- push_to from a request ----


def request(params: dict | None, request_id: str = "r") -> SimpleNamespace:
    return SimpleNamespace(request_id=request_id, kv_transfer_params=params)


def signed(address: str, keyring: Keyring = KEYRING) -> dict:
    return {"kvshelf": {"push_to": address, "push_to_sig": sign_push_to(keyring, address)}}


def scheduler(push_to: str | None = None, keyring: Keyring = KEYRING, kv_role: str = "kv_producer"):
    return SchedulerSide(lambda *_: [], CHUNK_SIZE, None, Role.of(kv_role, push_to), keyring, background=False,
                         hand_over_wait_s=0.0)


DECODE = "tcp://decode-1.internal:5800"


def test_free_ports_are_never_handed_out_twice_nor_on_each_others_cluster_bus():
    """Launchers ask for several ports before any server binds one (a `kvshelf pd` instance: HTTP,
    lookup, receiver): drawn at random, 2,000 of them would repeat about 60 times."""
    ports = [free_port() for _ in range(2000)]
    bus_ports = [port + CLUSTER_BUS_OFFSET for port in ports]
    assert len(set(ports + bus_ports)) == 2 * len(ports)


def test_a_request_push_to_signed_by_the_proxy_is_used():
    assert scheduler()._push_to(request(signed(DECODE))) == DECODE
    assert scheduler()._push_to(request(signed("tcp://[::1]:5800"))) == "tcp://[::1]:5800"


@pytest.mark.parametrize("params", [
    {"kvshelf": {"push_to": DECODE}},
    {"kvshelf": {"push_to": DECODE, "push_to_sig": ""}},
    {"kvshelf": {"push_to": DECODE, "push_to_sig": sign_push_to(KEYRING, "tcp://attacker:5800")}},
    signed(DECODE, STRANGER),
    signed("ipc:///tmp/kvshelf-victim.ipc"),
    signed("tcp://*:5800"),
    signed("tcp://decode-1"),
    signed("tcp://eth0;decode-1:5800"),
    {"kvshelf": {"push_to": 5800}},
], ids=["unsigned", "empty-sig", "sig-of-another-address", "stranger-sig", "ipc", "wildcard", "no-port",
        "source-address", "not-a-string"])
def test_a_request_push_to_without_a_valid_signature_or_not_tcp_is_ignored(params):
    assert scheduler()._push_to(request(params)) is None
    assert scheduler("tcp://configured:5800")._push_to(request(params)) == "tcp://configured:5800"


def test_push_to_from_the_config_is_trusted_and_only_a_producer_pushes():
    assert scheduler("tcp://configured:5800")._push_to(request(None)) == "tcp://configured:5800"
    assert scheduler("tcp://configured:5800")._push_to(request({"kvshelf": {}})) == "tcp://configured:5800"
    assert scheduler(kv_role="kv_both")._push_to(request(signed(DECODE))) is None


def test_unkeyed_a_request_push_to_needs_no_signature_but_never_ipc():
    unkeyed = scheduler(keyring=Keyring(None))
    assert unkeyed._push_to(request({"kvshelf": {"push_to": DECODE}})) == DECODE
    assert unkeyed._push_to(request({"kvshelf": {"push_to": "ipc:///tmp/x.ipc"}})) is None


def test_ignored_push_tos_are_logged_once_per_period(caplog):
    from kvshelf.integrations.vllm import scheduler as scheduler_module

    side = scheduler()
    with caplog.at_level(logging.WARNING, logger=scheduler_module.__name__):
        for index in range(5):
            unsigned = request({"kvshelf": {"push_to": f"tcp://attacker:{5800 + index}"}}, f"r{index}")
            assert side._push_to(unsigned) is None
    assert len([record for record in caplog.records if record.name == scheduler_module.__name__]) == 1


# ---- the local lookup sockets ----


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile.gettempdir() answering a fresh directory, so the socket directory is this test's."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path / f"kvshelf-{os.getuid()}"


def test_lookup_sockets_live_in_a_private_directory_and_are_removed_on_close(private_tmp, make_shelf, namespace):
    address = lookup_address("engine-a", 0)
    path = Path(address.removeprefix("ipc://"))
    assert path.parent == private_tmp
    assert stat.S_IMODE(private_tmp.stat().st_mode) == 0o700
    shelf = make_shelf()
    shelf.save(TOKENS[:8], random_kv(8), namespace)
    server = LookupServer(shelf, address)
    client = LookupClient("engine-a", 1, 5.0)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert client.locate(Prompt(TOKENS, namespace)) == ["memory", "memory"]
    finally:
        client.close()
        server.close()
    assert not path.exists()


def test_an_engine_id_cannot_place_a_socket_outside_the_private_directory(private_tmp):
    for engine_id in ("../../etc/evil", "a" * 300, "x/y"):
        path = Path(lookup_address(engine_id, 3).removeprefix("ipc://"))
        assert path.parent == private_tmp and path.name.endswith("-3.ipc") and "/" not in path.name
        assert len(str(path)) <= 100


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o777])
def test_a_socket_directory_open_to_others_is_refused(private_tmp, mode):
    private_tmp.mkdir()
    private_tmp.chmod(mode)
    with pytest.raises(ValueError, match="open to other users.*chmod 700"):
        private_socket_dir()


def test_a_socket_directory_that_is_a_symlink_is_refused(private_tmp, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    private_tmp.symlink_to(elsewhere)
    with pytest.raises(ValueError, match="symlink"):
        lookup_address("engine-a", 0)


def test_a_socket_directory_of_another_user_is_refused(private_tmp):
    if os.getuid() != 0:
        pytest.skip("making a directory another user owns needs root")
    private_tmp.mkdir(mode=0o700)
    os.chown(private_tmp, 12345, 12345)
    with pytest.raises(ValueError, match="belongs to uid 12345"):
        private_socket_dir()
