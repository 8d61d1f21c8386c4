"""Decode (and prefill) of a llama.cpp Q4_K_M file: isthmus's numba target against llama.cpp on the
same file, each engine in its own process, interleaved rounds, best of each (bench/model.py's
harness, the one `isthmus bench` uses for the default model).

    python benchmarks/bench_kquant_decode.py [FILE.gguf ...] [--synthetic [--q4-1]] [--rounds N]
    python benchmarks/bench_kquant_decode.py --matvec      # per block format: one decode matvec
    python benchmarks/bench_kquant_decode.py --rows        # per token: integer kernels vs dequantize+BLAS

Without FILE it takes the default model (SmolLM2-135M-Instruct, q4_1/q8_0) requantized by llama.cpp's
own quantizer to Q4_K_M; `--synthetic` a random-weight Llama whose widths are multiples of 256
quantized to Q4_K_M (q4_k and q6_k throughout, as in the 7B-class files people download). Both are
the files of `isthmus bench --only quant` (bench/quant.py says what they hold), made once and
cached. The script prints each file's type counts with the figures.
"""

from __future__ import annotations

import argparse
import collections
import os

from isthmus.bench.quant import quantized_file


MATVEC_TYPES = ("q4_1", "q8_0", "q4_k", "q5_k", "q6_k", "q5_0", "q5_1", "q3_k", "q2_k", "iq4_nl")
GROUPED = ("q4_1", "q8_0", "iq4_nl")     # measured in both layouts (kernels/numba/grouped.py)


def matvec(rows: int = 2816, cols: int = 1024, copies: int = 24, rounds: int = 10) -> None:
    """One decode-sized matvec (1 x cols by W[rows, cols]) per block format, the weights made by
    llama.cpp's quantizer (q4_1 and q8_0 by isthmus's, bit for bit the same): `copies` distinct
    copies cycled so that together they exceed the caches, as a model's layers do; best of `rounds`
    interleaved rounds. q4_1, q8_0 and iq4_nl in both of their layouts: 16 rows a vector (the
    default where the host has AVX2) and a row at a time."""
    import sys
    import time

    import numpy as np
    from gguf import GGMLQuantizationType as T

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "support"))
    import ggml_ref
    from isthmus.compiler.quant import QuantizedArray, quantize
    from isthmus.kernels.numba import linear

    rng = np.random.default_rng(0)
    wf = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    sets = {}
    for name in MATVEC_TYPES:
        qa = (quantize(wf, name) if name in ("q4_1", "q8_0")
              else QuantizedArray(name, wf.shape, ggml_ref.quantize(wf, T[name.upper()])))
        for layout in ("rows", "groups") if name in GROUPED else ("",):
            calls = []
            for _ in range(copies):
                p = linear.pack(qa, group=layout != "rows")
                calls.append(linear.matvec_call(x, p, np.zeros((1, rows), np.float32), linear.Workspace()))
                calls[-1][0](*calls[-1][1])
            sets[f"{name} {layout}".strip()] = (calls, p.nbytes)
    best = dict.fromkeys(sets, float("inf"))
    for _ in range(rounds):
        for name, (calls, _) in sets.items():
            t0 = time.perf_counter()
            for fn, a in calls:
                fn(*a)
            best[name] = min(best[name], (time.perf_counter() - t0) / copies)
    print(f"decode matvec {rows}x{cols}, {copies} copies cycled, best of {rounds} rounds (load {os.getloadavg()[0]:.2f})")
    for name, (calls, nbytes) in sets.items():
        print(f"  {name:14s} {best[name] * 1e6:7.1f} us   {nbytes / best[name] / 1e9:5.1f} GB/s of weights   "
              f"{best[name] / best['q4_1 groups']:.2f}x q4_1's time")


