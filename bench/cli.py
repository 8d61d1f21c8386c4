"""`isthmus bench [--quick] [--only GROUP] [--json out.json] [--plot out.png] [--markdown]`."""

from __future__ import annotations

import sys
import time

from isthmus.errors import InputError


def register(sub, common) -> None:
    from isthmus.bench import GROUPS

    p = sub.add_parser("bench", parents=[common], help="isthmus against its peers (numpy, onnxruntime, llama.cpp, "
                       "AES-GCM, the NPU's bounds), side by side")
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter runs (a few minutes)")
    p.add_argument("--only", action="append", default=[], metavar="GROUP",
                   help=f"run only this group (repeatable): {', '.join(GROUPS)}")
    p.add_argument("--json", metavar="OUT.json", help="also write every row, the command and the machine as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="also plot the ratios (needs matplotlib: isthmus[plot])")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (for docs/performance.md)")
    p.set_defaults(fn=cmd_bench)


def cmd_bench(args) -> int:
    from isthmus.bench import GROUPS, run
    from isthmus.bench import report

    groups = [g for item in args.only for g in item.split(",") if g] or list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise InputError(f"unknown bench group(s) {', '.join(unknown)}: choose from {', '.join(GROUPS)}")
    if args.plot:
        report.check_plot_available()
    command = "isthmus bench" + " --quick" * args.quick + "".join(f" --only {g}" for g in args.only)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    rows = run(groups, quick=args.quick, log=log)
    report.print_machine()
    print(report.markdown(rows) if args.markdown else report.table(rows))
    print(f"({len(rows)} comparisons in {time.perf_counter() - t0:.0f} s; ratio > 1: isthmus better; "
          "npu: fraction of the bound reached; kernels, onnx, model: each engine in its own process, "
          "taking turns, best of several rounds)")
    if args.json:
        report.write_json(args.json, rows, command, args.quick)
    if args.plot:
        report.write_plot(args.plot, rows)
    return 0
