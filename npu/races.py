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
    engines = sorted(set(tl.engine), key=ENGINES.index)
    index = {e: n for n, e in enumerate(engines)}
    n_eng = len(engines)
    clock = [[0] * n_eng for _ in range(n_eng)]
    signals: dict[int, list[list[int]]] = {}                   # sem -> prefix joins of its signals' clocks
    remaining = [0] * n_eng
    for i in tl.order:
        remaining[index[tl.engine[i]]] += 1
    # space -> engine -> accesses (epoch, box, is_write, instruction) in increasing epoch
    live = {space: [[] for _ in range(n_eng)] for space in ("hbm", "sbuf", "psum")}
    boxes: dict = {}                                           # identical instructions share footprints
    for step, i in enumerate(tl.order):
        ins = prog.instructions[i]
        e = index[tl.engine[i]]
        vc = clock[e]
        if ins.op == "sem_wait" and ins["value"]:
            seen = signals[ins["sem"]][ins["value"] - 1]
            clock[e] = vc = [max(a, b) for a, b in zip(vc, seen)]
        vc[e] += 1
        if ins.op == "sem_signal":
            hist = signals.setdefault(ins["sem"], [])
            hist.append([max(a, b) for a, b in zip(hist[-1], vc)] if hist else list(vc))
        remaining[e] -= 1
        key = (ins.op, *ins.args.values())
        fp = boxes.get(key)
        if fp is None:
            fp = boxes[key] = [(a, write, footprint_box(a)) for a, write in footprints(ins)]
        for a, write, box in fp:
            per_engine = live[a.space]
            for f in range(n_eng):
                if f == e:
                    continue
                accesses, k = per_engine[f], len(per_engine[f]) - 1
                while k >= 0 and accesses[k][0] > vc[f]:               # not known to happen before
                    _, other, other_write, j = accesses[k]
                    if (write or other_write) and overlap(box, other):
                        how = "both writing" if write and other_write else "one writing"
                        raise instruction_error(
                            i, ins, f"data race with instruction #{j} `{prog.instructions[j]}`: both touch "
                            f"{a.space.upper()} ({a} here), {how}, and no semaphore orders them")
                    k -= 1
            mine = per_engine[e]
            mine.append((vc[e], box, write, i))
            if len(mine) > MAX_LIVE:
                del mine[:len(mine) - MAX_LIVE]
        if step % PRUNE_EVERY == PRUNE_EVERY - 1:                 # drop what every busy engine has seen
            active = [clock[x] for x in range(n_eng) if remaining[x]]
            for f in range(n_eng):
                known = min((c[f] for c in active), default=None)
                for per_engine in live.values():
                    acc = per_engine[f]
                    if known is None:
                        acc.clear()
                    elif acc and acc[0][0] <= known:
                        per_engine[f] = [x for x in acc if x[0] > known]
