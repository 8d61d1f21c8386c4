"""Batched decode at the engine, without the server: tokens per second of one decode step for B
sequences, isthmus's numba target (`NumbaExecutable.decode_batch`) against llama.cpp decoding B
sequences in one `llama_decode` batch (each sequence its own `seq_id` and position), on the same
GGUF file, each engine in its own process, interleaved rounds, best of each.

    pip install -e ".[peers]"        # llama-cpp-python, for the peer
    python benchmarks/bench_batched_decode.py [FILE.gguf] [--batches 1,4,8,16] [--steps 32] [--rounds 5]

Without FILE it takes the default model. Issue 16 asks 8 streams for >= 4x one stream's rate; this
measures what each engine's batched step gives before any serving cost, and what the same machine
gives llama.cpp.
"""

from __future__ import annotations

import argparse
import os

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", nargs="?")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    from isthmus.bench.isolated import Worker

    path = args.file
    if path is None:
        from isthmus.models import pull
        path = str(pull(progress=False))
    batches = [int(b) for b in args.batches.split(",")]
    workers = {"isthmus numba": Worker("isthmus.bench.batched:IsthmusBatch", path)}
    try:
        workers["llama.cpp"] = Worker("isthmus.bench.batched:LlamaCppBatch", path)
    except Exception as e:          # no llama-cpp-python: isthmus alone
        print(f"llama.cpp not measured: {e}")
    best = {(name, b): 0.0 for name in workers for b in batches}
    try:
        for _ in range(args.rounds):
            for b in batches:
                for name, w in workers.items():
                    best[name, b] = max(best[name, b], w.call("rate", b, args.steps))
    finally:
        for w in workers.values():
            w.close()
    print(f"{os.path.basename(path)}: tokens/s of a decode step for B sequences, best of {args.rounds} "
          f"interleaved rounds of {args.steps} steps (load {os.getloadavg()[0]:.2f})")
    for name in workers:
        one = best[name, batches[0]]
        print(f"  {name:14s} " + "   ".join(f"B={b}: {best[name, b]:7.1f} ({best[name, b] / one:.2f}x)" for b in batches))
    return {f"{n} B={b}": v for (n, b), v in best.items()}


if __name__ == "__main__":
    main()
