"""Data-race check: two engines touching the same memory, at least one writing, with no semaphore
ordering them, is an error even when the modeled timing happened to serialise them.

Happens-before is tracked with vector clocks: each engine's instructions are ordered by its queue;
a `sem_wait` for value v is ordered after the first v signals of that semaphore (they are what
released it). Each access is a footprint: SBUF/PSUM partitions x a byte range within them, or an
HBM byte range per row (rows at a common stride are compared row by row). Footprints are
conservative inside a partition (a strided pattern covers its whole byte span), so interleaved
patterns written by two engines count as overlapping.
"""

from __future__ import annotations

import bisect

from isthmus.npu.isa import AP, DTYPES, ENGINES, OPS, Program, instruction_error
from isthmus.npu.timing import Timeline

PRUNE_EVERY = 64          # instructions between dropping accesses every engine is known to follow
MAX_LIVE = 4096           # accesses kept per memory space; older ones are dropped (races past it are missed)


def footprints(ins):
    """(ap, is_write) for each memory operand of an instruction."""
    op = OPS[ins.op]
    out = []
    for f in op.fields:
        a = ins.args.get(f.name)
        if isinstance(a, AP):
            write = f.name in ("dst", "accum")
            out.append((a, write))
            if write and ins.op == "matmul" and ins.args["acc"]:
                out.append((a, False))
    return out


def footprint_box(a: AP):
    """(space, p0, p1, lo, hi, row_bytes, rows): partitions [p0, p1) x bytes [lo, hi); for HBM, rows of
    `row_bytes` period starting at lo."""
    if a.space == "hbm":
        period = a.pstride * DTYPES[a.dtype].size
        return a.space, 0, 1, a.offset, a.offset + (a.count - 1) * period + a.extent, period, a.count, a.extent
    return a.space, a.start, a.start + a.count, a.offset, a.offset + a.extent, 0, 1, a.extent


