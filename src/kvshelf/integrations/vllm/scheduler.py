"""The scheduler half: how many prompt tokens the shelf can supply, and when to load and save.

A request's prompt is located once, when vLLM first asks: the workers say which tier holds each
of its leading chunks (trimmed to the prefix that loads faster than vLLM computes it). With
`transfer.mode: async` (the default) a load from below the memory tier runs in the background:
the request waits in WAITING_FOR_REMOTE_KVS while other requests keep stepping, and the worker
reports it done through get_finished. A load from memory alone stays synchronous, before the
step's forward pass: it takes a few milliseconds, less than the step a background load costs
the request. The prompt's full chunks are saved from the blocks vLLM wrote in the step that
finishes its prefill (chunks already stored are skipped); in async mode the copy runs after
the step, and `request_finished` holds the request's blocks until the worker reports it done.
`transfer.mode: sync` loads and saves inside the step, as kvshelf did before.

Models with sliding-window layers under vLLM's hybrid allocator (SupportsHMA): a sliding-window
group frees the blocks its window has moved past as the prefill goes on, so each step saves the
chunks it completed, copied out inside the step (a background copy could read blocks vLLM has
already given to another request); loads skip the blocks vLLM did not allocate (outside the
window of the loaded prefix).

Roles (vLLM's kv_role): `kv_both` loads and saves full chunks. `kv_producer`, a prefill
instance, also saves the prompt's partial last chunk and hands the whole prompt to a decode
instance: pushed to the address in the request's `kv_transfer_params.kvshelf.push_to` (only
tcp://host:port, signed by the proxy with the deployment secret as `push_to_sig`; unsigned with
`security.key: none`) or to `pd.push_to`, else written through to the shared tiers. In async mode
the hand-over runs after the step and the prefill's answer says so in its `kv_transfer_params`
(`kvshelf.handed_over`: the tokens handed over, signed); the proxy passes that to the decode
instance, whose load then waits for chunks still on their way up to HAND_OVER_WAITS times
`pd.push_timeout_s`: a push may take that long to fail, and the write-through it falls back to
comes after it.
`kv_consumer`, a decode instance, loads (tails included) and never saves.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np

from kvshelf.integrations.vllm.context import EngineFacts, mm_hashes, request_namespace
from kvshelf.integrations.vllm.plan import StepPlan, Transfer
from kvshelf.keys import Chunking, Prompt
from kvshelf.ports import QuietLog, is_tcp_address, push_to_is_signed
from kvshelf.security import Keyring
from kvshelf.shelf.cost import num_attention_pairs

logger = logging.getLogger(__name__)
# (prompt, request id) -> the tier of each leading chunk the workers hold, as far as worth loading.
Locate = Callable[[Prompt, str], list[str]]
MEMORY_TIER = "memory"
_HAND_OVER_CONTEXT = b"kvshelf handed_over\0"
HAND_OVER_WAITS = 2  # a decode-side load waits this many pd.push_timeout_s: the push's, then the write-through's


@dataclass(slots=True)
class RequestState:
    prompt: Prompt
    located: list[str]  # the tier of each leading chunk held, at lookup
    push_to: str | None = None  # kv_producer: the decode instance to push the prompt's KV to
    handed_over: int = 0  # decode side: tokens a prefill instance said it is handing over
    block_ids: list[list[int]] = field(default_factory=list)  # per KV cache group
    local_tokens: int = 0  # leading prompt tokens in vLLM's own prefix cache, at the last ask
    load: tuple[int, int] | None = None  # tokens [start, end) to load in the next step
    load_async: bool = False
    hit_tokens: int = 0  # tokens kvshelf was asked to load
    saving: bool = False  # a save was planned: in async mode its blocks are held until the worker is done


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


def hand_over_message(prompt: Prompt, num_tokens: int) -> bytes:
    """What a prefill instance signs when it says it hands `num_tokens` of `prompt` over."""
    tokens = blake3.blake3(np.asarray(prompt.token_ids, dtype="<i4").tobytes()).digest()
    return _HAND_OVER_CONTEXT + str(num_tokens).encode() + b"\0" + tokens


class SchedulerSide:
    def __init__(
        self, locate: Locate, chunk_size: int, facts: EngineFacts, role: Role, keyring: Keyring,
        background: bool, hand_over_wait_s: float,
    ) -> None:
        """`keyring` checks the proxy's signature on a request's push_to, and signs hand-overs.
        `background`: transfer.mode async. `hand_over_wait_s`: how long a decode-side load waits
        for KV a prefill instance is handing over (HAND_OVER_WAITS x pd.push_timeout_s)."""
        self.locate = locate
        self.chunking = Chunking(chunk_size)
        self.facts = facts
        self.role = role
        self.keyring = keyring
        self.background = background
        # Sliding-window groups free blocks while the request runs: saves copy within the step.
        self.background_saves = background and not facts.has_windows
        self.hand_over_wait_s = hand_over_wait_s
        self.requests: dict[str, RequestState] = {}
        self._waiting: list[str] = []  # requests whose background load goes out with the next plan
        self._log = QuietLog(logger)

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Prompt tokens beyond vLLM's own `num_computed_tokens` that the shelf can supply, and
        whether they load in the background."""
        prompt_ids = list(request.prompt_token_ids or ())
        state = self.requests.get(request.request_id)
        if state is None or list(state.prompt.token_ids) != prompt_ids:
            prompt = Prompt(prompt_ids, request_namespace(self.facts.base_namespace, request), mm_hashes(request))
            located = self.locate(prompt, request.request_id) if prompt_ids else []
            state = RequestState(prompt, located, self._push_to(request), self._handed_over(request, prompt))
            self.requests[request.request_id] = state
        state.local_tokens = num_computed_tokens
        stored = max(self._stored_tokens(state), state.handed_over)
        # Never claim the last prompt token: vLLM must compute it to sample the first output.
        if prompt_ids and stored == len(prompt_ids):  # all stored (ending in a chunk or a tail)
            usable = len(prompt_ids) - 1
        else:
            usable = min(stored, self.chunking.floor(len(prompt_ids) - 1))
        num_tokens = max(usable - num_computed_tokens, 0)
        if not num_tokens:
            return 0, False
        first, last = num_computed_tokens // self.chunking.size, self.chunking.count(usable)
        from_memory = all(tier == MEMORY_TIER for tier in state.located[first:last])
        state.load_async = self.background and not (from_memory and last <= len(state.located))
        return num_tokens, state.load_async

    def _stored_tokens(self, state: RequestState) -> int:
        return self.chunking.prefix_tokens(len(state.located), len(state.prompt))

    def _push_to(self, request: Any) -> str | None:
        """Where to push the request's KV: its `kv_transfer_params.kvshelf.push_to` if that is
        tcp://host:port signed by the proxy (`push_to_sig`), else pd.push_to (trusted: the operator's)."""
        if not self.role.hands_over:
            return None
        params = _kvshelf_params(request)
        if "push_to" not in params:
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

    def _handed_over(self, request: Any, prompt: Prompt) -> int:
        """Tokens of `prompt` a prefill instance says it is handing over (`kvshelf.handed_over`, as
        its answer's kv_transfer_params gave it, signed); 0 when none, or unsigned, or not waited for."""
        params = _kvshelf_params(request)
        num_tokens = params.get("handed_over")
        if not self.background or type(num_tokens) is not int or not 0 < num_tokens <= len(prompt):
            return 0
        if not self.keyring.verify(hand_over_message(prompt, num_tokens), params.get("handed_over_sig")):
            self._log.warning("handed_over", "kvshelf: request %s: ignoring kv_transfer_params.kvshelf.handed_over "
                              "(missing or wrong handed_over_sig: only a prefill instance holding security.key "
                              "signs it)", request.request_id)
            return 0
        return num_tokens

    def after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        state = self.requests.get(request.request_id)
        if state is None:
            return
        state.block_ids = [list(group) for group in blocks.get_block_ids()]
        if num_external_tokens > 0:
            state.hit_tokens = num_external_tokens
            state.load = (state.local_tokens, state.local_tokens + num_external_tokens)
            if state.load_async:  # not scheduled this step: its load goes out with this step's plan
                self._waiting.append(request.request_id)

    def plan_step(self, scheduler_output: Any) -> StepPlan:
        plan = StepPlan(preempted=sorted(scheduler_output.preempted_req_ids or ()),
                        background_saves=self.background_saves)
        for request_id in self._waiting:
            state = self.requests.get(request_id)
            if state is not None and state.load is not None:
                plan.async_loads.append(self._load_transfer(request_id, state))
        self._waiting = []
        for new in scheduler_output.scheduled_new_reqs:
            state = self.requests.get(new.req_id)
            if state is not None:
                state.block_ids = [list(group) for group in new.block_ids]
                self._plan_request(plan, new.req_id, state, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for index, request_id in enumerate(cached.req_ids):
            state = self.requests.get(request_id)
            if state is None:
                continue
            new_block_ids = cached.new_block_ids[index]
            if request_id in cached.resumed_req_ids:  # after preemption: all its blocks are new
                state.block_ids = [list(group) for group in new_block_ids]
            elif new_block_ids is not None:
                for group, new_ids in zip(state.block_ids, new_block_ids):
                    group.extend(new_ids)
            self._plan_request(plan, request_id, state, cached.num_computed_tokens[index], scheduler_output)
        return plan

    def _load_transfer(self, request_id: str, state: RequestState) -> Transfer:
        start, end = state.load
        state.load = None
        waits = state.handed_over > self._stored_tokens(state)
        return self._transfer(request_id, state, start, end, wait_s=self.hand_over_wait_s if waits else 0.0)

    def _plan_request(
        self, plan: StepPlan, request_id: str, state: RequestState, num_computed: int, scheduler_output: Any
    ) -> None:
        if state.load is not None:
            plan.loads.append(self._load_transfer(request_id, state))
        num_scheduled = scheduler_output.num_scheduled_tokens.get(request_id, 0)
        prompt_tokens = len(state.prompt)
        plan.num_prefill_tokens += max(min(num_scheduled, prompt_tokens - num_computed), 0)
        plan.num_tokens += num_scheduled
        plan.num_attention_pairs += num_attention_pairs(num_computed, num_scheduled)
        if num_computed < prompt_tokens <= num_computed + num_scheduled:
            plan.first_tokens[request_id] = state.hit_tokens
        if not self.role.saves or not num_computed < prompt_tokens:
            return
        if self.facts.has_windows and not self.role.hands_over:
            # Each step's completed chunks now: the window frees their blocks as the prefill goes on.
            start = self.chunking.floor(max(self._stored_tokens(state), num_computed))
            end = self.chunking.floor(min(num_computed + num_scheduled, prompt_tokens))
            if end > start:
                plan.saves.append(self._transfer(request_id, state, start, end))
                state.saving = True
            return
        if prompt_tokens > num_computed + num_scheduled:
            return  # only the step that finishes the prefill saves
        if self.role.hands_over:
            # All of it, tail included, even what the shelf held: the decode side may lack it.
            plan.saves.append(self._transfer(request_id, state, 0, prompt_tokens, hand_over=True))
            state.saving = True
            return
        full_tokens = self.chunking.floor(prompt_tokens)
        stored = self._stored_tokens(state)
        if full_tokens > stored:
            plan.saves.append(self._transfer(request_id, state, self.chunking.floor(stored), full_tokens))
            state.saving = True

    def _transfer(self, request_id: str, state: RequestState, start: int, end: int, hand_over: bool = False,
                  wait_s: float = 0.0) -> Transfer:
        # A copy of the block lists: the plan travels to the workers while later steps extend them.
        num_blocks = -(-end // self.facts.block_size)
        block_ids = tuple(group[:num_blocks] for group in state.block_ids)
        return Transfer(request_id, state.prompt, block_ids, start, end, hand_over, state.push_to, wait_s)

    def forget_failed_blocks(self, invalid_block_ids: set[int]) -> None:
        """Chunks whose blocks failed to load are gone from the shelf (or unreadable): stop counting
        them as stored, so the request's recomputed prefill saves them again."""
        for state in self.requests.values():
            failed = [index for group in state.block_ids for index, block_id in enumerate(group)
                      if block_id in invalid_block_ids]
            if failed:
                first_failed_chunk = min(failed) * self.facts.block_size // self.chunking.size
                del state.located[first_failed_chunk:]
                state.handed_over = 0

    def hit_sources(self, request: Any, num_external_tokens: int) -> dict[str, int]:
        """`num_external_tokens` of the request's load split by the tier (name) holding them."""
        state = self.requests.get(request.request_id)
        if state is None or not num_external_tokens:
            return {}
        start, end = state.local_tokens, state.local_tokens + num_external_tokens
        sources: dict[str, int] = {}
        for index in range(start // self.chunking.size, self.chunking.count(end)):
            tier = state.located[index] if index < len(state.located) else "inbox"  # still being handed over
            begin, chunk_end = self.chunking.span(index, end)
            sources[tier] = sources.get(tier, 0) + chunk_end - max(begin, start)
        return sources

    def finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's request_finished: whether the request's blocks wait for a background save, and
        what a prefill instance tells the decode instance (through the proxy)."""
        state = self.requests.pop(request.request_id, None)
        if state is None or not state.saving:
            return False, None
        params = None
        if self.role.hands_over and self.background:
            num_tokens = len(state.prompt)
            signature = self.keyring.sign(hand_over_message(state.prompt, num_tokens))
            params = {"kvshelf": {"handed_over": num_tokens, "handed_over_sig": signature}}
        return self.background_saves, params


def _kvshelf_params(request: Any) -> dict:
    transfer_params = request.kv_transfer_params
    params = transfer_params.get("kvshelf") if isinstance(transfer_params, dict) else None
    return params if isinstance(params, dict) else {}
