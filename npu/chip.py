"""Several cores as one chip: a program per core, timed concurrently, simulated together, traced per core.

A `ChipProgram` holds one `Program` per core of a config with `cores` > 1 (the `chip` preset). The
cores share HBM (each program declares the tensors it uses; a tensor of the same name must sit at
the same offset in every core's program) and nothing else: each has its own SBUF, PSUM, engines,
DMA queues and semaphores. They meet through two instructions: `dma_core` (a DMA into another
core's SBUF over the core-to-core link) and `sem_signal_core` (a semaphore increment on another
core, seen there `link_latency_cycles` later); a `dma_core` with `signal` counts its own arrival on the
receiver's semaphore, without the second hop. Collectives are built from them (collectives.py).

Timing (`schedule_chip`): the single-core event simulation over every core's engine queues at once
(timing.py's rules: in-order queues, the earliest runnable start next, semaphores). A transfer shares
the bandwidth of the resource it moves bytes over with the core's DMA queues busy moving bytes over the
same resource when it starts: a `dma_copy` / `dma_gather` (HBM) the core's HBM share, `hbm_bytes_per_s /
cores` (every core streaming), with the core's other HBM transfers; a `dma_core` the link,
`link_bytes_per_s`, with its other link sends. A link send does not take HBM bandwidth from a weight load
beside it, nor a load link bandwidth from a send (before this rule every busy queue counted: SmolLM2's
chip decode step 206,925 cycles, 201,078 with it). Both kinds pass through the core's DMA engines, whose
bandwidth (the link's figure, 3.5 TB/s a chip) is above the HBM share, and a step's link bytes are few
(SmolLM2: 1.1 MB a core against 37-41 MB of HBM), so that common path is not modeled as a limit.
A remote signal's arrival is its end plus the link
latency, a signalling `dma_core`'s its end (the last byte landed); semaphore values count arrivals in
time order. Not modeled: contention between cores beyond the per-core HBM share. `LoadedChip` prepares
a chip program once to run many times (a compiled model's chunk programs on `chip`); its race check
(races.check_chip_races) puts every core's engines in one happens-before relation, the cross-core
signals and DMAs included.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
from dataclasses import dataclass, field

import numpy as np

from isthmus.errors import NpuError
from isthmus.npu.config import NpuConfig, load_config
from isthmus.npu.isa import OPS, Program, instruction_error
from isthmus.npu.timing import COSTS, Stats, Timeline, stats


@dataclass
class ChipProgram:
    cores: list[Program]

    def __post_init__(self):
        seen = {}
        for c, prog in enumerate(self.cores):
            for t in prog.tensors:
                other = seen.setdefault(t.name, (c, t))
                if (other[1].offset, other[1].shape, other[1].dtype) != (t.offset, t.shape, t.dtype):
                    raise NpuError(f"tensor {t.name} differs between core {other[0]} and core {c} "
                                   f"(the cores share HBM: same offset, shape and dtype)")

    @property
    def hbm_bytes(self) -> int:
        return max(p.hbm_bytes for p in self.cores)


@dataclass
class ChipTimeline:
    timelines: list[Timeline]                 # one per core
    order: list[tuple[int, int]] = field(default_factory=list)   # (core, instruction), execution order

    @property
    def cycles(self) -> int:
        return max((t.cycles for t in self.timelines), default=0)


def _plan(prog: Program, core: int, cores: int, cfg: NpuConfig):
    rows = []
    for i, ins in enumerate(prog.instructions):
        if ins.op == "halt":
            break
        eng = ins.engine
        if eng.startswith("dma") and int(eng[3:]) >= cfg.dma_queues:
            raise instruction_error(i, ins, f"DMA queue {eng[3:]} does not exist ({cfg.dma_queues} queues)")
        if "sem" in ins.args and ins["sem"] >= cfg.semaphores:
            raise instruction_error(i, ins, f"semaphore {ins['sem']} does not exist ({cfg.semaphores} semaphores)")
        if "core" in ins.args and (ins["core"] >= cores or ins["core"] == core):
            raise instruction_error(i, ins, f"core {ins['core']} is not another core of this chip ({cores} cores; "
                                            f"this is core {core})")
        cost = OPS[ins.op].cost
        cycles, flops = COSTS[cost][0](ins, cfg) if cost != "link" else (cfg.link_latency_cycles, 0)
        nbytes, kind = 0, None
        if ins.op in ("dma_copy", "dma_core"):
            nbytes = max(ins["dst"].nbytes, ins["src"].nbytes)
            kind = "link" if ins.op == "dma_core" else "hbm"
        elif ins.op == "dma_gather":
            nbytes, kind = ins["dst"].nbytes, "hbm"
        rows.append((eng, cycles, flops, nbytes, kind))
    return rows


def signal_of(c: int, ins, end: int, cfg: NpuConfig):
    """(core, semaphore, arrival time) of the semaphore increment an instruction of core `c` ending at `end`
    makes, or None: a `sem_signal` on its own core at its end, a `sem_signal_core` on the other core one
    hop later, a `dma_core` with `signal` on the receiver when its data has landed (its end)."""
    op = ins.op
    if op == "sem_signal":
        return c, ins["sem"], end
    if op == "sem_signal_core":
        return ins["core"], ins["sem"], end + cfg.link_latency_cycles
    if op == "dma_core" and ins["signal"]:
        return ins["core"], ins["sem"], end
    return None


def schedule_chip(chip: ChipProgram, cfg: NpuConfig | str | None = None) -> ChipTimeline:
    """Every core's timeline, the cores running concurrently; NpuError on a deadlock (naming the core).
    The config defaults to the `chip` preset."""
    cfg = load_config(cfg or "chip")
    n = len(chip.cores)
    if n > cfg.cores:
        raise NpuError(f"a chip program for {n} cores on config {cfg.name}, which has {cfg.cores}")
    plans = [_plan(p, c, n, cfg) for c, p in enumerate(chip.cores)]
    bpc = {"hbm": cfg.hbm_bytes_per_cycle, "link": cfg.link_bytes_per_cycle}
    tls = []
    for plan in plans:
        m = len(plan)
        tls.append(Timeline([], [r[0] for r in plan], [0] * m, [0] * m, [0] * m, [r[2] for r in plan],
                            [r[3] for r in plan]))
    order: list[tuple[int, int]] = []
    free: dict[tuple[int, str], int] = {}
    over: dict[tuple[int, str], str | None] = {}             # what each queue's latest instruction moves bytes over
    arrivals: dict[tuple[int, int], list[int]] = {}          # (core, sem) -> signal arrival times, sorted
    waiting: dict[tuple[int, int], list[str]] = {}
    queues: dict[tuple[int, str], list[int]] = {}
    for c, plan in enumerate(plans):
        for i, r in enumerate(plan):
            queues.setdefault((c, r[0]), []).append(i)
    head = {q: 0 for q in queues}
    heap: list[tuple[int, int, int, str]] = []
    dma_engines = [f"dma{q}" for q in range(cfg.dma_queues)]

    def offer(key):
        c, e = key
        q = queues[key]
        if head[key] >= len(q):
            return
        i = q[head[key]]
        ins = chip.cores[c].instructions[i]
        t = free.get(key, 0)
        if ins.op == "sem_wait":
            got = arrivals.get((c, ins["sem"]), [])
            v = ins["value"]
            if len(got) < v:
                waiting.setdefault((c, ins["sem"]), []).append(e)
                return
            if v:
                t = max(t, got[v - 1])
        heapq.heappush(heap, (t, c, i, e))

    for key in queues:
        offer(key)
    while heap:
        t, c, i, e = heapq.heappop(heap)
        eng, cycles, _, nbytes, kind = plans[c][i]
        tl = tls[c]
        tl.reach[i] = free.get((c, e), 0)
        if nbytes:
            # the core's queues busy over the same resource share it (a send beside a load slows neither)
            active = 1 + sum(1 for q in dma_engines if q != e and free.get((c, q), 0) > t and over.get((c, q)) == kind)
            cycles += math.ceil(nbytes * active / bpc[kind])
        tl.start[i], tl.end[i] = t, t + cycles
        free[c, e] = t + cycles
        over[c, e] = kind
        tl.order.append(i)
        order.append((c, i))
        head[c, e] += 1
        offer((c, e))
        ins = chip.cores[c].instructions[i]
        sig = signal_of(c, ins, t + cycles, cfg)
        if sig:
            dest, sem, arrive = sig
            bisect.insort(arrivals.setdefault((dest, sem), []), arrive)
            for w in waiting.pop((dest, sem), []):
                offer((dest, w))
    blocked = [(c, queues[c, e][head[c, e]]) for (c, e) in queues if head[c, e] < len(queues[c, e])]
    if blocked:
        c, i = min(blocked)
        ins = chip.cores[c].instructions[i]
        got = len(arrivals.get((c, ins["sem"]), []))
        raise NpuError(f"core {c}: " + str(instruction_error(
            i, ins, f"semaphore deadlock: waits for semaphore {ins['sem']} >= {ins['value']}, which never gets "
                    f"past {got}" + (f"; {len(blocked) - 1} other engine(s) blocked too" if len(blocked) > 1 else ""))))
    return ChipTimeline(tls, order)


def critical_path(chip: ChipProgram, ctl: ChipTimeline, cfg: NpuConfig | str | None = None) -> list[tuple]:
    """The chain of instructions that sets the chip's cycles, first to last, as (core, instruction index,
    start, end): from the instruction that ends last, back through what let each one start: the signal
    whose arrival released a `sem_wait` that waited (on any core), else the previous instruction of its
    own engine queue (which ended when it started). A gap between a signal's end and its arrival (a
    remote signal's hop) shows as the next entry's start. Aggregated by label and op, it says where a
    step's cycles go (docs/npu-performance.md, *Eight cores*)."""
    cfg = load_config(cfg or "chip")
    arrive: dict[tuple[int, int, int], tuple[int, int]] = {}      # (core, sem, arrival) -> its signaller
    prev: list[dict[int, int]] = []
    for c, (prog, tl) in enumerate(zip(chip.cores, ctl.timelines)):
        last: dict[str, int] = {}
        pv: dict[int, int] = {}
        for i in tl.order:
            sig = signal_of(c, prog.instructions[i], tl.end[i], cfg)
            if sig:
                arrive.setdefault(sig, (c, i))
        for i in sorted(tl.order):                  # queue order is program order within an engine
            pv[i] = last.get(tl.engine[i])
            last[tl.engine[i]] = i
        prev.append(pv)
    c = max(range(len(ctl.timelines)), key=lambda k: ctl.timelines[k].cycles)
    tl = ctl.timelines[c]
    i = max(tl.order, key=lambda j: tl.end[j])
    path = []
    while i is not None:
        tl, ins = ctl.timelines[c], chip.cores[c].instructions[i]
        path.append((c, i, tl.start[i], tl.end[i]))
        if ins.op == "sem_wait" and tl.start[i] > tl.reach[i]:
            c, i = arrive[(c, ins["sem"], tl.start[i])]
        else:
            i = prev[c][i]
    return path[::-1]


