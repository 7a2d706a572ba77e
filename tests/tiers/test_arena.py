import mmap
import random
import threading
import time

import numpy as np
import pytest
import redis
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshelf import ChunkKey
from kvshelf.codecs import frame
from kvshelf.codecs.quantized import Int8Codec
from kvshelf.tiers.arena import ALIGN_BYTES, PREFAULT_MIN_BYTES, Arena, advise, buffer_address
from kvshelf.tiers.disk import chunk_path
from kvshelf.tiers.memory import MemoryTier
from tests.conftest import CHUNK_SIZE, random_kv

TOKENS = list(range(300, 316))  # 4 chunks


def key(index: int) -> ChunkKey:
    return ChunkKey("0123456789abcdef", index.to_bytes(32, "little"))


def offset(arena: Arena, buffer) -> int:
    return buffer_address(buffer) - arena.address


def wait_until(condition, what: str, timeout_s: float = 60.0) -> None:
    """For the pre-fault thread's progress: a bound on a hang, not a timing assertion."""
    deadline_s = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline_s:
            raise AssertionError(f"{what} never happened")
        time.sleep(0.01)


# --- the arena ---


def test_buffers_are_writable_aligned_and_freed_with_their_last_view():
    arena = Arena(1 << 20, prefault=False)
    buffer = arena.allocate(1000, aligned_at=68)
    assert len(buffer) == 1000 and (buffer_address(buffer) + 68) % ALIGN_BYTES == 0
    buffer[:4] = b"kvsh"
    assert arena.used_bytes == 1088  # 60 bytes of padding before, rounded up to a multiple of ALIGN_BYTES
    views = [np.frombuffer(buffer, dtype=np.uint8)[10:], torch.frombuffer(buffer, dtype=torch.uint8)[4:].view(-1),
             buffer[500:]]
    del buffer
    for index in range(len(views)):
        assert arena.used_bytes == 1088, f"freed while view {index} and later ones still held it"
        views[index] = None
    assert arena.used_bytes == 0 and arena.num_free_ranges() == 1


def test_freed_memory_is_reused_best_fit_lowest_first():
    arena = Arena(64 * ALIGN_BYTES, prefault=False)
    small, large, tail = arena.allocate(ALIGN_BYTES), arena.allocate(8 * ALIGN_BYTES), arena.allocate(ALIGN_BYTES)
    small_at, large_at = offset(arena, small), offset(arena, large)
    del small, large
    # The smallest hole that fits is taken: the freed small slot, not the large one or the free tail.
    assert offset(arena, again := arena.allocate(ALIGN_BYTES)) == small_at
    assert offset(arena, arena.allocate(3 * ALIGN_BYTES)) == large_at
    del again, tail


def test_a_full_arena_says_so_and_fragments_merge_back():
    arena = Arena(16 * ALIGN_BYTES, prefault=False)
    slots = [arena.allocate(ALIGN_BYTES) for _ in range(16)]
    assert arena.allocate(1) is None
    del slots[::2]  # 8 holes of one slot each
    assert arena.num_free_ranges() == 8
    assert arena.allocate(2 * ALIGN_BYTES) is None and arena.can_hold(2 * ALIGN_BYTES)
    assert not arena.can_hold(16 * ALIGN_BYTES + 1)
    slots.clear()
    assert arena.num_free_ranges() == 1 and arena.allocate(16 * ALIGN_BYTES) is not None


def test_release_frees_at_once_and_only_once():
    arena = Arena(4 * ALIGN_BYTES, prefault=False)
    failed = arena.allocate(ALIGN_BYTES)
    arena.release(buffer_address(failed))
    assert arena.used_bytes == 0
    reused = arena.allocate(ALIGN_BYTES)
    assert buffer_address(reused) == buffer_address(failed)
    del failed  # its finalizer is spent: the slot now in use is not freed again
    assert arena.used_bytes == ALIGN_BYTES
    arena.release(buffer_address(np.empty(4)))  # not the arena's: ignored
    assert arena.used_bytes == ALIGN_BYTES


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5000), st.integers(0, 100)), max_size=80))
def test_slots_never_overlap_and_all_come_back(operations):
    arena = Arena(64 * 2**10, prefault=False)
    held: list[tuple[memoryview, int]] = []
    for serial, (free, num_bytes, aligned_at) in enumerate(operations):
        if free and held:
            held.pop(num_bytes % len(held))
            continue
        buffer = arena.allocate(num_bytes, aligned_at)
        if buffer is not None:
            np.frombuffer(buffer, dtype=np.uint8)[:] = serial % 251
            held.append((buffer, serial % 251))
        buffer = None
        assert arena.used_bytes <= arena.size_bytes
    assert all((np.frombuffer(buffer, dtype=np.uint8) == fill).all() for buffer, fill in held)
    held.clear()
    assert arena.used_bytes == 0 and arena.num_free_ranges() == 1


