"""The timing model: per-instruction cost formulas and the engine timeline.

Each engine (tensor, vector, act and one per DMA queue) is an in-order queue holding the
program's instructions for it, in program order. Engines run concurrently; the only ordering
between them is through semaphores (`sem_wait` blocks its queue until a semaphore reaches a
value; `sem_signal` adds 1 when its queue reaches it). The schedule is an event simulation: the
runnable queue head with the earliest start time runs next, so semaphore signal times are known
in order. The functional simulator executes instructions in exactly this order.

With `serial=True` (FORCE_SERIAL) every instruction starts when the previous one in program order
ends, and a `sem_wait` not already satisfied by earlier signals is a deadlock.

Cost formulas (cycles; all constants come from the config, see `COSTS` and docs/npu.md).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from isthmus.npu.config import NpuConfig
from isthmus.npu.isa import ENGINES, OPS, Instruction, Program, instruction_error


def _matmul(ins: Instruction, cfg: NpuConfig):
    mov, sta = ins["moving"], ins["stationary"]
    k, n, m = mov.count, mov.free_elems, sta.free_elems
    passes = cfg.tensor_fp32_passes if mov.dtype == "f32" else 1
    return max(n, cfg.tensor_min_moving) * passes + cfg.tensor_fixed_cycles, 2 * k * m * n


def _elems(ins: Instruction) -> int:
    """Elements per partition an engine streams: the largest AP operand's free size."""
    return max(v.free_elems for k, v in ins.args.items() if hasattr(v, "free_elems"))


def _vector(ins: Instruction, cfg: NpuConfig):
    e = _elems(ins)
    return math.ceil(e / cfg.vector_elems_per_cycle) + cfg.vector_fixed_cycles, ins["dst"].count * e


def _transpose(ins: Instruction, cfg: NpuConfig):
    src = ins["src"]
    e = max(src.count, src.free_elems)
    return math.ceil(e / cfg.vector_elems_per_cycle) + cfg.vector_fixed_cycles, 0


def _act(ins: Instruction, cfg: NpuConfig):
    e = ins["src"].free_elems
    per = 3 + (ins.args.get("accum") is not None)   # scale, bias, f (, sum)
    return math.ceil(e / cfg.act_elems_per_cycle) + cfg.act_fixed_cycles, per * ins["src"].count * e


def _dequant(ins: Instruction, cfg: NpuConfig):
    e = ins["dst"].free_elems
    if ins["engine"] == "act":
        return math.ceil(e / cfg.act_elems_per_cycle) + cfg.act_fixed_cycles, 2 * ins["dst"].count * e
    return math.ceil(e / cfg.vector_elems_per_cycle) + cfg.vector_fixed_cycles, 2 * ins["dst"].count * e


def _sync(ins: Instruction, cfg: NpuConfig):
    return cfg.sync_cycles, 0


def _dma(ins: Instruction, cfg: NpuConfig):
    """Fixed part only; `schedule` adds bytes * active_queues / bytes_per_cycle at the start time."""
    return cfg.dma_latency_cycles, 0


# cost class -> (function(ins, cfg) -> (cycles, flops), formula as documented)
COSTS = {
    "matmul": (_matmul, "max(N, tensor_min_moving) * passes + tensor_fixed_cycles; passes = tensor_fp32_passes "
                        "for f32 operands, else 1. FLOPs = 2*K*M*N."),
    "vector": (_vector, "ceil(E / vector_elems_per_cycle) + vector_fixed_cycles, E = the largest operand's "
                        "elements per partition. FLOPs = partitions * E."),
    "transpose": (_transpose, "ceil(max(P, F) / vector_elems_per_cycle) + vector_fixed_cycles for a [P, F] source."),
    "act": (_act, "ceil(E / act_elems_per_cycle) + act_fixed_cycles, E = src elements per partition. "
                  "FLOPs = (3, or 4 with accum) * partitions * E."),
    "dma": (_dma, "dma_latency_cycles + ceil(bytes * A / (hbm_bytes_per_s / cores / clock_hz)), bytes = the larger "
                  "side, A = the core's HBM transfers in flight when it starts (itself included): they share the "
                  "core's HBM bandwidth (link sends use none of it and do not count)."),
    "dequant": (_dequant, "as vector (engine=vector) or act (engine=act) over E = dst elements per partition. "
                          "FLOPs = 2 * partitions * E."),
    "link": (_dma, "link_latency_cycles + ceil(bytes * A / (link_bytes_per_s / clock_hz)), A = the core's link "
                   "sends in flight when it starts, itself included (they share the link; HBM transfers do not "
                   "count; npu.chip schedules it, a one-core program cannot hold it). With "
                   "`signal`, the receiver's semaphore counts it at its end."),
    "sync": (_sync, "sync_cycles (plus, for sem_wait, the stall until the semaphore is reached)."),
}


