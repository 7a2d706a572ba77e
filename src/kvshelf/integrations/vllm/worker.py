"""The worker half: copy chunks between the shelf and vLLM's paged KV cache.

Loads the plan marks synchronous run in start_load_kv, before the forward pass; the others start
on a loader thread as the step begins (handle_preemptions) and run while the engine keeps
stepping, and get_finished reports them. Saves run in
wait_for_save, or with `transfer.mode: async` on a saver thread: the request's blocks are held
(the scheduler's request_finished returns delay-free) until its KV is copied out of them, then
get_finished reports the request and vLLM frees them; storing, pushing and writing through go on
from the copies. A request preempted with a copy still pending is waited for in
handle_preemptions, before vLLM overwrites its blocks.

Who owns which block when: a background load writes only blocks vLLM allocated to a request
waiting for it (WAITING_FOR_REMOTE_KVS), which vLLM neither reads nor frees until the load is
reported; a background save reads only blocks of a request that is running (its prompt's blocks
are never rewritten), finished (held by delay-free) or preempted (drained first).

A chunk that cannot be loaded (evicted, damaged, store down) reports its blocks as load errors,
so vLLM recomputes them: a failed load costs time, never correctness. Nothing a store holds may
reach vLLM's engine core as an exception (which kills it) or as KV of another shape (which
leaves stale KV in the layers it does not cover): each loaded chunk's shape is checked against
the paged cache before it is scattered, and any exception while loading, saving or handing over
one transfer is contained to that transfer, logged in one line (at most one per reason per
period) and counted.
"""

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable

import torch

from kvshelf.disagg.handover import HandOver
from kvshelf.disagg.transfer import TransferCounters
from kvshelf.integrations.vllm.context import EngineFacts, model_order
from kvshelf.integrations.vllm.paged import (
    NULL_BLOCK_ID,
    PagedKV,
    block_views,
    blocks_from,
    check_cpu_layout,
    check_cpu_mla_layout,
)
from kvshelf.integrations.vllm.plan import StepPlan, Transfer
from kvshelf.integrations.vllm.stats import flat_counters
from kvshelf.keys import Prompt
from kvshelf.layout import DTYPES
from kvshelf.ports import QuietLog
from kvshelf.shelf import Shelf
from kvshelf.threads import background_thread

logger = logging.getLogger(__name__)
HAND_OVER_POLL_S = 0.01  # how often a load waiting for handed-over KV looks again
MAX_QUEUED_PREFETCHES = 8


class JobThread:
    """One daemon thread running jobs in order, urgent ones before the rest; a failing job is
    logged and the next one runs."""

    def __init__(self, name: str) -> None:
        # (0 urgent | 1 not | 2 stop, submission order, job)
        self._jobs: queue.PriorityQueue[tuple[int, int, Callable[[], None] | None]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread = background_thread(self._run, name)

    def submit(self, job: Callable[[], None], urgent: bool = True) -> None:
        self._jobs.put((0 if urgent else 1, next(self._order), job))

    def close(self) -> None:
        """Run what is queued, then stop."""
        self._jobs.put((2, next(self._order), None))
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()[2]) is not None:
            try:
                job()
            except Exception:  # noqa: BLE001 - jobs contain their own failures; this is a last resort
                logger.exception("kvshelf: a background transfer failed")
            # Not held while waiting for the next: its chunks may be arena memory the tier evicts.
            job = None


