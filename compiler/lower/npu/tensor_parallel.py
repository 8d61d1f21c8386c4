"""Tensor parallelism over a chip's cores: a Llama MLP block (rmsnorm, SwiGLU, down projection, residual)
split Megatron-style, with the all-reduce as DMA between cores.

Each core c of n holds the residual stream x [D, rows] (feature-major, replicated), computes
h = rmsnorm(x) itself, then its slice of the hidden features: gate and up split by *outputs*
(columns of the layer: F/n each), so a_c = silu(gate_c h) * up_c h needs no communication, and down
split by *inputs* (rows: the same F/n), so down_c a_c is a partial sum of the whole output [D]. One
all-reduce of those partials (D floats a row) and the residual add finish the block on every core.

The all-reduce is *one hop*: each core sends its partial to every other core at once (`dma_core`,
one per peer, spread over its DMA queues), each send counting its own arrival on the receiver's
semaphore (`signal=1`, as a TPU remote copy's receive semaphore does); meanwhile each core puts its
residual plus its own partial in the n-th slot, then waits for its n-1 arrivals and sums the n slots
into its residual with one reduce. A ring moves fewer bytes per core (2(n-1)/n of the vector against n-1
copies), but for a decode step's 2.3 KB vector the link latency, not its bandwidth, is the cost:
2(n-1) latencies in a row for the ring, one here (a separate `sem_signal_core` after each send
would add a second hop: ~450 cycles an all-reduce). Receive slots alternate between two sets
and two semaphores (`RECV_SEMS`) by the parity of the all-reduce, so a fast core's next partial can
neither overwrite a slot nor count as an arrival of the previous all-reduce on a slow core (a core
sends all-reduce k+2 only after it has all-reduce k+1's partials, which every peer sent after its
adds of k).

`tp_mlp_program` builds the chip program (one `Program` per core through the ordinary `Emitter`, so
every local dependency gets its semaphores as in any program); `tp_mlp_figures` times it against the
same block on one core. The whole decoder (attention heads per core, the chunk programs, a chip HBM
image) is tp_decoder.py, which uses `_all_reduce` with DMA queues of its own.
"""

from __future__ import annotations

import numpy as np

from isthmus.compiler.lower.npu.emitter import Emitter
from isthmus.compiler.lower.npu.resident_kernels import Consts, linear, new_act, rmsnorm
from isthmus.compiler.lower.npu.weights import WeightStream, make_weight, piece_cols_for
from isthmus.npu.config import load_config

RECV_SEMS = (20, 21)        # above the emitter's per-engine semaphores (0 .. 18)


