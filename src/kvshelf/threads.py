"""kvshelf's background threads, kept off the engine's compute cores.

vLLM's CPU worker pins its main thread to one core of its OpenMP set, and a thread inherits its
creator's affinity: left alone, every loader, saver, writer and receiver thread of kvshelf would
share that one core with the forward pass, however many other cores are idle. Worse, while a
request waits for a background transfer vLLM steps empty batches in a spin loop on that core,
and two instances on one host pinned to the same core then starve each other's transfers for
seconds (a prefill instance's write-through stalled until the decode instance waiting for it
gave up). So each background thread first moves itself to the cores its process may use, less
the ones its creator was pinned to (all of them if that leaves none).
"""

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)
CPUSET_FILE = Path("/sys/fs/cgroup/cpuset.cpus.effective")


def usable_cpus(cpuset_file: Path = CPUSET_FILE) -> set[int]:
    """The CPUs this process's cgroup allows (every CPU when that is not known)."""
    try:
        text = cpuset_file.read_text().strip()
    except OSError:
        text = ""
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus or set(range(os.cpu_count() or 1))


def background_cpus(inherited: set[int], usable: set[int]) -> set[int]:
    """Where a background thread runs: the usable cores its creator was not pinned to, else all."""
    return (usable - inherited) or usable


def leave_compute_cores() -> None:
    """Move the calling thread off the cores it inherited from a pinned creator (Linux only)."""
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, background_cpus(os.sched_getaffinity(0), usable_cpus()))
    except OSError as exc:  # a cpuset changed under us: stay where we are
        logger.debug("kvshelf: could not move a background thread off the compute cores: %s", exc)


def background_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A started daemon thread running `target` off the compute cores."""

    def run() -> None:
        leave_compute_cores()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
