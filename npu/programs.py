"""Reference NPU programs built with `ProgramBuilder`: the examples, the tests' workloads and the
benchmarks' inputs. examples/npu/matmul_512.s is `tiled_matmul`'s pinned disassembly: a test fails when
the generated code changes; `python -m isthmus.npu.programs` rewrites it after a deliberate change."""

from __future__ import annotations

from pathlib import Path

from isthmus.npu.builder import ProgramBuilder
from isthmus.npu.config import NpuConfig, load_config
from isthmus.npu.isa import AP, DTYPES, Program
from isthmus.npu.timing import schedule


def tiled_matmul(config: NpuConfig | str | None = None, m: int = 512, n: int = 512, k: int = 512,
                 dtype: str = "bf16", tile_n: int = 128, load_queues: int = 8, block_rows: int = 2) -> Program:
    """C[m, n] = AT[k, m]^T @ B[k, n] (AT is A transposed, as the PE array wants it), tiled 128 x tile_n.

    AT and B stay resident in SBUF (so m, n, k are bounded by its size). Output tiles go in blocks of
    `block_rows` tile rows. The first block runs K-outer, column by column, so each loaded piece feeds
    several matmuls while the loads ramp up; later blocks run tile by tile with K inner, so their tiles
    finish one at a time and the stores spread out; consecutive blocks alternate between two sets of
    PSUM tiles. DMA queues 0..load_queues-1 load the pieces in the order of first use; the last queue
    only merges tokens (below); the others store. What is left over the tensor engine's busy cycles is
    the wait for the first two pieces, the tensor engine's own `sem_wait`/`sem_signal` (2 cycles each)
    and the eviction and store of the last result, so the schedule keeps the last two small:

    - a group of loads that all land before the first of them is needed (by a first timing pass of the
      same program) is merged into one token by the join queue, which waits for each of them: the
      tensor engine waits once per group instead of once per load;
    - the tensor engine signals after every second finished tile (evictions are off the critical path
      until the end);
    - the last tile runs in two column halves, each with its own K loop, so the first half is evicted
      and stored while the second is multiplied, and only a half tile's store follows the last matmul;
      the last full tile before them is evicted by ACT and VECTOR together (split where both finish at
      once) and the last three stores queue on one DMA queue, so none shares the bandwidth with another.
    """
    cfg = load_config(config)
    p, kp = cfg.pe_cols, cfg.pe_rows
    mt, nt, kt = m // p, n // tile_n, k // kp
    per_bank = cfg.psum_bank_bytes // (4 * tile_n)
    tiles = block_rows * nt
    if m % p or k % kp or n % tile_n or mt % block_rows or load_queues + 3 > cfg.dma_queues or tile_n % 2:
        raise ValueError("m, k must be multiples of the PE array, n of tile_n (even) and m/128 of block_rows; "
                         "need three more DMA queues than load_queues")
    if not per_bank or 2 * tiles > per_bank * (cfg.psum_bytes_per_partition // cfg.psum_bank_bytes):
        raise ValueError(f"two blocks of {tiles} [128, {tile_n}] fp32 tiles do not fit PSUM")
    blocks = [[(mi, ni) for ni in range(nt) for mi in range(r, r + block_rows)]   # column by column: the first
              for r in range(0, mt, block_rows)]                                  # K step needs a new piece
    steps = [(i, mi, ni, 0, tile_n) for i in range(kt) for mi, ni in blocks[0]]  # every other matmul
    steps += [(i, mi, ni, 0, tile_n) for blk in blocks[1:] for mi, ni in blk for i in range(kt)]
    mi, ni = steps[-1][1:3]
    h = tile_n // 2
    steps = [s for s in steps if s[1:3] != (mi, ni)] + [(i, mi, ni, lo, lo + h) for lo in (0, h) for i in range(kt)]
    args = (cfg, m, n, k, dtype, tile_n, load_queues, blocks, steps)
    draft, uses = _tiled_matmul(*args, joins=[])
    return _tiled_matmul(*args, joins=_joinable(uses, schedule(draft, cfg)))[0]


def _joinable(uses, tl, slack: int = 12) -> list[list[int]]:
    """Groups of loads (by their index in `uses`: (DMA instruction, first matmul that reads it), in the
    order of first use) that all land `slack` cycles before the first of them is needed."""
    groups, cur = [], []
    for j in range(len(uses)):
        cand = cur + [j]
        if max(tl.end[uses[x][0]] for x in cand) + slack <= min(tl.start[uses[x][1]] for x in cand):
            cur = cand
        else:
            groups, cur = groups + [cur] * (len(cur) > 1), [j]
    return groups + [cur] * (len(cur) > 1)


def _tiled_matmul(cfg, m, n, k, dtype, tile_n, load_queues, blocks, steps, joins):
    """Emit `tiled_matmul`'s program for its matmul steps (K tile, tile row, tile column, column range)
    and its join groups; returns it with the (load, first use) instruction indices of each load."""
    p, kp = cfg.pe_cols, cfg.pe_rows
    nt, kt, sz = n // tile_n, k // kp, DTYPES[dtype].size
    per_bank = cfg.psum_bank_bytes // (4 * tile_n)
    tiles = len(blocks[0])
    b = ProgramBuilder(cfg)
    AT = b.tensor("AT", (k, m), dtype, "input")
    B = b.tensor("B", (k, n), dtype, "input")
    C = b.tensor("C", (m, n), dtype, "output")
    at = b.sbuf((kt, m), dtype, kp)                                  # resident: [K part, kt, m]
    bt = b.sbuf((kt, n), dtype, kp)                                  # resident: [K part, kt, n]
    banks = [b.psum((per_bank, tile_n)) for _ in range(-(-2 * tiles // per_bank))]
    out = b.sbuf(((m // p) * nt, tile_n), dtype, p)
    join_q, store_q = cfg.dma_queues - 1, list(range(load_queues, cfg.dma_queues - 1))

    def at_tile(i, mi):
        return AP("sbuf", dtype, 0, kp, at.offset + (i * m + mi * p) * sz, ((p, 1),))

    def b_tile(i, ni, lo=0, hi=tile_n):
        return AP("sbuf", dtype, 0, kp, bt.offset + (i * n + ni * tile_n + lo) * sz, ((hi - lo, 1),))

    place = {tile: ((bi % 2) * tiles + t, bi, t) for bi, blk in enumerate(blocks) for t, tile in enumerate(blk)}

    def ps_tile(mi, ni, lo, hi):                                     # a tile's PSUM place, set by block parity
        bank, slot = divmod(place[mi, ni][0], per_bank)
        return AP("psum", "f32", 0, p, banks[bank].offset + (slot * tile_n + lo) * 4, ((hi - lo, 1),))

    order = []                                                       # pieces in the order of first use
    for i, mi, ni, _, _ in steps:
        order += [x for x in (("AT", i, mi), ("B", i, ni)) if x not in order]
    loaded, index = {}, {}
    for j, (name, i, x) in enumerate(order):
        q = j % load_queues
        with b.label(f"load {name}[{i},{x}]"):
            index[name, i, x] = len(b.instructions)
            if name == "AT":
                b.dma_copy(at_tile(i, x), AT[i * kp:(i + 1) * kp, x * p:(x + 1) * p], queue=q)
            else:
                b.dma_copy(b_tile(i, x), B[i * kp:(i + 1) * kp, x * tile_n:(x + 1) * tile_n], queue=q)
            loaded[name, i, x] = b.signal(f"dma{q}")
    for group in joins:                                              # one token for each group of loads
        with b.label("join loads"):
            b.wait(f"dma{join_q}", *[loaded[order[j]] for j in group])
            token = b.signal(f"dma{join_q}")
        for j in group:
            loaded[order[j]] = token

    left = {}                                                        # K steps still to run per piece
    for i, mi, ni, lo, hi in steps:
        left[mi, ni, lo, hi] = left.get((mi, ni, lo, hi), 0) + 1
    pieces = list(left)
    last3 = pieces[-3:]
    block_end = {[x for x in pieces if x[:2] in blk][-1] for blk in blocks}
    first_use, evicted, finished, count = {}, {}, [], 0
    for i, mi, ni, lo, hi in steps:
        _, bi, t = place[mi, ni]
        with b.label(f"C[{mi},{ni}]"):
            if i == 0 and lo == 0 and bi >= 2:                       # its PSUM tile was evicted two blocks ago
                b.wait("tensor", *evicted[blocks[bi - 2][t]])
            b.wait("tensor", loaded["AT", i, mi], loaded["B", i, ni])
            for x in (("AT", i, mi), ("B", i, ni)):
                first_use.setdefault(x, len(b.instructions))
            b.matmul(ps_tile(mi, ni, lo, hi), at_tile(i, mi), b_tile(i, ni, lo, hi), acc=int(i > 0))
        piece = (mi, ni, lo, hi)
        left[piece] -= 1
        if left[piece]:
            continue
        finished.append(piece)
        if len(finished) < (tiles // 2 if bi == 0 else 2) and piece not in last3 and piece not in block_end:
            continue
        done = b.signal("tensor")
        for mi2, ni2, lo2, hi2 in finished:
            dst = out.offset + ((mi2 * nt + ni2) * tile_n + lo2) * sz
            split = (mi2, ni2, lo2, hi2) == last3[0]
            cut = (hi2 - lo2 + cfg.vector_fixed_cycles - cfg.act_fixed_cycles) // 2 if split else 0
            parts = [("act", lo2, lo2 + cut), ("vector", lo2 + cut, hi2)] if split else \
                [("vector" if count % 2 or (mi2, ni2, lo2, hi2) in last3 else "act", lo2, hi2)]
            count += 1
            tokens = []
            with b.label(f"C[{mi2},{ni2}]"):
                for eng, a, z in parts:
                    b.wait(eng, done)
                    d = AP("sbuf", dtype, 0, p, dst + (a - lo2) * sz, ((z - a, 1),))
                    src = ps_tile(mi2, ni2, a, z)
                    b.copy(d, src) if eng == "vector" else b.activate(d, src, func="identity")
                    tokens.append(b.signal(eng))
                evicted.setdefault((mi2, ni2), []).extend(tokens)
                q = store_q[-1] if (mi2, ni2, lo2, hi2) in last3 else store_q[count % (len(store_q) - 1)]
                b.wait(f"dma{q}", *tokens)
                b.dma_copy(C[mi2 * p:(mi2 + 1) * p, ni2 * tile_n + lo2:ni2 * tile_n + hi2],
                           AP("sbuf", dtype, 0, p, dst, ((hi2 - lo2, 1),)), queue=q)
        finished = []
    uses = [(index[x], first_use[x]) for x in order]
    return b.build(), uses


def tile_mix(config: NpuConfig | str | None = None, partitions: int = 32, cols: int = 32,
             repeats: int = 1000) -> Program:
    """A simulator workload: `repeats` blocks of 8 compute instructions (5 vector, 1 act, 1 tensor) on
    [partitions, cols] tiles, with the semaphores that order them (6 sync instructions a block)."""
    cfg = load_config(config)
    b = ProgramBuilder(cfg)
    x, y = b.sbuf(cols, "f32", partitions), b.sbuf(cols, "f32", partitions)
    h, w = b.sbuf(cols, "bf16", partitions), b.sbuf(partitions, "bf16", partitions)
    s, ps = b.sbuf(1, "f32", partitions), b.psum(cols, "f32", partitions)
    b.memset(x.ap(), value=0.5)
    b.memset(w.ap(), value=0.25)
    b.iota(y.ap(), base=1, pcoef=1, c0=-1)
    act_done = evicted = None
    for _ in range(repeats):
        b.wait("vector", act_done)
        b.tensor_tensor(x.ap(), x.ap(), y.ap(), op="add")
        b.tensor_scalar(h.ap(), x.ap(), op="mul", scalar=0.5)
        h_ready = b.signal("vector")
        b.wait("act", h_ready)
        b.activate(x.ap(), h.ap(), func="tanh", scale=0.5, bias=0.1)
        act_done = b.signal("act")
        b.wait("tensor", h_ready, evicted)
        b.matmul(ps.ap(), w.ap(), h.ap(), acc=0)
        b.wait("vector", b.signal("tensor"))
        b.copy(y.ap(), ps.ap())
        evicted = b.signal("vector")
        b.tensor_reduce(s.ap(), y.ap(), op="max")
        b.tensor_scalar(y.ap(), y.ap(), op="mul", scalar=s.ap())
        b.select(y.ap(), y.ap(), cmp="ge", pcoef=1, c0=-1, fill=0.0)
    return b.build()


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "npu"
GOLDEN = {"matmul_512.s": lambda: tiled_matmul("core", 512, 512, 512, "bf16")}


def main() -> int:
    """Rewrite the pinned example programs (examples/npu/*.s) from these generators."""
    from isthmus.npu.asm import format_program
    for name, make in GOLDEN.items():
        (EXAMPLES / name).write_text(format_program(make()))
        print(f"wrote {EXAMPLES / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
