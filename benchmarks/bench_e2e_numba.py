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
import time

import numpy as np

PROMPT = "Explain in a few sentences why the sky is blue."


def _prompt_ids(tok, n):
    text = ("The history of the printing press begins in the fifteenth century, when movable type "
            "changed how books were made and read across Europe. ") * 40
    ids = tok.encode(text)
    assert len(ids) >= n
    return ids[:n]


def bench_isthmus(model, target, n_prefill, n_decode):
    import isthmus

    exe = isthmus.compile(model, target=target)
    ids = _prompt_ids(model.tokenizer, n_prefill)
    chat = model.tokenizer.encode(model.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True))
    exe.decoder().step(ids[:8])                     # warm: kernels loaded, buffers bound
    best = float("inf")
    for _ in range(3 if target != "reference" else 2):
        d = exe.decoder()
        t0 = time.perf_counter()
        d.step(ids)
        best = min(best, time.perf_counter() - t0)
    d = exe.decoder()
    logits = d.step(chat)
    tok = int(np.argmax(logits))
    d.step([tok])
    t0 = time.perf_counter()
    for _ in range(n_decode):
        tok = int(np.argmax(d.step([tok])))
    dec = time.perf_counter() - t0
    return n_prefill / best, n_decode / dec


def bench_llama_cpp(path, n_prefill, n_decode, tokenizer):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    threads = os.cpu_count() or 1
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    ids = _prompt_ids(tokenizer, n_prefill)
    llm.eval(ids[:8])
    best = float("inf")
    for _ in range(3):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        best = min(best, time.perf_counter() - t0)
    chat = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                          add_generation_prompt=True))
    llm.reset()
    llm.eval(chat)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    llm.eval([tok])
    t0 = time.perf_counter()
    for _ in range(n_decode):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    dec = time.perf_counter() - t0
    return n_prefill / best, n_decode / dec


def chat_cli(target, n_decode):
    """`isthmus chat --verbose` as a subprocess: (prompt eval rate, eval rate, peak RSS MB)."""
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
    rows = []
    for target in ("numba",) + (() if args.skip_reference else ("reference",)):
        rows.append((f"isthmus {target}",) + bench_isthmus(model, target, args.prefill, args.decode))
    peer = bench_llama_cpp(path, args.prefill, args.decode, model.tokenizer)
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
