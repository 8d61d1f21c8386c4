"""NPU simulator speed in instructions per second, as a table for this machine.

    python benchmarks/bench_npu.py
    asv run --python=same -b bench_npu        # the tracked figures (benchmarks/asv_suite/bench_npu.py)

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

import os

from asv_suite.bench_npu import SHAPES, compute_instructions, measure, workload  # this folder is on sys.path

from isthmus.npu import sim


def main() -> None:
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
