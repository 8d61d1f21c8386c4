"""Chrome / Perfetto trace of a timeline: one track (thread) per engine, one slice per instruction.

Slices are named `label: mnemonic` when the instruction carries a source label (the graph node
the compiler lowered it from), else the mnemonic; `args` hold the index, the full text and the
cost record. A `sem_wait` slice spans the stall, from when it reached the head of its queue.
Open the file at https://ui.perfetto.dev (Open trace file) or chrome://tracing (Load).
"""

from __future__ import annotations

import json

from isthmus.npu.config import NpuConfig
from isthmus.npu.isa import ENGINES, Program
from isthmus.npu.timing import Timeline


def trace_events(prog: Program, tl: Timeline, cfg: NpuConfig) -> dict:
    us = 1e6 / cfg.clock_hz                                   # microseconds per cycle
    engines = sorted(set(tl.engine[i] for i in tl.order), key=ENGINES.index)
    tid = {e: n + 1 for n, e in enumerate(engines)}
    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": f"isthmus NPU ({cfg.name})"}}]
    for e in engines:
        events.append({"ph": "M", "pid": 1, "tid": tid[e], "name": "thread_name", "args": {"name": e.upper()}})
        events.append({"ph": "M", "pid": 1, "tid": tid[e], "name": "thread_sort_index", "args": {"sort_index": tid[e]}})
    for i in tl.order:
        ins = prog.instructions[i]
        t0 = tl.reach[i] if ins.op == "sem_wait" else tl.start[i]
        events.append({
            "ph": "X", "pid": 1, "tid": tid[tl.engine[i]], "cat": tl.engine[i],
            "name": f"{ins.label}: {ins.op}" if ins.label else ins.op,
            "ts": t0 * us, "dur": (tl.end[i] - t0) * us,
            "args": {"index": i, "text": str(ins), "label": ins.label, "cycles": tl.end[i] - tl.start[i],
                     "stall_cycles": tl.start[i] - tl.reach[i], "flops": tl.flops[i], "bytes": tl.dma_bytes[i]},
        })
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"config": cfg.name, "cycles": tl.cycles, "serial": tl.serial}}


def write_trace(path, prog: Program, tl: Timeline, cfg: NpuConfig) -> None:
    with open(path, "w") as f:
        json.dump(trace_events(prog, tl, cfg), f)
