"""Drives one vLLM engine (CPU, float32, bundled model) step by step, in its own process, to catch
requests in the middle of a transfer: abort one while its KV loads, preempt others while their
KV is saved, and count the engine's free KV blocks after each phase.

    python vllm_stepper.py JOB_JSON   ->  last stdout line: RESULT {"outputs": {id: [...]}, "phases": [...]}

JOB_JSON: {"extra_config": {...} or null (no kvshelf), "num_blocks": N, "phases": [PHASE, ...]}, where PHASE is
    {"add": [{"id": ..., "prompt_token_ids": [...], "max_tokens": N}, ...],
     "abort_when_loading": ID or absent}   add the requests; step until none is left (aborting ID once
                                           it waits for its KV: WAITING_FOR_REMOTE_KVS)
Each phase reports the engine's free blocks once idle, whether the abort happened, and the most
preemptions any of its requests saw.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `tests.`


def main(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.v1.request import RequestStatus

    from kvshelf.models import bundled_model_dir

    transfer_config = None
    if job["extra_config"] is not None:
        transfer_config = {"kv_connector": "KVShelfConnector", "kv_connector_module_path": "kvshelf.integrations.vllm",
                           "kv_role": "kv_both", "kv_connector_extra_config": job["extra_config"]}
    llm = LLM(model=str(bundled_model_dir()), dtype="float32", enforce_eager=True, max_model_len=512,
              enable_prefix_caching=False, kv_transfer_config=transfer_config,
              num_gpu_blocks_override=job["num_blocks"], max_num_seqs=8)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    block_pool = scheduler.kv_cache_manager.block_pool
    outputs: dict[str, list[int]] = {}
    phases = []
    initially_free = block_pool.get_num_free_blocks()
    for phase in job["phases"]:
        for request in phase["add"]:
            engine.add_request(request["id"], {"prompt_token_ids": request["prompt_token_ids"]},
                               SamplingParams(max_tokens=request["max_tokens"], temperature=0.0))
        to_abort = phase.get("abort_when_loading")
        aborted = False
        max_preemptions = 0
        while engine.has_unfinished_requests() or scheduler.has_requests():
            if to_abort and not aborted and any(
                request.status == RequestStatus.WAITING_FOR_REMOTE_KVS for request in scheduler.requests.values()
            ):
                engine.abort_request([to_abort])
                aborted = True
            for output in engine.step():
                if output.finished:
                    outputs[output.request_id] = list(output.outputs[0].token_ids)
            max_preemptions = max([max_preemptions, *(request.num_preemptions
                                                       for request in scheduler.requests.values())])
        phases.append({"free_blocks": block_pool.get_num_free_blocks(), "initially_free": initially_free,
                       "aborted": aborted, "max_preemptions": max_preemptions})
    return {"outputs": outputs, "phases": phases}


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler in this process, to count its blocks
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
