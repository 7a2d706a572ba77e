"""The vLLM worker's background transfers, on a real shelf and a real paged cache (no engine).

What vLLM relies on: a background load is reported finished exactly once, with its failed blocks
reported no later than that; a background save keeps the request's blocks (not reported) until
its KV is copied out and vLLM has finished the request; a preempted request's blocks are not
handed back to vLLM while a save still reads them; a load waiting for KV a prefill instance is
handing over picks it up when it arrives.
"""

import threading
import time

import pytest
import torch

from kvshelf import Namespace, Shelf, load_config
from kvshelf.integrations.vllm.context import EngineFacts
from kvshelf.integrations.vllm.paged import PagedKV
from kvshelf.integrations.vllm.plan import StepPlan, Transfer
from kvshelf.integrations.vllm.worker import JobThread, WorkerSide
from kvshelf.keys import Prompt
from kvshelf.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4)
BLOCK_SIZE, CHUNK_SIZE, NUM_BLOCKS = 4, 8, 12
TOKENS = list(range(100, 116))  # two chunks of 8, each two blocks of 4
BLOCK_IDS = [5, 2, 7, 1]
STALE = -3.0
SECRET = "a-test-deployment-secret-of-32-characters-or-more"
PATIENCE_S = 60.0  # how long a test waits for a background job before failing (a hang, not a timing check)


@pytest.fixture
def namespace() -> Namespace:
    return Namespace("test-model@1", LAYOUT)


def make_worker(shelf: Shelf, namespace: Namespace) -> WorkerSide:
    worker = WorkerSide(shelf, EngineFacts(namespace, BLOCK_SIZE), tp_rank=0, cpu_isa=None)
    worker.register({f"layer.{i}": torch.full((NUM_BLOCKS, LAYOUT.num_kv_heads, BLOCK_SIZE, 2 * LAYOUT.head_dim),
                                              STALE) for i in range(LAYOUT.num_layers)})
    return worker


def disk_shelf(tmp_path) -> Shelf:
    """A shelf over the disk tier in `tmp_path`: another process's, when one is open already."""
    return Shelf(load_config(environ={}, chunk_size=CHUNK_SIZE, memory_size="1MiB", security_key=SECRET,
                             disk_path=str(tmp_path / "disk")))


@pytest.fixture
def shelf(tmp_path):
    with disk_shelf(tmp_path) as shelf:
        yield shelf


@pytest.fixture
def worker(shelf, namespace):
    worker = make_worker(shelf, namespace)
    yield worker
    worker.close()


def kv_of(num_tokens: int = len(TOKENS), seed: int = 1) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(num_tokens), generator=torch.Generator().manual_seed(seed))


def transfer(namespace: Namespace, request_id: str = "request-1", **fields) -> Transfer:
    return Transfer(request_id, Prompt(TOKENS, namespace), (BLOCK_IDS,), start=0, end=len(TOKENS), **fields)


def finished(worker: WorkerSide, finished_ids: set[str] = frozenset()) -> tuple[set[str], set[str], set[int]]:
    """Ask like vLLM until something is reported: (sent, loaded, failed blocks)."""
    deadline_s = time.monotonic() + PATIENCE_S
    while True:
        sent, loaded = worker.finished(set(finished_ids))
        failed = worker.take_failed_block_ids()
        if sent or loaded or time.monotonic() > deadline_s:
            return sent or set(), loaded or set(), failed
        time.sleep(0.01)


def test_a_background_load_fills_the_blocks_and_is_reported_once(worker, shelf, namespace):
    kv = kv_of()
    shelf.save(TOKENS, kv, namespace)
    worker.begin_step(StepPlan(async_loads=[transfer(namespace)]))
    assert finished(worker) == (set(), {"request-1"}, set())
    assert torch.equal(worker.paged.gather((BLOCK_IDS,)), kv)
    assert worker.finished(set()) == (None, None)


def test_a_background_load_of_a_missing_chunk_reports_its_blocks_with_the_request(worker, shelf, namespace):
    kv = kv_of()
    shelf.save(TOKENS[:CHUNK_SIZE], kv[:, :, :CHUNK_SIZE], namespace)  # the second chunk was never stored
    worker.begin_step(StepPlan(async_loads=[transfer(namespace)]))
    sent, loaded, failed = finished(worker)
    assert loaded == {"request-1"} and failed == {7, 1}
    assert torch.equal(worker.paged.gather((BLOCK_IDS[:2],)), kv[:, :, :CHUNK_SIZE])