def overlap(x, y) -> bool:
    if x[0] != y[0] or x[1] >= y[2] or y[1] >= x[2] or x[3] >= y[4] or y[3] >= x[4]:
        return False
    period = x[5]
    if x[0] != "hbm" or period != y[5] or period < max(x[7], y[7]) or period == 0:
        return True
    # rows p of x cover [x.lo + p*P, +ext_x), rows q of y [y.lo + q*P, +ext_y): some k = p - q with
    # -ext_x < d + k*P < ext_y, d = x.lo - y.lo, k in [-(rows_y - 1), rows_x - 1]
    d = x[3] - y[3]
    kmin = (-x[7] - d) // period + 1
    kmax = -((d - y[7]) // period) - 1
    return max(kmin, -(y[6] - 1)) <= min(kmax, x[6] - 1)


def check_races(prog: Program, tl: Timeline) -> None:
    """Raise NpuError naming the first pair of unordered, conflicting instructions (in execution order)."""
    _check([(0, i, ins, tl.engine[i], (0, ins["sem"], step) if ins.op == "sem_signal" else None)
            for step, i in enumerate(tl.order) for ins in (prog.instructions[i],)],
           lambda c, j: f"instruction #{j} `{prog.instructions[j]}`", lambda c, err: err)


def check_chip_races(chip, ctl, cfg) -> None:
    """The race check over a chip program (npu/chip.py) as its cores run together: every core's engines
    in one happens-before relation. A `sem_signal_core` counts on the receiving core's semaphore when it
    arrives (its end plus the link latency, as schedule_chip times it), a `dma_core` with `signal` when
    its data has landed (its end), so a `sem_wait` there is ordered after the senders' past (the
    signalling DMA's own write included); a `dma_core` writes the receiving core's SBUF, where it races
    with that core's own engines unless a semaphore orders them. HBM is one memory for all cores."""
    from isthmus.errors import NpuError
    from isthmus.npu.chip import signal_of
    items = []
    for c, i in ctl.order:
        tl, ins = ctl.timelines[c], chip.cores[c].instructions[i]
        items.append((c, i, ins, tl.engine[i], signal_of(c, ins, tl.end[i], cfg)))
    _check(items, lambda c, j: f"core {c}'s instruction #{j} `{chip.cores[c].instructions[j]}`",
           lambda c, err: NpuError(f"core {c}: {err}"))


def _space(c: int, ins, a: AP, write: bool):
    """The memory an operand touches: HBM (shared), or core c's SBUF/PSUM (a dma_core's dst: the peer's)."""
    if a.space == "hbm":
        return "hbm"
    return (ins["core"] if write and ins.op == "dma_core" else c), a.space


def _check(items, name, wrap) -> None:
    """items: (core, instruction index, instruction, engine, the semaphore increment it makes as (core,
    semaphore, arrival order) or None), in execution order. Happens-before by vector clocks over every
    (core, engine); a wait for v joins the clocks of the first v signals of its semaphore to arrive."""
    engines = sorted({(c, e) for c, _, _, e, _ in items}, key=lambda ce: (ce[0], ENGINES.index(ce[1])))
    index = {ce: n for n, ce in enumerate(engines)}
    n_eng = len(engines)
    clock = [[0] * n_eng for _ in range(n_eng)]
    signals: dict = {}              # (core, sem) -> [arrivals sorted, their clocks, prefix joins]
    remaining = [0] * n_eng
    for c, _, _, e, _ in items:
        remaining[index[c, e]] += 1
    live: dict = {}                 # memory -> engine -> accesses (epoch, box, is_write, core, instruction)
    boxes: dict = {}                # identical instructions share footprints
    prune = PRUNE_EVERY * max(1, n_eng // 24)
    for step, (c, i, ins, eng, sig) in enumerate(items):
        e = index[c, eng]
        vc = clock[e]
        if ins.op == "sem_wait" and ins["value"]:
            seen = signals[c, ins["sem"]][2][ins["value"] - 1]
            clock[e] = vc = [max(a, b) for a, b in zip(vc, seen)]
        vc[e] += 1
        if sig is not None:
            dest, sem, arrive = sig
            times, clocks, joins = signals.setdefault((dest, sem), ([], [], []))
            k = bisect.bisect_right(times, arrive)
            times.insert(k, arrive)
            clocks.insert(k, list(vc))
            del joins[k:]
            for n in range(k, len(clocks)):
                joins.append([max(a, b) for a, b in zip(joins[-1], clocks[n])] if joins else clocks[n])
        remaining[e] -= 1
        key = (ins.op, *ins.args.values())
        fp = boxes.get(key)
        if fp is None:
            fp = boxes[key] = [(a, write, footprint_box(a)) for a, write in footprints(ins)]
        for a, write, box in fp:
            per_engine = live.setdefault(_space(c, ins, a, write), {})
            for f, accesses in per_engine.items():
                if f == e:
                    continue
                k = len(accesses) - 1
                while k >= 0 and accesses[k][0] > vc[f]:               # not known to happen before
                    _, other, other_write, oc, j = accesses[k]
                    if (write or other_write) and overlap(box, other):
                        how = "both writing" if write and other_write else "one writing"
                        raise wrap(c, instruction_error(
                            i, ins, f"data race with {name(oc, j)}: both touch "
                            f"{a.space.upper()} ({a} here), {how}, and no semaphore orders them"))
                    k -= 1
            mine = per_engine.setdefault(e, [])
            mine.append((vc[e], box, write, c, i))
            if len(mine) > MAX_LIVE:
                del mine[:len(mine) - MAX_LIVE]
        if step % prune == prune - 1:                             # drop what every busy engine has seen
            active = [clock[x] for x in range(n_eng) if remaining[x]]
            known = [min(col) for col in zip(*active)] if active else None
            for per_engine in live.values():
                for f, acc in per_engine.items():
                    if known is None:
                        acc.clear()
                    elif acc and acc[0][0] <= known[f]:
                        per_engine[f] = [x for x in acc if x[0] > known[f]]
