"""What the scheduler tells the workers each step: which chunks to load, which to save."""

from dataclasses import dataclass, field

from kvshelf.keys import MMHashes, Namespace


@dataclass(slots=True)
class Transfer:
    """Tokens [start, end) of `token_ids` between the shelf and the request's blocks."""

    request_id: str
    token_ids: list[int]  # the whole prompt
    namespace: Namespace
    mm_hashes: MMHashes
    block_ids: list[int]  # the request's blocks, from token 0
    start: int
    end: int
    hand_over: bool = False  # kv_producer: save the tail too, and hand all of it to the decode side now
    push_to: str | None = None  # ... by pushing it there; None: by writing through to the shared tiers


@dataclass(slots=True)
class StepPlan:
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)
