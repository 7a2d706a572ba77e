"""A streaming client for any OpenAI-compatible server: TTFT, inter-token latency, throughput."""

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass(slots=True)
class Completion:
    text: str
    ttft_s: float
    latency_s: float
    token_times_s: list[float] = field(repr=False)  # each streamed token's arrival (time.perf_counter)
    num_prompt_tokens: int | None = None
    num_cached_tokens: int | None = None

    @property
    def token_gaps_s(self) -> list[float]:
        """Between consecutive streamed tokens."""
        return [later - earlier for earlier, later in zip(self.token_times_s, self.token_times_s[1:])]

    @property
    def mean_itl_s(self) -> float | None:
        gaps_s = self.token_gaps_s
        return sum(gaps_s) / len(gaps_s) if gaps_s else None


class CompletionClient:
    def __init__(self, base_url: str, model: str, timeout_s: float = 600.0, extra_body: dict | None = None) -> None:
        """`extra_body`: server-specific fields, e.g. vLLM's {"ignore_eos": True} for fixed-length answers."""
        self.model = model
        self._extra_body = extra_body or {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s)

    def complete(self, prompt: str, max_tokens: int) -> Completion:
        """Stream one greedy completion of `prompt`."""
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        } | self._extra_body
        started_s = time.perf_counter()
        token_times_s: list[float] = []
        pieces: list[str] = []
        usage: dict = {}
        with self._http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"server answered {response.status_code}: {response.read().decode()[:500]}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                usage = event.get("usage") or usage
                if event.get("choices"):  # one event per generated token (its text may be empty: EOS)
                    token_times_s.append(time.perf_counter())
                    pieces.extend(choice.get("text", "") for choice in event["choices"])
        if not token_times_s:
            raise RuntimeError("the server streamed no tokens")
        details = usage.get("prompt_tokens_details") or {}
        return Completion(
            text="".join(pieces),
            ttft_s=token_times_s[0] - started_s,
            latency_s=token_times_s[-1] - started_s,
            token_times_s=token_times_s,
            num_prompt_tokens=usage.get("prompt_tokens"),
            num_cached_tokens=details.get("cached_tokens"),
        )

    def wait_ready(self, timeout_s: float, is_alive=lambda: True) -> None:
        """Wait until the server lists its models; `is_alive` lets a caller stop early if it died."""
        deadline_s = time.monotonic() + timeout_s
        while time.monotonic() < deadline_s and is_alive():
            try:
                if self._http.get("/v1/models", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"server at {self._http.base_url} did not become ready")

    def close(self) -> None:
        self._http.close()
