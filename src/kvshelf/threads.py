"""kvshelf's background threads, free to run on any core the process may use.

vLLM's CPU worker pins its main thread to one core, and a thread inherits its creator's
affinity: left alone, every loader, saver, writer and receiver thread of kvshelf would run on
that one core. While a request waits for a background transfer, vLLM steps empty batches and its
worker spins between them on that core, and a kvshelf thread pinned there next to another
process's spinning worker got no CPU for seconds: two instances on one 2-core host, both pinned
to core 0, stalled a prefill's 27 MB write-through to Redis for 5-7 s, until the decode instance
waiting for it gave up. So each background thread first unpins itself to every core its cgroup
allows, and the kernel places it. (Moving it only to the cores its creator was not pinned to
fails where instances are pinned to different cores: each one's threads then land on the
other's spinning core.) The threads ZeroMQ starts are unpinned too: see `kvshelf.ports.zmq_context`.
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


def unpin_thread(native_id: int = 0) -> None:
    """Let a thread (by its `threading` native_id; the calling thread by default) run on every
    usable core, whatever its creator was pinned to (Linux only)."""
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(native_id, usable_cpus())
    except OSError as exc:  # a cpuset changed under us: stay where we are
        logger.debug("kvshelf: could not unpin a background thread: %s", exc)


def background_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A started daemon thread running `target`, unpinned."""

    def run() -> None:
        unpin_thread()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
