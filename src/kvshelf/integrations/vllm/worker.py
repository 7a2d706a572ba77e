"""The worker half: copy chunks between the shelf and vLLM's paged KV cache.

A chunk that cannot be loaded (evicted, damaged, store down) reports its blocks as load
errors, so vLLM recomputes them: a failed load costs time, never correctness.
"""

import dataclasses
import logging

import torch

from kvshelf.integrations.vllm.context import EngineFacts
from kvshelf.integrations.vllm.paged import PagedKV, block_view
from kvshelf.integrations.vllm.plan import StepPlan, Transfer
from kvshelf.integrations.vllm.stats import flat_counters
from kvshelf.keys import Namespace
from kvshelf.shelf import Shelf

logger = logging.getLogger(__name__)


class WorkerSide:
    def __init__(self, shelf: Shelf, facts: EngineFacts, tp_rank: int, keys_then_values_per_block: bool) -> None:
        self.shelf = shelf
        self.block_size = facts.block_size
        self.tp_rank = tp_rank
        self._head_dim = facts.base_namespace.layout.head_dim
        self._keys_then_values_per_block = keys_then_values_per_block
        self.paged: PagedKV | None = None
        self.failed_block_ids: set[int] = set()
        self._failed_request_ids: set[str] = set()
        self.num_load_failed_tokens = 0
        self._reported: dict[str, int] = {}

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Layer caches in model order, as vLLM registers them."""
        views = [block_view(cache, self._head_dim, self._keys_then_values_per_block) for cache in kv_caches.values()]
        self.paged = PagedKV(views)
        if self.paged.block_size != self.block_size:
            raise ValueError(
                f"vLLM's KV cache has blocks of {self.paged.block_size} tokens, expected {self.block_size}"
            )

    def load(self, plan: StepPlan) -> None:
        self.failed_block_ids = set()
        self._failed_request_ids = set()
        for transfer in plan.loads:
            self._load(transfer)

    def _load(self, transfer: Transfer) -> None:
        chunk_size = self.shelf.chunk_size
        # Tokens before `start` are in vLLM's own prefix cache: read only the chunks after them.
        namespace = self._namespace(transfer)
        loaded = self.shelf.load(transfer.token_ids, namespace, transfer.end, transfer.mm_hashes, transfer.start)
        loaded_end = max(min(loaded.end, transfer.end), transfer.start)
        first_chunk = loaded.start // chunk_size
        for index, chunk in enumerate(loaded.chunks[: loaded_end // chunk_size - first_chunk], start=first_chunk):
            # Blocks before `start` already hold vLLM's own cached KV (possibly shared): leave them.
            begin = max(index * chunk_size, transfer.start)
            block_ids = transfer.block_ids[begin // self.block_size : (index + 1) * chunk_size // self.block_size]
            self.paged.scatter(chunk, block_ids, first_token=begin - index * chunk_size)
        if loaded_end < transfer.end:
            failed = transfer.block_ids[loaded_end // self.block_size : transfer.end // self.block_size]
            logger.warning(
                "kvshelf: request %s: %d tokens could not be loaded; vLLM recomputes them",
                transfer.request_id,
                transfer.end - loaded_end,
            )
            self.failed_block_ids.update(failed)
            self._failed_request_ids.add(transfer.request_id)
            self.num_load_failed_tokens += transfer.end - loaded_end

    def save(self, plan: StepPlan) -> None:
        chunk_blocks = self.shelf.chunk_size // self.block_size
        for transfer in plan.saves:
            if transfer.request_id in self._failed_request_ids:
                # This step's KV attended to blocks that failed to load: never store it. vLLM
                # recomputes the request, and its finished prefill is saved then.
                continue
            first_block = transfer.start // self.block_size

            def chunk_at(index: int, transfer: Transfer = transfer, first_block: int = first_block) -> torch.Tensor:
                begin = first_block + index * chunk_blocks
                return self.paged.gather(transfer.block_ids[begin : begin + chunk_blocks])

            namespace = self._namespace(transfer)
            self.shelf.save_chunks(transfer.token_ids, namespace, chunk_at, transfer.start, transfer.mm_hashes)

    def _namespace(self, transfer: Transfer) -> Namespace:
        return dataclasses.replace(transfer.namespace, tp_rank=self.tp_rank)

    def counters_since_last_report(self) -> dict[str, int]:
        current = flat_counters(self.shelf, self.num_load_failed_tokens)
        increments = {name: value - self._reported.get(name, 0) for name, value in current.items()}
        self._reported = current
        return increments

    def take_failed_block_ids(self) -> set[int]:
        failed, self.failed_block_ids = self.failed_block_ids, set()
        return failed
