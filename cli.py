"""The `isthmus` command.

Every user mistake (bad path, corrupt file, unsupported op, bad flag) ends in one line on
stderr and exit status 2; a failed numerical check exits 1; an internal error says it is one
and points to `--debug` for the traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

from isthmus.errors import InputError, IsthmusError

EXIT_USAGE, EXIT_CHECK_FAILED, EXIT_INTERNAL = 2, 1, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage dump
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class _UsageError(Exception):
    pass


def _add_model(p, required=True, help_extra=""):
    from isthmus.models import DEFAULT_MODEL
    if required:
        p.add_argument("model", help="a registry name (e.g. smollm2-135m-instruct) or a path: .gguf, .onnx, HF folder"
                       + help_extra)
    else:
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name or path (default {DEFAULT_MODEL})")


def _add_target(p):
    from isthmus.compiler.targets import TARGETS
    p.add_argument("--target", default=None, choices=TARGETS,
                   help="where to run (default: numba on a CPU, triton with a CUDA GPU, when available)")
    add_npu_options(p)


def add_npu_options(p):
    """--npu-config, --npu-precision, --npu-weights: the npu target's lowering options
    (`isthmus.compile(..., config=, precision=, weights=)`; docs/npu-performance.md)."""
    p.add_argument("--npu-config", help="with --target npu: the preset (core, the default; chip: 8 cores, "
                   "tensor-parallel; edge; datacenter) or a .json config")
    p.add_argument("--npu-precision", choices=("bf16x3", "bf16", "f32"),
                   help="with --target npu: matmul precision (default bf16x3)")
    p.add_argument("--npu-weights", choices=("bf16", "int8", "fp8", "q4", "auto"),
                   help="with --target npu: how weights sit in HBM (default bf16; int8/q4: GGUF's blocks)")


def target_options(args) -> dict:
    """The --npu-* options given, as `isthmus.compile` keywords; refused with any other target and
    with --sealed (a sealed package is compiled inside the enclave with the target's defaults)."""
    given = {k: v for k, v in (("config", args.npu_config), ("precision", args.npu_precision),
                                ("weights", args.npu_weights)) if v is not None}
    if given and args.target != "npu":
        raise InputError(f"--npu-{next(iter(given))} applies to --target npu (the target here is "
                         f"{args.target or 'the default'})")
    if given and getattr(args, "sealed", None):
        raise InputError("--npu-* options are not taken with --sealed: the enclave compiles the sealed "
                         "program with the target's defaults")
    return given


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    parser = _Parser(prog="isthmus", parents=[common],
                     description="Compile third-party LLMs, run them sealed, serve them over the chat API.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("pull", parents=[common], help="fetch a registry model into the cache")
    p.add_argument("name", nargs="?", default=None, help="registry name (default: the default model)")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.set_defaults(fn=cmd_pull)

    p = sub.add_parser("list", parents=[common], help="the pulled models: name, size, digest, modified")
    p.add_argument("--json", action="store_true", help="print JSON (with the full sha256)")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("rm", parents=[common], help="remove pulled models from the cache")
    p.add_argument("models", nargs="+", metavar="MODEL", help="registry name, as `isthmus list` shows it")
    p.set_defaults(fn=cmd_rm)

    p = sub.add_parser("info", parents=[common], help="architecture, parameters, quantization, op histogram")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("compile", parents=[common], help="run the pass pipeline and lower to a target")
    _add_model(p)
    _add_target(p)
    p.add_argument("--dump-ir", action="store_true", help="print the IR after each pass")
    p.add_argument("-o", "--output", help="write the final IR text here")
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("run", parents=[common], help="run any graph on named inputs from an .npz file")
    p.add_argument("model", nargs="?", default=None, help="a registry name (e.g. smollm2-135m-instruct) or a "
                   "path: .gguf, .onnx, HF folder (none with --sealed)")
    _add_target(p)
    p.add_argument("--sealed", metavar="PACKAGE", help="run a sealed .isth package inside the simulated enclave "
                   "(the key comes from the local key release service)")
    p.add_argument("--inputs", required=True, help=".npz file of named input arrays")
    p.add_argument("-o", "--output", help="write the named outputs to this .npz")
    p.add_argument("--check", choices=("reference", "onnxruntime"),
                   help="compare against the unoptimised graph on the reference target, or onnxruntime")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs error allowed by --check (default 1e-4)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("chat", parents=[common], help="chat with a model (the default model unless --model)")
    p.add_argument("prompt", nargs="?", default=None,
                   help="the user message (none: stdin if piped, else an interactive session; /? there for help)")
    _add_model(p, required=False)
    _add_target(p)
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--verbose", action="store_true", help="print timings to stderr, as `ollama run --verbose`")
    p.add_argument("--sealed", metavar="PACKAGE", help="chat with a sealed .isth package inside the simulated "
                   "enclave (the key comes from the local key release service; --model is ignored)")
    p.set_defaults(fn=cmd_chat)
    # Subcommands that belong to one layer live with it and register themselves here.
    from isthmus.bench.cli import register as register_bench
    from isthmus.cli_profile import register as register_profile
    from isthmus.interop.cli import register as register_serve
    from isthmus.npu.cli import register as register_npu
    from isthmus.runtime.tee.cli import register as register_tee
    for register in (register_profile, register_bench, register_npu, register_tee, register_serve):
        register(sub, common)
    return parser


# -- commands ------------------------------------------------------------------------------------

def cmd_pull(args) -> int:
    from isthmus.models import DEFAULT_MODEL, pull
    path = pull(args.name or DEFAULT_MODEL, force=args.force)
    print(path)
    return 0


def cmd_list(args) -> int:
    import json

    from isthmus.models import list_pulled
    models = list_pulled()
    if args.json:
        print(json.dumps([{"name": m.name, "path": str(m.path), "size": m.size, "sha256": m.sha256,
                           "modified": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(m.modified)),
                           "intact": m.intact} for m in models], indent=2))
        return 0
    rows = [("NAME", "ID", "SIZE", "MODIFIED")] + [
        (m.name, m.sha256[:12] + ("" if m.intact else " (corrupt: pull --force)"), f"{m.size / 1e6:.0f} MB",
         time.strftime("%Y-%m-%d %H:%M", time.localtime(m.modified))) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths)) + "    " + r[3])
    return 0


