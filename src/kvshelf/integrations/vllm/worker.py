"""The worker half: copy chunks between the shelf and vLLM's paged KV cache.

A chunk that cannot be loaded (evicted, damaged, store down) reports its blocks as load
errors, so vLLM recomputes them: a failed load costs time, never correctness.

Nothing a store holds may reach vLLM's engine core as an exception (which kills it) or as KV
of another shape (which leaves stale KV in the layers it does not cover): each loaded chunk's
shape is checked against the paged cache before it is scattered, and any exception while
loading, saving or pushing one transfer is contained to that transfer, logged in one line (at
most one per reason per period) and counted; a failed load reports the transfer's blocks.
"""

import dataclasses
import functools
import logging
from collections.abc import Callable

import torch

from kvshelf.disagg.transfer import KVPusher, TransferCounters
from kvshelf.integrations.vllm.context import EngineFacts
from kvshelf.integrations.vllm.paged import PagedKV, block_views, check_cpu_layout
from kvshelf.integrations.vllm.plan import StepPlan, Transfer
from kvshelf.integrations.vllm.stats import flat_counters
from kvshelf.keys import Namespace
from kvshelf.ports import QuietLog
from kvshelf.shelf import Shelf

logger = logging.getLogger(__name__)


class WorkerSide:
    def __init__(self, shelf: Shelf, facts: EngineFacts, tp_rank: int, cpu_isa: str | None) -> None:
        """`cpu_isa`: the CPU attention kernel's instruction set, on vLLM's CPU backend; else None."""
        self.shelf = shelf
        self.block_size = facts.block_size
        self.tp_rank = tp_rank
        self._head_dim = facts.base_namespace.layout.head_dim
        self._cpu_isa = cpu_isa
        self.paged: PagedKV | None = None
        self.failed_block_ids: set[int] = set()
        self._failed_request_ids: set[str] = set()
        self.num_load_failed_tokens = 0
        self.transfer_counters = TransferCounters()
        self.pusher = KVPusher(shelf.config.pd.push_timeout_s, self.transfer_counters, shelf.keyring)
        self._reported: dict[str, int] = {}
        self._log = QuietLog(logger)

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Layer caches in model order, as vLLM registers them."""
        caches = list(kv_caches.values())
        if self._cpu_isa is not None:
            _, num_kv_heads, block_size, _ = caches[0].shape
            check_cpu_layout(block_size, num_kv_heads, self._head_dim, caches[0].dtype, self._cpu_isa)
        self.paged = PagedKV([block_views(cache, self._head_dim, self._cpu_isa is not None) for cache in caches])
        if self.paged.block_size != self.block_size:
            raise ValueError(
                f"vLLM's KV cache has blocks of {self.paged.block_size} tokens, expected {self.block_size}"
            )

    def load(self, plan: StepPlan) -> None:
        self.failed_block_ids = set()
        self._failed_request_ids = set()
        for transfer in plan.loads:
            try:
                loaded_end, wrong_shape = self._load(transfer)
                reason, why = ("shape", wrong_shape) if wrong_shape else ("missing", "not stored, or not readable")
            except Exception as exc:  # noqa: BLE001 - an exception here would end vLLM's engine core
                # Blocks scattered before the failure are recomputed too.
                loaded_end, reason, why = transfer.start, "error", f"{type(exc).__name__}: {exc}"
            if loaded_end < transfer.end:
                self._report_failed(transfer, loaded_end, reason, why)

    def _load(self, transfer: Transfer) -> tuple[int, str | None]:
        """Scatter the transfer's stored chunks into its blocks; returns where the KV loaded ends,
        and what was wrong with the chunk there if it was the wrong shape."""
        chunk_size = self.shelf.chunk_size
        # Tokens before `start` are in vLLM's own prefix cache: read only the chunks after them.
        namespace = self._namespace(transfer)
        loaded = self.shelf.load(
            transfer.token_ids, namespace, transfer.end, transfer.mm_hashes, transfer.start, tail=True
        )
        loaded_end = max(min(loaded.end, transfer.end), transfer.start)
        for index, chunk in enumerate(loaded.chunks, start=loaded.start // chunk_size):
            # Blocks before `start` already hold vLLM's own cached KV (possibly shared): leave them.
            begin, end = max(index * chunk_size, transfer.start), min((index + 1) * chunk_size, loaded_end)
            if begin >= end:
                break
            wrong_shape = self._wrong_shape(chunk, transfer, index)
            if wrong_shape:
                return begin, wrong_shape
            block_ids = transfer.block_ids[begin // self.block_size :]
            self.paged.scatter(chunk, block_ids, first_token=begin - index * chunk_size, num_tokens=end - begin)
        return loaded_end, None

    def _wrong_shape(self, chunk: torch.Tensor, transfer: Transfer, index: int) -> str | None:
        """What is wrong with chunk `index` of the prompt for the paged cache, if anything: it must
        hold every layer (one of fewer would leave stale KV in the others), its tokens, the cache's
        heads, head_dim and dtype."""
        num_tokens = min(self.shelf.chunk_size, len(transfer.token_ids) - index * self.shelf.chunk_size)
        keys = self.paged.layers[0][0]  # (num_blocks, block_size, kv_heads, head_dim)
        expected = (len(self.paged.layers), 2, num_tokens, *keys.shape[2:])
        if tuple(chunk.shape) == expected and chunk.dtype == keys.dtype:
            return None
        return f"chunk {index} is {tuple(chunk.shape)} of {chunk.dtype}, the cache takes {expected} of {keys.dtype}"

    def _report_failed(self, transfer: Transfer, loaded_end: int, reason: str, why: str) -> None:
        """Tokens [loaded_end, end) were not loaded: their blocks are reported, and vLLM recomputes them."""
        failed = transfer.block_ids[loaded_end // self.block_size : -(-transfer.end // self.block_size)]
        self._log.warning(reason, "kvshelf: request %s: %d tokens could not be loaded (%s); vLLM recomputes them",
                          transfer.request_id, transfer.end - loaded_end, why)
        self.failed_block_ids.update(failed)
        self._failed_request_ids.add(transfer.request_id)
        self.num_load_failed_tokens += transfer.end - loaded_end

    def save(self, plan: StepPlan) -> None:
        write_through = False
        for transfer in plan.saves:
            if transfer.request_id in self._failed_request_ids:
                # This step's KV attended to blocks that failed to load: never store it. vLLM
                # recomputes the request, and its finished prefill is saved then.
                continue
            try:
                write_through = self._save(transfer) or write_through
            except Exception as exc:  # noqa: BLE001 - a failed save costs a later recompute, never the step
                self._log.warning("save", "kvshelf: request %s: saving its KV failed (%s: %s); it is not stored",
                                  transfer.request_id, type(exc).__name__, exc)
                self.shelf.metrics.counters.dropped_writes += 1
        if write_through:
            # ... as soon as this step's output is out, so the writes must be done by then.
            try:
                self.shelf.flush()
            except Exception as exc:  # noqa: BLE001 - the write-through is lost, not the step
                self._log.warning("flush", "kvshelf: writing KV through for the decode instance failed (%s: %s)",
                                  type(exc).__name__, exc)

    def _save(self, transfer: Transfer) -> bool:
        """Save the transfer's chunks (and hand them over); True if they must be written through now."""
        namespace = self._namespace(transfer)
        # Cached: a push reads the chunks the save just copied out (the memory tier keeps them anyway).
        chunk_at = functools.cache(self._chunk_reader(transfer))
        self.shelf.save_chunks(
            transfer.token_ids[: transfer.end], namespace, chunk_at, transfer.start, transfer.mm_hashes,
            tail=transfer.hand_over,
        )
        if not transfer.hand_over:
            return False
        # Not pushed (or the push failed): the decode instance looks in the shared tiers.
        return not self._push(transfer, namespace, chunk_at)

    def _push(self, transfer: Transfer, namespace: Namespace, chunk_at: Callable[[int], torch.Tensor]) -> bool:
        """Push the transfer's chunks to its decode instance; True if they all arrived."""
        if transfer.push_to is None:
            return False
        try:
            keys = self.shelf.chunk_keys(transfer.token_ids, namespace, transfer.mm_hashes, tail=True)
            return self.pusher.push(transfer.push_to, keys, chunk_at)
        except Exception as exc:  # noqa: BLE001 - the pusher contains its own failures; this is for the rest
            self._log.warning("push", "kvshelf: request %s: pushing its KV failed (%s: %s); handing it over "
                              "through the shared tiers", transfer.request_id, type(exc).__name__, exc)
            self.transfer_counters.push_failures += 1
            return False

    def _chunk_reader(self, transfer: Transfer) -> Callable[[int], torch.Tensor]:
        """chunk_at(i): the i-th chunk of `transfer` (from its start), copied from the request's blocks."""
        chunk_size, chunk_blocks = self.shelf.chunk_size, self.shelf.chunk_size // self.block_size
        first_block = transfer.start // self.block_size

        def chunk_at(index: int) -> torch.Tensor:
            begin = first_block + index * chunk_blocks
            num_tokens = min(chunk_size, transfer.end - transfer.start - index * chunk_size)
            return self.paged.gather(transfer.block_ids[begin : begin + chunk_blocks], num_tokens)

        return chunk_at

    def _namespace(self, transfer: Transfer) -> Namespace:
        return dataclasses.replace(transfer.namespace, tp_rank=self.tp_rank)

    def counters_since_last_report(self) -> dict[str, int]:
        current = flat_counters(self.shelf, self.num_load_failed_tokens, self.transfer_counters)
        increments = {name: value - self._reported.get(name, 0) for name, value in current.items()}
        self._reported = current
        return increments

    def take_failed_block_ids(self) -> set[int]:
        failed, self.failed_block_ids = self.failed_block_ids, set()
        return failed
