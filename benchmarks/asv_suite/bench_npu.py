"""The modeled NPU: what the timing model says programs cost, and how fast the simulator runs.

`Modeled` tracks cycles, FLOP utilisation (achieved / peak over the program's cycles) and HBM
bytes (read + written) of programs the compiler emits, on the datacenter preset, in bf16:
  matmul M×K×N    x[M, K] @ W[K, N], W a constant (compiler/lower/npu/profile_tables.matmul_figures)
  attention P/C   P queries over a window of C keys, 9 query and 3 KV heads of 64, causal
  layer P/C       a one-layer SmolLM2-135M decoder (random weights, 256-token vocabulary) as the
                  chunk program that runs P new tokens over a KV window of C
These come from the timing model alone, so they are deterministic: any change is a change in the
compiler, the cost model or the config. `SimulatorSpeed` is host speed of the functional simulator
(`isthmus.npu.programs.tile_mix` workloads): wall time and instructions per second.
`python benchmarks/bench_npu.py` prints the simulator-speed table.
"""

from __future__ import annotations

import functools
import time

import numpy as np

PROGRAMS = ["matmul 1x576x1536", "matmul 256x576x1536", "matmul 1024x4096x4096",
            "attention 1/256", "attention 256/256", "layer 1/256", "layer 256/256"]
SMOLLM2_LAYER = dict(n_layers=1, hidden=576, ffn=1536, n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=256,
                     rms_eps=1e-5, rope_theta=100000.0, context_length=2048)


def _attention_program(P: int, C: int):
    from isthmus.compiler.ir import Graph
    from isthmus.compiler.lower.npu.op_runner import Compiled, GenericRunner
    from isthmus.compiler.lower.npu.target import lower_npu

    shapes = {"q": (1, 9, P, 64), "k": (1, 3, C, 64), "v": (1, 3, C, 64)}
    g = Graph(f"attention_{P}_{C}")
    q, k, v = (g.add_input(n, s, "f32") for n, s in shapes.items())
    g.set_outputs([g.add("attention", [q, k, v], {"causal": True}, name="attention")])
    exe = lower_npu(g, config="datacenter", precision="bf16")
    feeds = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    return Compiled(GenericRunner(exe), feeds, load=False).segments[0].program, exe.config


@functools.cache
def _layer_executable():
    from isthmus.compiler.frontends import Model
    from isthmus.compiler.frontends.llama import build_llama
    from isthmus.compiler.lower.npu.target import lower_npu
    from isthmus.compiler.passes.pipeline import run_pipeline

    c = SMOLLM2_LAYER
    D, F, H, KVH, hd, V = (c[k] for k in ("hidden", "ffn", "n_heads", "n_kv_heads", "head_dim", "vocab_size"))
    rng = np.random.default_rng(0)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    w = {"token_embd.weight": mat(V, D), "output_norm.weight": np.ones(D, np.float32), "output.weight": mat(V, D),
         "blk.0.attn_norm.weight": np.ones(D, np.float32), "blk.0.ffn_norm.weight": np.ones(D, np.float32),
         "blk.0.attn_q.weight": mat(H * hd, D), "blk.0.attn_k.weight": mat(KVH * hd, D),
         "blk.0.attn_v.weight": mat(KVH * hd, D), "blk.0.attn_output.weight": mat(D, H * hd),
         "blk.0.ffn_gate.weight": mat(F, D), "blk.0.ffn_up.weight": mat(F, D), "blk.0.ffn_down.weight": mat(D, F)}
    g = build_llama(c, w, rope_layout="interleaved", name="smollm2_layer")
    return lower_npu(run_pipeline(g), model=Model(g, "smollm2_layer", "bench", c), precision="bf16")


def figures(program: str) -> dict:
    from isthmus.npu.timing import schedule, stats

    kind, shape = program.split()
    if kind == "matmul":
        from isthmus.compiler.lower.npu.profile_tables import matmul_figures
        st = matmul_figures(*map(int, shape.split("x")), "bf16", "datacenter")["stats"]
    else:
        P, C = map(int, shape.split("/"))
        if kind == "attention":
            prog, cfg = _attention_program(P, C)
        else:
            from isthmus.compiler.lower.npu.chunk_program import build_chunk_program
            exe = _layer_executable()
            prog, cfg = build_chunk_program(exe.image, P, C), exe.config
        st = stats(prog, schedule(prog, cfg), cfg)
    return {"cycles": st.cycles, "flop_utilisation": st.achieved_flops / st.config.peak_flops,
            "hbm_bytes": st.hbm_read_bytes + st.hbm_write_bytes}


class Modeled:
    params = [PROGRAMS]
    param_names = ["program"]
    rounds = 1              # deterministic: more rounds would measure the same numbers again
    timeout = 300

    def setup_cache(self):
        """Every program's figures, computed once for the three tracks (asv pickles them)."""
        return {p: figures(p) for p in PROGRAMS}

    setup_cache.timeout = 300

    def track_cycles(self, f, program):
        return f[program]["cycles"]

    track_cycles.unit = "cycles"

    def track_flop_utilisation(self, f, program):
        return f[program]["flop_utilisation"]

    track_flop_utilisation.unit = "fraction of peak"

    def track_hbm_bytes(self, f, program):
        return f[program]["hbm_bytes"]

    track_hbm_bytes.unit = "bytes"


# -- simulator speed -----------------------------------------------------------------------------------------

SHAPES = {"small 4x16": (4, 16, 2500), "small 32x32": (32, 32, 2500), "128x512": (128, 512, 60)}


@functools.cache
def workload(shape: str):
    from isthmus.npu import programs
    from isthmus.npu.config import load_config

    parts, cols, repeats = SHAPES[shape]
    cfg = load_config("datacenter")
    return cfg, programs.tile_mix(cfg, parts, cols, repeats)


def compute_instructions(prog) -> int:
    """Instructions counted in the rates: all but the semaphore ones (free to execute)."""
    from isthmus.npu.isa import OPS
    return sum(1 for ins in prog.instructions if OPS[ins.op].cost != "sync")


def measure(fn, n_instructions: int, min_seconds: float = 1.0) -> tuple[float, float]:
    """(instructions per wall second, per CPU second), best of repeated calls lasting >= min_seconds."""
    best_wall = best_cpu = float("inf")
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or best_wall == float("inf"):
        w, c = time.perf_counter(), time.process_time()
        fn()
        best_wall, best_cpu = min(best_wall, time.perf_counter() - w), min(best_cpu, time.process_time() - c)
    return n_instructions / best_wall, n_instructions / max(best_cpu, 1e-9)


class SimulatorSpeed:
    """"loaded run" is `LoadedProgram.run` (memory reset, then the prepared instructions: each
    further run of a compiled program); "end to end" is one `isthmus.npu.sim.run` (timing model,
    race check, fresh memory, preparing, executing)."""
    params = [list(SHAPES)]
    param_names = ["tiles"]

    def setup(self, shape):
        from isthmus.npu import sim
        self.cfg, self.prog = workload(shape)
        self.loaded = sim.LoadedProgram(self.prog, self.cfg)

    def time_run_loaded(self, shape):
        self.loaded.run()

    def time_end_to_end(self, shape):
        from isthmus.npu import sim
        sim.run(self.prog, config=self.cfg)

    def track_run_loaded_instructions_per_second(self, shape):
        return measure(self.loaded.run, compute_instructions(self.prog), min_seconds=0.5)[0]

    track_run_loaded_instructions_per_second.unit = "instructions/s"