@dataclass
class ChipResult:
    outputs: dict[str, np.ndarray]
    stats: list[Stats]                        # per core
    timeline: ChipTimeline

    @property
    def cycles(self) -> int:
        return self.timeline.cycles


class LoadedChip:
    """A chip program timed, checked and prepared once, to run many times (as sim.LoadedProgram is for one
    core: a compiled model's chunk programs on `chip`): `run` only resets memory, writes the inputs,
    executes every core's closures in the timeline's order and reads the outputs. `hbm`: a flat uint8
    array used as the chip's HBM (shared with other loaded chip programs that declare their common
    tensors at the same offsets); `bind` makes tensors resident across runs. `check_races`: the race
    check over all cores together (races.check_chip_races)."""

    def __init__(self, chip: ChipProgram, config: NpuConfig | str | None = None, check_races: bool = False,
                 hbm: np.ndarray | None = None):
        from isthmus.npu.sim import Machine, gc_paused, prepare
        cfg = self.config = load_config(config or "chip")
        if chip.hbm_bytes > cfg.hbm_capacity_bytes:
            raise NpuError(f"the chip program needs {chip.hbm_bytes:,} bytes of HBM; config {cfg.name} has "
                           f"{cfg.hbm_capacity_bytes:,}")
        self.program = chip
        with gc_paused():
            self.timeline = schedule_chip(chip, cfg)
            hbm = np.full(chip.hbm_bytes, 0xFF, np.uint8) if hbm is None else hbm
            self.machines = [Machine.for_program(cfg, p, hbm) for p in chip.cores]
            for m in self.machines:
                m.peers = self.machines
            fns = [dict(zip(tl.order, prepare(p, m, tl.order)))
                   for p, m, tl in zip(chip.cores, self.machines, self.timeline.timelines)]
            self._calls = [(c, i, fns[c][i]) for c, i in self.timeline.order if fns[c][i] is not None]
            if check_races:
                from isthmus.npu.races import check_chip_races
                check_chip_races(chip, self.timeline, cfg)
            self.stats = [stats(p, tl, cfg) for p, tl in zip(chip.cores, self.timeline.timelines)]
        self.tensors = {t.name: t for p in chip.cores for t in p.tensors}
        self._bound: set[str] = set()
        self._runs = 0

    def bind(self, values: dict | None = None, names=()) -> None:
        """Make tensors resident: write `values` now, and keep them and `names` across runs."""
        m = self.machines[0]                     # the HBM is one array: machine 0 keeps its resident ranges
        for name in [*(values or {}), *names]:
            t = self.tensors[name]
            if values and name in values:
                m.write_tensor(t, values[name])
            if name not in self._bound:
                self._bound.add(name)
                m.resident.append((t.offset, t.offset + t.nbytes))

    def run(self, inputs: dict | None = None, require: bool = True) -> ChipResult:
        """`require`: a declared input neither given nor bound is an error (off: whatever HBM holds)."""
        from isthmus.npu.sim import blas_single_threaded
        if self._runs:
            self.machines[0].reset()             # SBUF, PSUM and the non-resident HBM
            for m in self.machines[1:]:
                m.sbuf.fill(0xFF)
                m.psum.fill(0xFF)
        self._runs += 1
        inputs = dict(inputs or {})
        for name, t in self.tensors.items():
            if name in inputs:
                self.machines[0].write_tensor(t, inputs.pop(name))
            elif t.kind in ("input", "inout") and require and name not in self._bound:
                raise NpuError(f"missing input {name} ({t.dtype}{list(t.shape)})")
        if inputs:
            raise NpuError(f"unknown input(s) {', '.join(sorted(inputs))}")
        c = i = 0
        try:
            with np.errstate(all="ignore"), blas_single_threaded():
                for c, i, fn in self._calls:
                    fn()
        except NpuError as e:
            raise NpuError(f"core {c}: " + str(instruction_error(i, self.program.cores[c].instructions[i], str(e))))
        m = self.machines[0]
        outputs = {n: m.read_tensor(t) for n, t in self.tensors.items() if t.kind in ("output", "inout")}
        return ChipResult(outputs, self.stats, self.timeline)