def rows(rounds: int = 5) -> None:
    """Per input row (token), on one thread, in CPU time (so other work on the machine skews it
    little): the integer matvec kernels (four tokens per pass over a weight row) against dequantize
    + BLAS, at 1 to 256 rows: where `linear.MATVEC_MAX_ROWS` belongs (q4_1 and q8_0 grouped for
    the integer kernels, in rows for BLAS)."""
    import sys
    import time

    import numba
    import numpy as np
    from gguf import GGMLQuantizationType as T

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "support"))
    import ggml_ref
    from isthmus.compiler.quant import QuantizedArray, quantize
    from isthmus.kernels.numba import linear

    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"ms per token, one thread, CPU time, best of {rounds}; integer kernels / dequantize+BLAS")
    for fmt, shape in (("q4_k", (2816, 1024)), ("q5_0", (1536, 576)), ("q4_1", (1536, 576)), ("q8_0", (1536, 576))):
        wf = rng.standard_normal(shape).astype(np.float32)
        qa = (quantize(wf, fmt) if fmt in ("q4_1", "q8_0")
              else QuantizedArray(fmt, wf.shape, ggml_ref.quantize(wf, T[fmt.upper()])))
        # grouped weights take the integer kernels at any row count: BLAS reads the row layout
        packs = {True: linear.pack(qa), False: linear.pack(qa, group=False)}
        ws, cells = linear.Workspace(), []
        for n in (1, 4, 8, 16, 32, 64, 128, 256):
            x = rng.standard_normal((n, shape[1])).astype(np.float32)
            out = np.zeros((n, shape[0]), np.float32)
            best = {}
            for _ in range(rounds + 1):             # the first round compiles and warms
                for integer in (True, False):
                    if not integer and n == 1:
                        continue
                    threshold = linear.MATVEC_MAX_ROWS
                    linear.MATVEC_MAX_ROWS = threshold if integer else 0     # BLAS at any row count
                    try:
                        t0 = time.thread_time()
                        linear.linear(x, packs[integer], out, ws, row_wise=integer)
                        best[integer] = min(best.get(integer, 1e9), time.thread_time() - t0)
                    finally:
                        linear.MATVEC_MAX_ROWS = threshold
            blas = f" / {best[False] * 1e3 / n:.3f}" if False in best else ""
            cells.append(f"{n}: {best[True] * 1e3 / n:.3f}{blas}")
        print(f"  {fmt} {shape[0]}x{shape[1]}  " + "   ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*", help="GGUF files; several are measured in the same interleaved rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=38)
    ap.add_argument("--synthetic", action="store_true", help="a random Llama with widths multiple of 256")
    ap.add_argument("--q4-1", action="store_true", help="with --synthetic: also the same weights as Q4_1")
    ap.add_argument("--matvec", action="store_true", help="per block format: one decode matvec, no model")
    ap.add_argument("--rows", action="store_true", help="per token: integer kernels vs dequantize+BLAS, 1-256 rows")
    args = ap.parse_args()
    if args.matvec:
        return matvec()
    if args.rows:
        return rows(args.rounds)
    from isthmus.bench.isolated import Worker, interleave
    from isthmus.compiler.frontends.gguf import read_gguf

    paths = list(args.files)
    if args.synthetic:
        paths += [str(quantized_file("synthetic Llama", t)) for t in ["Q4_K_M"] + ["Q4_1"] * args.q4_1]
    if not paths:
        from isthmus.models import DEFAULT_MODEL

        paths.append(str(quantized_file(DEFAULT_MODEL, "Q4_K_M")))
    workers = {}
    try:
        for path in paths:
            types = collections.Counter(read_gguf(path).tensor_types.values())
            tag = os.path.basename(path)
            print(f"{tag}: " + ", ".join(f"{n} x{c}" for n, c in types.most_common()))
            workers[f"isthmus {tag}"] = Worker("isthmus.bench.model:IsthmusEngine", path, "numba")
            workers[f"llama.cpp {tag}"] = Worker("isthmus.bench.model:LlamaCppEngine", path)
        side = {os.path.basename(p): workers[f"isthmus {os.path.basename(p)}"] for p in paths}
        ids = {tag: w.call("ids", args.prefill) for tag, w in side.items()}
        chat = {tag: w.call("chat") for tag, w in side.items()}

        def step(name, w):
            tag = name.split(" ", 1)[1]
            return {"prefill": args.prefill / w.call("prefill", ids[tag]),
                    "decode": args.decode / w.call("decode", chat[tag], args.decode)}

        runs = interleave(workers, step, args.rounds)
    finally:
        for w in workers.values():
            w.close()
    best = {name: {k: max(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for path in paths:
        tag = os.path.basename(path)
        ours, theirs = best[f"isthmus {tag}"], best[f"llama.cpp {tag}"]
        for key in ours:
            print(f"{tag:34s} {key:8s} isthmus {ours[key]:8.1f} tok/s   llama.cpp {theirs[key]:8.1f} tok/s   "
                  f"ratio {ours[key] / theirs[key]:.2f}x")


if __name__ == "__main__":
    main()
