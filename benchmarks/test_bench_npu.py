"""pytest-benchmark micro-benchmarks of the NPU simulator: `pytest benchmarks/ --benchmark-only`.

Each records `instructions_per_s` (compute instructions, from the fastest round) in the
benchmark's extra_info; the workloads are the ones of benchmarks/bench_npu.py. The numpy peer runs the same 512^3 matmul
the tiled NPU program computes, for scale.
"""

import ml_dtypes
import numpy as np
import pytest

from isthmus.npu import programs, sim
from isthmus.npu.config import load_config
from isthmus.npu.isa import OPS

SHAPES = {"small_4x16": (4, 16, 2500), "small_32x32": (32, 32, 2500), "128x512": (128, 512, 60)}


def _compute(prog) -> int:
    """Instructions counted in the rates: all but the (free) semaphore and nop instructions."""
    return sum(1 for ins in prog.instructions if OPS[ins.op].cost != "sync")


def _rate(benchmark, n):
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.min:
        benchmark.extra_info["instructions"] = n
        benchmark.extra_info["instructions_per_s"] = round(n / stats.stats.min)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_sim_run_loaded(benchmark, shape):
    """`LoadedProgram.run`: reset memory and run the prepared instructions (each further run)."""
    cfg = load_config("datacenter")
    prog = programs.tile_mix(cfg, *SHAPES[shape])
    loaded = sim.LoadedProgram(prog, cfg)
    benchmark(loaded.run)
    _rate(benchmark, _compute(prog))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_sim_end_to_end(benchmark, shape):
    """One `sim.run`: timing model, fresh memory, preparing and executing every instruction."""
    cfg = load_config("datacenter")
    prog = programs.tile_mix(cfg, *SHAPES[shape])
    benchmark(sim.run, prog, None, cfg)
    _rate(benchmark, _compute(prog))


def _matmul_inputs():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal((512, 512)).astype(ml_dtypes.bfloat16)
    return a, b


def test_sim_tiled_matmul_512(benchmark):
    cfg = load_config("datacenter")
    prog = programs.tiled_matmul(cfg)
    a, b = _matmul_inputs()
    result = benchmark(sim.run, prog, {"AT": a.T, "B": b}, cfg)
    benchmark.extra_info["modeled_cycles"] = result.stats.cycles
    _rate(benchmark, _compute(prog))


def test_peer_numpy_matmul_512(benchmark):
    a, b = _matmul_inputs()
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    benchmark(lambda: (a32 @ b32).astype(ml_dtypes.bfloat16))