def run_chip(chip: ChipProgram, inputs: dict | None = None, config: NpuConfig | str | None = None,
             hbm: np.ndarray | None = None, check_races: bool = False) -> ChipResult:
    """Time the chip, then execute every core's instructions in that order on shared HBM (config: `chip`).
    `hbm`: an HBM image kept between runs (a flat uint8 array; what it holds stays, so inputs written by
    an earlier run, a KV cache say, need not be passed again); by default a fresh, NaN-filled one."""
    return LoadedChip(chip, config, check_races, hbm).run(inputs, require=hbm is None)


def chip_trace_events(chip: ChipProgram, ctl: ChipTimeline, cfg: NpuConfig) -> dict:
    """One Perfetto process (track group) per core, one track per engine in it."""
    from isthmus.npu.trace import trace_events
    events = []
    for c, (prog, tl) in enumerate(zip(chip.cores, ctl.timelines)):
        for ev in trace_events(prog, tl, cfg)["traceEvents"]:
            ev = dict(ev, pid=c + 1)
            if ev.get("name") == "process_name":
                ev["args"] = {"name": f"core {c} ({cfg.name})"}
            events.append(ev)
        events.append({"ph": "M", "pid": c + 1, "name": "process_sort_index", "args": {"sort_index": c}})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"config": cfg.name, "cores": len(chip.cores), "cycles": ctl.cycles}}


def write_chip_trace(path, chip: ChipProgram, ctl: ChipTimeline, cfg: NpuConfig) -> None:
    with open(path, "w") as f:
        json.dump(chip_trace_events(chip, ctl, cfg), f)
