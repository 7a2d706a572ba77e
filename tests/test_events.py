"""KV cache events: what the tiers report stored and dropped, how a shelf buffers it, a reset, and
the same as vLLM's events (real tiers, a real redis-server, vLLM's own event types and aggregator)."""

import dataclasses
import pickle

import msgspec
import pytest
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

from kvshelf import Namespace
from kvshelf.integrations.vllm.events import KVShelfKVEvents, SchedulerEvents, to_vllm_events, worker_events
from kvshelf.keys import Prompt
from kvshelf.shelf.events import REMOVED, STORED, ChunkEvent, ChunkEvents
from kvshelf.tiers.disk import DiskTier
from kvshelf.tiers.inbox import InboxTier
from kvshelf.tiers.redis import RedisTier
from tests.conftest import CHUNK_SIZE, LAYOUT, random_kv
from tests.tiers.test_memory import key

TOKENS = list(range(500, 512))  # three chunks of 4
SALT = "tenant-salt-that-must-never-leave"


def blob(index: int) -> list[bytes]:
    return [bytes([index]) * 100]


def records(events: ChunkEvents) -> list[tuple[str, str, list[int]]]:
    """(kind, tier, key indices) of the records taken; keys made by `key(i)`."""
    return [(record.kind, record.tier, [int.from_bytes(k.digest, "little") for k in record.keys])
            for record in events.take()]


def replayed(taken: list[ChunkEvent]) -> set:
    """What a reader following the records believes the tier holds."""
    held = set()
    for record in taken:
        held = held | set(record.keys) if record.kind == STORED else held - set(record.keys)
    return held


# ---- the tiers' reports ----


def test_disk_reports_chunks_written_and_evicted_so_that_replaying_them_gives_its_contents(tmp_path):
    disk = DiskTier(tmp_path, capacity_bytes=250)  # room for two chunks of 100 bytes
    events = ChunkEvents([disk])
    disk.put_many([(key(0), blob(0)), (key(1), blob(1))])
    disk.put_many([(key(2), blob(2))])
    disk.put_many([(key(1), blob(1))])  # held already: not stored again
    assert records(events) == [(STORED, "disk", [0, 1]), (REMOVED, "disk", [0]), (STORED, "disk", [2])]
    # A batch larger than the tier: 3 is written, then evicted by 5; reported neither stored nor removed.
    disk.put_many([(key(3), blob(3)), (key(4), blob(4)), (key(5), blob(5))])
    taken = events.take()
    assert [(record.kind, [int.from_bytes(k.digest, "little") for k in record.keys]) for record in taken] == [
        (REMOVED, [1, 2]), (STORED, [4, 5])]
    assert replayed(taken) == set(disk.list_keys()) == {key(4), key(5)}


def test_inbox_reports_arrivals_hand_overs_and_expiry():
    inbox = InboxTier(10_000, ttl_s=3600)
    events = ChunkEvents([inbox])
    inbox.put_many([(key(0), blob(0)), (key(1), blob(1))])
    inbox.get_many([key(0)])  # handed over to its request: it leaves the inbox
    assert records(events) == [(STORED, "inbox", [0, 1]), (REMOVED, "inbox", [0])]
    expiring = InboxTier(10_000, ttl_s=0.0)  # every chunk has waited long enough at the next look
    events = ChunkEvents([expiring])
    expiring.put_many([(key(2), blob(2))])
    assert expiring.contains_prefix([key(2)]) == 0
    assert records(events) == [(STORED, "inbox", [2]), (REMOVED, "inbox", [2])]


def test_redis_reports_what_it_stores(redis_server):
    from kvshelf.config import load_config

    tier = RedisTier(load_config(environ={}, redis_url=redis_server.url).redis, backoff_s=0.2)
    tier.connect()
    try:
        events = ChunkEvents([tier])
        tier.put_many([(key(0), blob(0)), (key(1), blob(1))])
        assert records(events) == [(STORED, "redis", [0, 1])]
        assert events.held_keys() == {}  # shared: not this instance's to list
    finally:
        tier.close()


