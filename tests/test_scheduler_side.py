"""The vLLM scheduler half's decisions, on vLLM-shaped request and step objects (no engine):
which loads run in the background, what a step's plan carries, when blocks are held for a
background save, and the signed hand-over a prefill instance gives its decode instance."""

from types import SimpleNamespace

import pytest

from kvshelf import Namespace
from kvshelf.integrations.vllm.context import EngineFacts
from kvshelf.integrations.vllm.scheduler import Role, SchedulerSide
from kvshelf.layout import KVLayout
from kvshelf.security import Keyring

CHUNK, BLOCK = 8, 4
PROMPT = list(range(100, 120))  # 2 full chunks and a tail of 4
KEYRING = Keyring(b"k" * 32)
NAMESPACE = Namespace("test-model@1", KVLayout(num_layers=2, num_kv_heads=2, head_dim=4))


def request(request_id="r1", prompt=PROMPT, kv_transfer_params=None):
    return SimpleNamespace(request_id=request_id, prompt_token_ids=prompt, lora_request=None, cache_salt=None,
                           mm_features=[], kv_transfer_params=kv_transfer_params)


def blocks(*block_ids):
    return SimpleNamespace(get_block_ids=lambda: (list(block_ids),))


def step(new=(), num_scheduled=None, preempted=()):
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[])
    return SimpleNamespace(scheduled_new_reqs=list(new), scheduled_cached_reqs=cached,
                           num_scheduled_tokens=num_scheduled or {}, preempted_req_ids=set(preempted))


def new_request(request_id, block_ids, num_computed):
    return SimpleNamespace(req_id=request_id, block_ids=(list(block_ids),), num_computed_tokens=num_computed)


FACTS = EngineFacts(NAMESPACE, BLOCK)
# A hybrid model under vLLM's hybrid allocator: group 0 full attention, group 1 a sliding window of 6.
HYBRID = EngineFacts(NAMESPACE, BLOCK, windows=(None, 6), layer_groups={"layer.0": 0, "layer.1": 1})


def scheduler(located, kv_role="kv_both", background=True, facts=FACTS):
    return SchedulerSide(lambda prompt, request_id: list(located), CHUNK, facts, Role.of(kv_role, None), KEYRING,
                         background, hand_over_wait_s=5.0)


@pytest.mark.parametrize("located, background, expected", [
    (["memory", "memory"], True, (16, False)),  # from memory: synchronous, before the forward pass
    (["memory", "disk"], True, (16, True)),
    (["redis"], True, (8, True)),
    (["disk", "disk"], False, (16, False)),  # transfer.mode: sync
    ([], True, (0, False)),
])
def test_loads_below_memory_run_in_the_background(located, background, expected):
    assert scheduler(located, background=background).num_new_matched_tokens(request(), 0) == expected


def test_a_background_load_goes_out_in_the_step_that_allocated_its_blocks():
    side = scheduler(["disk", "disk"])
    side.num_new_matched_tokens(request(), 0)
    side.after_alloc(request(), blocks(5, 2, 7, 1, 9), 16)
    plan = side.plan_step(step())  # the request is not scheduled: it waits for its KV
    assert not plan.loads and [(t.request_id, t.block_ids, t.start, t.end) for t in plan.async_loads] == [
        ("r1", ([5, 2, 7, 1],), 0, 16)]
    assert not side.plan_step(step()).async_loads  # once


def test_a_background_save_holds_the_blocks_and_a_plain_finish_does_not():
    side = scheduler([])
    side.num_new_matched_tokens(request(), 0)
    side.after_alloc(request(), blocks(1, 2, 3, 4, 5), 0)
    plan = side.plan_step(step([new_request("r1", [1, 2, 3, 4, 5], 0)], {"r1": len(PROMPT)}))
    assert [(t.start, t.end) for t in plan.saves] == [(0, 16)] and plan.background_saves
    assert plan.num_prefill_tokens == len(PROMPT)
    assert side.finished(request()) == (True, None)
    other = scheduler([])
    other.num_new_matched_tokens(request("r2"), 0)
    assert other.finished(request("r2")) == (False, None)  # aborted before its prefill ended: nothing to save