def cmd_rm(args) -> int:
    from isthmus.models import pulled_path, remove
    names = list(dict.fromkeys(args.models))
    for name in names:    # check them all first: nothing is removed if one name is wrong
        pulled_path(name)
    for name in names:
        remove(name)
        print(f"deleted '{name}'")
    return 0


def cmd_info(args) -> int:
    import json

    from isthmus.models import load, resolve
    path = resolve(args.model)
    model = load(path)
    cfg = {k: v for k, v in model.config.items() if k != "chat_template"}
    info = {
        "path": str(path), "format": model.format, "graph": model.graph.name,
        "architecture": cfg.get("architecture", "graph"),
        "parameters": model.parameter_count(), "weight_bytes": model.weight_bytes(),
        "quantization": model.quantization(),
        "inputs": {v.name: str(v.type) for v in model.graph.inputs if not v.name.startswith("past_")},
        "outputs": {v.name: str(v.type) for v in model.graph.outputs if not v.name.startswith("present_")},
        "config": cfg, "chat_template": bool(model.chat_template),
        "ops": model.graph.op_histogram(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{'model':<16}{info['graph']}  ({info['format']}, {path})")
    print(f"{'architecture':<16}{info['architecture']}")
    print(f"{'parameters':<16}{info['parameters'] / 1e6:.1f}M  ({info['weight_bytes'] / 1e6:.1f} MB of weights)")
    print(f"{'quantization':<16}" + ", ".join(f"{k} x{n}" for k, n in info["quantization"].items()))
    for key in ("n_layers", "hidden", "ffn", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "context_length",
                "rope_theta", "rms_eps"):
        if key in cfg:
            print(f"{key:<16}{cfg[key]}")
    print(f"{'inputs':<16}" + ", ".join(f"{k}: {t}" for k, t in info["inputs"].items()))
    print(f"{'outputs':<16}" + ", ".join(f"{k}: {t}" for k, t in info["outputs"].items()))
    print("ops")
    for op, n in info["ops"].items():
        print(f"  {op:<14}{n:>6}")
    return 0


def cmd_compile(args) -> int:
    import isthmus
    from isthmus.compiler.ir_text import print_graph

    model = isthmus.load(args.model)
    before = len(model.graph.nodes)

    def dump(name, graph):
        print(f"// ----- IR after {name} ({len(graph.nodes)} nodes)")
        print(print_graph(graph), end="")

    exe = isthmus.compile(model, target=args.target, on_pass=dump if args.dump_ir else None, **target_options(args))
    if args.output:
        with open(args.output, "w") as f:
            f.write(print_graph(exe.graph))
    print(f"compiled {model.graph.name} for {exe.target}: {before} -> {len(exe.graph.nodes)} nodes "
          f"in {exe.compile_seconds:.2f} s; ops: " +
          ", ".join(f"{op} x{n}" for op, n in exe.graph.op_histogram().items()),
          file=sys.stderr if args.dump_ir else sys.stdout)
    return 0


def cmd_run(args) -> int:
    import numpy as np

    import isthmus
    from isthmus.npz import load_npz
    from isthmus.runtime.check import compare

    if (args.model is None) == (args.sealed is None):
        raise InputError("give a model to run, or --sealed PACKAGE (not both)")
    options = target_options(args)
    inputs = load_npz(args.inputs)
    session = None
    if args.sealed:    # the simulated TEE: attest, get the key, unseal in memory, check the program
        from isthmus.runtime.tee.cli import open_sealed
        session = open_sealed(args)
        exe = session.exe
        model = exe.model
    else:
        model = isthmus.load(args.model)
        exe = isthmus.compile(model, target=args.target, **options)
    try:
        outputs = exe.run(inputs)
        expected = _run_check(args, model, inputs, sealed=session is not None) if args.check else None
    finally:
        if session is not None:
            session.close()
    if args.output:
        np.savez(args.output, **outputs)
    for name, a in outputs.items():
        print(f"{name:<24}{a.dtype!s:<9}{a.shape!s}")
    if not args.check:
        return 0
    ok = compare(outputs, expected, args.tolerance, label=args.check)
    return 0 if ok else EXIT_CHECK_FAILED


def _run_check(args, model, inputs, sealed: bool) -> dict:
    """What `run --check` compares against: onnxruntime on the model file, or the reference target."""
    import isthmus
    from isthmus.runtime.check import onnxruntime_outputs

    if args.check == "onnxruntime":
        if model.format != "onnx":
            raise InputError("--check onnxruntime needs an ONNX model; use --check reference")
        if sealed:
            raise InputError("--check onnxruntime needs the model file, which a sealed package never writes "
                             "out; use --check reference")
        return onnxruntime_outputs(model.path, inputs)
    return isthmus.compile(model, target="reference", passes=[]).run(inputs)


def cmd_chat(args) -> int:
    import isthmus

    t0 = time.perf_counter()
    interactive = args.prompt is None and sys.stdin is not None and sys.stdin.isatty()
    if args.prompt is None and not interactive:    # piped: all of stdin is one prompt, as `ollama run`
        try:
            # without the newline `echo` ends it with: `echo Q | isthmus chat` asks what `isthmus chat Q` asks
            args.prompt = sys.stdin.read().rstrip() if sys.stdin is not None else ""
        except UnicodeDecodeError as e:
            raise InputError(f"stdin is not text in the locale's encoding ({e.reason})") from None
    if not interactive and not args.prompt.strip():
        raise InputError("the prompt is empty (give one as an argument, on stdin, or none on a terminal "
                         "for an interactive session)")
    options = target_options(args)
    session = None
    if args.sealed:    # the simulated TEE: attest, get the key, unseal in memory, check the program
        from isthmus.runtime.tee.cli import open_sealed
        session = open_sealed(args)
        exe = session.exe
    else:
        model = isthmus.load(args.model)
        exe = isthmus.compile(model, target=args.target, **options)
    load_seconds = time.perf_counter() - t0
    try:
        if interactive:
            from isthmus.chat_repl import repl
            return repl(exe, args, load_seconds, session.timings if session else None)
        return _chat(args, exe, t0, load_seconds, session)
    finally:
        if session is not None:
            session.close()


def _chat(args, exe, t0: float, load_seconds: float, session) -> int:
    import isthmus

    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    stream = isthmus.chat(exe, messages, max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        print_timings(stream.stats, time.perf_counter() - t0, load_seconds, session.timings if session else {})
    return 0


def print_timings(s, total: float, load_seconds: float, timings: dict) -> None:
    """The --verbose lines of one reply on stderr, as `ollama run --verbose`."""
    lines = [("total duration", _dur(total)), ("load duration", _dur(load_seconds)),
             *((f"  {k} duration", _dur(v)) for k, v in timings.items()),
             ("prompt eval count", f"{s.prompt_tokens} token(s)"),
             ("prompt eval duration", _dur(s.prompt_seconds)),
             ("prompt eval rate", f"{s.prompt_rate:.2f} tokens/s"),
             ("eval count", f"{s.eval_tokens} token(s)"), ("eval duration", _dur(s.eval_seconds)),
             ("eval rate", f"{s.eval_rate:.2f} tokens/s")]
    width = max(22, *(len(k) + 2 for k, _ in lines))
    for k, v in lines:
        print(f"{k + ':':<{width}}{v}", file=sys.stderr)


def _dur(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.3f}s"


# -- entry point ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "fn", None):
            parser.print_help()
            return EXIT_USAGE
        return args.fn(args)
    except _UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except IsthmusError as e:
        if debug:
            raise
        print(f"isthmus: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("isthmus: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: say so, keep it to one line unless asked
        if debug:
            raise
        print(f"isthmus: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(run again with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
