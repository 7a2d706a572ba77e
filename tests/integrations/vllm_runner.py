"""Runs one vLLM engine (CPU, float32, bundled model) over a list of requests, in its own process.

    python vllm_runner.py JOB_JSON   ->  last stdout line: RESULT [{"output_ids": [...], "num_cached_tokens": N}, ...]

JOB_JSON: {"extra_config": {...} or null (no kvshelf), "requests": [{"prompt_token_ids": [...], "cache_salt": "..."}]}.
vLLM starts worker processes, so it must run under a __main__ guard, never at import.
"""

import json
import os
import sys

MAX_NEW_TOKENS = 12


def main(job: dict) -> list[dict]:
    from vllm import LLM, SamplingParams

    from kvshelf.models import bundled_model_dir

    transfer_config = None
    if job["extra_config"] is not None:
        transfer_config = {
            "kv_connector": "KVShelfConnector",
            "kv_connector_module_path": "kvshelf.integrations.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": job["extra_config"],
        }
    llm = LLM(
        model=str(bundled_model_dir()),
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        enable_prefix_caching=False,
        kv_transfer_config=transfer_config,
    )
    sampling = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0)
    results = []
    for request in job["requests"]:  # one at a time: each sees what the previous ones saved
        output = llm.generate([request], sampling, use_tqdm=False)[0]
        results.append({"output_ids": list(output.outputs[0].token_ids), "num_cached_tokens": output.num_cached_tokens})
    return results


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
