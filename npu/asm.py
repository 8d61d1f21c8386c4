"""Assembly text <-> Program, derived from `isa.OPS`.

One instruction per line::

    mnemonic AP, AP, ..., name=value, ... @"source label"   # comment

Required access patterns come first, in table order; every other field is `name=value`, in any
order; a field with a default (docs/npu-isa.md) may be left out. An AP is written
``space.dtype[start:stop]+offset{size:stride,...}`` for SBUF/PSUM and
``hbm.dtype[rows*rowstride]+offset{...}`` for HBM; offsets are bytes, strides are elements.
Two directives describe HBM: ``.hbm BYTES`` and ``.tensor NAME DTYPE[d0,d1,...] OFFSET KIND``
(KIND: input, output, inout, scratch).
`format_program` prints the canonical form, which `parse_program` reads back to an equal Program.
"""

from __future__ import annotations

import json
import re

import numpy as np

from isthmus.errors import NpuError
from isthmus.npu.encoding import check_instruction, check_tensor, decode_program, encode_program
from isthmus.npu.isa import AP, OPS, REQUIRED, SPACES, Instruction, Program, TensorDecl

_AP_RE = re.compile(r"(\w+)\.(\w+)\[\s*(\d+)\s*([:*])\s*(\d+)\s*\](?:\+\s*(0[xX][0-9a-fA-F]+|\d+))?\{([^{}]*)\}\Z")
_DIM_RE = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*\Z")
_KW_RE = re.compile(r"([a-z_][a-z0-9_]*)\s*=\s*(.*)\Z", re.S)
_TENSOR_RE = re.compile(r"\.tensor\s+(\S+)\s+(\w+)\[([\d,\s]*)\]\s+(0[xX][0-9a-fA-F]+|\d+)\s+(\w+)\Z")
_HBM_RE = re.compile(r"\.hbm\s+(0[xX][0-9a-fA-F]+|\d+)\Z")


# -- printing -------------------------------------------------------------------------------------------------

def format_f32(x) -> str:
    """The shortest text that reads back to the same fp32 value."""
    return str(np.float32(x))


def _format_value(f, v) -> str:
    if isinstance(v, AP):
        return str(v)
    if f.kind in ("f32", "scalar"):
        return format_f32(v)
    return str(v)


def format_instruction(ins: Instruction) -> str:
    op = OPS[ins.op]
    parts = []
    for f in op.fields:
        v = ins.args.get(f.name)
        if f.kind == "ap":
            parts.append(str(v))
        elif v is not None:
            parts.append(f"{f.name}={_format_value(f, v)}")
    text = ins.op + (" " + ", ".join(parts) if parts else "")
    if ins.label is not None:
        text += " @" + json.dumps(ins.label)
    return text


def format_program(prog: Program) -> str:
    lines = [f".hbm {prog.hbm_bytes}"]
    for t in prog.tensors:
        lines.append(f".tensor {t.name} {t.dtype}[{','.join(map(str, t.shape))}] {t.offset:#x} {t.kind}")
    lines += [format_instruction(i) for i in prog.instructions]
    return "\n".join(lines) + "\n"


# -- parsing -------------------------------------------------------------------------------------------------

def parse_ap(text: str) -> AP:
    m = _AP_RE.match(text.strip())
    if not m:
        raise NpuError(f"bad access pattern {text.strip()!r}: expected "
                       f"space.dtype[start:stop]+offset{{size:stride,...}}")
    space, dtype, a, sep, b, off, dims = m.groups()
    if space not in SPACES[1:]:
        raise NpuError(f"unknown memory space {space!r} (hbm, sbuf, psum)")
    if (space == "hbm") != (sep == "*"):
        raise NpuError(f"{text.strip()}: write HBM rows as [rows*rowstride] and SBUF/PSUM partitions as [start:stop]")
    dim_list = []
    for d in dims.split(","):
        dm = _DIM_RE.match(d)
        if not dm:
            raise NpuError(f"bad free dim {d.strip()!r} in {text.strip()!r}: expected size:stride")
        dim_list.append((int(dm[1]), int(dm[2])))
    a, b = int(a), int(b)
    if space == "hbm":
        return AP(space, dtype, 0, a, int(off, 0) if off else 0, tuple(dim_list), b)
    if b <= a:
        raise NpuError(f"{text.strip()}: empty partition range {a}:{b}")
    return AP(space, dtype, a, b - a, int(off, 0) if off else 0, tuple(dim_list))


