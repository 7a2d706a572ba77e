"""What the scheduler tells the workers each step: which chunks to load, which to save."""

from dataclasses import dataclass, field

from kvshelf.keys import Prompt


@dataclass(slots=True)
class Transfer:
    """Tokens [start, end) of `prompt` between the shelf and the request's blocks."""

    request_id: str
    prompt: Prompt  # the whole prompt
    block_ids: tuple[list[int], ...]  # the request's blocks per KV cache group, from token 0
    start: int
    end: int
    hand_over: bool = False  # kv_producer: save the tail too, and hand all of it to the decode side now
    push_to: str | None = None  # ... by pushing it there; None: by writing through to the shared tiers
    wait_s: float = 0.0  # an asynchronous load waits this long for chunks a prefill instance is handing over


@dataclass(slots=True)
class StepPlan:
    loads: list[Transfer] = field(default_factory=list)  # before this step's forward pass
    async_loads: list[Transfer] = field(default_factory=list)  # in the background; reported by get_finished
    saves: list[Transfer] = field(default_factory=list)  # after the forward pass (in the background when async)
    preempted: list[str] = field(default_factory=list)  # requests whose blocks are freed now: drain their saves
    # For the load-or-recompute estimate (shelf.cost): prompt tokens this step computes, all tokens
    # it computes, and the (query, key) pairs they attend to.
    num_prefill_tokens: int = 0
    num_tokens: int = 0
    num_attention_pairs: int = 0
    # transfer.mode async (and no sliding-window group): saves run after the step; blocks held till done
    background_saves: bool = False
    # Requests whose prefill this step finishes (their first token), with the tokens kvshelf supplied them.
    first_tokens: dict[str, int] = field(default_factory=dict)