def test_threads_allocating_and_freeing_at_once():
    arena = Arena(1 << 20, prefault=False)
    errors = []

    def work(thread_id: int) -> None:
        rng = random.Random(thread_id)
        held = []
        for _ in range(2000):
            if held and rng.random() < 0.5:
                buffer = held.pop(rng.randrange(len(held)))
                if not (np.frombuffer(buffer, dtype=np.uint8) == thread_id).all():
                    errors.append(f"thread {thread_id}: its buffer was overwritten")
                continue
            buffer = arena.allocate(rng.randrange(1, 4000))
            if buffer is not None:
                np.frombuffer(buffer, dtype=np.uint8)[:] = thread_id
                held.append(buffer)

    threads = [threading.Thread(target=work, args=(thread_id,)) for thread_id in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and arena.used_bytes == 0 and arena.num_free_ranges() == 1


def test_huge_page_advice_is_skipped_where_unsupported():
    mapping = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    assert advise(mapping, 12345) is False  # no such advice: refused by the kernel, and nothing raised
    assert Arena(1 << 20, prefault=False).huge_pages in (True, False)
    assert Arena(0).allocate(1) is None and not Arena(ALIGN_BYTES - 1).huge_pages


def test_prefault_runs_ahead_of_use_and_keeps_what_is_written():
    size_bytes = 160 * 2**20
    arena = Arena(size_bytes)
    wait_until(lambda: arena.faulted_bytes == PREFAULT_MIN_BYTES, "the first pre-fault")
    # Past the faulted part: the thread is told to fault in twice the highest byte allocated
    # (here all of it), and faults over memory already written without changing it.
    buffer = arena.allocate(100 * 2**20)
    pattern = np.arange(len(buffer), dtype=np.uint64).astype(np.uint8)
    np.frombuffer(buffer, dtype=np.uint8)[:] = pattern
    wait_until(lambda: arena.faulted_bytes == size_bytes, "pre-faulting the rest")
    assert (np.frombuffer(buffer, dtype=np.uint8) == pattern).all()
    arena.close()
    assert arena.allocate(1) is None and buffer[0] == 0  # closed: nothing new; the mapping lives with its views


def mapped(address: int) -> bool:
    for line in open("/proc/self/maps"):
        start, end = (int(bound, 16) for bound in line.split()[0].split("-"))
        if start <= address < end:
            return True
    return False


def test_a_closed_arena_is_unmapped_with_its_last_view():
    arena = Arena(8 * 2**20)
    buffer = arena.allocate(100)
    arena.close()
    assert mapped(arena.address)
    del buffer
    assert not mapped(arena.address)


# --- the memory tier in its arena ---


def test_chunks_are_kept_in_the_arena_without_a_copy_when_they_are_there_already():
    tier = MemoryTier(1 << 20, prefault=False)
    made = tier.allocate((2, 2, 4, 2, 4), torch.float32).fill_(3.0)
    outside = torch.full((2, 2, 4, 2, 4), 5.0)
    tier.put_many([(key(0), made), (key(1), outside)])
    held_made, held_outside = tier.get_many([key(0), key(1)])
    assert held_made.data_ptr() == made.data_ptr()
    assert held_outside.data_ptr() != outside.data_ptr() and tier.arena.owns(held_outside.data_ptr())
    assert torch.equal(held_outside, outside)


def test_a_chunk_someone_holds_stays_intact_after_eviction():
    chunk_bytes = 16 * 4
    tier = MemoryTier(3 * chunk_bytes, prefault=False)
    tier.put_many([(key(i), torch.full((16,), float(i))) for i in range(3)])
    [held] = tier.get_many([key(0)])
    tier.put_many([(key(i), torch.full((16,), float(i))) for i in range(3, 9)])  # 0 evicted long ago
    assert tier.get_many([key(0)]) == [None] and torch.equal(held, torch.full((16,), 0.0))
    # Its memory is still taken: the tier holds what fits around it.
    assert tier.arena.used_bytes == 3 * chunk_bytes and len(tier) == 2
    del held
    tier.put_many([(key(9), torch.zeros(16))])
    assert len(tier) == 3


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 400)), max_size=60))
def test_mixed_sizes_under_pressure_keep_every_chunk_intact(puts):
    tier = MemoryTier(4096, prefault=False)
    for index, num_floats in puts:
        tier.put_many([(key(index), torch.full((num_floats,), float(index)))])
        assert tier.used_bytes <= tier.capacity_bytes and tier.arena.used_bytes <= tier.arena.size_bytes
    for index in range(31):
        [chunk] = tier.get_many([key(index)])
        assert chunk is None or (chunk == float(index)).all()


def test_a_buffer_the_arena_cannot_hold_is_plain_memory_and_not_stored():
    tier = MemoryTier(1024, prefault=False)
    tensor = tier.allocate((512,), torch.float32)  # 2 KiB
    assert not tier.arena.owns(tensor.data_ptr()) and len(tier.read_buffer(4096)) == 4096
    tier.put_many([(key(0), torch.zeros(200))])  # 800 bytes fit
    tier.put_many([(key(1), torch.zeros(512))])  # over the budget: not stored, nothing evicted
    assert [chunk is not None for chunk in tier.get_many([key(0), key(1)])] == [True, False]


