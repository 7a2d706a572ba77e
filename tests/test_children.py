"""However a launcher is stopped (SIGTERM, SIGINT, SIGHUP, SIGKILL), no process it started is left.

Launchers run as real processes here: a small one starting process groups like vLLM's (a leader
and a process the leader started), and `kvshelf pd` and `kvshelf demo` themselves, stopped once
their vLLM instances have started their engine processes.
"""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvshelf.children import WATCHDOG_NAME
from kvshelf.ports import free_port

GONE_TIMEOUT_S = 60.0  # children.STOP_WAIT_S, and then some

# Two children, each a group of two processes: a shell and a sleep it started, which a signal to
# the shell alone would leave behind.
SMALL_LAUNCHER = textwrap.dedent("""
    import time
    from kvshelf import children
    children.stop_on_signals()
    started = [children.start(["sh", "-c", "sleep 300 & sleep 300"]) for _ in range(2)]
    print(" ".join(str(process.pid) for process in started), flush=True)
    try:
        time.sleep(300)
    finally:
        for process in started:
            children.stop(process)
""")


def stat_of(pid: str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [state, ppid, pgrp, session, ...]


def alive_in(sessions: set[int]) -> list[int]:
    """Processes (not zombies) in `sessions`."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        stat = stat_of(pid)
        if stat and stat[0] != "Z" and int(stat[3]) in sessions:
            alive.append(int(pid))
    return alive


def children_of(pid: int) -> set[int]:
    """`pid`'s children, but for kvshelf's watchdog."""
    def is_watchdog(child: str) -> bool:
        with contextlib.suppress(OSError):
            return Path(f"/proc/{child}/cmdline").read_bytes().endswith(WATCHDOG_NAME.encode() + b"\0")
        return False

    return {int(child) for child in filter(str.isdigit, os.listdir("/proc"))
            if (stat := stat_of(child)) and int(stat[1]) == pid and not is_watchdog(child)}


def wait_until_gone(sessions: set[int], timeout_s: float = GONE_TIMEOUT_S) -> list[int]:
    deadline_s = time.monotonic() + timeout_s
    while (left := alive_in(sessions)) and time.monotonic() < deadline_s:
        time.sleep(0.2)
    return left


def stop_launcher(launcher: subprocess.Popen, sig: signal.Signals, sessions: set[int]) -> None:
    """Send `sig`; the launcher must end, and every process of its children's sessions with it."""
    launcher.send_signal(sig)
    returncode = launcher.wait(timeout=GONE_TIMEOUT_S)
    if sig in (signal.SIGTERM, signal.SIGHUP):
        assert returncode == 128 + sig
        assert alive_in(sessions) == []  # it waited for its children before it exited
    assert wait_until_gone(sessions) == []


SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL]


@pytest.mark.parametrize("sig", SIGNALS, ids=[sig.name for sig in SIGNALS])
def test_a_stopped_launcher_leaves_no_process_of_its_children(sig):
    launcher = subprocess.Popen([sys.executable, "-c", SMALL_LAUNCHER], stdout=subprocess.PIPE, text=True)
    try:
        sessions = {int(pid) for pid in launcher.stdout.readline().split()}
        assert len(sessions) == 2
        deadline_s = time.monotonic() + 10
        while not all(len(alive_in({session})) >= 2 for session in sessions):  # each shell has started a sleep
            assert time.monotonic() < deadline_s
            time.sleep(0.05)
        stop_launcher(launcher, sig, sessions)
    finally:
        launcher.kill()
        launcher.wait()


def engines_started(launcher: subprocess.Popen, num_children: int, num_engines: int) -> set[int]:
    """The sessions of `launcher`'s children, once it has `num_children` and `num_engines` of them
    have started vLLM's engine process (a second process in the session)."""
    deadline_s = time.monotonic() + 300
    while time.monotonic() < deadline_s and launcher.poll() is None:
        sessions = children_of(launcher.pid)
        busy = [session for session in sessions if len(alive_in({session})) >= 2]
        if len(sessions) >= num_children and len(busy) >= num_engines:
            return sessions
        time.sleep(0.5)
    raise AssertionError(f"the launcher (exit code {launcher.poll()}) did not start its vLLM instances")


@pytest.mark.slow
@pytest.mark.parametrize(("command", "num_children", "num_engines", "sig"), [
    (["pd"], 3, 2, signal.SIGTERM),  # two vLLM instances and the proxy
    (["demo", "--num-docs", "1", "--doc-tokens", "256"], 1, 1, signal.SIGKILL),  # the watchdog stops it
], ids=["pd-SIGTERM", "demo-SIGKILL"])
def test_kvshelf_launchers_leave_nothing_running(tmp_path, command, num_children, num_engines, sig):
    if command == ["pd"]:
        command = ["pd", "--port", str(free_port()), "--log-dir", str(tmp_path / "logs")]
    else:
        command += ["--out", str(tmp_path / "out")]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    launcher = subprocess.Popen([sys.executable, "-m", "kvshelf.cli", *command], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sessions: set[int] = set()
    try:
        sessions = engines_started(launcher, num_children, num_engines)
        stop_launcher(launcher, sig, sessions)
    finally:
        launcher.kill()
        launcher.wait()
        for pid in alive_in(sessions):  # a failed test must not leave them either
            os.kill(pid, signal.SIGKILL)