class WorkerSide:
    def __init__(self, shelf: Shelf, facts: EngineFacts, tp_rank: int, cpu_isa: str | None) -> None:
        """`cpu_isa`: the CPU attention kernel's instruction set, on vLLM's CPU backend; else None."""
        self.shelf = shelf
        self.block_size = facts.block_size
        self.tp_rank = tp_rank
        self._head_dim = facts.base_namespace.layout.head_dim
        self._kind = facts.base_namespace.layout.kind
        self._layer_groups = facts.layer_groups
        self._dtype = facts.base_namespace.layout.torch_dtype
        self._compute_dtype = facts.compute_dtype
        shelf.check_layout(facts.base_namespace.layout)
        self._cpu_isa = cpu_isa
        self.paged: PagedKV | None = None
        self.transfer_counters = TransferCounters()
        self.hand_over = HandOver(shelf, self.transfer_counters)
        self._log = QuietLog(logger)
        self._reported: dict[str, int] = {}
        # Shared with the loader and saver threads, under _lock.
        self._lock = threading.Condition()
        self._failed_block_ids: set[int] = set()
        self.num_load_failed_tokens = 0
        self._loaded: set[str] = set()  # background loads done (or failed) since the last get_finished
        self._copying: Counter[str] = Counter()  # background saves per request still reading its blocks
        self._held: set[str] = set()  # requests whose blocks the scheduler holds for a background save
        self._finished: set[str] = set()  # ... of those, the ones vLLM has finished
        self._prefetching: set[str] = set()  # requests with a prefetch queued
        self._loader = JobThread("kvshelf-load")
        self._saver = JobThread("kvshelf-save")
        self._step_started_s = 0.0  # when this step's compute began: for the load-or-recompute estimate

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """vLLM's layer caches by layer name. A chunk holds them in model order: vLLM registers
        them in KV cache group order, which changes with its hybrid allocator on or off (a chunk
        stored one way would load into the wrong layers the other way)."""
        names = sorted(kv_caches, key=model_order)
        # An fp8 cache is allocated as bytes: viewed as its float8 type.
        caches = [kv_caches[name].view(self._dtype) if kv_caches[name].dtype == torch.uint8 else kv_caches[name]
                  for name in names]
        mla = self._kind == "mla"
        if self._cpu_isa is not None:
            _, num_kv_heads, block_size, _ = caches[0].shape
            if mla:
                check_cpu_mla_layout(block_size, self._head_dim, caches[0].dtype)
            else:
                check_cpu_layout(block_size, num_kv_heads, self._head_dim, caches[0].dtype, self._cpu_isa,
                                 DTYPES[self._compute_dtype])
        self.paged = PagedKV([block_views(cache, self._head_dim, self._cpu_isa is not None, mla) for cache in caches],
                             [self._layer_groups.get(name, 0) for name in names])
        if self.paged.block_size != self.block_size:
            raise ValueError(
                f"vLLM's KV cache has blocks of {self.paged.block_size} tokens, expected {self.block_size}"
            )

    # ---- a step: handle_preemptions, start_load_kv, (forward), wait_for_save, get_finished ----

    def begin_step(self, plan: StepPlan) -> None:
        """At the start of vLLM's step (handle_preemptions), before its forward pass: start the plan's
        background loads (they write only blocks of requests waiting for them, so they need not
        wait for the forward pass, as start_load_kv would), and before vLLM reuses the blocks of
        preempted requests, wait until no save still reads them."""
        self._step_started_s = time.perf_counter()
        for transfer in plan.async_loads:
            self._loader.submit(lambda transfer=transfer: self._load_in_background(transfer))
        with self._lock:
            self._lock.wait_for(lambda: not any(self._copying[request_id] for request_id in plan.preempted))

    def load(self, plan: StepPlan) -> set[str]:
        """Run the plan's synchronous loads now; returns the requests whose synchronous load failed
        (their KV this step must not be saved)."""
        failed_request_ids = set()
        for transfer in plan.loads:
            if not self._load_contained(transfer):
                failed_request_ids.add(transfer.request_id)
        if plan.loads:  # the step's compute starts after its synchronous loads
            self._step_started_s = time.perf_counter()
        return failed_request_ids

    def save(self, plan: StepPlan, failed_request_ids: set[str]) -> None:
        if self._step_started_s and plan.num_prefill_tokens:
            seconds = time.perf_counter() - self._step_started_s
            self.shelf.cost.note_prefill(plan.num_tokens, seconds, plan.num_attention_pairs)
        for request_id, hit_tokens in plan.first_tokens.items():
            self.shelf.metrics.first_token(request_id, hit_tokens > 0)
        for transfer in plan.saves:
            if transfer.request_id in failed_request_ids:
                # This step's KV attended to blocks that failed to load: never store it. vLLM
                # recomputes the request, and its finished prefill is saved then.
                continue
            if not plan.background_saves:
                self._save_contained(transfer)
                continue
            with self._lock:
                self._copying[transfer.request_id] += 1
                self._held.add(transfer.request_id)
            self._saver.submit(lambda transfer=transfer: self._save_in_background(transfer))

    def finished(self, finished_request_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """vLLM's get_finished: (requests whose background saves no longer need their blocks,
        requests whose background loads are done)."""
        with self._lock:
            self._finished |= finished_request_ids & self._held
            self._prefetching -= finished_request_ids
            sent = {request_id for request_id in self._finished if not self._copying[request_id]}
            self._finished -= sent
            self._held -= sent
            for request_id in sent:
                del self._copying[request_id]
            loaded, self._loaded = self._loaded, set()
            # A request's trace is complete once vLLM has finished it and no save still copies its KV.
            traced = (finished_request_ids - self._held) | sent
        for request_id in traced:
            self.shelf.tracer.finish(request_id)
        return sent or None, loaded or None

    def take_failed_block_ids(self) -> set[int]:
        with self._lock:
            failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    # ---- loads ----

    def _load_in_background(self, transfer: Transfer) -> None:
        with self._lock:  # the load reads what its prefetch, if still queued, would have
            self._prefetching.discard(transfer.request_id)
        try:
            if transfer.wait_s:
                self._wait_for_hand_over(transfer)
            self._load_contained(transfer)
        finally:
            with self._lock:
                self._loaded.add(transfer.request_id)

    def _wait_for_hand_over(self, transfer: Transfer) -> None:
        """Until the prompt's KV a prefill instance is handing over has arrived, or `wait_s` passed."""
        deadline_s = time.monotonic() + transfer.wait_s
        prompt = transfer.prompt.with_rank(self.tp_rank)
        while not self.shelf.holds(prompt, transfer.end) and time.monotonic() < deadline_s:
            time.sleep(HAND_OVER_POLL_S)

    def _load_contained(self, transfer: Transfer) -> bool:
        """Load one transfer; report what did not load. True if all of it did."""
        try:
            loaded_end, wrong_shape = self._load(transfer)
            reason, why = ("shape", wrong_shape) if wrong_shape else ("missing", "not stored, or not readable")
        except Exception as exc:  # noqa: BLE001 - an exception here would end vLLM's engine core
            # Blocks scattered before the failure are recomputed too.
            loaded_end, reason, why = transfer.start, "error", f"{type(exc).__name__}: {exc}"
        if loaded_end >= transfer.end:
            return True
        self._report_failed(transfer, loaded_end, reason, why)
        return False

    def _load(self, transfer: Transfer) -> tuple[int, str | None]:
        """Scatter the transfer's stored chunks into its blocks; returns where the KV loaded ends,
        and what was wrong with the chunk there if it was the wrong shape."""
        chunking = self.shelf.chunking
        prompt = transfer.prompt.with_rank(self.tp_rank)
        # Tokens before `start` are in vLLM's own prefix cache: read only the chunks after them.
        loaded = self.shelf.load(prompt.token_ids, prompt.namespace, transfer.end, prompt.mm_hashes, transfer.start,
                                 tail=True, request_id=transfer.request_id)
        loaded_end = max(min(loaded.end, transfer.end), transfer.start)
        for index, chunk in enumerate(loaded.chunks, start=loaded.start // chunking.size):
            # Blocks before `start` already hold vLLM's own cached KV (possibly shared): leave them.
            chunk_begin, chunk_end = chunking.span(index, loaded_end)
            begin, end = max(chunk_begin, transfer.start), chunk_end
            if begin >= end:
                break
            wrong_shape = self._wrong_shape(chunk, len(prompt), index)
            if wrong_shape:
                return begin, wrong_shape
            block_ids = blocks_from(transfer.block_ids, begin // self.block_size)
            self.paged.scatter(chunk, block_ids, first_token=begin - chunk_begin, num_tokens=end - begin)
        return loaded_end, None

    def _wrong_shape(self, chunk: torch.Tensor, num_prompt_tokens: int, index: int) -> str | None:
        """What is wrong with chunk `index` of the prompt for the paged cache, if anything: it must
        hold every layer (one of fewer would leave stale KV in the others), its tokens, the cache's
        heads, head_dim and dtype."""
        num_tokens = self.shelf.chunking.tokens_in(index, num_prompt_tokens)
        keys = self.paged.layers[0][0]  # (num_blocks, block_size, kv_heads, head_dim)
        expected = (len(self.paged.layers), self.paged.planes, num_tokens, *keys.shape[2:])
        if tuple(chunk.shape) == expected and chunk.dtype == keys.dtype:
            return None
        return f"chunk {index} is {tuple(chunk.shape)} of {chunk.dtype}, the cache takes {expected} of {keys.dtype}"

    def _report_failed(self, transfer: Transfer, loaded_end: int, reason: str, why: str) -> None:
        """Tokens [loaded_end, end) were not loaded: their blocks are reported, and vLLM recomputes them."""
        first_block = loaded_end // self.block_size
        failed = {block_id for group in blocks_from(transfer.block_ids, first_block,
                                                    -(-transfer.end // self.block_size) - first_block)
                  for block_id in group if block_id != NULL_BLOCK_ID}
        self._log.warning(reason, "kvshelf: request %s: %d tokens could not be loaded (%s); vLLM recomputes them",
                          transfer.request_id, transfer.end - loaded_end, why)
        with self._lock:
            self._failed_block_ids.update(failed)
            self.num_load_failed_tokens += transfer.end - loaded_end

    # ---- lookups ----

    def located(self, request_id: str | None, prompt: Prompt, located: list[str]) -> list[str]:
        """The answer to the scheduler's lookup: the held prefix that loads faster than vLLM computes
        it (transfer.load_or_recompute), whose lower-tier chunks start moving to memory at once
        (transfer.prefetch, async mode)."""
        transfer = self.shelf.config.transfer
        if transfer.load_or_recompute and located:
            chunk_bytes = prompt.namespace.layout.bytes_per_token * self.shelf.chunk_size
            located = located[: self.shelf.cost.worth_loading(located, chunk_bytes, self.shelf.chunk_size)]
        if transfer.mode == "async" and transfer.prefetch and request_id is not None and located:
            self.prefetch(request_id, prompt, located)
        return located

    def prefetch(self, request_id: str, prompt: Prompt, located: list[str]) -> None:
        """Promote the chunks a lookup found below the memory tier into memory now, so the request's
        load finds them there. Bounded (MAX_QUEUED_PREFETCHES); dropped if the request ends first."""
        if all(tier == "memory" for tier in located):
            return
        with self._lock:
            if request_id in self._prefetching or len(self._prefetching) >= MAX_QUEUED_PREFETCHES:
                return
            self._prefetching.add(request_id)
        num_tokens = self.shelf.chunking.prefix_tokens(len(located), len(prompt))

        def promote() -> None:
            with self._lock:
                if request_id not in self._prefetching:  # finished, aborted, or its load went first
                    return
                self._prefetching.discard(request_id)
            try:
                self.shelf.load(prompt.token_ids, prompt.namespace, num_tokens, prompt.mm_hashes, tail=True,
                                prefetch=True)
            except Exception as exc:  # noqa: BLE001 - a failed prefetch is a slower load, never an error
                self._log.warning("prefetch", "kvshelf: prefetching request %s failed (%s: %s)",
                                  request_id, type(exc).__name__, exc)

        # After every load queued now or later: a request's own load never waits for another's prefetch.
        self._loader.submit(promote, urgent=False)

    # ---- saves ----

    def _save_in_background(self, transfer: Transfer) -> None:
        chunks = None
        try:
            chunks = self._copy_out(transfer)
        except Exception as exc:  # noqa: BLE001 - a failed save costs a later recompute, never the engine
            self._save_failed(transfer, exc)
        finally:
            with self._lock:
                self._copying[transfer.request_id] -= 1
                self._lock.notify_all()
        if chunks is not None and transfer.hand_over:
            self._hand_over_contained(transfer, chunks)

    def _save_contained(self, transfer: Transfer) -> None:
        try:
            chunks = self._copy_out(transfer)
        except Exception as exc:  # noqa: BLE001 - a failed save costs a later recompute, never the step
            self._save_failed(transfer, exc)
            return
        if transfer.hand_over:
            self._hand_over_contained(transfer, chunks)

    def _copy_out(self, transfer: Transfer) -> list[torch.Tensor] | None:
        """Everything the save needs from the request's blocks: a plain save stores the chunks the
        memory tier lacks now; a hand-over copies every chunk of the prompt, tail included, for
        `_hand_over_contained` to store and send after the blocks are released."""
        chunk_at = self._chunk_reader(transfer)
        # A chunk some sliding-window group no longer holds all of is not stored, nor any after it.
        held_end = self.paged.held_tokens(transfer.block_ids, transfer.end, transfer.start)
        end = transfer.end if held_end == transfer.end else self.shelf.chunking.floor(held_end)
        if transfer.hand_over:
            return [chunk_at(index) for index in range(self.shelf.chunking.count(end - transfer.start))]
        prompt = transfer.prompt.with_rank(self.tp_rank)
        self.shelf.save_chunks(prompt.token_ids[:end], prompt.namespace, chunk_at, transfer.start,
                               prompt.mm_hashes, num_prompt_tokens=len(prompt), request_id=transfer.request_id)
        return None

    def _hand_over_contained(self, transfer: Transfer, chunks: list[torch.Tensor]) -> None:
        prompt = transfer.prompt.with_rank(self.tp_rank)
        if len(chunks) < self.shelf.chunking.count(len(prompt)):  # a sliding window freed the rest: hand over less
            prompt = dataclasses.replace(prompt, token_ids=prompt.token_ids[: len(chunks) * self.shelf.chunk_size])
        try:
            self.hand_over.send(prompt, chunks, transfer.push_to)
        except Exception as exc:  # noqa: BLE001 - the hand-over is lost (the decode side recomputes), not the step
            self._save_failed(transfer, exc)

    def _save_failed(self, transfer: Transfer, exc: Exception) -> None:
        self._log.warning("save", "kvshelf: request %s: saving its KV failed (%s: %s); it is not stored",
                          transfer.request_id, type(exc).__name__, exc)
        self.shelf.metrics.counters.dropped_writes += 1

    def _chunk_reader(self, transfer: Transfer) -> Callable[[int], torch.Tensor]:
        """chunk_at(i): the i-th chunk of `transfer` (from its start), copied from the request's blocks."""
        chunking, chunk_blocks = self.shelf.chunking, self.shelf.chunk_size // self.block_size
        first_block = transfer.start // self.block_size
        namespace = transfer.prompt.namespace

        def chunk_at(index: int) -> torch.Tensor:
            num_tokens = chunking.tokens_in(index, transfer.end - transfer.start)
            out = self.shelf.chunk_memory(namespace, num_tokens)  # straight into the arena: no copy to store it
            block_ids = blocks_from(transfer.block_ids, first_block + index * chunk_blocks, chunk_blocks)
            return self.paged.gather(block_ids, num_tokens, out)

        return chunk_at

    # ----

    def counters_since_last_report(self) -> dict[str, int]:
        current = flat_counters(self.shelf, self.num_load_failed_tokens, self.transfer_counters)
        increments = {name: value - self._reported.get(name, 0) for name, value in current.items()}
        self._reported = current
        return increments

    def close(self) -> None:
        """Finish queued loads and saves, then the hand-over channels."""
        self._loader.close()
        self._saver.close()
        self.hand_over.close()
