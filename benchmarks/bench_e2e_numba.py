"""End-to-end decode and prefill on the default model: isthmus numba, isthmus reference, llama.cpp.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_e2e_numba.py [--decode 64] [--prefill 256]

Same GGUF (SmolLM2-135M-Instruct Q4_1), same prompt tokens, greedy, one process each, in one run:
  * prefill: tokens/s of one step over a `--prefill`-token prompt (best of 3, fresh cache each);
  * decode:  tokens/s of `--decode` greedy steps after a short chat prompt;
  * chat:    `isthmus chat --target T --verbose` run as a user runs it (prompt eval rate, eval rate,
             peak resident memory of the process).
llama.cpp is measured through llama-cpp-python (the `peers` extra) with n_threads = the cores
here; it is skipped, and said so, when not installed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys


def bench(engine, tok, n_prefill, n_decode):
    from isthmus.bench.model import chat_ids, prompt_ids, rates

    try:
        return rates(engine, prompt_ids(tok, n_prefill), chat_ids(tok), n_decode)
    finally:
        engine.close()


def chat_cli(target, n_decode):
    """`isthmus chat --verbose` as a subprocess: (prompt eval rate, eval rate, peak RSS MB)."""
    from isthmus.bench.model import PROMPT

    cmd = [sys.executable, "-m", "isthmus.cli", "chat", PROMPT, "--target", target, "--verbose",
           "--max-tokens", str(n_decode)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate()
    rss = _peak_rss_children()      # the only child this process waits for
    rates = dict(re.findall(r"^(prompt eval rate|eval rate):\s+([\d.]+)", err, re.M))
    return float(rates.get("prompt eval rate", "nan")), float(rates.get("eval rate", "nan")), rss, " ".join(cmd[1:])


def _peak_rss_children():
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-chat", action="store_true")
    args = ap.parse_args(argv)

    from isthmus.compiler.frontends import load_model
    from isthmus.models import pull

    path = pull(progress=False)
    # the CLI first, while this process is small: a child's peak RSS counts what fork copied
    chat = None if args.skip_chat else chat_cli("numba", args.decode)
    model = load_model(path)
    from isthmus.bench.model import IsthmusEngine, LlamaCppEngine

    rows = []
    for target in ("numba",) + (() if args.skip_reference else ("reference",)):
        rows.append((f"isthmus {target}",) + bench(IsthmusEngine(model, target), model.tokenizer, args.prefill,
                                                   args.decode))
    try:
        peer = bench(LlamaCppEngine(path, model.tokenizer), model.tokenizer, args.prefill, args.decode)
    except ImportError:
        peer = None
    rows.append(("llama.cpp", *peer) if peer else ("llama.cpp (llama-cpp-python not installed)", float("nan"),
                                                   float("nan")))
    print(f"threads: NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'all')} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')} cores={os.cpu_count()}")
    print(f"{'':<28}{'prefill ' + str(args.prefill) + ' tok/s':>22}{'decode tok/s':>16}")
    for name, pre, dec in rows:
        print(f"{name:<28}{pre:>22.1f}{dec:>16.1f}")
    if peer:
        print(f"numba / llama.cpp: decode {rows[0][2] / peer[1]:.2f}x, prefill {rows[0][1] / peer[0]:.2f}x")
    if not args.skip_reference:
        print(f"numba / reference: decode {rows[0][2] / rows[1][2]:.2f}x, prefill {rows[0][1] / rows[1][1]:.2f}x")
    if chat:
        pre, dec, rss, cmd = chat
        print(f"`isthmus {cmd.split(' ', 2)[2]}`: prompt eval {pre:.1f} tok/s, eval {dec:.1f} tok/s, "
              f"peak RSS {rss:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
