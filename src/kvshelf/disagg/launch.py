"""`kvshelf pd`: one prefill instance, one decode instance and the proxy in front, on this machine.

    kvshelf pd --port 8000                    # push channel: KV goes straight into the decode inbox
    kvshelf pd --channel tier --redis-url redis://127.0.0.1:6379/0

Each vLLM instance is `kvshelf serve` with a role, its own memory tier and no disk tier, a
routing lookup address, and (decode) an inbox for pushed KV; with the tier channel both share
the given Redis. `cpus` pins each instance's OpenMP threads (VLLM_CPU_OMP_THREADS_BIND) so the
two do not fight over the same cores. A Redis login in the URL reaches each instance through its
environment (as `kvshelf serve` passes it), never its command line.
"""

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from kvshelf import children
from kvshelf.ports import free_port
from kvshelf.serve import connector_extra_config, redis_login_env, vllm_serve_argv

START_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Instance:
    role: str  # "prefill", "decode" or "both"
    port: int
    lookup_address: str
    receive_address: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def spec(self) -> str:
        """How `kvshelf proxy` names it."""
        spec = f"{self.url},lookup={self.lookup_address}"
        return spec + (f",kv={self.receive_address}" if self.receive_address else "")


def new_instance(role: str) -> Instance:
    receive = f"tcp://127.0.0.1:{free_port()}" if role == "decode" else None
    return Instance(role, free_port(), f"tcp://127.0.0.1:{free_port()}", receive)


def instance_argv(instance: Instance, memory_size: str, redis_url: str | None, vllm_args: Sequence[str]) -> list[str]:
    extra = connector_extra_config(None, None, memory_size, None, redis_url, instance.receive_address,
                                   instance.lookup_address, serve_address=f"127.0.0.1:{instance.port}")
    extra.pop("disk.path")  # each instance keeps its own memory; a shared disk directory would be two writers
    return vllm_serve_argv(None, "127.0.0.1", instance.port, extra, list(vllm_args), instance.role)


def instance_env(redis_url: str | None, cpus: str | None = None) -> dict[str, str]:
    """An instance's environment: this process's, with the Redis login kept out of its argv, and its cores."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if cpus:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    env.update(redis_login_env(None, redis_url))
    return env


def proxy_argv(port: int, instances: Sequence[Instance], channel: str, routing: str = "kv-aware") -> list[str]:
    flags = {"prefill": "--prefill", "decode": "--decode", "both": "--instance"}
    argv = [sys.executable, "-m", "kvshelf.cli", "proxy", "--port", str(port), "--channel", channel,
            "--routing", routing]
    for instance in instances:
        argv += [flags[instance.role], instance.spec]
    return argv


@dataclass
class Running:
    proxy_url: str
    instances: list[Instance]
    processes: dict[str, subprocess.Popen]  # by role, and "proxy"


@contextlib.contextmanager
def running(
    instances: Sequence[Instance],
    log_dir: Path,
    channel: str = "push",
    redis_url: str | None = None,
    memory_size: str = "2GiB",
    vllm_args: Sequence[str] = (),
    cpus: Sequence[str | None] | None = None,
    routing: str = "kv-aware",
    proxy_port: int | None = None,
) -> Iterator[Running]:
    """Start `instances` (at the same time) and a proxy over them; stop them all on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    processes: dict[str, subprocess.Popen] = {}
    urls: dict[str, str] = {}
    try:
        for index, instance in enumerate(instances):
            name = f"{instance.role}-{index}"
            argv = instance_argv(instance, memory_size, redis_url, vllm_args)
            env = instance_env(redis_url, cpus[index] if cpus else None)
            processes[name] = start_process(argv, log_dir / name, env)
            urls[name] = instance.url
        proxy_port = proxy_port or free_port()
        processes["proxy"] = start_process(proxy_argv(proxy_port, instances, channel, routing), log_dir / "proxy", None)
        urls["proxy"] = f"http://127.0.0.1:{proxy_port}"
        for name, url in urls.items():
            wait_healthy(url, processes[name], log_dir / name)
        yield Running(urls["proxy"], list(instances), processes)
    finally:
        children.stop(*processes.values())


def start_process(argv: list[str], log_path: Path, env: dict | None) -> subprocess.Popen:
    """A child that ends with this process, in a process group of its own (see kvshelf.children),
    its output in `log_path` with the suffix .log."""
    with open(log_path.with_suffix(".log"), "w") as log:
        return children.start(argv, env, log)


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if process.poll() is not None:
            tail = log_path.with_suffix(".log").read_text()[-3000:]
            raise RuntimeError(f"{url} exited with {process.returncode} while starting:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        time.sleep(1.0)
    raise RuntimeError(f"{url} did not become healthy in {timeout_s:.0f} s; see {log_path.with_suffix('.log')}")


def serve_forever(setup: Running) -> int:
    """Print where things are, and wait until Ctrl-C or an instance dies."""
    print(f"proxy: {setup.proxy_url}/v1 (OpenAI-compatible; model 'smollm2')", flush=True)
    for instance in setup.instances:
        print(f"  {instance.role}: {instance.url}  lookup {instance.lookup_address}"
              + (f"  receives KV on {instance.receive_address}" if instance.receive_address else ""), flush=True)
    try:
        while all(process.poll() is None for process in setup.processes.values()):
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0
    dead = [name for name, process in setup.processes.items() if process.poll() is not None]
    print(f"stopped: {', '.join(dead)} exited", file=sys.stderr)
    return 1
