"""End-to-end decode and prefill on the default model: isthmus numba, isthmus reference, llama.cpp.

    python benchmarks/bench_e2e_numba.py [--prefill 38,271] [--decode 64] [--rounds 5]

Same GGUF (SmolLM2-135M-Instruct Q4_1), same token ids (isthmus's tokenizer of that GGUF), greedy.
Each engine runs in its own process with its own settings (isthmus.bench.isolated; llama.cpp through
llama-cpp-python, the `peers` extra, with n_threads = the cores and its defaults otherwise), and the
engines take turns, one at a time, round after round; each figure is the best of the rounds:
  * prefill: tokens/s of one step over each `--prefill`-token prompt (fresh cache each);
  * decode:  tokens/s of `--decode` greedy steps after a short chat prompt;
  * chat:    `isthmus chat --target numba --verbose` run as a user runs it (prompt eval rate, eval
             rate, peak resident memory of the process).
llama.cpp is skipped, and said so, when not installed. `isthmus bench --only model` prints the
numba vs llama.cpp rows of the same measurement.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys


def chat_cli(target, n_decode):
    """`isthmus chat --verbose` as a subprocess: (prompt eval rate, eval rate, peak RSS MB)."""
    from isthmus.bench.model import PROMPT

    cmd = [sys.executable, "-P", "-m", "isthmus.cli", "chat", PROMPT, "--target", target, "--verbose",
           "--max-tokens", str(n_decode)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate()
    rss = _peak_rss_children()      # the only child this process waits for
    rates = dict(re.findall(r"^(prompt eval rate|eval rate):\s+([\d.]+)", err, re.M))
    return float(rates.get("prompt eval rate", "nan")), float(rates.get("eval rate", "nan")), rss, " ".join(cmd[4:])


def _peak_rss_children():
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", default="38,271", help="prompt lengths, comma-separated")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (best of)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-chat", action="store_true")
    args = ap.parse_args(argv)
    prefill = [int(n) for n in args.prefill.split(",")]

    from isthmus.bench.model import engines, measure
    from isthmus.models import pull

    path = pull(progress=False)
    chat = None if args.skip_chat else chat_cli("numba", args.decode)
    names = ["isthmus numba"] + ([] if args.skip_reference else ["isthmus reference"]) + ["llama.cpp"]
    workers, missing = engines(path, names, log=lambda m: None)
    try:
        got = measure(workers, prefill, args.decode, args.rounds, log=lambda m: None)
    finally:
        for w in workers.values():
            w.close()
    print(f"each engine in its own process, best of {args.rounds} interleaved rounds; cores={os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    cols = [f"prefill {n}" for n in prefill] + ["decode"]
    print(f"{'':<24}" + "".join(f"{c + ' tok/s':>20}" for c in cols))
    for name in names:
        if name in got:
            print(f"{name:<24}" + "".join(f"{got[name][c]:>20.1f}" for c in cols))
        else:
            print(f"{name:<24}  n/a: {missing[name]}")
    ours = got["isthmus numba"]
    for peer in ("llama.cpp", "isthmus reference"):
        if peer in got:
            print(f"numba / {peer}: " + ", ".join(f"{c} {ours[c] / got[peer][c]:.2f}x" for c in cols))
    if chat:
        pre, dec, rss, command = chat
        print(f"`isthmus {command}`: prompt eval {pre:.1f} tok/s, eval {dec:.1f} tok/s, "
              f"peak RSS {rss:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
