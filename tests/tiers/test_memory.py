import torch
from hypothesis import given
from hypothesis import strategies as st

from kvshelf import ChunkKey
from kvshelf.tiers.memory import MemoryTier


def key(index: int) -> ChunkKey:
    return ChunkKey("0123456789abcdef", index.to_bytes(32, "little"))


@given(st.integers(1, 4096), st.lists(st.tuples(st.integers(0, 20), st.integers(0, 300)), max_size=60))
def test_never_over_budget(capacity_bytes, puts):
    tier = MemoryTier(capacity_bytes)
    for index, num_floats in puts:
        tier.put_many([(key(index), torch.zeros(num_floats))])
        assert tier.used_bytes <= capacity_bytes
        assert tier.used_bytes == sum(chunk.nbytes for chunk in tier._chunks.values())


def test_evicts_least_recently_used():
    tier = MemoryTier(capacity_bytes=3 * 64)  # chunks take whole multiples of the arena's 64-byte alignment
    tier.put_many([(key(i), torch.zeros(16)) for i in range(3)])
    tier.get_many([key(0)])  # 0 is now the most recent; 1 the least
    tier.put_many([(key(3), torch.zeros(16))])
    assert [value is not None for value in tier.get_many([key(i) for i in range(4)])] == [True, False, True, True]
    assert tier.counters.num_evictions == 1


def test_chunk_larger_than_budget_is_not_stored():
    tier = MemoryTier(capacity_bytes=8)
    tier.put_many([(key(0), torch.zeros(4))])
    assert tier.get_many([key(0)]) == [None] and tier.used_bytes == 0


def test_contains_prefix_stops_at_first_gap():
    tier = MemoryTier(capacity_bytes=1000)
    tier.put_many([(key(0), torch.zeros(1)), (key(2), torch.zeros(1))])
    assert tier.contains_prefix([key(0), key(1), key(2)]) == 1


def test_stored_and_evicted_chunks_are_reported_outside_the_lock():
    tier = MemoryTier(capacity_bytes=2 * 64)
    events = []

    def note(kind):
        # Called outside the tier's lock: a listener may read the tier.
        return lambda name, keys: events.append((kind, name, [tier.contains_prefix([k]) for k in keys], list(keys)))

    tier.on_stored, tier.on_removed = note("stored"), note("removed")
    tier.put_many([(key(0), torch.zeros(16)), (key(1), torch.zeros(16))])
    tier.put_many([(key(1), torch.ones(16))])  # held already: not new
    tier.put_many([(key(2), torch.zeros(16))])  # evicts 0
    tier.delete([key(1)])  # deleted on request: not reported
    tier.allocate((32,), torch.float32)  # making room for the whole arena evicts 2
    assert events == [("stored", "memory", [1, 1], [key(0), key(1)]), ("removed", "memory", [0], [key(0)]),
                      ("stored", "memory", [1], [key(2)]), ("removed", "memory", [0], [key(2)])]


def test_a_batch_reports_its_net_change():
    tier = MemoryTier(capacity_bytes=64)
    events = []
    tier.on_stored = lambda name, keys: events.append(("stored", list(keys)))
    tier.on_removed = lambda name, keys: events.append(("removed", list(keys)))
    tier.put_many([(key(0), torch.zeros(16)), (key(1), torch.zeros(16))])  # 1 evicts 0 within the batch
    assert events == [("stored", [key(1)])] and tier.list_keys() == [key(1)]


def test_clear_drops_everything_and_reports_it():
    tier = MemoryTier(capacity_bytes=4 * 64)
    removed = []
    tier.on_removed = lambda name, keys: removed.extend(keys)
    tier.put_many([(key(i), torch.zeros(16)) for i in range(3)])
    tier.clear()
    assert removed == [key(0), key(1), key(2)] and len(tier) == 0 and tier.used_bytes == 0
    assert tier.arena.used_bytes == 0
