"""The thread pools behind the numba target, chosen here so that no environment variable is
needed for the best speed (docs/performance.md, "Threads", has the measurements).

* One pool does all the work: Numba's (OpenMP where libgomp exists, else its workqueue, whose
  launches measured 1.2-2.8x slower here; TBB last, as it is rarely installed and was not
  measured). Prefill matmuls run BLAS inside that pool's work items, one single-threaded BLAS call
  per item (`serial_blas`), instead of BLAS's own pool: two pools on the same cores took turns
  spinning and sleeping, which made a 38-token prefill 3.2x slower on a 2-core host.
* Its workers spin briefly after each parallel launch (libgomp's default policy), so the ~120
  launches of a decode step do not each pay a wake-up.
* The thread that launches the kernels uses fewer threads while other processes keep cores busy
  (`pace`, below): spinning threads that wait for one descheduled thread at every launch made
  decode 100x slower beside a single busy process.

A user who sets NUMBA_THREADING_LAYER, NUMBA_NUM_THREADS or OMP_WAIT_POLICY keeps their setting.
"""

from __future__ import annotations

import os as _os
import threading as _threading
import time as _time

import numba
from numba import get_num_threads as _get_num_threads, set_num_threads as _set_num_threads

from isthmus.openblas import single_threaded

LAYER_PRIORITY = ["omp", "workqueue", "tbb"]


def configure() -> None:
    """Pick the threading layer; must run before the first parallel launch (kernels/numba/__init__)."""
    numba.config.THREADING_LAYER_PRIORITY = LAYER_PRIORITY


def pool_size() -> int:
    """The pool's thread count, fixed for the process: what work is split by, so that how it is
    split (and so any BLAS call's shape) does not follow the count `pace` runs it on."""
    return numba.config.NUMBA_NUM_THREADS


def serial_blas():
    """BLAS calls made inside Numba's parallel kernels run on the calling worker only."""
    return single_threaded("scipy")


# --- fewer threads while other processes hold the cores ---------------------------------------------
# The pool's threads wait for each other at the end of every launch (~150 a decode step). When
# another process keeps a core busy, one of them is off its core for a scheduler slice at a time
# while the others spin at the barrier: on 2 cores beside one CPU-bound process in another session
# (Linux's autogroups give it a full core's share whatever its nice value), decode fell from ~270
# to 0.85 tokens/s, where one thread alone makes ~200. So the thread that launches the kernels
# (`pace`, before each forward pass) looks every CHECK_S at the cores this process may use: the
# cores other processes kept busy are left to them (rounded: a client parsing its stream is not a
# core's worth), and a thread of ours that wanted a core all along but waited for one over STARVED
# of the time gives one up; cores left idle give threads back, one a look. Which threads run a
# launch never changes its numbers: every work item is computed whole by one thread.


CHECK_S = 0.1          # seconds between looks (one costs ~0.3 ms: a /proc file a thread)
STARVED = 0.25         # a busy thread's share of its time spent waiting for a core, past which one thread fewer
BUSY = 0.8             # a thread is busy when it ran or waited to run this share of the window
LEAVE = 0.6            # other processes' use of our cores past which one is left to them (and so on: 1.6 two)
IDLE_CORES = 0.6       # idle cores, at fewer threads than the others leave room for, past which one more
QUIET = 0.5            # cores this process used in a window below which the window says nothing of contention
_TICK = _os.sysconf("SC_CLK_TCK") if hasattr(_os, "sysconf") else 100


class Sample:
    """This process's threads' time on a core and waiting for one (ns, by thread id), its CPU time
    (s, ended threads included) and the busy and idle time (s) of the cores it may use, from /proc
    (`sample`)."""

    __slots__ = ("threads", "cpu", "busy", "idle")

    def __init__(self, threads: dict, cpu: float, busy: float, idle: float):
        self.threads, self.cpu, self.busy, self.idle = threads, cpu, busy, idle


def sample() -> Sample | None:
    """Now's `Sample`; None where /proc does not say (not Linux, no schedstats)."""
    try:
        threads = {}
        for tid in _os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    ran, waited = f.read().split()[:2]
            except (OSError, ValueError):
                continue           # the thread has ended
            threads[tid] = (int(ran), int(waited))
        mine = {f"cpu{c}" for c in _os.sched_getaffinity(0)}
        busy = idle = 0
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                fields = line.split()
                if fields[0] in mine:    # user nice system idle iowait irq softirq (steal is the host's)
                    v = [int(x) for x in fields[1:8]]
                    busy += v[0] + v[1] + v[2] + v[5] + v[6]
                    idle += v[3] + v[4]
        t = _os.times()
        return Sample(threads, t.user + t.system, busy / _TICK, idle / _TICK) if threads else None
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def decide(threads: int, full: int, before: Sample, after: Sample, wall: float) -> int:
    """The thread count for the next window, from two samples taken `wall` seconds apart."""
    if (after.cpu - before.cpu) / wall < QUIET:
        return threads          # this process mostly waited (for a request, for its turn): no evidence
    starved = 0.0
    for tid, (ran, waited) in after.threads.items():
        if tid not in before.threads:
            continue
        ran, waited = (ran - before.threads[tid][0]) * 1e-9, (waited - before.threads[tid][1]) * 1e-9
        if ran + waited > BUSY * wall:
            starved = max(starved, waited / (ran + waited))
    others = max(0.0, (after.busy - before.busy - (after.cpu - before.cpu)) / wall)
    room = max(1, full - int(others + 1 - LEAVE))
    if threads > room:
        return room
    if threads > 1 and starved > STARVED:
        return threads - 1
    if threads < room and (after.idle - before.idle) / wall > IDLE_CORES:
        return threads + 1
    return threads


_STARTED, _STARTED_AT = sample(), _time.monotonic()  # the first look of each thread measures from here
_USER_SET = "NUMBA_NUM_THREADS" in _os.environ      # a count the user chose is kept as it is


class _Governor(_threading.local):
    def __init__(self):
        self.threads = self.full = None       # numba's count, read at the first look (reading it starts the pool)
        self.at, self.last = _STARTED_AT, _STARTED


_governor = _Governor()


def pace() -> None:
    """Called by the launching thread before each forward pass: adjusts its thread count (cheap
    except once every CHECK_S)."""
    g = _governor
    now = _time.monotonic()
    if _USER_SET or now - g.at < CHECK_S or g.last is None:
        return
    if _get_num_threads() != g.threads:              # the first look, or set by someone else: the new full count
        g.threads = g.full = _get_num_threads()
    current = sample()
    if current is not None:
        n = decide(g.threads, g.full, g.last, current, now - g.at)
        if n != g.threads:
            _set_num_threads(n)
            g.threads = n
    g.at, g.last = now, current