def test_records_are_bounded_the_oldest_going_first(tmp_path):
    disk = DiskTier(tmp_path, 10_000)
    events = ChunkEvents([disk], max_keys=4)
    for index in range(3):
        disk.put_many([(key(2 * index), blob(0)), (key(2 * index + 1), blob(0))])
    assert events.num_dropped_keys == 2
    assert records(events) == [(STORED, "disk", [2, 3]), (STORED, "disk", [4, 5])]
    assert events.take() == []


# ---- a reset ----


def test_clear_empties_memory_inbox_and_disk_reports_every_chunk_and_leaves_the_shared_redis(
    make_shelf, redis_server, namespace, tmp_path
):
    shelf = make_shelf(redis_url=redis_server.url, pd_receive_address="tcp://127.0.0.1:1")
    keys = shelf.chunk_keys(TOKENS, namespace)
    shelf.save(TOKENS, random_kv(len(TOKENS)), namespace)
    shelf.flush()
    shelf.inbox.put_many([(key(9), blob(9))])
    shelf.events.take()
    assert shelf.clear()
    prompt = Prompt(TOKENS, namespace)
    assert shelf.locate(prompt, probe=True) == []  # nothing of this instance's own
    assert shelf.locate(prompt) == ["redis"] * 3  # the fleet's Redis still serves it
    removed = {record.tier: set(record.keys) for record in shelf.events.take() if record.kind == REMOVED}
    assert removed == {"memory": set(keys), "disk": set(keys), "inbox": {key(9)}}
    assert not list((tmp_path / "disk").rglob("*.kvs"))


def test_a_reset_drops_the_models_kv_from_the_shared_redis_whatever_the_tenant_and_keeps_other_models(
    make_shelf, redis_server, namespace
):
    import redis

    shelf = make_shelf(redis_url=redis_server.url)
    tenant = dataclasses.replace(namespace, cache_salt="tenant-b")
    other_model = Namespace("other-model", LAYOUT)
    for saved in (namespace, tenant, other_model):
        shelf.save(TOKENS, random_kv(len(TOKENS)), saved)
    shelf.flush()
    # Redis may have evicted a description (it is never read): the instance's own namespace goes all the same.
    redis.Redis.from_url(redis_server.url).delete(f"kvshelf:{namespace.id(shelf.keyring)}:namespace")
    shelf.events.take()
    assert shelf.clear(namespace)
    assert [shelf.locate(Prompt(TOKENS, each)) for each in (namespace, tenant, other_model)] == [
        [], [], ["redis"] * 3]
    removed = {key for record in shelf.events.take() if record.tier == "redis" for key in record.keys}
    assert removed == set(shelf.chunk_keys(TOKENS, namespace)) | set(shelf.chunk_keys(TOKENS, tenant))


# ---- vLLM's events ----


def test_vllm_events_carry_chained_keys_per_tier_and_never_tokens_or_salts(make_shelf):
    shelf = make_shelf()
    salted = Namespace("model-name-that-must-never-leave", LAYOUT, cache_salt=SALT)
    keys = shelf.chunk_keys(TOKENS, salted)
    shelf.events.note_chain(keys)
    shelf.save(TOKENS, random_kv(len(TOKENS)), salted)
    shelf.flush()
    events = worker_events(shelf).get_all_events()
    digests = [key.digest for key in keys]
    assert [(type(event), event.medium, event.ownership, event.locality) for event in events] == [
        (BlockStored, "CPU", "kvshelf-memory", "LOCAL"), (BlockStored, "STORAGE", "kvshelf-disk", "LOCAL")]
    for event in events:
        assert (event.block_hashes, event.parent_block_hash) == (digests, None)
        assert (event.token_ids, event.block_size, event.lora_name, event.extra_keys) == ([], CHUNK_SIZE, None, None)
    wire = msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=events))
    assert SALT.encode() not in wire and b"model-name-that-must-never-leave" not in wire
    assert worker_events(shelf) is None  # taken


