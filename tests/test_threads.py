"""Background threads leave the cores their creator was pinned to (vLLM pins its worker's main thread)."""

import os
import threading

import pytest

from kvshelf.threads import background_cpus, background_thread, usable_cpus


def test_usable_cpus_reads_the_cgroup_cpuset(tmp_path):
    cpuset = tmp_path / "cpuset.cpus.effective"
    cpuset.write_text("0-2,5,8-9\n")
    assert usable_cpus(cpuset) == {0, 1, 2, 5, 8, 9}


def test_usable_cpus_without_a_cpuset_is_every_cpu(tmp_path):
    assert usable_cpus(tmp_path / "missing") == set(range(os.cpu_count()))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert usable_cpus(empty) == set(range(os.cpu_count()))


def test_background_cpus_are_the_usable_ones_the_creator_is_not_pinned_to():
    assert background_cpus({0}, {0, 1, 2, 3}) == {1, 2, 3}
    assert background_cpus({0, 1, 2, 3}, {0, 1, 2, 3}) == {0, 1, 2, 3}  # not pinned: anywhere
    assert background_cpus({0, 1}, {0, 1}) == {0, 1}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two usable CPUs")
def test_a_thread_started_by_a_pinned_thread_runs_on_the_other_cores():
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
    assert seen["background"] == allowed - {pinned}
