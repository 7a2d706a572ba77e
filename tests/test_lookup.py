"""The lookup protocol between vLLM's scheduler and its workers, and a router's describe and held
questions: real shelves behind real ZeroMQ sockets (ipc:// and loopback TCP), no engine."""

import json
import uuid

import numpy as np
import pytest
import zmq

from kvshelf import Namespace, Shelf, load_config
from kvshelf.disagg.kv_index import decode_held
from kvshelf.integrations.vllm.lookup import LookupClient, LookupServer, RoutingLookupServer, combine, lookup_address
from kvshelf.keys import Prompt
from kvshelf.ports import free_port, secure_client
from tests.conftest import CHUNK_SIZE, LAYOUT, random_kv

TOKENS = list(range(700, 714))  # three chunks of 4 and a tail of 2
NAMESPACE = Namespace("lookup-model", LAYOUT, tp_size=2)
ANSWER_MS = 10_000


@pytest.fixture
def engine(opened, tmp_path):
    """Two tensor-parallel workers' shelves, each behind its lookup socket, and a client asking both.
    Rank 0 holds the prompt's first three chunks in memory (and on disk); rank 1 the first two, on
    disk only (a shelf that restarted)."""
    engine_id = f"test-{uuid.uuid4()}"
    prompt = Prompt(TOKENS, NAMESPACE)

    def shelf(rank: int) -> Shelf:
        made = Shelf(load_config(environ={}, chunk_size=CHUNK_SIZE, disk_path=str(tmp_path / f"rank{rank}")))
        opened.append(made)
        return made

    first = shelf(0)
    first.save(TOKENS, random_kv(len(TOKENS)), prompt.with_rank(0).namespace)
    first.flush()
    before_restart = shelf(1)
    before_restart.save(TOKENS[:8], random_kv(8), prompt.with_rank(1).namespace)
    before_restart.flush()
    second = shelf(1)
    hooked = []

    def on_located(request_id, asked, located):
        hooked.append((request_id, asked, located))
        return located[:1] if request_id == "trim-me" else located

    servers = [LookupServer(first, lookup_address(engine_id, 0), on_located),
               LookupServer(second, lookup_address(engine_id, 1), on_located)]
    opened.extend(servers)
    client = LookupClient(engine_id, 2, timeout_s=5.0)
    opened.append(client)
    return client, [first, second], hooked, prompt, engine_id


def test_locate_takes_the_chunks_every_rank_holds_each_at_the_slowest_ranks_tier(engine):
    client, _, hooked, prompt, _ = engine
    assert client.locate(prompt, "request-1") == ["disk", "disk"]
    # Each worker's hook runs on its own thread: in either order.
    assert sorted((request_id, asked.namespace.tp_rank, located) for request_id, asked, located in hooked) == [
        ("request-1", 0, ["memory"] * 3), ("request-1", 1, ["disk"] * 2)]
    assert [asked.token_ids for _, asked, _ in hooked] == [TOKENS, TOKENS]


def test_the_workers_hook_decides_what_is_claimed(engine):
    client, _, _, prompt, _ = engine
    assert client.locate(prompt, "trim-me") == ["disk"]


def test_a_probe_is_left_out_of_the_hit_statistics(engine):
    client, shelves, _, prompt, _ = engine
    before = shelves[0].stats()
    assert client.locate(prompt, probe=True) == ["disk", "disk"]
    assert shelves[0].stats() == before


def test_combine():
    assert combine([["memory", "inbox", "redis"], ["disk", "memory"]]) == ["disk", "inbox"]
    assert combine([["memory"], []]) == []


def test_reset_empties_every_rank_and_fails_if_a_rank_is_silent(engine):
    client, shelves, _, prompt, engine_id = engine
    assert client.reset(NAMESPACE)  # each rank is told its own namespace (for a shared Redis: none here)
    assert client.locate(prompt) == []
    assert [shelf.locate(prompt.with_rank(rank), probe=True) for rank, shelf in enumerate(shelves)] == [[], []]
    silent = LookupClient(engine_id, 3, timeout_s=5.0, reset_timeout_s=0.2)  # rank 2 does not exist
    try:
        assert not silent.reset()
    finally:
        silent.close()


def test_held_lists_what_each_ranks_own_tiers_hold(engine):
    client, shelves, _, prompt, _ = engine
    held = client.held()
    on_disk = [shelves[0].chunk_keys(TOKENS, prompt.with_rank(0).namespace),
               shelves[1].chunk_keys(TOKENS[:8], prompt.with_rank(1).namespace)]
    assert sorted(held["disk"]) == sorted(key.digest for keys in on_disk for key in keys)
    assert sorted(held["memory"]) == sorted(key.digest for key in on_disk[0])  # rank 1 restarted: nothing in memory


def ask(address: str, keyring, frames: list[bytes]) -> list[bytes]:
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    secure_client(socket, keyring)
    socket.connect(address)
    try:
        socket.send_multipart(frames)
        assert socket.poll(ANSWER_MS)
        return socket.recv_multipart()
    finally:
        socket.close()


def test_a_router_learns_the_namespace_chunk_size_and_what_is_held(engine, opened):
    _, shelves, _, prompt, engine_id = engine
    address = f"tcp://127.0.0.1:{free_port()}"
    keyring = shelves[0].keyring
    opened.append(RoutingLookupServer(address, NAMESPACE, CHUNK_SIZE, LookupClient(engine_id, 2, 5.0), keyring))
    (description,) = ask(address, keyring, [json.dumps({"op": "describe"}).encode(), b""])
    assert json.loads(description) == {"namespace": NAMESPACE.describe(), "chunk_size": CHUNK_SIZE}
    held = decode_held(ask(address, keyring, [json.dumps({"op": "held"}).encode(), b""]))
    assert len(held["disk"]) == 5
    tokens = np.asarray(TOKENS, dtype="<i4").tobytes()
    assert ask(address, keyring, [json.dumps({"cache_salt": None}).encode(), tokens]) == [b"8"]
    assert ask(address, keyring, [json.dumps({"op": "forget"}).encode(), b""]) == [b"0"]  # a bad question: a miss