def _slices(F: int, n: int) -> list[range]:
    per = -(-F // n)
    return [range(c * per, min(F, (c + 1) * per)) for c in range(n)]


def tp_mlp_program(gate: np.ndarray, up: np.ndarray, down: np.ndarray, norm: np.ndarray, eps: float,
                   rows: int = 1, config="chip", cores: int | None = None, layers: int = 1):
    """A chip program (or, for one core, a plain `Program`) computing, `layers` times over x [rows, D]:
    x = x + down(silu(gate h) * up h), h = rmsnorm(x) * norm; weights as stored ([out, in], f32), bf16
    on chip. Returns (program, inputs): HBM inputs "x" and the weights, output "y" (written by core 0)."""
    from isthmus.npu.chip import ChipProgram
    cfg = load_config(config)
    n = cores or cfg.cores
    P = cfg.partitions
    F, D = gate.shape
    nc = -(-D // P)
    budget = cfg.sbuf_bytes_per_partition // 8
    sl = _slices(F, n)
    ws = []
    for c, r in enumerate(sl):
        idx = np.asarray(r)
        fc = len(idx)
        cols_in = piece_cols_for(D, fc, P, "bf16", budget)
        ws.append({"gate": make_weight(f"gate.{c}", gate, "bf16", P, cols_in, rows=idx),
                   "up": make_weight(f"up.{c}", up, "bf16", P, cols_in, rows=idx),
                   "down": make_weight(f"down.{c}", down, "bf16", P, piece_cols_for(fc, D, P, "bf16", budget),
                                       cols=idx)})
    g = np.zeros(nc * P, np.float32)
    g[:D] = norm
    inputs = {"norm": np.ascontiguousarray(g.reshape(nc, P).T)}
    for wc in ws:
        for w in wc.values():
            inputs[w.name] = w.data
    progs = []
    for c in range(n):
        em = Emitter(cfg)
        x_t = em.tensor("x", (rows, D), "f32", "input")
        y_t = em.tensor("y", (rows, D), "f32", "output")
        g_t = em.tensor("norm", (P, nc), "f32", "input")
        for k, wc in enumerate(ws):                       # every core declares every slice: same offsets
            for w in wc.values():
                t = em.tensor(w.name, w.data.shape, "bf16", "input")
                if k == c:
                    w.hbm = t
        mine = ws[c]
        x = new_act(em, D, rows, "f32", "residual stream")
        gt = em.sbuf((nc,), "f32", what="norm weights")
        slots = [em.sbuf((n, nc, rows), "f32", what="all-reduce receive") for _ in RECV_SEMS]
        consts = Consts(em)
        with em.label("load"):
            em.dma(gt[:, :], g_t[0:P, 0:nc])
            for ch in range(nc):
                pc = min(P, D - ch * P)
                em.dma(x.tile[0:pc, ch, :], x_t.ap(ch * P, pc, 1, [(rows, D)]))
        hole = max(hi - lo for lo, hi in em.sbuf_alloc.holes)
        ring = em.sbuf((hole - 8 * 1024,), "i8", what="weight ring")
        stream = WeightStream(em, ring)
        for _ in range(layers):
            stream.add(mine["gate"], mine["up"])
            stream.add(mine["down"])
        for layer in range(layers):
            h = new_act(em, D, rows, "bf16", "normed")
            with em.label(f"L{layer}.ffn_norm"):
                rmsnorm(em, consts, x, gt, eps, h, mm_dtype="bf16")
            a = new_act(em, len(sl[c]), rows, "bf16", "ffn")
            with em.label(f"L{layer}.gate"):
                linear(em, h, mine["gate"], stream, a, epilogue="swiglu", up=mine["up"])
            em.free(h.tile)
            part = new_act(em, D, rows, "f32", "down partial")
            with em.label(f"L{layer}.down"):
                linear(em, a, mine["down"], stream, part)
            em.free(a.tile)
            with em.label(f"L{layer}.all_reduce"):
                _all_reduce(em, c, n, part, x, slots[layer % 2], RECV_SEMS[layer % 2], layer // 2 + 1)
            em.free(part.tile)
        if c == 0:
            with em.label("store"):
                for ch in range(nc):
                    pc = min(P, D - ch * P)
                    em.dma(y_t.ap(ch * P, pc, 1, [(rows, D)]), x.tile[0:pc, ch, :])
        progs.append(em.build())
    return (ChipProgram(progs) if n > 1 else progs[0]), inputs


def _all_reduce(em: Emitter, c: int, n: int, part, x, slots, sem: int, round_: int,
                queues: list[int] | None = None) -> None:
    """x += the sum over cores of `part` (one hop: see the module docstring). `round_`: how many
    all-reduces have used this slot set and semaphore, this one included. `queues`: the DMA queues the
    sends take, in turn (default: all of them)."""
    if n == 1:
        em.tt(x.tile[:, :, :], x.tile[:, :, :], part.tile[:, :, :], "add")
        return
    queues = queues or list(range(em.cfg.dma_queues))
    P = em.cfg.partitions
    for j, k in enumerate(k for k in range(n) if k != c):
        q = queues[j % len(queues)]
        slot = c if c < k else c - 1                      # my slot among core k's n-1 senders
        em.emit("dma_core", slots[:, slot, :, :], part.tile[:, :, :], core=k, queue=q, signal=1, sem=sem)
    # while the partials travel: x + my partial into the last slot (no peer writes it), so that one reduce
    # over the n slots sums everything into x
    em.tt(slots[:, n - 1, :, :], x.tile[:, :, :], part.tile[:, :, :], "add")
    em.emit("sem_wait", engine="vector", sem=sem, value=round_ * (n - 1))
    m = x.tile.shape[0] * x.tile.shape[1]
    em.reduce(x.tile.raw(0, P, 0, [(m, 1)]), slots.raw(0, P, 0, [(m, 1), (n, m)]), "sum")


def tp_mlp_figures(gate, up, down, norm, eps: float, rows: int = 1, layers: int = 1) -> dict:
    """The block on `chip` (8 cores, tensor-parallel) and on one `core` (timing model only): cycles of
    each, the speed-up, the chip's HBM bound (every core's weight bytes at the whole chip's bandwidth;
    the x loads and collectives are not in it) and the one-core program's roofline."""
    from isthmus.npu.chip import schedule_chip
    from isthmus.npu.timing import roofline, schedule
    chip_cfg, core_cfg = load_config("chip"), load_config("core")
    chip, _ = tp_mlp_program(gate, up, down, norm, eps, rows, "chip", layers=layers)
    one, _ = tp_mlp_program(gate, up, down, norm, eps, rows, "core", cores=1, layers=layers)
    ctl = schedule_chip(chip, chip_cfg)
    single = schedule(one, core_cfg).cycles
    wbytes = 2 * layers * (gate.size + up.size + down.size)
    hbm = wbytes / (chip_cfg.hbm_bytes_per_s / chip_cfg.clock_hz)
    return {"cycles": ctl.cycles, "one_core_cycles": single, "speedup": single / ctl.cycles,
            "hbm_bound_cycles": hbm, "hbm_ratio": ctl.cycles / hbm,
            "one_core_roofline": roofline(one, core_cfg), "chip": chip, "timeline": ctl}
