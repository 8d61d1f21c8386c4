"""Reference NPU programs built with `ProgramBuilder`: the examples, the tests' workloads and the
benchmarks' inputs. examples/npu/matmul_512.s is `tiled_matmul`'s pinned disassembly: a test fails when
the generated code changes; `python -m isthmus.npu.programs` rewrites it after a deliberate change."""

from __future__ import annotations

import itertools
from pathlib import Path

from isthmus.npu.builder import ProgramBuilder
from isthmus.npu.config import NpuConfig, load_config
from isthmus.npu.isa import AP, DTYPES, Program


def tiled_matmul(config: NpuConfig | str | None = None, m: int = 512, n: int = 512, k: int = 512,
                 dtype: str = "bf16", tile_n: int = 128, load_queues: int = 8, block_rows: int = 2) -> Program:
    """C[m, n] = AT[k, m]^T @ B[k, n] (AT is A transposed, as the PE array wants it), tiled 128 x tile_n.

    AT and B stay resident in SBUF (so m, n, k are bounded by its size). Output tiles go in blocks of
    `block_rows` tile rows; inside a block the K loop is outermost, every tile of the block
    accumulating in its own PSUM tile, so each K step reuses each loaded piece block_rows or n/tile_n
    times: the loads outpace the tensor engine from the second matmul on, where a K-innermost order
    needs a whole B column slab per output tile at first. DMA queues 0..load_queues-1 load the pieces
    in the order of first use; consecutive blocks alternate between two sets of PSUM tiles, so a block's
    evictions (PSUM -> SBUF, casting to `dtype`; alternating ACT and VECTOR) and its stores (on the
    remaining queues) overlap the next block's matmuls.
    """
    cfg = load_config(config)
    p, kp = cfg.pe_cols, cfg.pe_rows
    mt, nt, kt, sz = m // p, n // tile_n, k // kp, DTYPES[dtype].size
    per_bank = cfg.psum_bank_bytes // (4 * tile_n)
    tiles = block_rows * nt
    if m % p or k % kp or n % tile_n or mt % block_rows or load_queues >= cfg.dma_queues:
        raise ValueError("m, k must be multiples of the PE array, n of tile_n and m/128 of block_rows; "
                         "need more DMA queues than load_queues")
    if not per_bank or 2 * tiles > per_bank * (cfg.psum_bytes_per_partition // cfg.psum_bank_bytes):
        raise ValueError(f"two blocks of {tiles} [128, {tile_n}] fp32 tiles do not fit PSUM")
    b = ProgramBuilder(cfg)
    AT = b.tensor("AT", (k, m), dtype, "input")
    B = b.tensor("B", (k, n), dtype, "input")
    C = b.tensor("C", (m, n), dtype, "output")
    at = b.sbuf((kt, m), dtype, kp)                                  # resident: [K part, kt, m]
    bt = b.sbuf((kt, n), dtype, kp)                                  # resident: [K part, kt, n]
    banks = [b.psum((per_bank, tile_n)) for _ in range(-(-2 * tiles // per_bank))]
    out = [b.sbuf(tile_n, dtype, p) for _ in range(mt * nt)]
    load_q = itertools.cycle(range(load_queues))
    store_q = itertools.cycle(range(load_queues, cfg.dma_queues))
    loaded, done, evicted = {}, {}, {}                               # tokens by piece / output tile

    def at_tile(i, mi):
        return AP("sbuf", dtype, 0, kp, at.offset + (i * m + mi * p) * sz, ((p, 1),))

    def b_tile(i, ni, lo=0, hi=tile_n):
        return AP("sbuf", dtype, 0, kp, bt.offset + (i * n + ni * tile_n + lo) * sz, ((hi - lo, 1),))

    def ps_tile(j):                                                  # j: a tile's place in its block, set by parity
        bank, slot = divmod(j, per_bank)
        return AP("psum", "f32", 0, p, banks[bank].offset + slot * tile_n * 4, ((tile_n, 1),))

    def load(piece):
        """piece: (name, K tile, M or N tile, None)."""
        if piece in loaded:
            return
        name, i, x, half = piece
        q = next(load_q)
        with b.label(f"load {name}[{i},{x}]"):
            if name == "AT":
                b.dma_copy(at_tile(i, x), AT[i * kp:(i + 1) * kp, x * p:(x + 1) * p], queue=q)
            else:
                lo, hi = (0, tile_n) if half is None else (half * tile_n // 2, (half + 1) * tile_n // 2)
                b.dma_copy(b_tile(i, x, lo, hi), B[i * kp:(i + 1) * kp, x * tile_n + lo:x * tile_n + hi], queue=q)
            loaded[piece] = b.signal(f"dma{q}")

    # the first block runs K-outer (reuse ramps up while the loads are in flight); later blocks, whose
    # pieces are all resident by then, tile by tile with K inner, so their tiles finish one at a time
    # and the stores spread out instead of bunching at the end. The very last matmul is split into two
    # of half width: the first half is evicted and stored while the second is multiplied.
    blocks = [[(mi, ni) for ni in range(nt) for mi in range(r, r + block_rows)]    # column by column: the
              for r in range(0, mt, block_rows)]                                   # first K step needs a new
    #                                                                               piece every other matmul
    steps = [(i, mi, ni) for i in range(kt) for mi, ni in blocks[0]]
    steps += [(i, mi, ni) for blk in blocks[1:] for mi, ni in blk for i in range(kt)]
    first, last = steps[0], steps[-1]

    def pieces(step):
        i, mi, ni = step
        return [("AT", i, mi, None), ("B", i, ni, None)]

    for step in steps:                                               # loads in the order of first use
        for piece in pieces(step):
            load(piece)

    def evict_and_store(mi, ni, t, ps, cols=(0, tile_n), eng=None):
        j = mi * nt + ni
        eng = eng or ("vector" if t % 2 else "act")
        q = next(store_q)
        lo, hi = cols
        with b.label(f"C[{mi},{ni}]"):
            b.wait(eng, done[mi, ni, lo])
            dst = AP("sbuf", dtype, 0, p, out[j].offset + lo * sz, ((hi - lo, 1),))
            src = AP("psum", "f32", 0, p, ps.offset + lo * 4, ((hi - lo, 1),))
            if eng == "vector":
                b.copy(dst, src)
            else:
                b.activate(dst, src, func="identity")
            evicted[mi, ni, lo] = b.signal(eng)
            b.wait(f"dma{q}", evicted[mi, ni, lo])
            b.dma_copy(C[mi * p:(mi + 1) * p, ni * tile_n + lo:ni * tile_n + hi], dst, queue=q)

    place = {}                                                       # output tile -> (its PSUM tile, parity slot)
    for bi, blk in enumerate(blocks):
        for t, tile in enumerate(blk):
            place[tile] = ((bi % 2) * tiles + t, bi, t)
    for step in steps:
        i, mi, ni = step
        j, bi, t = place[mi, ni]
        ps = ps_tile(j)
        with b.label(f"C[{mi},{ni}]"):
            if i == 0 and bi >= 2:                                   # its PSUM tile was evicted two blocks ago
                prev = blocks[bi - 2][t]
                b.wait("tensor", *[v for key, v in evicted.items() if key[:2] == prev])
            if step == last:
                for h in (0, 1):
                    lo, hi = h * tile_n // 2, (h + 1) * tile_n // 2
                    b.wait("tensor", loaded["AT", i, mi, None], loaded["B", i, ni, None])
                    b.matmul(AP("psum", "f32", 0, p, ps.offset + lo * 4, ((hi - lo, 1),)), at_tile(i, mi),
                             b_tile(i, ni, lo, hi), acc=int(i > 0))
                    done[mi, ni, lo] = b.signal("tensor")
                if True:
                    evict_and_store(mi, ni, t, ps, (0, tile_n // 2), "act")
                    evict_and_store(mi, ni, t, ps, (tile_n // 2, tile_n), "vector")
            else:
                if bi == 0:
                    b.wait("tensor", loaded["AT", i, mi, None], loaded["B", i, ni, None])
                elif i == 0:                                         # resident by now: wait once per tile
                    b.wait("tensor", *[loaded[x, k_, y, None] for k_ in range(kt) for x, y in (("AT", mi), ("B", ni))])
                b.matmul(ps, at_tile(i, mi), b_tile(i, ni), acc=int(i > 0))
            if i == kt - 1 and step != last:
                done[mi, ni, 0] = b.signal("tensor")
                evict_and_store(mi, ni, t, ps)
    return b.build()


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
