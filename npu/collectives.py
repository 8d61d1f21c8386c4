"""Collectives as DMA: a ring all-reduce over a chip's cores, from `dma_core`.

`ring_all_reduce(builders, tiles, chunks)` appends to each core's program the classic ring: N-1
reduce-scatter steps (core c sends one chunk of its tile to core c+1, which adds it into its own)
and N-1 all-gather steps (the fully reduced chunks travel on round the ring), so each core sends
2 (N-1)/N of the tile over the link. Each send counts its own arrival on semaphore `RECV_SEM` of the
receiving core (`dma_core ... signal=1`: one link latency a step, not a second for a separate
`sem_signal_core`); the adds run on VECTOR. `all_reduce_program` wraps it into a complete chip program
(load x[c], all-reduce, store y[c]): the example and the test of the machine's multi-core side.
"""

from __future__ import annotations

from isthmus.npu.builder import ProgramBuilder
from isthmus.npu.config import load_config
from isthmus.npu.isa import AP

RECV_SEM = 31          # above the builder's token semaphores (one per engine: 0 .. 18)


def ring_all_reduce(builders: list[ProgramBuilder], tiles: list, queue: int = 0, after: list | None = None) -> list:
    """Sum `tiles` (one [P, F] f32 SBUF tile per core, F divisible by the core count) across the cores,
    in place on every core. `after[c]`: a token core c's first send waits for. Returns each core's
    token for "the reduced tile is complete" (its DMA queue's last receive has landed: wait for it on
    `dma{queue}` of that core before reading, together with the returned VECTOR token)."""
    n = len(builders)
    P, F = tiles[0].partitions, tiles[0].free[-1]
    if F % n:
        raise ValueError(f"the tile's {F} columns do not split into {n} chunks")
    w = F // n
    recv = [[b.sbuf(w, "f32") for _ in range(n - 1)] for b in builders]
    dq = f"dma{queue}"

    def chunk(t, k):
        return AP("sbuf", "f32", t.start, P, t.offset + k * w * 4, ((w, 1),))

    last_add = list(after or [None] * n)
    arrivals = [0] * n                                      # receives counted so far on each core
    for s in range(n - 1):                                  # reduce-scatter
        for c, b in enumerate(builders):
            nxt = (c + 1) % n
            b.wait(dq, last_add[c])
            b.dma_core(recv[nxt][s].ap(), chunk(tiles[c], (c - s) % n), core=nxt, queue=queue, signal=1, sem=RECV_SEM)
        for c, b in enumerate(builders):
            arrivals[c] += 1
            k = (c - s - 1) % n
            if s == 0:                                      # the add writes the tile `after` filled
                b.wait("vector", (after or [None] * n)[c])
            b.sem_wait(engine="vector", sem=RECV_SEM, value=arrivals[c])
            b.tensor_tensor(chunk(tiles[c], k), chunk(tiles[c], k), recv[c][s].ap(), op="add")
            last_add[c] = b.signal("vector")
    for s in range(n - 1):                                  # all-gather
        for c, b in enumerate(builders):
            nxt = (c + 1) % n
            if s == 0:
                b.wait(dq, last_add[c])
            else:                                           # forward what arrived in the previous step
                b.sem_wait(engine=dq, sem=RECV_SEM, value=arrivals[c])
            k = (c + 1 - s) % n
            b.dma_core(chunk(tiles[nxt], k), chunk(tiles[c], k), core=nxt, queue=queue, signal=1, sem=RECV_SEM)
        for c in range(n):
            arrivals[c] += 1
    return [(arrivals[c], last_add[c]) for c in range(n)]


def all_reduce_program(config="chip", cores: int | None = None, free: int = 512):
    """x [cores * P, free] f32 in HBM; core c loads rows c*P.., all-reduces, stores y's rows c*P..: every
    block of y is the sum of x's blocks (a ChipProgram)."""
    from isthmus.npu.chip import ChipProgram
    cfg = load_config(config)
    n = cores or cfg.cores
    P = cfg.partitions
    builders = [ProgramBuilder(cfg) for _ in range(n)]
    tiles, loaded, ys = [], [], []
    for c, b in enumerate(builders):
        x = b.tensor("x", (n * P, free), "f32", "input")
        ys.append(b.tensor("y", (n * P, free), "f32", "output"))
        tiles.append(b.sbuf(free, "f32"))
        with b.label("load"):
            b.dma_copy(tiles[c].ap(), x[c * P:(c + 1) * P, :], queue=1)
            loaded.append(b.signal("dma1"))
    done = ring_all_reduce(builders, tiles, queue=0, after=loaded)
    for c, b in enumerate(builders):
        count, add = done[c]
        with b.label("store"):
            b.sem_wait(engine="dma1", sem=RECV_SEM, value=count)
            b.wait("dma1", add)
            b.dma_copy(ys[c][c * P:(c + 1) * P, :], tiles[c].ap(), queue=1)
    return ChipProgram([b.build() for b in builders])
