"""Numba kernels against numpy on LLM shapes, in one run, with the ratio the issue asks for.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_ops_numba.py [--quick]

numpy is each op's reference in compiler/ops (the oracle the kernels are tested against); for the
quantized matvec it is numpy's fp32 matvec (BLAS sgemv) of the same matrix, dequantized.
Each figure is the best of several timed rounds (the machine may be shared), kernels warmed
(compiled or loaded from the cache) first. Shapes: rows x features = 1x576 (a decode step of the
default model), 256x576 (a 256-token prefill), 4096x4096; rope reads them as [1, heads, rows, 64].
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from isthmus.compiler.ops import get_op
from isthmus.compiler.quant import quantize
from isthmus.kernels.numba import activation, linear, norm, rope, softmax

SHAPES = [(1, 576), (256, 576), (4096, 4096)]
TARGET = {"rmsnorm": 2.0, "rope": 2.0, "swiglu": 2.0, "softmax": 1.2, "matvec": 1.5}


def best(fn, budget=0.4, rounds=7):
    fn()
    n, t = 1, 0.0
    while True:       # calibrate the inner loop to ~budget / rounds
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t > budget / rounds or n > 1 << 16:
            break
        n *= 4
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return min(times)


def cases(quick=False):
    rng = np.random.default_rng(0)
    ref = {k: get_op(k).reference for k in ("rmsnorm", "rope", "swiglu", "softmax")}
    for rows, cols in SHAPES[:2] if quick else SHAPES:
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        w = rng.standard_normal(cols).astype(np.float32)
        out = np.empty_like(x)
        yield "rmsnorm", (rows, cols), lambda: norm.rmsnorm(x, w, 1e-5, out), lambda: ref["rmsnorm"](x, w, 1e-5)
        u = rng.standard_normal((rows, cols)).astype(np.float32)
        yield "swiglu", (rows, cols), lambda: activation.swiglu(x, u, out), lambda: ref["swiglu"](x, u)
        yield "softmax", (rows, cols), lambda: softmax.softmax(x, -1, out), lambda: ref["softmax"](x, -1)
        x4 = x.reshape(1, rows, cols // 64, 64).transpose(0, 2, 1, 3).copy()
        pos = np.arange(rows)[None]
        o4 = np.empty_like(x4)
        yield "rope", (rows, cols), lambda: rope.rope(x4, pos, 1e5, "interleaved", 0, o4), \
            lambda: ref["rope"](x4, pos, 1e5, "interleaved", 0)
    mats = [(1536, 576, "q4_1"), (49152, 576, "q8_0")] + ([] if quick else
                                                          [(4096, 4096, q) for q in ("q4_0", "q4_1", "q8_0")])
    ws = linear.Workspace()
    for r, c, q in mats:
        wq = quantize(rng.standard_normal((r, c)).astype(np.float32), q)
        p = linear.pack(wq)
        dense = wq.dequantize()
        xv = rng.standard_normal((1, c)).astype(np.float32)
        o = np.empty((1, r), np.float32)
        yield f"matvec {q}", (r, c), lambda p=p, xv=xv, o=o: linear.linear(xv, p, o, ws), \
            lambda dense=dense, xv=xv: dense @ xv[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    args = ap.parse_args(argv)
    print(f"{'op':<14}{'shape':>14}{'numba us':>12}{'numpy us':>12}{'ratio':>8}{'target':>8}")
    ok = True
    for name, shape, mine, theirs in cases(args.quick):
        a, b = best(mine), best(theirs)
        goal = TARGET[name.split()[0]]
        ok &= b / a >= goal
        print(f"{name:<14}{'x'.join(map(str, shape)):>14}{a * 1e6:>12.1f}{b * 1e6:>12.1f}{b / a:>8.2f}{goal:>8.1f}"
              f"{'' if b / a >= goal else '  below target'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