def test_a_background_load_from_disk_in_a_fresh_process_is_exact(shelf, namespace, tmp_path):
    kv = kv_of()
    shelf.save(TOKENS, kv, namespace)
    shelf.flush()
    with disk_shelf(tmp_path) as other:
        assert other.locate(Prompt(TOKENS, namespace)) == ["disk", "disk"]
        worker = make_worker(other, namespace)
        try:
            worker.begin_step(StepPlan(async_loads=[transfer(namespace)]))
            assert finished(worker)[1] == {"request-1"}
            assert torch.equal(worker.paged.gather((BLOCK_IDS,)), kv)
        finally:
            worker.close()


def test_a_background_save_holds_the_blocks_until_the_request_finishes(worker, shelf, namespace):
    kv = kv_of()
    worker.paged.scatter(kv, (BLOCK_IDS,), first_token=0, num_tokens=len(TOKENS))
    worker.save(StepPlan(saves=[transfer(namespace)], background_saves=True), set())
    worker._saver.submit(lambda: None)  # a marker: once it ran, the save before it is done
    deadline_s = time.monotonic() + PATIENCE_S
    while shelf.lookup(TOKENS, namespace) < len(TOKENS) and time.monotonic() < deadline_s:
        time.sleep(0.01)
    assert shelf.lookup(TOKENS, namespace) == len(TOKENS)
    assert worker.finished(set()) == (None, None)  # still running in vLLM: nothing to report
    assert finished(worker, {"request-1", "another-request"}) == ({"request-1"}, set(), set())
    assert worker.finished({"request-1"}) == (None, None)  # reported once


class SlowPaged(PagedKV):
    """Copies out only when the test lets it."""

    def __init__(self, paged: PagedKV) -> None:
        super().__init__(paged.layers)
        self.go = threading.Event()

    def gather(self, block_ids, num_tokens=None, out=None):
        assert self.go.wait(PATIENCE_S)
        return super().gather(block_ids, num_tokens, out)


def test_a_preempted_requests_blocks_wait_for_its_save_to_copy_them(worker, shelf, namespace):
    kv = kv_of()
    worker.paged.scatter(kv, (BLOCK_IDS,), first_token=0, num_tokens=len(TOKENS))
    worker.paged = slow = SlowPaged(worker.paged)
    worker.save(StepPlan(saves=[transfer(namespace)], background_saves=True), set())
    drained = threading.Thread(target=worker.begin_step, args=(StepPlan(preempted=["request-1"]),))
    drained.start()
    drained.join(0.2)
    assert drained.is_alive()  # the save has not copied the blocks yet: vLLM must not reuse them
    worker.begin_step(StepPlan(preempted=["another-request"]))  # others are not held up
    slow.go.set()
    drained.join(PATIENCE_S)
    assert not drained.is_alive()
    worker.close()  # runs what is queued
    assert shelf.lookup(TOKENS, namespace) == len(TOKENS)
    stored = shelf.load(TOKENS, namespace, len(TOKENS))
    assert torch.equal(stored.kv(), kv)


def test_a_load_waits_for_kv_being_handed_over(worker, shelf, namespace):
    kv = kv_of()
    worker.begin_step(StepPlan(async_loads=[transfer(namespace, wait_s=PATIENCE_S)]))
    assert worker.finished(set()) == (None, None)  # nothing there yet: it waits
    shelf.save(TOKENS, kv, namespace)  # ... as a push arriving in the inbox would
    assert finished(worker) == (set(), {"request-1"}, set())
    assert torch.equal(worker.paged.gather((BLOCK_IDS,)), kv)


def test_a_load_waiting_for_a_hand_over_that_never_comes_fails_its_blocks(worker, namespace):
    worker.begin_step(StepPlan(async_loads=[transfer(namespace, wait_s=0.05)]))
    sent, loaded, failed = finished(worker)
    assert loaded == {"request-1"} and failed == set(BLOCK_IDS)


def test_a_prefetch_promotes_lower_tier_chunks_to_memory(shelf, namespace, tmp_path):
    kv = kv_of()
    shelf.save(TOKENS, kv, namespace)
    shelf.flush()
    with disk_shelf(tmp_path) as other:
        worker = make_worker(other, namespace)
        prompt = Prompt(TOKENS, namespace)
        worker.prefetch("request-1", prompt, other.locate(prompt))
        worker._loader.submit(lambda: None)
        worker.close()  # runs what is queued
        assert other.locate(prompt) == ["memory", "memory"]


