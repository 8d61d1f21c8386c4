"""`isthmus profile MODEL --target npu [--trace out.json]`: the modeled per-op profile of a decoder
on the NPU (prefill + one decode step), from the tables of compiler/lower/npu/profile_tables.py.
Registered into the main parser by `register(sub, common)`."""

from __future__ import annotations

import sys

from isthmus.compiler.lower.npu.profile_tables import op_table


def register(sub, common) -> None:
    p = sub.add_parser("profile", parents=[common],
                       help="modeled per-op profile of a model on the NPU (prefill + one decode step)")
    p.add_argument("model", help="a registry name or a path (.gguf, .onnx, HF folder)")
    p.add_argument("--target", default="npu", choices=("npu",), help="only the NPU has a modeled profile")
    p.add_argument("--trace", help="write the decode step's Chrome/Perfetto trace (.json) here")
    p.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog.",
                   help="text to prefill before the profiled decode step")
    p.add_argument("--config", default="core", help="NPU preset (core, chip, edge, datacenter) or a .json config")
    p.add_argument("--precision", default=None, choices=("bf16x3", "bf16", "f32"),
                   help="matmul precision (default bf16x3; see docs/npu-performance.md)")
    p.add_argument("--npu-weights", default=None, choices=("bf16", "int8", "fp8", "q4", "auto"),
                   help="how weights are stored in HBM: bf16 (default), int8 and q4 (8 or 4 bits, a scale and min "
                        "per 32 inputs: GGUF's blocks, the file's own where it has them), fp8 (per-channel "
                        "scales), auto (per layer from the file's quantization); the quantized ones are scaled on chip")
    p.add_argument("--by", default="op", choices=("op", "node"), help="one row per op kind or per graph node")
    p.add_argument("--limit", type=int, default=30, help="rows to print (0: all)")
    p.add_argument("--prefill", action="store_true", help="also print the prefill program's table")
    p.set_defaults(fn=cmd_profile)


def cmd_profile(args) -> int:
    import time

    import isthmus
    from isthmus.compiler.lower.npu.target import lower_npu
    from isthmus.compiler.passes.pipeline import run_pipeline
    from isthmus.errors import InputError, UnsupportedError
    from isthmus.npu.config import load_config
    from isthmus.npu.trace import write_trace

    cfg = load_config(args.config)
    model = isthmus.load(args.model)
    if not getattr(model, "is_decoder", False):
        raise UnsupportedError("profile runs a decoder model (prefill and a decode step); "
                               "for other graphs use `isthmus run --target npu`")
    t0 = time.perf_counter()
    exe = lower_npu(run_pipeline(model.graph), model=model, config=cfg, precision=args.precision,
                    weights=args.npu_weights)
    print(f"compiled in {time.perf_counter() - t0:.2f} s (precision {exe.precision}, weights {exe.weights}, "
          f"config {cfg.name})", file=sys.stderr)
    if exe.spec is None:
        raise UnsupportedError("this graph is not a Llama decoder the NPU lowering recognises; "
                               "profile the per-op lowering with `isthmus run --target npu`")
    ids = model.tokenizer.encode(args.prompt) if model.tokenizer is not None else [1, 2, 3]
    if not ids:
        raise InputError("--prompt encodes to no tokens")
    exe.profiling = True
    dec = exe.decoder()
    logits = dec.step(ids)
    dec.step([int(logits.argmax())])
    multi = exe.config.cores > 1             # the decoder tensor-parallel over the cores (tp_runtime.py)
    if multi:
        from isthmus.compiler.lower.npu.tp_runtime import chip_report
        from isthmus.npu.chip import write_chip_trace as write_trace   # noqa: F811
        table = lambda run: chip_report(exe, run, args.by, args.limit)              # noqa: E731
    else:
        table = lambda run: op_table(*run, exe.graph, cfg, args.by, args.limit)     # noqa: E731
    if args.prefill:
        print(f"prefill of {len(ids)} tokens:")
        print(table(exe.runs[0]))
        print()
    prog, tl, st = exe.runs[-1]
    print(f"one decode step at position {dec.length - 1}:")
    print(table(exe.runs[-1]))
    if multi:
        wb, bound = exe.chip.weight_bytes, exe.chip.weight_bytes / cfg.hbm_bytes_per_s
        print(f"weights streamed per token by the {len(prog.cores)} cores: {wb / 1e6:.1f} MB; at the chip's "
              f"{cfg.hbm_bytes_per_s / 1e9:.0f} GB/s {bound * 1e6:.1f} us; the step takes "
              f"{tl.cycles / cfg.clock_hz / bound:.2f}x that")
    else:
        _memory_and_weights(exe, prog, st, cfg)
    if args.trace:
        write_trace(args.trace, prog, tl, cfg)
        print(f"trace: {args.trace} (open in https://ui.perfetto.dev or chrome://tracing"
              + ("; a track group per core)" if multi else ")"))
    return 0


def _memory_and_weights(exe, prog, st, cfg) -> None:
    mem = getattr(prog, "memory", {})
    if mem:
        print(f"memory plan: SBUF peak {mem['sbuf_peak']:,} of {mem['sbuf_capacity']:,} bytes per partition "
              f"(weight ring {mem.get('weight_ring', 0):,}), PSUM peak {mem['psum_peak']:,} of "
              f"{mem['psum_capacity']:,}; spills: {len(mem['spills']) or 'none'}; HBM {mem['hbm_bytes'] / 1e6:.1f} MB"
              + (f"; chunks split to fit SBUF: {sorted(exe.runtime.unfit)}" if exe.runtime.unfit else ""))
    wb = exe.image.weight_bytes
    bound = wb / cfg.core_hbm_bytes_per_s
    fmts = ", ".join(f"{n} {f}" for f, n in sorted(exe.image.formats.items()))
    print(f"weights streamed per token: {wb / 1e6:.1f} MB ({fmts}); their HBM-bandwidth bound {bound * 1e6:.1f} us; "
          f"the step takes {st.seconds / bound:.2f}x that (the roofline above counts all its HBM traffic)")
