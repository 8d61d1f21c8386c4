"""Numba kernels against numpy on LLM shapes, in one run, with the ratio the issue asks for.

    python benchmarks/bench_ops_numba.py [--quick] [--rounds 3]

numpy is each op's reference in compiler/ops (the oracle the kernels are tested against); for the
quantized matvec it is numpy's fp32 matvec (BLAS sgemv) of the same matrix, dequantized.
The numba kernels run in one process and numpy in another (isthmus.bench.isolated), each with its
own defaults, taking turns per case; each figure is the best of the rounds (the machine may be
shared), kernels warmed (compiled or loaded from the cache) first. `isthmus bench --only kernels`
prints the same cases. Shapes: rows x features = 1x576 (a decode step of the
default model), 256x576 (a 256-token prefill), 4096x4096; rope reads them as [1, heads, rows, 64].
"""

from __future__ import annotations

import argparse

from isthmus.bench.ops import kernel_times

TARGET = {"rmsnorm": 2.0, "rope": 2.0, "swiglu": 2.0, "softmax": 1.2, "matvec": 1.5}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case (best of)")
    args = ap.parse_args(argv)
    times = kernel_times(args.quick, rounds=args.rounds, log=lambda m: None)
    print(f"{'op':<14}{'shape':>14}{'numba us':>12}{'numpy us':>12}{'ratio':>8}{'target':>8}")
    ok = True
    for name, shape, a, b in times:
        goal = TARGET[name.split()[0]]
        ok &= b / a >= goal
        print(f"{name:<14}{'x'.join(map(str, shape)):>14}{a * 1e6:>12.1f}{b * 1e6:>12.1f}{b / a:>8.2f}{goal:>8.1f}"
              f"{'' if b / a >= goal else '  below target'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