def _split_label(line: str, err):
    """(body, label) with the trailing `@"label"` and `# comment` removed."""
    for i, c in enumerate(line):
        if c == "#":
            return line[:i], None
        if c == "@" and line[i + 1:i + 2] == '"':
            try:
                label, end = json.JSONDecoder().raw_decode(line, i + 1)
            except ValueError as e:
                raise err(f"bad label string ({e.msg})") from None
            rest = line[end:].strip()
            if rest and not rest.startswith("#"):
                raise err(f"unexpected text after the label: {rest!r}")
            return line[:i], label
    return line, None


def _split_operands(body: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in body:
        depth += c in "[{"
        depth -= c in "]}"
        if c == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip() or parts:
        parts.append("".join(cur).strip())
    return parts


def _parse_value(f, text: str):
    if f.kind in ("ap", "opt_ap"):
        return parse_ap(text)
    if f.kind == "scalar" and text.split(".", 1)[0] in SPACES[1:]:
        return parse_ap(text)
    try:
        if f.kind in ("scalar", "f32"):
            return float(np.float32(float(text)))
        if f.kind in ("uint", "int", "flag"):
            return int(text, 0)
    except ValueError:
        raise NpuError(f"{f.name}: {text!r} is not a number") from None
    return text


def parse_instruction(line: str, err=NpuError) -> Instruction | None:
    body, label = _split_label(line, err)
    body = body.strip()
    if not body:
        if label is not None:
            raise err("a label needs an instruction")
        return None
    mnemonic, _, rest = body.partition(" ")
    op = OPS.get(mnemonic)
    if op is None:
        raise err(f"unknown instruction {mnemonic!r}")
    positional, args = list(op.positional), {}
    for part in _split_operands(rest):
        if not part:
            raise err("empty operand")
        kw = _KW_RE.match(part)
        if kw and kw[1] in op.field_map:
            name, text = kw[1], kw[2].strip()
            if name in args:
                raise err(f"{mnemonic}: field {name} given twice")
        elif kw:
            raise err(f"{mnemonic}: unknown field {kw[1]!r} (fields: {', '.join(op.field_map)})")
        else:
            if not positional:
                raise err(f"{mnemonic}: too many operands (it takes {len(op.positional)} access patterns)")
            name, text = positional.pop(0).name, part
        try:
            args[name] = _parse_value(op.field_map[name], text)
        except NpuError as e:
            raise err(str(e)) from None
    for f in op.fields:
        if f.name not in args and f.default is not REQUIRED and f.default is not None:
            args[f.name] = f.default
    ins = Instruction(mnemonic, {f.name: args[f.name] for f in op.fields if f.name in args}, label)
    try:
        check_instruction(ins)
    except NpuError as e:
        raise err(str(e)) from None
    return ins


def parse_program(text: str, filename: str = "<asm>") -> Program:
    instructions, tensors, hbm = [], [], 0
    for lineno, line in enumerate(text.splitlines(), 1):
        def err(msg, lineno=lineno):
            return NpuError(f"{filename}:{lineno}: {msg}")
        stripped = line.strip()
        if stripped.startswith("."):
            stripped = stripped.split("#", 1)[0].strip()
            if m := _HBM_RE.match(stripped):
                hbm = max(hbm, int(m[1], 0))
            elif m := _TENSOR_RE.match(stripped):
                try:
                    shape = tuple(int(d) for d in m[3].split(",")) if m[3].strip() else ()
                except ValueError:
                    raise err(f"bad tensor shape [{m[3]}]") from None
                t = TensorDecl(m[1], m[2], shape, int(m[4], 0), m[5])
                try:
                    check_tensor(t)
                except NpuError as e:
                    raise err(str(e)) from None
                if any(o.name == t.name for o in tensors):
                    raise err(f"tensor {t.name} is declared twice")
                tensors.append(t)
            else:
                raise err(f"bad directive {stripped!r} (.hbm BYTES | .tensor NAME DTYPE[dims] OFFSET KIND)")
            continue
        ins = parse_instruction(line, err)
        if ins is not None:
            instructions.append(ins)
    return Program(instructions, tensors, hbm)


def assemble(text: str, filename: str = "<asm>") -> bytes:
    return encode_program(parse_program(text, filename))


def disassemble(data: bytes) -> str:
    return format_program(decode_program(data))