def test_sync_mode_saves_inside_the_step():
    side = scheduler([], background=False)
    side.num_new_matched_tokens(request(), 0)
    plan = side.plan_step(step([new_request("r1", [1, 2, 3, 4, 5], 0)], {"r1": len(PROMPT)}))
    assert plan.saves and not plan.background_saves
    assert side.finished(request()) == (False, None)


def test_preempted_requests_travel_in_the_plan():
    assert scheduler([]).plan_step(step(preempted={"r9", "r3"})).preempted == ["r3", "r9"]


def handed_over_params():
    producer = scheduler([], kv_role="kv_producer")
    producer.num_new_matched_tokens(request(), 0)
    producer.plan_step(step([new_request("r1", [1, 2, 3, 4, 5], 0)], {"r1": len(PROMPT)}))
    delay, params = producer.finished(request())
    assert delay
    return params


def test_the_decode_side_waits_for_a_signed_hand_over():
    consumer = scheduler([], kv_role="kv_consumer")  # nothing has arrived yet
    asked = request(kv_transfer_params=handed_over_params())
    assert consumer.num_new_matched_tokens(asked, 0) == (len(PROMPT) - 1, True)
    consumer.after_alloc(asked, blocks(5, 6, 7, 8, 9), len(PROMPT) - 1)
    (load,) = consumer.plan_step(step()).async_loads
    assert load.wait_s == 5.0 and load.end == len(PROMPT) - 1
    assert consumer.hit_sources(asked, len(PROMPT) - 1) == {"inbox": len(PROMPT) - 1}


@pytest.mark.parametrize("tamper", [
    lambda params: params["kvshelf"].update(handed_over=len(PROMPT) - 1),  # another count than signed
    lambda params: params["kvshelf"].pop("handed_over_sig"),
    lambda params: params["kvshelf"].update(handed_over="20"),
])
def test_an_unsigned_or_altered_hand_over_is_not_waited_for(tamper):
    params = handed_over_params()
    tamper(params)
    consumer = scheduler([], kv_role="kv_consumer")
    assert consumer.num_new_matched_tokens(request(kv_transfer_params=params), 0) == (0, False)


def test_hit_sources_split_the_load_by_tier():
    side = scheduler(["memory", "disk", "redis"])
    asked = request()
    assert side.num_new_matched_tokens(asked, 0) == (19, True)
    assert side.hit_sources(asked, 19) == {"memory": 8, "disk": 8, "redis": 3}


def test_failed_blocks_forget_the_chunks_from_there_on():
    side = scheduler(["disk", "disk", "disk"])
    side.num_new_matched_tokens(request(), 0)
    side.after_alloc(request(), blocks(5, 2, 7, 1, 9), 19)
    side.forget_failed_blocks({7})  # block 2 of the request: chunk 1
    assert side.requests["r1"].located == ["disk"]


def test_sliding_window_models_save_each_steps_chunks_inside_the_step():
    side = scheduler([], facts=HYBRID)
    side.num_new_matched_tokens(request(), 0)
    group_blocks = ([1, 2, 3], [4, 5, 6])
    side.after_alloc(request(), SimpleNamespace(get_block_ids=lambda: group_blocks), 0)
    new = SimpleNamespace(req_id="r1", block_ids=group_blocks, num_computed_tokens=0)
    first = side.plan_step(step([new], {"r1": 12}))  # a prefill in steps of 12 tokens: chunk 0 is complete
    assert [(t.start, t.end, t.block_ids) for t in first.saves] == [(0, 8, ([1, 2], [4, 5]))]
    assert not first.background_saves  # the window frees blocks as the prefill goes on: copied in the step
    cached = SimpleNamespace(req_ids=["r1"], new_block_ids=[([7, 8], [0, 9])], resumed_req_ids=set(),
                             num_computed_tokens=[12])
    second = side.plan_step(SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                                            num_scheduled_tokens={"r1": 8}, preempted_req_ids=set()))
    assert [(t.start, t.end) for t in second.saves] == [(8, 16)]  # chunk 1, begun in the first step
    assert second.saves[0].block_ids == ([1, 2, 3, 7], [4, 5, 6, 0])
    assert side.finished(request()) == (False, None)  # nothing left in the background: blocks are vLLM's now
