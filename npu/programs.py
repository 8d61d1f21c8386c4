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
                 dtype: str = "bf16", tile_n: int = 128, load_queues: int = 8) -> Program:
    """C[m, n] = AT[k, m]^T @ B[k, n] (AT is A transposed, as the PE array wants it), tiled 128 x tile_n.

    Engines overlap, synchronised by dependency tokens: DMA queues 0..load_queues-1 load AT and B
    tiles in the order the tensor engine consumes them (B stays resident, AT slabs of 128 columns
    are double buffered); the tensor engine accumulates each [128, tile_n] output over K in one of
    4 PSUM banks; evictions (PSUM -> SBUF, casting to `dtype`) alternate between ACT and VECTOR,
    ending on VECTOR (the cheaper); the last DMA queue stores each tile while later ones compute.
    """
    cfg = load_config(config)
    p, kp = cfg.pe_cols, cfg.pe_rows
    if m % p or k % kp or n % tile_n or load_queues + 1 > cfg.dma_queues:
        raise ValueError("m, k must be multiples of the PE array and n of tile_n; need load_queues + 1 DMA queues")
    mt, nt, kt, sz = m // p, n // tile_n, k // kp, DTYPES[dtype].size
    store_q = f"dma{cfg.dma_queues - 1}"
    b = ProgramBuilder(cfg)
    AT = b.tensor("AT", (k, m), dtype, "input")
    B = b.tensor("B", (k, n), dtype, "input")
    C = b.tensor("C", (m, n), dtype, "output")
    at = [b.sbuf((kt, p), dtype, kp) for _ in range(2)]               # AT slab: [K part, kt, 128 cols]
    bt = b.sbuf((kt, n), dtype, kp)                                  # B resident: [K part, kt, n]
    ps = [b.psum(tile_n) for _ in range(4)]
    out = [b.sbuf(tile_n, dtype, p) for _ in range(4)]
    queue = itertools.cycle(range(load_queues))
    loaded, done, evicted, stored = {}, {}, {}, {}                   # tokens by piece / output tile

    def at_tile(i, mi):
        return AP("sbuf", dtype, 0, kp, at[mi % 2].offset + i * p * sz, ((p, 1),))

    def b_tile(i, ni):
        return AP("sbuf", dtype, 0, kp, bt.offset + (i * n + ni * tile_n) * sz, ((tile_n, 1),))

    def load(piece, dst, src, after=None):
        q = next(queue)
        with b.label(f"load {piece[0]}[{piece[1]},{piece[2]}]"):
            b.wait(f"dma{q}", after)
            b.dma_copy(dst, src, queue=q)
            loaded[piece] = b.signal(f"dma{q}")

    def load_at(i, mi, after=None):
        load(("AT", i, mi), at_tile(i, mi), AT[i * kp:(i + 1) * kp, mi * p:(mi + 1) * p], after)

    for ni in range(nt):                                             # consumption order; slabs 0, 1 up front
        for i in range(kt):
            if ni == 0:
                load_at(i, 0)
            load(("B", i, ni), b_tile(i, ni), B[i * kp:(i + 1) * kp, ni * tile_n:(ni + 1) * tile_n])
    for i in range(kt if mt > 1 else 0):
        load_at(i, 1)

    for mi in range(mt):
        for ni in range(nt):
            j, slot = mi * nt + ni, (mi * nt + ni) % 4
            with b.label(f"C[{mi},{ni}]"):
                b.wait("tensor", evicted.get(j - 4))                # its PSUM bank is free again
                for i in range(kt):
                    b.wait("tensor", loaded["AT", i, mi], loaded["B", i, ni])
                    b.matmul(ps[slot].ap(), at_tile(i, mi), b_tile(i, ni), acc=int(i > 0))
                done[j] = b.signal("tensor")
                eng = "vector" if j % 2 else "act"
                b.wait(eng, done[j], stored.get(j - 4))              # staging buffer free again
                if eng == "vector":
                    b.copy(out[slot].ap(), ps[slot].ap())
                else:
                    b.activate(out[slot].ap(), ps[slot].ap(), func="identity")
                evicted[j] = b.signal(eng)
                b.wait(store_q, evicted[j])
                b.dma_copy(C[mi * p:(mi + 1) * p, ni * tile_n:(ni + 1) * tile_n], out[slot].ap(),
                           queue=cfg.dma_queues - 1)
                stored[j] = b.signal(store_q)
        if mi + 2 < mt:                                              # slab mi consumed: load slab mi + 2
            for i in range(kt):
                load_at(i, mi + 2, after=done[(mi + 1) * nt - 1])
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
GOLDEN = {"matmul_512.s": lambda: tiled_matmul("datacenter", 512, 512, 512, "bf16")}


def main() -> int:
    """Rewrite the pinned example programs (examples/npu/*.s) from these generators."""
    from isthmus.npu.asm import format_program
    for name, make in GOLDEN.items():
        (EXAMPLES / name).write_text(format_program(make()))
        print(f"wrote {EXAMPLES / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