def test_a_chunk_stored_after_its_parent_names_it_and_removals_name_their_tier(tmp_path):
    disk = DiskTier(tmp_path, capacity_bytes=250)
    events = ChunkEvents([disk])
    events.note_chain([key(0), key(1), key(2)])
    disk.put_many([(key(1), blob(1))])
    disk.put_many([(key(2), blob(2)), (key(7), blob(7))])  # 7 follows nothing known; 1 is evicted
    converted = to_vllm_events(events.take(), CHUNK_SIZE, events.parent_of)
    assert converted == [
        BlockStored(block_hashes=[key(1).digest], parent_block_hash=key(0).digest, token_ids=[],
                    block_size=CHUNK_SIZE, lora_id=None, medium="STORAGE", lora_name=None, locality="LOCAL",
                    ownership="kvshelf-disk"),
        BlockRemoved(block_hashes=[key(1).digest], medium="STORAGE", locality="LOCAL", ownership="kvshelf-disk"),
        BlockStored(block_hashes=[key(2).digest], parent_block_hash=key(1).digest, token_ids=[],
                    block_size=CHUNK_SIZE, lora_id=None, medium="STORAGE", lora_name=None, locality="LOCAL",
                    ownership="kvshelf-disk"),
        BlockStored(block_hashes=[key(7).digest], parent_block_hash=None, token_ids=[], block_size=CHUNK_SIZE,
                    lora_id=None, medium="STORAGE", lora_name=None, locality="LOCAL", ownership="kvshelf-disk"),
    ]


def test_every_tensor_parallel_ranks_events_reach_the_scheduler_through_vllms_aggregation(tmp_path):
    from kvshelf import Shelf, load_config

    namespace = Namespace("tp-model", LAYOUT, tp_size=2)
    shelves = [Shelf(load_config(environ={}, chunk_size=CHUNK_SIZE, disk_path=str(tmp_path / f"rank{rank}")))
               for rank in range(2)]
    try:
        prompt = Prompt(TOKENS, namespace)
        for rank, shelf in enumerate(shelves):
            ranked = prompt.with_rank(rank).namespace
            shelf.save(TOKENS, random_kv(len(TOKENS), seed=rank), ranked)
            shelf.flush()
        # Each worker's events cross a process boundary (pickled) to the scheduler's aggregator.
        outputs = [ModelRunnerOutput(req_ids=[], req_id_to_index={}, kv_connector_output=KVConnectorOutput(
            kv_cache_events=pickle.loads(pickle.dumps(worker_events(shelf))))) for shelf in shelves]
        aggregated = KVOutputAggregator(expected_finished_count=2).aggregate(outputs)
        scheduler = SchedulerEvents()
        scheduler.add(aggregated.kv_connector_output.kv_cache_events)
        stored = {digest for event in scheduler.take() for digest in event.block_hashes}
        expected = {key.digest for rank, shelf in enumerate(shelves)
                    for key in shelf.chunk_keys(TOKENS, prompt.with_rank(rank).namespace)}
        assert stored == expected and len(expected) == 6
        assert scheduler.take() == []
    finally:
        for shelf in shelves:
            shelf.close()


def test_scheduler_events_are_bounded_and_ignore_other_connectors_events():
    scheduler = SchedulerEvents(max_events=2)
    removals = [BlockRemoved(block_hashes=[key(index).digest], medium="CPU") for index in range(3)]
    scheduler.add(KVShelfKVEvents(removals))
    scheduler.add(None)
    assert scheduler.take() == removals[1:] and scheduler.num_dropped == 1


@pytest.mark.parametrize("num_workers", [1, 3])
def test_kvshelf_kv_events_keep_every_workers_events(num_workers):
    first = KVShelfKVEvents([BlockRemoved(block_hashes=[key(0).digest], medium="CPU")])
    for index in range(1, num_workers):
        first.add_events([BlockRemoved(block_hashes=[key(index).digest], medium="CPU")])
        first.increment_workers()
    assert first.aggregate() is first
    assert (len(first.get_all_events()), first.get_number_of_workers()) == (num_workers, num_workers)
    first.clear_events()
    assert (first.get_all_events(), first.get_number_of_workers()) == ([], 1)
