"""The launching thread's thread count under other processes' load (kernels/numba/threads.py):
`decide` from two /proc samples, checked on made-up samples (the scheduler's numbers, not timings),
and `sample` against this process's own /proc."""

import os
import time

import pytest

from isthmus.kernels.numba import threads
from isthmus.kernels.numba.threads import Sample, decide

NS = 1e9


def two(wall, *, mine=(), others=0.0, idle=0.0, cores=2):
    """Samples `wall` s apart: each of `mine` a thread's (s on a core, s waiting for one); the
    process's CPU their sum; the cores busy with others' work `others` cores and idle `idle`."""
    before = Sample({str(i): (0, 0) for i in range(len(mine))}, 0.0, 0.0, 0.0)
    ran = sum(r for r, _ in mine)
    after = Sample({str(i): (int(r * NS), int(w * NS)) for i, (r, w) in enumerate(mine)}, ran,
                   ran + others * wall, idle * wall)
    return before, after


def test_a_core_another_process_keeps_busy_is_left_to_it():
    # two threads sharing one core's worth beside a process that took the other core
    before, after = two(0.1, mine=[(0.05, 0.05), (0.05, 0.05)], others=1.0)
    assert decide(2, 2, before, after, 0.1) == 1
    # 16 threads, one process beside them: fifteen
    before, after = two(0.1, mine=[(0.1, 0.0)] * 15, others=1.0)
    assert decide(16, 16, before, after, 0.1) == 15


def test_a_window_this_process_mostly_waited_through_says_nothing():
    # a benchmark's peer ran both cores while this process waited for its turn
    before, after = two(0.5, mine=[(0.01, 0.0), (0.0, 0.0)], others=2.0)
    assert decide(2, 2, before, after, 0.5) == 2


def test_a_client_parsing_its_stream_is_not_a_core():
    before, after = two(0.1, mine=[(0.095, 0.005), (0.1, 0.0)], others=0.45)
    assert decide(2, 2, before, after, 0.1) == 2


def test_a_starved_busy_thread_gives_one_up_and_an_idle_one_does_not_count():
    before, after = two(0.1, mine=[(0.06, 0.04), (0.1, 0.0)])           # 40 % of its time waiting
    assert decide(2, 2, before, after, 0.1) == 1
    before, after = two(0.1, mine=[(0.01, 0.05), (0.1, 0.0)])           # mostly asleep: not busy
    assert decide(2, 2, before, after, 0.1) == 2
    before, after = two(0.1, mine=[(0.06, 0.04)])
    assert decide(1, 2, before, after, 0.1) == 1                        # never below one


def test_idle_cores_give_threads_back_one_a_look_up_to_the_full_count():
    before, after = two(0.1, mine=[(0.1, 0.0)], idle=1.0)
    assert decide(1, 2, before, after, 0.1) == 2
    before, after = two(0.1, mine=[(0.1, 0.0)] * 2, idle=6.0, cores=8)
    assert decide(2, 8, before, after, 0.1) == 3
    assert decide(2, 2, *two(0.1, mine=[(0.1, 0.0)] * 2, idle=0.0), 0.1) == 2
    before, after = two(0.1, mine=[(0.1, 0.0)], others=1.0, idle=0.0)   # the other process still there
    assert decide(1, 2, before, after, 0.1) == 1


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="no /proc")
def test_sample_reads_this_processs_threads_and_its_cores():
    a = threads.sample()
    spin = time.thread_time() + 0.05
    while time.thread_time() < spin:
        pass
    b = threads.sample()
    me = str(__import__("threading").get_native_id())
    assert me in a.threads and me in b.threads
    assert b.threads[me][0] - a.threads[me][0] >= 0.04 * NS          # this thread's time on a core
    assert b.cpu - a.cpu >= 0.04 and b.busy - a.busy >= 0.03            # counted for the process and its cores (10 ms ticks)


def test_a_count_set_by_the_user_is_kept(monkeypatch):
    import numba

    g = threads._governor
    for name in ("threads", "full", "last"):                 # put back as they were afterwards
        monkeypatch.setattr(g, name, getattr(g, name))
    calls = []
    monkeypatch.setattr(threads, "_set_num_threads", calls.append)
    monkeypatch.setattr(threads, "decide", lambda *a: 1)
    monkeypatch.setattr(g, "at", 0.0)
    monkeypatch.setattr(threads, "_USER_SET", True)       # NUMBA_NUM_THREADS in the environment
    threads.pace()
    assert calls == []
    monkeypatch.setattr(threads, "_USER_SET", False)
    threads.pace()
    assert calls == ([1] if numba.get_num_threads() > 1 else [])
