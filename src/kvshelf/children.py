"""The processes kvshelf's launchers start (vLLM instances, the proxy, redis-server) end with them.

`kvshelf pd`, `kvshelf demo` and the benches start servers of several GB each; a supervisor
(systemd, Docker, Kubernetes, a script) stops a launcher with SIGTERM, a terminal closing sends
SIGHUP, and anything may SIGKILL it. So that no way of stopping a launcher leaves its children
running:

- `start` puts each child in a session and process group of its own: stopping the group
  (`stop`) stops vLLM's engine and worker processes too, and a Ctrl-C in the terminal reaches
  only the launcher, which stops its children in order.
- `stop_on_signals` makes SIGTERM and SIGHUP end the launcher as Ctrl-C does, by an exception in
  its main thread: its `finally` blocks stop the children and wait for them, so a supervisor
  sees the launcher exit after its children, not before.
- A watchdog process, started with the first child, holds the read end of a pipe whose write end
  only the launcher holds, and is told each child's group as it starts and stops. When the
  launcher ends, however it ends (SIGKILL included), the pipe closes and the watchdog stops every
  group still registered: SIGTERM, then SIGKILL after STOP_WAIT_S. (A parent-death signal would
  reach only the child itself, not the engine processes vLLM starts, and only when the *thread*
  that started it ends.)
"""

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

logger = logging.getLogger(__name__)

# After SIGTERM, how long a child's group may take before SIGKILL. A serving vLLM stops in a few
# seconds; one still starting up ignores SIGTERM until it is up (a minute and more here).
STOP_WAIT_S = 20.0
WATCHDOG_NAME = "kvshelf-watchdog"  # its argument, so that `ps` says what it is

# Runs in its own session, so signals to the launcher's group or terminal do not reach it.
_WATCHDOG = f"""
import os, signal, sys, time
groups = set()
for line in sys.stdin:  # one "+pgid" or "-pgid" a line, until the launcher ends
    (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
def alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False
for sig, wait_s in ((signal.SIGTERM, {STOP_WAIT_S}), (signal.SIGKILL, 0)):
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
    deadline_s = time.monotonic() + wait_s
    while any(map(alive, groups)) and time.monotonic() < deadline_s:
        time.sleep(0.1)
"""


class _Watchdog:
    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def tell(self, line: str) -> None:
        with self._lock:
            if self._process is None:
                self._process = subprocess.Popen([sys.executable, "-c", _WATCHDOG, WATCHDOG_NAME],
                                                 stdin=subprocess.PIPE, text=True, start_new_session=True)
            try:
                self._process.stdin.write(line + "\n")
                self._process.stdin.flush()
            except OSError as exc:  # someone killed it: the children still start and stop, unguarded
                logger.warning("kvshelf: the watchdog process is gone (%s); children started now are not "
                               "stopped if this process is killed", exc)


_watchdog = _Watchdog()


def start(argv: Sequence[str], env: dict[str, str] | None = None, log: IO | None = None) -> subprocess.Popen:
    """`argv` as a child that ends with this process (see the module docstring); its stdout and
    stderr go to `log` (an open file; the child keeps its own descriptor), else to this process's."""
    output = {"stdout": log, "stderr": subprocess.STDOUT} if log else {}
    process = subprocess.Popen(list(argv), env=env, start_new_session=True, **output)
    _watchdog.tell(f"+{process.pid}")  # its group id is its pid
    return process


def stop(*processes: subprocess.Popen, wait_s: float = STOP_WAIT_S) -> None:
    """Stop `processes` and their groups (see `start`), all at once: SIGTERM; SIGKILL to a group
    once its leader has exited (whatever of it outlived the leader), or after `wait_s` if not."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline_s = time.monotonic() + wait_s
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(deadline_s - time.monotonic(), 0))
        kill(process)


def kill(process: subprocess.Popen) -> None:
    """End `process` and its group at once (SIGKILL), as a crash would; the watchdog forgets it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    _watchdog.tell(f"-{process.pid}")


class Stopped(SystemExit):
    """SIGTERM or SIGHUP reached a launcher: it unwinds, stopping its children, and exits 128 + signal."""


def stop_on_signals() -> None:
    """From now on SIGTERM and SIGHUP end this process (main thread) the way Ctrl-C does; once
    one of them or Ctrl-C has come, later ones are ignored so that stopping the children is not
    cut short."""

    def handle(signum: int, frame: object) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        print(f"kvshelf: {signal.Signals(signum).name}: stopping what this process started", file=sys.stderr,
              flush=True)
        raise (KeyboardInterrupt() if signum == signal.SIGINT else Stopped(128 + signum))

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, handle)
