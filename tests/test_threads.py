"""Background threads are not pinned where their creator was (vLLM pins its worker's main thread)."""

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from kvshelf.threads import background_thread, usable_cpus


def test_usable_cpus_reads_the_cgroup_cpuset(tmp_path):
    cpuset = tmp_path / "cpuset.cpus.effective"
    cpuset.write_text("0-2,5,8-9\n")
    assert usable_cpus(cpuset) == {0, 1, 2, 5, 8, 9}


def test_usable_cpus_without_a_cpuset_is_every_cpu(tmp_path):
    assert usable_cpus(tmp_path / "missing") == set(range(os.cpu_count()))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert usable_cpus(empty) == set(range(os.cpu_count()))


needs_two_cpus = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                    reason="needs Linux and two usable CPUs")


@needs_two_cpus
def test_a_thread_started_by_a_pinned_thread_may_run_on_every_core():
    allowed = os.sched_getaffinity(0)
    pinned = min(allowed)
    seen: dict[str, set[int]] = {}

    def pinned_creator():
        os.sched_setaffinity(0, {pinned})  # as vLLM's CPU worker pins its main thread

        def record():
            seen["background"] = os.sched_getaffinity(0)

        background_thread(record, "test-background").join()
        seen["creator"] = os.sched_getaffinity(0)

    creator = threading.Thread(target=pinned_creator)
    creator.start()
    creator.join()
    assert seen["creator"] == {pinned}  # the creator itself stays where it was put
    assert seen["background"] >= allowed  # every core the test may use (more, if the test runs pinned)



@needs_two_cpus
def test_zeromq_and_authenticator_threads_started_by_a_pinned_thread_may_run_on_every_core():
    # A fresh process, as the context and its threads are made once per process.
    script = textwrap.dedent("""
        import json, os, threading, zmq
        from kvshelf import load_config
        from kvshelf.ports import secure_server, zmq_context
        from kvshelf.security import Keyring
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # as vLLM pins its worker's main thread
        keyring = Keyring.from_config(load_config(environ={}, security_key="k" * 40).security)
        socket = zmq_context().socket(zmq.ROUTER)
        secure_server(socket, keyring, 2**20, 4)  # starts the ZAP authenticator's thread
        socket.bind("tcp://127.0.0.1:0")
        def comm(task):
            with open(f"/proc/self/task/{task}/comm") as file:
                return file.read().strip()
        print(json.dumps({
            "main": sorted(os.sched_getaffinity(0)),
            "zeromq": [sorted(os.sched_getaffinity(int(task))) for task in os.listdir("/proc/self/task")
                       if comm(task).startswith("ZMQbg/IO")],
            "python": [sorted(os.sched_getaffinity(thread.native_id)) for thread in threading.enumerate()
                       if thread is not threading.main_thread()],
        }))
        socket.close()
    """)
    affinity = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                         check=True).stdout)
    every = sorted(usable_cpus())
    assert affinity["main"] == [min(os.sched_getaffinity(0))]
    assert affinity["zeromq"] == [every]  # ZeroMQ's I/O thread: moves, encrypts and decrypts every message
    assert affinity["python"] == [every]  # the authenticator: answers every handshake
