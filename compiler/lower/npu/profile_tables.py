"""Per-op profile of NPU programs (the tables `isthmus profile MODEL --target npu` prints: cli_profile.py).

Every instruction carries the label of the graph node it was lowered from, so the modeled
timeline attributes to nodes: per node (or per op kind, summed over nodes) the busy cycles of each
engine, the HBM bytes its DMAs moved and its FLOPs. A node's *cycles* are what bounds it alone:
max(TENSOR busy, VECTOR busy, ACT busy, bytes / HBM bandwidth); the share column divides by the
sum over nodes (nodes overlap in the real timeline, whose total is printed above the table).
*Bound* names the largest term: compute (and which engine) or memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from isthmus.npu.isa import OPS

COMPUTE = ("tensor", "vector", "act")


@dataclass
class OpRow:
    name: str
    op: str
    count: int = 0                                  # graph nodes aggregated
    instructions: int = 0
    busy: dict = field(default_factory=dict)        # engine class -> busy cycles
    bytes: int = 0
    flops: int = 0
    cycles: float = 0.0
    bound: str = ""


def _node_ops(graph) -> dict:
    return {n.outputs[0].name: n.op for n in graph.nodes} if graph is not None else {}


def op_rows(program, timeline, graph, cfg=None, by: str = "op") -> list[OpRow]:
    """Rows per op kind (`by="op"`) or per node (`by="node"`), most cycles first."""
    from isthmus.npu.config import load_config
    cfg = cfg or load_config(None)
    ops = _node_ops(graph)
    rows: dict[str, OpRow] = {}
    nodes_of: dict[str, set] = {}
    ins_list = program.instructions
    for i in timeline.order:
        ins = ins_list[i]
        label = ins.label or "(unlabelled)"
        op = ops.get(label, "other")
        key = label if by == "node" else op
        row = rows.get(key)
        if row is None:
            row = rows[key] = OpRow(key, op)
        nodes_of.setdefault(key, set()).add(label)
        if OPS[ins.op].cost == "sync":
            continue
        row.instructions += 1
        eng = timeline.engine[i]
        cls = "dma" if eng.startswith("dma") else eng
        row.busy[cls] = row.busy.get(cls, 0) + timeline.end[i] - timeline.start[i]
        row.bytes += timeline.dma_bytes[i]
        row.flops += timeline.flops[i]
    bpc = cfg.hbm_bytes_per_cycle
    for key, row in rows.items():
        row.count = len(nodes_of[key])
        terms = {e: row.busy.get(e, 0) for e in COMPUTE}
        terms["memory"] = row.bytes / bpc
        worst = max(terms, key=terms.get)
        row.cycles = terms[worst]
        row.bound = "memory" if worst == "memory" else f"compute ({worst})"
    return sorted(rows.values(), key=lambda r: -r.cycles)


def op_table(program, timeline, stats, graph, cfg, by: str = "op", limit: int = 0) -> str:
    rows = op_rows(program, timeline, graph, cfg, by)
    total = sum(r.cycles for r in rows) or 1.0
    head = f"{'op' if by == 'op' else 'node':<24}{'nodes':>6}{'instrs':>8}{'cycles':>12}{'share':>8}{'bytes':>14}" \
           f"{'FLOPs':>15}{'tensor':>8}{'vector':>8}{'act':>7}{'dma':>7}  bound"
    from isthmus.npu.timing import roofline
    lines = [f"{stats.cycles:,} cycles = {stats.seconds * 1e6:.1f} us modeled on {cfg.name}; "
             f"{len(program.instructions):,} instructions; HBM read {stats.hbm_read_bytes / 1e6:.1f} MB "
             f"(bound {stats.hbm_read_bytes / cfg.core_hbm_bytes_per_s * 1e6:.1f} us at "
             f"{cfg.core_hbm_bytes_per_s / 1e9:.1f} GB/s)", roofline(program, cfg).describe(stats.cycles),
             head, "-" * len(head)]
    for r in rows[:limit or None]:
        c = max(r.cycles, 1.0)
        util = [f"{r.busy.get(e, 0) / c:>{w}.0%}" for e, w in (("tensor", 8), ("vector", 8), ("act", 7))]
        dma = f"{(r.bytes / cfg.hbm_bytes_per_cycle) / c:>7.0%}"
        lines.append(f"{r.name[:23]:<24}{r.count:>6}{r.instructions:>8,}{r.cycles:>12,.0f}{r.cycles / total:>8.1%}"
                     f"{r.bytes:>14,}{r.flops:>15,}{''.join(util)}{dma}  {r.bound}")
    lines.append("cycles: what bounds the op alone, max(engine busy, bytes / HBM bandwidth); engine columns: "
                 "busy / cycles; dma: bandwidth time / cycles.")
    return "\n".join(lines)


# -- figures the docs and tests quote ---------------------------------------------------------------------------

def matmul_figures(m: int, k: int, n: int, precision: str = "bf16", config="core") -> dict:
    """Lower x[m, k] @ W[k, n] (W a constant, as a model's weight) and run the timing model only:
    cycles, FLOP utilisation (achieved / peak), tensor-engine busy fraction and the roofline."""
    import numpy as np

    from isthmus.compiler.ir import Graph
    from isthmus.compiler.lower.npu.op_runner import Compiled, GenericRunner
    from isthmus.compiler.lower.npu.target import lower_npu
    from isthmus.npu.timing import roofline, schedule, stats
    g = Graph(f"matmul_{m}x{k}x{n}")
    x = g.add_input("x", (m, k), "f32")
    w = g.add_constant("w", np.zeros((k, n), np.float32))
    g.set_outputs([g.add("matmul", [x, w], name="matmul")])
    exe = lower_npu(g, config=config, precision=precision)
    prog = Compiled(GenericRunner(exe), {"x": np.zeros((m, k), np.float32)}, load=False).segments[0].program
    cfg = exe.config
    tl = schedule(prog, cfg)
    st = stats(prog, tl, cfg)
    ideal = 2.0 * m * k * n / cfg.peak_flops * cfg.clock_hz
    return {"program": prog, "stats": st, "cycles": st.cycles, "flop_utilisation": ideal / st.cycles,
            "tensor_busy": st.engines["tensor"].busy / st.cycles, "ideal_cycles": ideal,
            "roofline": roofline(prog, cfg)}


def decode_figures(exe, window: int = 64) -> dict:
    """One decode step of a compiled decoder (timing model only): cycles, time, the HBM-bandwidth bound
    of its weight bytes, the tensor-issue bound of its matmuls, and its roofline (all its compulsory
    HBM traffic: weights, the KV window, logits)."""
    from isthmus.compiler.lower.npu.chunk_program import build_chunk_program
    from isthmus.npu.timing import engine_bound, roofline, schedule, stats
    cfg = exe.config
    prog = build_chunk_program(exe.image, 1, window)
    tl = schedule(prog, cfg)
    st = stats(prog, tl, cfg)
    wb = exe.image.weight_bytes
    hbm = wb / cfg.hbm_bytes_per_cycle
    return {"program": prog, "stats": st, "cycles": st.cycles, "seconds": st.seconds, "weight_bytes": wb,
            "hbm_bound_cycles": hbm, "hbm_ratio": st.cycles / hbm,
            "tensor_bound_cycles": engine_bound(prog, cfg, "tensor"),
            "roofline": roofline(prog, cfg), "memory": prog.memory}


def batch_figures(exe, batch: int, window: int = 64) -> dict:
    """One decode step of `batch` conversations together (timing model only; batch 1 is the ordinary
    decode program): cycles, tokens per modeled second, the roofline."""
    from isthmus.compiler.lower.npu.chunk_program import build_chunk_program
    from isthmus.npu.timing import roofline, schedule
    cfg = exe.config
    prog = build_chunk_program(exe.image, batch, window, batched=batch > 1)
    cycles = schedule(prog, cfg).cycles
    return {"program": prog, "cycles": cycles, "tokens_per_s": batch * cfg.clock_hz / cycles,
            "roofline": roofline(prog, cfg), "memory": prog.memory}


def prefill_figures(exe, tokens: int = 64) -> dict:
    """A prompt of `tokens` into an empty conversation (timing model only), chunked as the decoder runtime
    does it (NpuDecoder: a padded first bucket, halved while its working set does not fit SBUF): total
    cycles and time, and each chunk program's (P, C, cycles, roofline)."""
    from isthmus.compiler.lower.npu.chunk_program import build_chunk_program
    from isthmus.compiler.lower.npu.target import MIN_WINDOW, NpuDecoder, _pow2
    from isthmus.errors import NpuError
    from isthmus.npu.timing import roofline, schedule
    cfg, img = exe.config, exe.image
    built: dict = {}

    def program(P, C):
        if (P, C) not in built:
            try:
                prog = build_chunk_program(img, P, C)
            except NpuError as e:
                if "SBUF is full" not in str(e) or P == 1:
                    raise
                built[P, C] = None
            else:
                built[P, C] = (schedule(prog, cfg).cycles, roofline(prog, cfg))
        return built[P, C]

    chunks, length = [], 0

    def fit(real, P):
        nonlocal length
        C = min(img.cmax, max(MIN_WINDOW, P, _pow2(length + real)))
        got = program(P, C)
        if got is None:
            half = P // 2
            head = real - half
            if head <= 0:
                return fit(real, half)
            fit(head, half)
            return fit(real - head, half)
        chunks.append((P, C, got[0], got[1]))
        length += real

    dec = NpuDecoder.__new__(NpuDecoder)
    dec.length, dec.rt = 0, type("R", (), {"max_chunk": cfg.moving_max})()
    for toks, P in dec._pieces([0] * tokens):
        fit(len(toks), P)
    cycles = sum(c for _, _, c, _ in chunks)
    bound = sum(r.cycles for *_, r in chunks)
    return {"cycles": cycles, "seconds": cycles / cfg.clock_hz, "chunks": chunks, "roofline_cycles": bound,
            "binds": sorted({r.binding for *_, r in chunks})}