@dataclass
class Timeline:
    """When each executed instruction ran. `order` lists instruction indices in execution order."""

    order: list[int]
    engine: list[str]
    start: list[int]
    end: list[int]
    reach: list[int]          # when the instruction reached the head of its queue
    flops: list[int]
    dma_bytes: list[int]
    serial: bool = False

    @property
    def cycles(self) -> int:
        return max(self.end, default=0)


@dataclass
class EngineStats:
    instructions: int = 0
    busy: int = 0
    stall: int = 0


@dataclass
class OpStats:
    count: int = 0
    cycles: int = 0
    flops: int = 0
    bytes: int = 0


@dataclass
class Stats:
    config: NpuConfig
    cycles: int
    serial: bool
    engines: dict[str, EngineStats] = field(default_factory=dict)
    ops: dict[str, OpStats] = field(default_factory=dict)
    flops: int = 0
    hbm_read_bytes: int = 0
    hbm_write_bytes: int = 0
    dma_bytes: int = 0

    @property
    def seconds(self) -> float:
        return self.cycles / self.config.clock_hz

    @property
    def achieved_flops(self) -> float:
        return self.flops / self.seconds if self.cycles else 0.0

    @property
    def achieved_bytes_per_s(self) -> float:
        return (self.hbm_read_bytes + self.hbm_write_bytes) / self.seconds if self.cycles else 0.0

    def table(self) -> str:
        c = self.config
        lines = [f"config {c.name}{'  (FORCE_SERIAL)' if self.serial else ''}: {self.cycles:,} cycles = "
                 f"{self.seconds * 1e6:.3f} us at {c.clock_hz / 1e9:g} GHz",
                 f"{'engine':<8}{'instrs':>8}{'busy':>12}{'stall':>12}{'util':>8}"]
        for name, e in self.engines.items():
            util = e.busy / self.cycles if self.cycles else 0.0
            lines.append(f"{name:<8}{e.instructions:>8,}{e.busy:>12,}{e.stall:>12,}{util:>8.1%}")
        lines.append(f"{'op':<15}{'count':>7}{'cycles':>12}{'FLOPs':>14}{'bytes':>14}")
        for name, o in self.ops.items():
            lines.append(f"{name:<15}{o.count:>7,}{o.cycles:>12,}{o.flops:>14,}{o.bytes:>14,}")
        lines.append(f"FLOPs {self.flops:,}: {self.achieved_flops / 1e12:.3f} TFLOP/s achieved of "
                     f"{c.peak_flops / 1e12:.3f} peak ({self.achieved_flops / c.peak_flops:.1%})")
        lines.append(f"HBM bytes read {self.hbm_read_bytes:,}, written {self.hbm_write_bytes:,}: "
                     f"{self.achieved_bytes_per_s / 1e9:.2f} GB/s achieved of {c.core_hbm_bytes_per_s / 1e9:.1f} peak "
                     f"({self.achieved_bytes_per_s / c.core_hbm_bytes_per_s:.1%})")
        return "\n".join(lines)


def _plan(prog: Program, cfg: NpuConfig):
    """Per instruction (up to the first halt): engine, cycles, flops, dma bytes; checks sync fields.
    Identical instructions share one row."""
    rows, done = [], {}
    for i, ins in enumerate(prog.instructions):
        if ins.op == "halt":
            break
        key = (ins.op, *ins.args.values())
        row = done.get(key)
        if row is None:
            if ins.op in ("dma_core", "sem_signal_core"):
                raise instruction_error(i, ins, "a core-to-core instruction: run the chip program (npu.chip)")
            eng = ins.engine
            if eng.startswith("dma") and int(eng[3:]) >= cfg.dma_queues:
                raise instruction_error(i, ins, f"DMA queue {eng[3:]} does not exist ({cfg.dma_queues} queues)")
            if "sem" in ins.args and ins["sem"] >= cfg.semaphores:
                raise instruction_error(i, ins, f"semaphore {ins['sem']} does not exist ({cfg.semaphores} semaphores)")
            cycles, flops = COSTS[OPS[ins.op].cost][0](ins, cfg)
            nbytes = max(ins["dst"].nbytes, ins["src"].nbytes) if ins.op == "dma_copy" else \
                ins["dst"].nbytes if ins.op == "dma_gather" else 0
            row = done[key] = (eng, cycles, flops, nbytes)
        rows.append(row)
    return rows


