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
    tier = MemoryTier(capacity_bytes=3 * 40)
    tier.put_many([(key(i), torch.zeros(10)) for i in range(3)])
    tier.get_many([key(0)])  # 0 is now the most recent; 1 the least
    tier.put_many([(key(3), torch.zeros(10))])
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
