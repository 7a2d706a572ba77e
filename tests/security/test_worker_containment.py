"""The vLLM worker contains whatever a store or the shelf does to one transfer.

vLLM's EngineCore dies on an exception out of start_load_kv (or wait_for_save), and a chunk of
fewer layers would leave another request's stale KV in the layers it does not cover. Here the
real worker, over a real shelf and a real paged cache, meets chunks of the wrong shape and
tiers that raise: each time the transfer's blocks are reported failed (vLLM recomputes them),
the blocks are never written with the wrong chunk, and nothing is raised.
"""

import logging

import pytest
import torch

from kvshelf import Namespace, Shelf, load_config
from kvshelf.disagg.transfer import KVPusher
from kvshelf.integrations.vllm.context import EngineFacts
from kvshelf.integrations.vllm.plan import StepPlan, Transfer
from kvshelf.integrations.vllm.worker import WorkerSide
from kvshelf.keys import Prompt
from kvshelf.layout import KVLayout
from kvshelf.tiers.memory import MemoryTier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4)
BLOCK_SIZE, CHUNK_SIZE, NUM_BLOCKS = 4, 8, 10
TOKENS = list(range(100, 116))  # two chunks of 8, each two blocks of 4
BLOCK_IDS = [5, 2, 7, 1]  # the request's blocks, in token order
STALE = -3.0  # what the blocks held before: another request's KV
SECRET = "a-test-deployment-secret-of-32-characters-or-more"


@pytest.fixture
def shelf():
    with Shelf(load_config(environ={}, chunk_size=CHUNK_SIZE, memory_size="1MiB", security_key=SECRET)) as shelf:
        yield shelf


@pytest.fixture
def namespace() -> Namespace:
    return Namespace("test-model@1", LAYOUT)


@pytest.fixture
def worker(shelf, namespace):
    worker = WorkerSide(shelf, EngineFacts(namespace, BLOCK_SIZE), tp_rank=0, cpu_isa=None)
    # vLLM's GPU layout per layer (blocks, kv_heads, block_size, 2 * head_dim), viewed by block_views.
    worker.register({f"layer.{i}": torch.full((NUM_BLOCKS, LAYOUT.num_kv_heads, BLOCK_SIZE, 2 * LAYOUT.head_dim),
                                              STALE) for i in range(LAYOUT.num_layers)})
    yield worker
    worker.close()


def genuine_kv(num_tokens: int = len(TOKENS)) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(num_tokens), generator=torch.Generator().manual_seed(1))


def transfer(namespace: Namespace, tokens=TOKENS, block_ids=BLOCK_IDS, **fields) -> Transfer:
    return Transfer("request-1", Prompt(tokens, namespace), (list(block_ids),), start=0, end=len(tokens), **fields)


def blocks(worker: WorkerSide, block_ids) -> torch.Tensor:
    """The KV in `block_ids`, in order (layers, 2, tokens, kv_heads, head_dim)."""
    return worker.paged.gather((block_ids,))


def plant(shelf: Shelf, namespace: Namespace, index: int, chunk: torch.Tensor, tokens=TOKENS) -> None:
    """Put `chunk` in the memory tier under the key of the prompt's chunk `index`, as a tier
    that let a bad chunk through would hand it to the worker."""
    key = shelf.chunk_keys(tokens, namespace, tail=True)[index]
    shelf._stack.memory.put_many([(key, chunk)])


def test_a_genuine_prefix_loads_into_the_blocks(worker, shelf, namespace):
    kv = genuine_kv()
    shelf.save(TOKENS, kv, namespace)
    worker.load(StepPlan(loads=[transfer(namespace)]))
    assert worker.take_failed_block_ids() == set() and worker.num_load_failed_tokens == 0
    assert torch.equal(blocks(worker, BLOCK_IDS), kv)


WRONG_SECOND_CHUNKS = {
    "fewer layers": (1, 2, CHUNK_SIZE, 2, 4),
    "fewer tokens": (2, 2, CHUNK_SIZE - 1, 2, 4),
    "more tokens": (2, 2, CHUNK_SIZE + 4, 2, 4),
    "other kv heads": (2, 2, CHUNK_SIZE, 1, 4),
    "other head_dim": (2, 2, CHUNK_SIZE, 2, 8),
    "not a chunk": (2, 2, CHUNK_SIZE * 8),
}


@pytest.mark.parametrize("shape", WRONG_SECOND_CHUNKS.values(), ids=WRONG_SECOND_CHUNKS.keys())
def test_a_chunk_of_the_wrong_shape_fails_its_blocks_and_writes_none_of_them(worker, shelf, namespace, shape):
    kv = genuine_kv()
    shelf.save(TOKENS, kv, namespace)
    plant(shelf, namespace, 1, torch.full(shape, 9.0))
    worker.load(StepPlan(loads=[transfer(namespace)]))
    assert worker.take_failed_block_ids() == {7, 1} and worker.num_load_failed_tokens == CHUNK_SIZE
    assert torch.equal(blocks(worker, [5, 2]), kv[:, :, :CHUNK_SIZE])  # the first chunk is genuine: loaded
    assert (blocks(worker, [7, 1]) == STALE).all()  # recomputed by vLLM, never written with the bad chunk


