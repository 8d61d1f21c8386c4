"""The numba target under different thread settings, each in its own process, interleaved, best of N.

    python benchmarks/bench_threads.py [--rounds 5] [--decode 64] [--config NAME:VAR=VALUE,...]

Default configurations: the plain environment (what isthmus chooses by itself), OMP_WAIT_POLICY=PASSIVE,
OMP_WAIT_POLICY=ACTIVE and NUMBA_THREADING_LAYER=workqueue. Each runs in a worker process that loads
the default model once; rounds rotate the order of the workers, and a worker that is not measuring
is stopped (SIGSTOP: under OMP_WAIT_POLICY=ACTIVE its threads would otherwise spin for ever), so
one engine at a time has the cores. Figures: prefill of 38 and 271 tokens
(tokens/s of one step over a fresh cache) and decode tokens/s of --decode greedy steps.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

PREFILLS = (38, 271)
CONFIGS = {
    "default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "NUMBA_THREADING_LAYER=workqueue": {"NUMBA_THREADING_LAYER": "workqueue"},
}
# variables that change thread behaviour: removed from every worker's environment so that
# "default" really is a plain shell
THREAD_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS",
               "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ISTHMUS_THREADS")


def worker(n_decode: int) -> None:
    import numpy as np

    import isthmus
    from isthmus.bench.model import chat_ids, prompt_ids

    model = isthmus.load("smollm2-135m-instruct")
    exe = isthmus.compile(model, target="numba")
    tok = model.tokenizer
    prompts = {n: prompt_ids(tok, n) for n in PREFILLS}
    chat = chat_ids(tok)
    exe.decoder().step(prompts[PREFILLS[0]])
    print("ready", flush=True)
    for line in sys.stdin:
        out = {}
        for n, ids in prompts.items():
            d = exe.decoder()
            t0 = time.perf_counter()
            d.step(ids)
            out[f"prefill {n}"] = n / (time.perf_counter() - t0)
        d = exe.decoder()
        nxt = int(np.argmax(d.step(chat)))
        t0 = time.perf_counter()
        for _ in range(n_decode):
            nxt = int(np.argmax(d.step([nxt])))
        out["decode"] = n_decode / (time.perf_counter() - t0)
        print(json.dumps(out), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--only", action="append", help="a configuration name (repeatable)")
    ap.add_argument("--config", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                    help="an extra configuration, e.g. spin10k:GOMP_SPINCOUNT=10000")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.decode)
        return 0
    configs = {k: v for k, v in CONFIGS.items() if not args.only or k in args.only}
    for spec in args.config:
        name, _, assigns = spec.partition(":")
        configs[name] = dict(a.split("=", 1) for a in assigns.split(","))
    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    procs = {}
    for name, extra in configs.items():
        procs[name] = subprocess.Popen([sys.executable, __file__, "--worker", "--decode", str(args.decode)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       env={**base, **extra})
        assert procs[name].stdout.readline().strip() == "ready", name
        procs[name].send_signal(signal.SIGSTOP)
    best: dict[str, dict[str, float]] = {name: {} for name in configs}
    names = list(configs)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            p = procs[name]
            p.send_signal(signal.SIGCONT)
            p.stdin.write("go\n")
            p.stdin.flush()
            for k, v in json.loads(p.stdout.readline()).items():
                best[name][k] = max(best[name].get(k, 0.0), v)
            p.send_signal(signal.SIGSTOP)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for p in procs.values():
        p.send_signal(signal.SIGCONT)
        p.stdin.close()
        p.wait()
    cols = [f"prefill {n}" for n in PREFILLS] + ["decode"]
    print(f"best of {args.rounds} interleaved rounds, tokens/s (decode: {args.decode} steps); {os.cpu_count()} cores;"
          f" load average {os.getloadavg()[0]:.2f}")
    print(f"| environment | {' | '.join(cols)} |")
    print("|---|" + "---:|" * len(cols))
    top = {c: max(best[n][c] for n in names) for c in cols}
    for name in names:
        cells = [f"{best[name][c]:.1f} ({best[name][c] / top[c]:.0%})" for c in cols]
        print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