def schedule(prog: Program, cfg: NpuConfig, serial: bool = False) -> Timeline:
    """Run the timing model; raises NpuError (naming the blocked sem_wait) on a deadlock."""
    plan = _plan(prog, cfg)
    n = len(plan)
    ins_list = prog.instructions
    start, end, reach = [0] * n, [0] * n, [0] * n
    order: list[int] = []
    bpc = cfg.hbm_bytes_per_cycle
    sem_count = [0] * cfg.semaphores
    sem_times: list[list[int]] = [[] for _ in range(cfg.semaphores)]
    free: dict[str, int] = {}
    dma_engines = [f"dma{q}" for q in range(cfg.dma_queues)]

    def run(i: int, t: int, e: str) -> int:
        reach[i] = free.get(e, 0)
        cycles = plan[i][1]
        if plan[i][3]:
            active = 1 if serial else 1 + sum(1 for q in dma_engines if q != e and free.get(q, 0) > t)
            cycles += math.ceil(plan[i][3] * active / bpc)
        start[i], end[i] = t, t + cycles
        free[e] = t + cycles
        order.append(i)
        ins = ins_list[i]
        if ins.op == "sem_signal":
            sem_count[ins["sem"]] += 1
            sem_times[ins["sem"]].append(t + cycles)
        return t + cycles

    if serial:
        t = 0
        for i in range(n):
            ins = ins_list[i]
            if ins.op == "sem_wait" and sem_count[ins["sem"]] < ins["value"]:
                raise instruction_error(i, ins, f"semaphore deadlock in FORCE_SERIAL order: semaphore {ins['sem']} "
                                                f"is {sem_count[ins['sem']]} here and no earlier signal remains")
            free[plan[i][0]] = t
            t = run(i, t, plan[i][0])
        return Timeline(order, [p[0] for p in plan], start, end, reach, [p[2] for p in plan],
                        [p[3] for p in plan], serial=True)

    queues: dict[str, list[int]] = {}
    for i, p in enumerate(plan):
        queues.setdefault(p[0], []).append(i)
    head = {e: 0 for e in queues}
    heap: list[tuple[int, int, str]] = []
    waiting: dict[int, list[str]] = {}

    def offer(e: str):
        q = queues[e]
        if head[e] >= len(q):
            return
        i = q[head[e]]
        ins = ins_list[i]
        t = free.get(e, 0)
        if ins.op == "sem_wait":
            s, v = ins["sem"], ins["value"]
            if sem_count[s] < v:
                waiting.setdefault(s, []).append(e)
                return
            if v:
                t = max(t, sem_times[s][v - 1])
        heapq.heappush(heap, (t, i, e))

    for e in queues:
        offer(e)
    while heap:
        t, i, e = heapq.heappop(heap)
        run(i, t, e)
        head[e] += 1
        offer(e)
        ins = ins_list[i]
        if ins.op == "sem_signal" and ins["sem"] in waiting:
            for w in waiting.pop(ins["sem"]):
                offer(w)
    blocked = [queues[e][head[e]] for e in queues if head[e] < len(queues[e])]
    if blocked:
        i = min(blocked)
        ins = ins_list[i]
        others = f"; {len(blocked) - 1} other engine(s) blocked too" if len(blocked) > 1 else ""
        raise instruction_error(i, ins, f"semaphore deadlock: waits for semaphore {ins['sem']} >= {ins['value']}, "
                                        f"which never gets past {sem_count[ins['sem']]}{others}")
    return Timeline(order, [p[0] for p in plan], start, end, reach, [p[2] for p in plan], [p[3] for p in plan])


def stats(prog: Program, tl: Timeline, cfg: NpuConfig) -> Stats:
    st = Stats(cfg, tl.cycles, tl.serial)
    busy, stall, count = {}, {}, {}
    op_count, op_cycles, op_flops, op_bytes = {}, {}, {}, {}
    for i in tl.order:
        op, e = prog.instructions[i].op, tl.engine[i]
        dur = tl.end[i] - tl.start[i]
        busy[e] = busy.get(e, 0) + dur
        stall[e] = stall.get(e, 0) + tl.start[i] - tl.reach[i]
        count[e] = count.get(e, 0) + 1
        op_count[op] = op_count.get(op, 0) + 1
        op_cycles[op] = op_cycles.get(op, 0) + dur
        op_flops[op] = op_flops.get(op, 0) + tl.flops[i]
        if tl.dma_bytes[i]:
            op_bytes[op] = op_bytes.get(op, 0) + tl.dma_bytes[i]
            ins = prog.instructions[i]
            src = None if op == "dma_gather" else ins["src"]
            if src is None or src.space == "hbm":
                st.hbm_read_bytes += src.nbytes if src is not None else ins["dst"].nbytes
            if ins["dst"].space == "hbm":
                st.hbm_write_bytes += ins["dst"].nbytes
    for e in sorted(busy, key=ENGINES.index):
        st.engines[e] = EngineStats(count[e], busy[e], stall[e])
    for op in op_count:
        st.ops[op] = OpStats(op_count[op], op_cycles[op], op_flops[op], op_bytes.get(op, 0))
    st.flops = sum(op_flops.values())
    st.dma_bytes = sum(op_bytes.values())
    return st