# --- loads land in the arena ---


def memory_of(shelf):
    return shelf._stack.memory


@pytest.mark.parametrize("codec", ["raw", "int8"])
def test_a_disk_hit_is_read_and_decoded_into_the_arena_and_promoted_without_a_copy(make_shelf, namespace, codec):
    writer = make_shelf(disk_codec=codec)
    kv = random_kv(len(TOKENS))
    writer.save(TOKENS, kv, namespace)
    writer.flush()
    reader = make_shelf(disk_codec=codec)
    loaded = reader.load(TOKENS, namespace, len(TOKENS))
    memory = memory_of(reader)
    assert loaded.num_tokens == len(TOKENS)
    assert all(memory.arena.owns(chunk.data_ptr()) for chunk in loaded.chunks)
    promoted = memory.get_many(reader.chunk_keys(TOKENS, namespace))
    assert [chunk.data_ptr() for chunk in promoted] == [chunk.data_ptr() for chunk in loaded.chunks]
    if codec == "raw":
        assert torch.equal(loaded.kv(), kv)
    else:
        assert torch.allclose(loaded.kv(), kv, atol=0.05)


def stored_in_redis(make_shelf, namespace, redis_server):
    """Random KV of TOKENS stored through one shelf, and another shelf on the same Redis to read it."""
    kv = random_kv(len(TOKENS))
    writer = make_shelf(disk_path=None, redis_url=redis_server.url)
    writer.save(TOKENS, kv, namespace)
    writer.flush()
    return kv, make_shelf(disk_path=None, redis_url=redis_server.url)


def test_a_redis_hit_is_read_into_the_arena(make_shelf, namespace, redis_server):
    kv, reader = stored_in_redis(make_shelf, namespace, redis_server)
    loaded = reader.load(TOKENS, namespace, len(TOKENS))
    assert torch.equal(loaded.kv(), kv)
    assert all(memory_of(reader).arena.owns(chunk.data_ptr()) for chunk in loaded.chunks)


def test_a_missing_redis_value_and_an_error_reply_are_misses_read_past(make_shelf, namespace, redis_server):
    kv, reader = stored_in_redis(make_shelf, namespace, redis_server)
    keys = reader.chunk_keys(TOKENS, namespace)
    client = redis.Redis.from_url(redis_server.url)
    client.delete(f"kvshelf:{keys[1].namespace_id}:{keys[1].hex}")
    client.delete(f"kvshelf:{keys[2].namespace_id}:{keys[2].hex}")
    client.rpush(f"kvshelf:{keys[2].namespace_id}:{keys[2].hex}", b"not a string")  # GET answers WRONGTYPE
    client.close()
    tier = reader._stack.lower[0].tier
    blobs = tier.get_many(keys, memory_of(reader).read_buffer)
    assert [blob is None for blob in blobs] == [False, True, True, False]
    assert bytes(blobs[3]) == redis_server.client().get(f"kvshelf:{keys[3].namespace_id}:{keys[3].hex}")


def test_a_chunk_failing_verification_gives_its_arena_memory_back(make_shelf, namespace):
    writer = make_shelf()
    writer.save(TOKENS, random_kv(len(TOKENS)), namespace)
    writer.flush()
    keys = writer.chunk_keys(TOKENS, namespace)
    path = chunk_path(writer.config.disk.path, keys[0])
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0x01
    path.write_bytes(bytes(damaged))
    reader = make_shelf()
    assert reader.load(TOKENS, namespace, len(TOKENS)).num_tokens == 0
    assert reader.stats()["tiers"]["disk"]["corrupt_chunks"] == 1
    memory = memory_of(reader)
    assert len(memory) == 3  # the other chunks were read and promoted
    memory.delete(keys)
    assert memory.arena.used_bytes == 0  # the damaged chunk's memory came back at once


class UnknownVariant(Int8Codec):
    """int8's codec id with a payload variant no kvshelf knows: authentic, and it fails to decode."""

    def encode(self, kv: torch.Tensor) -> bytes:
        return b"\xff" + super().encode(kv)[1:]


def test_a_chunk_failing_to_decode_gives_its_arena_memory_back(make_shelf, namespace):
    reader = make_shelf(disk_codec="int8")
    [first] = reader.chunk_keys(TOKENS[:CHUNK_SIZE], namespace)
    reader.save(TOKENS[:CHUNK_SIZE], random_kv(CHUNK_SIZE), namespace)
    reader.flush()
    path = chunk_path(reader.config.disk.path, first)
    path.write_bytes(frame(random_kv(CHUNK_SIZE), first.digest, UnknownVariant(), reader.keyring))
    memory = memory_of(reader)
    memory.delete([first])
    assert reader.load(TOKENS, namespace, CHUNK_SIZE).num_tokens == 0  # decoding failed after allocating
    assert reader.stats()["tiers"]["disk"]["foreign_chunks"] == 1 and path.exists()  # a newer kvshelf's: left
    assert memory.arena.used_bytes == 0
