"""What batch invariance costs: the default model reading a prompt whole, compiled normally and
with `batch_invariant=True` (`isthmus serve --batch-invariant`), each in its own process, rounds
interleaved, best of each; and whether the prompt read in 16-token parts gives the same bits.

    python benchmarks/bench_batch_invariant.py [--lengths 256,1024,2048] [--rounds 3] [--target numba]
"""

from __future__ import annotations

import argparse


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="256,1024,2048")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--target", default="numba")
    args = ap.parse_args(argv)
    from isthmus.bench.isolated import Worker
    from isthmus.models import pull

    path = str(pull(progress=False))
    lengths = [int(n) for n in args.lengths.split(",")]
    workers = {inv: Worker("isthmus.bench.batched:InvariantPrefill", path, args.target, inv) for inv in (False, True)}
    best = {(inv, n): float("inf") for inv in workers for n in lengths}
    try:
        for _ in range(args.rounds):
            for n in lengths:
                for inv, w in workers.items():
                    best[inv, n] = min(best[inv, n], w.call("seconds", n))
        differs = {inv: [w.call("chunking_matters", n) for n in lengths] for inv, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    print(f"prompt read whole, best of {args.rounds} interleaved rounds ({args.target}, default model)")
    print("| prompt tokens | default | batch-invariant | ratio | 16-token parts differ (default / invariant) |")
    print("|---|---|---|---|---|")
    for k, n in enumerate(lengths):
        a, b = best[False, n], best[True, n]
        print(f"| {n:,} | {a * 1e3:,.0f} ms | {b * 1e3:,.0f} ms | {b / a:.2f}x | {differs[False][k]} / {differs[True][k]} |")
    return {f"{'invariant' if inv else 'default'} {n}": v for (inv, n), v in best.items()}


if __name__ == "__main__":
    main()
