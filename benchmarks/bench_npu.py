"""NPU simulator speed in instructions per second (asv suite; also a script).

    python benchmarks/bench_npu.py            # prints the table below for this machine
    asv run --python=same -b bench_npu        # tracked figures

Workloads are `isthmus.npu.programs.tile_mix`: blocks of 8 compute instructions (tensor_tensor,
tensor_scalar, activate, matmul, copy, tensor_reduce, tensor_scalar by a per-partition value,
select) on [partitions, cols] tiles, plus the 6 semaphore instructions ordering them. Rates count
the compute instructions only (the sync ones are free to execute). "loaded run" is
`LoadedProgram.run` (memory reset, then the run loop over prepared instructions: what each
further run of a compiled program costs); "end to end" is one `isthmus.npu.sim.run`: timing
model, race check, fresh memory, preparing (identical instructions share one closure), executing.
Rates are per wall-clock second and per CPU second of this process (the latter is steadier on a
shared, loaded machine).
"""

from __future__ import annotations

import time

from isthmus.npu import programs, sim
from isthmus.npu.config import load_config
from isthmus.npu.isa import OPS

SHAPES = {"small 4x16": (4, 16, 2500), "small 32x32": (32, 32, 2500), "128x512": (128, 512, 60)}


def workload(shape: str):
    parts, cols, repeats = SHAPES[shape]
    cfg = load_config("datacenter")
    return cfg, programs.tile_mix(cfg, parts, cols, repeats)


def compute_instructions(prog) -> int:
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
    params = list(SHAPES)
    param_names = ["tiles"]

    def setup(self, shape):
        self.cfg, self.prog = workload(shape)
        self.loaded = sim.LoadedProgram(self.prog, self.cfg)

    def time_run_loaded(self, shape):
        self.loaded.run()

    def time_end_to_end(self, shape):
        sim.run(self.prog, config=self.cfg)

    def track_run_loaded_instructions_per_second(self, shape):
        return measure(self.loaded.run, compute_instructions(self.prog))[0]

    track_run_loaded_instructions_per_second.unit = "instructions/s"


def main() -> None:
    import os
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'tiles':<13}{'instrs':>8}{'loaded run/s wall':>19}{'(CPU)':>10}{'end-to-end/s wall':>19}{'(CPU)':>10}")
    for shape in SHAPES:
        cfg, prog = workload(shape)
        loaded = sim.LoadedProgram(prog, cfg)
        n = compute_instructions(prog)
        ew, ec = measure(loaded.run, n)
        rw, rc = measure(lambda: sim.run(prog, config=cfg), n)
        print(f"{shape:<13}{n:>8,}{ew:>19,.0f}{ec:>10,.0f}{rw:>19,.0f}{rc:>10,.0f}")


if __name__ == "__main__":
    main()