def engine_bound(prog: Program, cfg: NpuConfig, engine: str = "tensor") -> int:
    """Cycles `engine` must be busy with work other than synchronisation: a lower bound on any schedule."""
    return sum(cycles for (e, cycles, _, _), ins in zip(_plan(prog, cfg), prog.instructions)
               if e == engine and OPS[ins.op].cost != "sync")


@dataclass(frozen=True)
class Roofline:
    """The least time any schedule of a program can take on a config: each engine's busy floor and the
    compulsory HBM traffic at full bandwidth, in cycles. `binding` names the largest term."""

    tensor: int
    vector: int
    act: int
    hbm: float
    hbm_bytes: int            # distinct HBM bytes read plus distinct bytes written

    @property
    def terms(self) -> dict[str, float]:
        return {"tensor": self.tensor, "vector": self.vector, "act": self.act, "hbm": self.hbm}

    @property
    def cycles(self) -> float:
        return max(self.terms.values())

    @property
    def binding(self) -> str:
        return max(self.terms, key=self.terms.get)

    def describe(self, cycles: int) -> str:
        """One line: the bound, what binds, and how far `cycles` is from it."""
        return (f"roofline {self.cycles:,.0f} cycles ({self.binding} binds: tensor {self.tensor:,}, vector "
                f"{self.vector:,}, act {self.act:,}, HBM {self.hbm_bytes / 1e6:,.2f} MB = {self.hbm:,.0f}); "
                f"the program takes {cycles / self.cycles:.3f}x that")


def _distinct_bytes(spans: list) -> int:
    """Bytes covered by a list of (starts, ends) arrays of half-open HBM byte ranges."""
    import numpy as np
    if not spans:
        return 0
    starts = np.concatenate([s for s, _ in spans])
    ends = np.concatenate([e for _, e in spans])
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    # a range starts a new run where it begins past everything before it
    new = np.ones(len(starts), bool)
    new[1:] = starts[1:] > ends[:-1]
    run_start = starts[new]
    run_end = np.append(ends[np.flatnonzero(new)[1:] - 1], ends[-1])
    return int((run_end - run_start).sum())


def _hbm_rows(ap) -> tuple:
    """Each HBM row of an access pattern as a byte range (its first to its last byte: conservative for a
    strided row, exact for the contiguous rows programs stream)."""
    import numpy as np
    size = ap.nbytes // (ap.count * ap.free_elems)
    row = np.arange(ap.count, dtype=np.int64) * ap.pstride * size + ap.offset
    return row, row + ap.extent


def roofline(prog: Program, cfg: NpuConfig) -> Roofline:
    """max(tensor-engine bound, vector/act bound, compulsory HBM traffic / bandwidth) of a program. Engine
    bounds are the busy cycles of its instructions (synchronisation excluded); the HBM term counts each
    byte once (reading it again, or a gathered row, is not compulsory beyond the first time; a gather's
    rows count as its destination's bytes, since which rows is data)."""
    busy = {"tensor": 0, "vector": 0, "act": 0}
    reads, writes, gathered = [], [], 0
    seen = set()
    for (e, cycles, _, _), ins in zip(_plan(prog, cfg), prog.instructions):
        if e in busy and OPS[ins.op].cost != "sync":
            busy[e] += cycles
        if ins.op == "dma_copy":
            key = (ins["src"], ins["dst"])
            if key in seen:
                continue
            seen.add(key)
            if ins["src"].space == "hbm":
                reads.append(_hbm_rows(ins["src"]))
            if ins["dst"].space == "hbm":
                writes.append(_hbm_rows(ins["dst"]))
        elif ins.op == "dma_gather":
            gathered += ins["dst"].nbytes
    nbytes = _distinct_bytes(reads) + _distinct_bytes(writes) + gathered
    return Roofline(busy["tensor"], busy["vector"], busy["act"], nbytes / cfg.hbm_bytes_per_cycle, nbytes)
