"""Background threads are not pinned where their creator was (vLLM pins its worker's main thread)."""

import os
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


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two usable CPUs")
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
