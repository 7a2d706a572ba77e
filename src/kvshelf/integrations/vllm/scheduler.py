"""The scheduler half: how many prompt tokens the shelf can supply, and when to load and save.

A request's prompt is looked up once, when vLLM first asks. Loads are synchronous: they run
before the step's forward pass. The prompt's full chunks are saved in the step that finishes
its prefill, from the blocks vLLM just wrote (chunks already stored are skipped).

Roles (vLLM's kv_role): `kv_both` loads and saves full chunks. `kv_producer`, a prefill
instance, also saves the prompt's partial last chunk and hands the whole prompt to a decode
instance before the step ends: pushed to the address in the request's
`kv_transfer_params.kvshelf.push_to` (only tcp://host:port, signed by the proxy with the
deployment secret as `push_to_sig`; unsigned with `security.key: none`) or to `pd.push_to`,
else written through to the shared tiers. `kv_consumer`, a decode instance, loads (tails
included) and never saves.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvshelf.integrations.vllm.context import EngineFacts, mm_hashes, request_namespace
from kvshelf.integrations.vllm.plan import StepPlan, Transfer
from kvshelf.keys import MMHashes, Namespace
from kvshelf.ports import QuietLog, is_tcp_address, push_to_is_signed
from kvshelf.security import Keyring

logger = logging.getLogger(__name__)
Lookup = Callable[[Sequence[int], Namespace, MMHashes], int]


@dataclass(slots=True)
class RequestState:
    prompt_ids: list[int]
    namespace: Namespace
    mm_hashes: MMHashes
    stored_tokens: int  # leading prompt tokens the shelf held at lookup
    push_to: str | None = None  # kv_producer: the decode instance to push the prompt's KV to
    block_ids: list[int] = field(default_factory=list)
    local_tokens: int = 0  # leading prompt tokens in vLLM's own prefix cache, at the last ask
    load: tuple[int, int] | None = None  # tokens [start, end) to load in the next step


@dataclass(frozen=True)
class Role:
    saves: bool = True  # False for kv_consumer
    hands_over: bool = False  # kv_producer: save the tail too, and push or write through at once
    push_to: str | None = None  # kv_producer: the default destination (pd.push_to)

    @classmethod
    def of(cls, kv_role: str, push_to: str | None) -> "Role":
        if kv_role not in ("kv_both", "kv_producer", "kv_consumer"):
            raise ValueError(f"kvshelf does not know kv_role {kv_role!r}; use kv_both, kv_producer or kv_consumer")
        return cls(saves=kv_role != "kv_consumer", hands_over=kv_role == "kv_producer", push_to=push_to)


class SchedulerSide:
    def __init__(self, lookup: Lookup, chunk_size: int, facts: EngineFacts, role: Role, keyring: Keyring) -> None:
        """`keyring` checks the proxy's signature on a request's push_to."""
        self.lookup = lookup
        self.chunk_size = chunk_size
        self.facts = facts
        self.role = role
        self.keyring = keyring
        self.requests: dict[str, RequestState] = {}
        self._log = QuietLog(logger)

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        """Prompt tokens beyond vLLM's own `num_computed_tokens` that the shelf can supply."""
        prompt_ids = list(request.prompt_token_ids or ())
        state = self.requests.get(request.request_id)
        if state is None or state.prompt_ids != prompt_ids:
            namespace = request_namespace(self.facts.base_namespace, request)
            hashes = mm_hashes(request)
            stored = self.lookup(prompt_ids, namespace, hashes) if prompt_ids else 0
            state = RequestState(prompt_ids, namespace, hashes, stored, self._push_to(request))
            self.requests[request.request_id] = state
        state.local_tokens = num_computed_tokens
        # Never claim the last prompt token: vLLM must compute it to sample the first output.
        if prompt_ids and state.stored_tokens == len(prompt_ids):  # all stored (ending in a chunk or a tail)
            usable = len(prompt_ids) - 1
        else:
            usable = min(state.stored_tokens, (len(prompt_ids) - 1) // self.chunk_size * self.chunk_size)
        return max(usable - num_computed_tokens, 0)

    def _push_to(self, request: Any) -> str | None:
        """Where to push the request's KV: its `kv_transfer_params.kvshelf.push_to` if that is
        tcp://host:port signed by the proxy (`push_to_sig`), else pd.push_to (trusted: the operator's)."""
        if not self.role.hands_over:
            return None
        transfer_params = request.kv_transfer_params
        params = transfer_params.get("kvshelf") if isinstance(transfer_params, dict) else None
        if not isinstance(params, dict) or "push_to" not in params:
            return self.role.push_to
        push_to, signature = params["push_to"], params.get("push_to_sig")
        if push_to is None:  # the request asks for no push: its KV goes through the shared tiers
            return None
        if not is_tcp_address(push_to):
            why = "not tcp://host:port"
        elif not push_to_is_signed(self.keyring, push_to, signature):
            why = "missing or wrong push_to_sig: only the proxy, holding security.key, may choose it"
        else:
            return push_to
        fallback = f"pushing to pd.push_to {self.role.push_to}" if self.role.push_to else "using the shared tiers"
        self._log.warning("push_to", "kvshelf: request %s: ignoring kv_transfer_params.kvshelf.push_to %.100r (%s); "
                          "%s", request.request_id, push_to, why, fallback)
        return self.role.push_to

    def after_alloc(self, request: Any, num_external_tokens: int) -> None:
        state = self.requests.get(request.request_id)
        if state is not None and num_external_tokens > 0:
            state.load = (state.local_tokens, state.local_tokens + num_external_tokens)

    def plan_step(self, scheduler_output: Any) -> StepPlan:
        plan = StepPlan()
        for new in scheduler_output.scheduled_new_reqs:
            state = self.requests.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
                self._plan_request(plan, new.req_id, state, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for index, request_id in enumerate(cached.req_ids):
            state = self.requests.get(request_id)
            if state is None:
                continue
            new_block_ids = cached.new_block_ids[index]
            if request_id in cached.resumed_req_ids:  # after preemption: all its blocks are new
                state.block_ids = list(new_block_ids[0])
            elif new_block_ids is not None:
                state.block_ids.extend(new_block_ids[0])
            self._plan_request(plan, request_id, state, cached.num_computed_tokens[index], scheduler_output)
        return plan

    def _plan_request(
        self, plan: StepPlan, request_id: str, state: RequestState, num_computed: int, scheduler_output: Any
    ) -> None:
        if state.load is not None:
            start, end = state.load
            plan.loads.append(self._transfer(request_id, state, start, end))
            state.load = None
        num_scheduled = scheduler_output.num_scheduled_tokens.get(request_id, 0)
        prompt_tokens = len(state.prompt_ids)
        if not self.role.saves or not num_computed < prompt_tokens <= num_computed + num_scheduled:
            return  # only the step that finishes the prefill saves
        if self.role.hands_over:
            # All of it, tail included, even what the shelf held: the decode side may lack it.
            plan.saves.append(self._transfer(request_id, state, 0, prompt_tokens, hand_over=True))
            return
        full_tokens = prompt_tokens // self.chunk_size * self.chunk_size
        if full_tokens > state.stored_tokens:
            plan.saves.append(self._transfer(request_id, state, state.stored_tokens, full_tokens))

    def _transfer(self, request_id: str, state: RequestState, start: int, end: int, hand_over: bool = False
                  ) -> Transfer:
        # A copy of the block list: the plan travels to the workers while later steps extend it.
        block_ids = state.block_ids[: -(-end // self.facts.block_size)]
        return Transfer(request_id, state.prompt_ids, state.namespace, state.mm_hashes, block_ids, start, end,
                        hand_over, state.push_to)

    def forget_failed_blocks(self, invalid_block_ids: set[int]) -> None:
        """Chunks whose blocks failed to load are gone from the shelf (or unreadable): stop counting
        them as stored, so the request's recomputed prefill saves them again."""
        for state in self.requests.values():
            failed = [index for index, block_id in enumerate(state.block_ids) if block_id in invalid_block_ids]
            if failed:
                first_failed_token = failed[0] * self.facts.block_size
                state.stored_tokens = min(state.stored_tokens, first_failed_token // self.chunk_size * self.chunk_size)

    def finished(self, request: Any) -> None:
        self.requests.pop(request.request_id, None)