def test_a_chunk_of_another_dtype_fails_its_blocks(worker, shelf, namespace):
    shelf.save(TOKENS, genuine_kv(), namespace)
    plant(shelf, namespace, 0, genuine_kv()[:, :, :CHUNK_SIZE].half())
    worker.load(StepPlan(loads=[transfer(namespace)]))
    assert worker.take_failed_block_ids() == set(BLOCK_IDS) and (blocks(worker, BLOCK_IDS) == STALE).all()


def test_a_tail_of_a_full_chunks_length_fails(worker, shelf, namespace):
    """A prompt's last partial chunk must hold exactly its own tokens."""
    tokens = TOKENS[:12]  # a full chunk, then a tail of 4
    kv = genuine_kv(len(tokens))
    shelf.save_chunks(tokens, namespace, lambda index: kv[:, :, index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE].clone(),
                      tail=True)
    plant(shelf, namespace, 1, genuine_kv(CHUNK_SIZE), tokens)
    worker.load(StepPlan(loads=[transfer(namespace, tokens, BLOCK_IDS[:3])]))
    assert worker.take_failed_block_ids() == {7} and worker.num_load_failed_tokens == 4


class FailingMemoryTier(MemoryTier):
    """A memory tier with a bug: every read and write raises what no caller expects."""

    def get_many(self, keys):
        raise RuntimeError("a bug deep in a tier")

    def put_many(self, items):
        raise RuntimeError("a bug deep in a tier")


def test_an_exception_while_loading_fails_the_transfer_in_one_line(worker, shelf, namespace, caplog):
    shelf._stack.memory = FailingMemoryTier(2**20)
    with caplog.at_level(logging.WARNING, logger="kvshelf.integrations.vllm.worker"):
        worker.load(StepPlan(loads=[transfer(namespace)]))
    assert worker.take_failed_block_ids() == set(BLOCK_IDS) and worker.num_load_failed_tokens == len(TOKENS)
    [record] = caplog.records
    assert "RuntimeError: a bug deep in a tier" in record.getMessage() and record.exc_info is None


def test_an_exception_while_scattering_fails_the_transfer(worker, shelf, namespace):
    shelf.save(TOKENS, genuine_kv(), namespace)
    worker.load(StepPlan(loads=[transfer(namespace, block_ids=[5, 2, 7, NUM_BLOCKS + 90])]))  # no such block
    assert worker.take_failed_block_ids() == {5, 2, 7, NUM_BLOCKS + 90}
    assert worker.num_load_failed_tokens == len(TOKENS)


def test_one_failing_transfer_leaves_the_others_loaded(worker, shelf, namespace):
    kv = genuine_kv()
    shelf.save(TOKENS, kv, namespace)
    other_tokens = list(range(200, 208))
    shelf.save(other_tokens, torch.zeros(LAYOUT.shape(8)), namespace)
    plant(shelf, namespace, 0, torch.zeros(1, 2, CHUNK_SIZE, 2, 4), other_tokens)
    failing = Transfer("request-2", Prompt(other_tokens, namespace), ([3, 4],), start=0, end=8)
    worker.load(StepPlan(loads=[failing, transfer(namespace)]))
    assert worker.take_failed_block_ids() == {3, 4}
    assert torch.equal(blocks(worker, BLOCK_IDS), kv)


def test_an_exception_while_saving_is_counted_not_raised(worker, shelf, namespace):
    shelf._stack.memory = FailingMemoryTier(2**20)
    worker.save(StepPlan(saves=[transfer(namespace)]), set())
    assert shelf.stats()["dropped_writes"] == 1


class FailingPusher(KVPusher):
    """A pusher with a bug: it raises instead of reporting a failed push."""

    def push(self, address, keys, chunk_at):
        raise RuntimeError("a bug in the pusher")


def test_an_exception_while_pushing_hands_the_kv_over_through_the_shelf(worker, shelf, namespace):
    worker.hand_over._pusher = FailingPusher(1.0, worker.transfer_counters, shelf.keyring)
    handed_over = transfer(namespace, hand_over=True, push_to="tcp://127.0.0.1:9")
    worker.save(StepPlan(saves=[handed_over]), set())
    assert worker.transfer_counters.push_failures == 1
    assert shelf.lookup(TOKENS, namespace) == len(TOKENS)  # saved: the decode side finds it in the shared tiers
