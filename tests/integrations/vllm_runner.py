"""Runs one vLLM engine (CPU, float32, bundled model) over a list of requests, in its own process.

    python vllm_runner.py JOB_JSON   ->  last stdout line: RESULT [{"output_ids": [...], "num_cached_tokens": N}, ...]

JOB_JSON: {"extra_config": {...} or null (no kvshelf), "kv_role": "kv_both", "requests": [STEP, ...],
"barrier_dir": "...", "zoo_family": a kvshelf.bench.zoo family instead of the bundled model,
"llm_args": more keywords for vLLM's LLM, "env": more environment}, where STEP is
    {"prompt_token_ids": [...], "cache_salt": "..."}  one request, run alone; optional "max_tokens" and
                                                       "kv_transfer_params" (as a server's request would carry)
    {"batch": [request, ...]}                          requests run together (one result each)
    {"barrier": NAME}                                  create NAME.reached in barrier_dir, wait for NAME.go
    python vllm_runner.py --serve            ->  one engine without kvshelf, answering job after job:
                                                 a line {"requests": [STEP, ...]} in, a RESULT line out
vLLM starts worker processes, so it must run under a __main__ guard, never at import.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MAX_NEW_TOKENS = 12


def main(job: dict) -> list[dict]:
    return run_requests(make_llm(job), job)


def make_llm(job: dict):
    from vllm import LLM

    from kvshelf.models import bundled_model_dir

    transfer_config = None
    if job["extra_config"] is not None:
        transfer_config = {
            "kv_connector": "KVShelfConnector",
            "kv_connector_module_path": "kvshelf.integrations.vllm",
            "kv_role": job.get("kv_role", "kv_both"),
            "kv_connector_extra_config": job["extra_config"],
        }
    llm_args = {"model": str(bundled_model_dir()), "dtype": "float32", "enforce_eager": True, "max_model_len": 2048,
                "enable_prefix_caching": False, **job.get("llm_args", {})}
    if job.get("zoo_family"):
        from kvshelf.bench.zoo import zoo_model_dir

        llm_args["model"] = str(zoo_model_dir(job["zoo_family"]))
    return LLM(**llm_args, kv_transfer_config=transfer_config)


def run_requests(llm, job: dict) -> list[dict]:
    from vllm import SamplingParams

    results = []
    for step in job["requests"]:  # in order: each step sees what the previous ones saved
        if "barrier" in step:
            wait_at_barrier(Path(job["barrier_dir"]), step["barrier"])
            continue
        requests = step.get("batch", [step])
        sampling = [
            SamplingParams(max_tokens=request.get("max_tokens", MAX_NEW_TOKENS), temperature=0.0,
                           extra_args={"kv_transfer_params": request["kv_transfer_params"]}
                           if "kv_transfer_params" in request else None)
            for request in requests
        ]
        prompts = [{key: request[key] for key in ("prompt_token_ids", "cache_salt") if key in request}
                   for request in requests]
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        results += [{"output_ids": list(out.outputs[0].token_ids), "num_cached_tokens": out.num_cached_tokens}
                    for out in outputs]
    return results


def wait_at_barrier(barrier_dir: Path, name: str, timeout_s: float = 600.0) -> None:
    """Tell the test this engine reached `name`, then wait until the test has done its part."""
    (barrier_dir / f"{name}.reached").touch()
    deadline_s = time.monotonic() + timeout_s
    while not (barrier_dir / f"{name}.go").exists():
        if time.monotonic() > deadline_s:
            raise TimeoutError(f"barrier {name} was never released")
        time.sleep(0.05)


def wait_for(path: Path, timeout_s: float = 600.0) -> None:
    """Wait (in a test) until an engine has created `path`, e.g. a barrier's NAME.reached."""
    deadline_s = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline_s, f"engine never reached {path.name}"
        time.sleep(0.1)


@dataclass
class Engine:
    """A job's engine process; its output goes to a temporary file, not a pipe, so engines
    started together never wait for the test to read one of them."""

    process: subprocess.Popen
    output: IO[str]


def start_engine(
    extra_config: dict | None, requests: list[dict], barrier_dir: Path | None = None, kv_role: str = "kv_both",
    **job_fields,
) -> Engine:
    """This script on a job, in a new process (for tests); `job_fields`: zoo_family, llm_args, env."""
    job = json.dumps({"extra_config": extra_config, "requests": requests, "barrier_dir": str(barrier_dir),
                      "kv_role": kv_role, **job_fields})
    output = tempfile.TemporaryFile("w+")
    return Engine(subprocess.Popen([sys.executable, __file__, job], stdout=output, stderr=subprocess.STDOUT), output)


def engine_results(engine: Engine, timeout_s: float = 600) -> list[dict]:
    with engine.output:
        returncode = engine.process.wait(timeout=timeout_s)
        engine.output.seek(0)
        output = engine.output.read()
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert returncode == 0 and lines, output[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def run_engine(extra_config: dict | None, requests: list[dict], **job_fields) -> list[dict]:
    return engine_results(start_engine(extra_config, requests, **job_fields))


class ReferenceEngine:
    """vLLM alone (no kvshelf), in one process for a whole test session: what cached runs must
    reproduce. Started on first use; each `results` call is one job's requests, run in order."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None

    def results(self, requests: list[dict]) -> list[dict]:
        if self._process is None:
            self._process = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True)
        self._process.stdin.write(json.dumps({"requests": requests}) + "\n")
        self._process.stdin.flush()
        while line := self._process.stdout.readline():
            if line.startswith("RESULT "):
                return json.loads(line.removeprefix("RESULT "))
        raise RuntimeError(f"the reference engine exited with {self._process.wait()}")

    def close(self) -> None:
        if self._process is not None:
            self._process.stdin.close()
            self._process.wait(timeout=120)


def serve() -> None:
    llm = make_llm({"extra_config": None})
    for line in sys.stdin:
        print("RESULT " + json.dumps(run_requests(llm, json.loads(line))), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if sys.argv[1] == "--serve":
        serve()
        sys.exit(0)
    job = json.loads(sys.argv[1])
    os.environ.update(job.get("env", {}))
    print("RESULT " + json.dumps(main(job)), flush=True)