def test_a_prefetch_for_a_finished_request_is_dropped(shelf, namespace, tmp_path):
    shelf.save(TOKENS, kv_of(), namespace)
    shelf.flush()
    with disk_shelf(tmp_path) as other:
        worker = make_worker(other, namespace)
        gate = threading.Event()
        worker._loader.submit(lambda: gate.wait(PATIENCE_S))  # the loader is busy with an earlier load
        prompt = Prompt(TOKENS, namespace)
        worker.prefetch("request-1", prompt, ["disk", "disk"])
        worker.finished({"request-1"})  # vLLM finished (aborted) it before its prefetch ran
        gate.set()
        worker.close()
        assert other.locate(prompt) == ["disk", "disk"]


def test_loads_run_before_prefetches_queued_earlier():
    """Two hits arriving together: the first's load must not wait for the second's prefetch."""
    jobs, ran, gate = JobThread("test-jobs"), [], threading.Event()
    try:
        jobs.submit(lambda: gate.wait(PATIENCE_S))  # busy
        for name, urgent in (("prefetch-1", False), ("prefetch-2", False), ("load-1", True), ("load-2", True)):
            jobs.submit(lambda name=name: ran.append(name), urgent=urgent)
        gate.set()
    finally:
        jobs.close()  # runs what is queued
    assert ran == ["load-1", "load-2", "prefetch-1", "prefetch-2"]


def test_a_load_reads_for_itself_and_drops_its_prefetch_still_queued(shelf, namespace, tmp_path):
    kv = kv_of()
    shelf.save(TOKENS, kv, namespace)
    shelf.flush()
    with disk_shelf(tmp_path) as other:
        worker = make_worker(other, namespace)
        try:
            gate = threading.Event()
            worker._loader.submit(lambda: gate.wait(PATIENCE_S))  # busy: the prefetch stays queued
            worker.prefetch("request-1", Prompt(TOKENS, namespace), ["disk", "disk"])
            worker.begin_step(StepPlan(async_loads=[transfer(namespace)]))
            gate.set()
            assert finished(worker)[1] == {"request-1"}
            assert torch.equal(worker.paged.gather((BLOCK_IDS,)), kv)
        finally:
            worker.close()
        tiers = other.stats()["tiers"]
        # Read once, from disk, by the load; the prefetch then had nothing to do and did not run.
        assert tiers["disk"]["loaded_bytes"] > 0 and tiers["memory"]["loaded_bytes"] == 0


def test_a_lookup_answer_keeps_only_what_loads_faster_than_it_computes_and_prefetches_it(shelf, namespace):
    worker = make_worker(shelf, namespace)
    try:
        prompt = Prompt(TOKENS, namespace)
        gate = threading.Event()
        worker._loader.submit(lambda: gate.wait(PATIENCE_S))  # hold the prefetch in the queue to see it
        assert worker.located("request-1", prompt, ["memory", "disk"]) == ["memory", "disk"]  # nothing measured
        assert worker._prefetching == {"request-1"}
        # This engine computes 128 tokens in a microsecond, the disk reads a byte a second.
        shelf.cost.note_prefill(128, 1e-6)
        shelf._stack.lower[0].codecs.note_read(1, 1.0)
        assert worker.located("request-2", prompt, ["memory", "disk"]) == ["memory"]
        assert shelf.stats()["load_refused_tokens"] == CHUNK_SIZE
        gate.set()
    finally:
        worker.close()


def test_layers_go_into_chunks_in_model_order_whatever_order_vllm_registers_them(shelf, namespace):
    # With its hybrid allocator vLLM registers layers group by group; a chunk must not depend on that.
    names = [f"model.layers.{index}.self_attn.attn" for index in (1, 3, 10, 0, 2)]  # windowed group, then full
    groups = {name: 0 if index < 3 else 1 for index, name in enumerate(names)}
    facts = EngineFacts(namespace, BLOCK_SIZE, windows=(48, None), layer_groups=groups)
    worker = WorkerSide(shelf, facts, tp_rank=0, cpu_isa=None)
    worker.register({name: torch.full((NUM_BLOCKS, LAYOUT.num_kv_heads, BLOCK_SIZE, 2 * LAYOUT.head_dim),
                                      float(name.split(".")[2])) for name in names})
    assert [keys[0, 0, 0, 0].item() for keys, _ in worker.paged.layers] == [0, 1, 2, 3, 10]
    assert worker.paged.groups == [1, 0, 1, 0, 0]
    worker.close()
