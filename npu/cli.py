"""`isthmus npu asm|disasm|run`: registered into the main parser by `register(sub, common)`."""

from __future__ import annotations

import argparse
from pathlib import Path

from isthmus.errors import NpuError


def register(sub, common) -> None:
    p = sub.add_parser("npu", parents=[common], help="the modeled NPU: assemble, disassemble, run programs")
    p.set_defaults(fn=lambda args: _usage(p))
    npu = p.add_subparsers(dest="npu_command", metavar="NPU_COMMAND", parser_class=type(p))

    q = npu.add_parser("asm", parents=[common], help="assemble FILE.s into a binary program")
    q.add_argument("source", help="assembly text (.s)")
    q.add_argument("-o", "--output", help="binary to write (default: the source with .bin)")
    q.set_defaults(fn=cmd_asm)

    q = npu.add_parser("disasm", parents=[common], help="print a binary program as assembly text")
    q.add_argument("binary", help="a program assembled by `isthmus npu asm` (.bin)")
    q.add_argument("-o", "--output", help="write the text here instead of stdout")
    q.set_defaults(fn=cmd_disasm)

    q = npu.add_parser("run", parents=[common], help="simulate a program and print its timing stats")
    q.add_argument("program", help="assembly (.s) or binary (.bin)")
    q.add_argument("--config", default="core", help="a preset (core, chip, edge, datacenter) or a .json config")
    q.add_argument("--trace", help="write a Chrome/Perfetto trace (.json) here")
    q.add_argument("--serial", action="store_true", help="FORCE_SERIAL: run every instruction in program order")
    q.add_argument("--no-race-check", action="store_true",
                   help="allow engines to touch the same memory without a semaphore between them")
    q.add_argument("--inputs", help=".npz of input tensors by name (default: seeded random values)")
    q.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    q.add_argument("-o", "--output", help="write the output tensors to this .npz")
    q.set_defaults(fn=cmd_run)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def _read(path: str, binary: bool):
    try:
        return Path(path).read_bytes() if binary else Path(path).read_text()
    except FileNotFoundError:
        raise NpuError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise NpuError(f"{path}: is a directory") from None
    except UnicodeDecodeError:
        raise NpuError(f"{path}: not a text file (to run a binary program, name it .bin)") from None
    except OSError as e:
        raise NpuError(f"{path}: {e.strerror}") from None


def load_program(path: str):
    from isthmus.npu.asm import parse_program
    from isthmus.npu.encoding import MAGIC, decode_program
    data = _read(path, binary=True)
    if data.startswith(MAGIC) or path.endswith(".bin"):
        try:
            return decode_program(data)
        except NpuError as e:
            raise type(e)(f"{path}: {e}") from None
    return parse_program(_read(path, binary=False), path)


def _write(path: str, data) -> None:
    try:
        if isinstance(data, bytes):
            Path(path).write_bytes(data)
        else:
            Path(path).write_text(data)
    except OSError as e:
        raise NpuError(f"{path}: cannot write ({e.strerror})") from None


def cmd_asm(args) -> int:
    from isthmus.npu.asm import parse_program
    from isthmus.npu.encoding import encode_program
    prog = parse_program(_read(args.source, binary=False), args.source)
    out = args.output or str(Path(args.source).with_suffix(".bin"))
    data = encode_program(prog)
    _write(out, data)
    print(f"{out}: {len(prog.instructions)} instructions, {len(prog.labels)} labels, {len(data)} bytes")
    return 0


def cmd_disasm(args) -> int:
    from isthmus.npu.asm import format_program
    from isthmus.npu.encoding import decode_program
    try:
        text = format_program(decode_program(_read(args.binary, binary=True)))
    except NpuError as e:
        raise type(e)(f"{args.binary}: {e}") from None
    if args.output:
        _write(args.output, text)
    else:
        print(text, end="")
    return 0


def _inputs(prog, args) -> dict:
    import numpy as np
    if args.inputs:
        from isthmus.npz import load_npz
        return load_npz(args.inputs)
    rng = np.random.default_rng(args.seed)
    out = {}
    for t in prog.tensors:
        if t.kind in ("input", "inout"):
            ints = t.dtype in ("i8", "i32")
            out[t.name] = rng.integers(-8, 8, t.shape) if ints else rng.standard_normal(t.shape).astype(np.float32)
    return out


def cmd_run(args) -> int:
    import numpy as np

    from isthmus.npu.config import load_config
    from isthmus.npu.sim import run
    from isthmus.npu.trace import write_trace
    cfg = load_config(args.config)
    prog = load_program(args.program)
    result = run(prog, _inputs(prog, args), cfg, serial=args.serial, check_races=not args.no_race_check)
    print(result.stats.table())
    from isthmus.npu.timing import roofline
    print(roofline(prog, cfg).describe(result.stats.cycles))
    if args.trace:
        write_trace(args.trace, prog, result.timeline, cfg)
        print(f"trace: {args.trace} (open in https://ui.perfetto.dev or chrome://tracing)")
    if args.output:
        try:
            np.savez(args.output, **{k: v if v.dtype.kind in "fiu" else v.astype(np.float32)   # bf16, fp8
                                     for k, v in result.outputs.items()})
        except OSError as e:
            raise NpuError(f"{args.output}: cannot write ({e.strerror})") from None
    return 0
