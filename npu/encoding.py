"""Fixed-width binary encoding of instructions and the program container, derived from `isa.OPS`.

An instruction is one little-endian word of `WORD_BYTES` bytes: bits 0-7 the opcode, bits 8-31
the label id (0: none, else 1 + an index into the program's label table), then the op's fields
packed in table order from bit 32 up, each at its kind's width (an AP packs its subfields in
`isa.AP_LAYOUT` order). Every unused bit is zero. The decoder accepts exactly the words the
encoder can produce and raises `NpuDecodeError` for anything else.

A program file is: magic ``ISNPU\\0``, u16 version, u16 word size, u16 reserved (0); u32
instruction count, u32 label count, u32 tensor count, u64 HBM bytes; the instruction words;
the label table (u32 byte length + UTF-8 each); the tensor table (u16 name length + UTF-8 name,
u8 dtype code, u8 kind, u8 rank, u64 byte offset, u32 per dim). Nothing may follow.
"""

from __future__ import annotations

import re
import struct

import numpy as np

from isthmus.errors import NpuDecodeError, NpuError
from isthmus.npu.isa import (AP, AP_BITS, AP_LAYOUT, DTYPE_BY_CODE, DTYPES, MAX_DIMS, OP_BY_CODE, OPS, SPACES,
                             TENSOR_KINDS, Instruction, Program, TensorDecl)

WORD_BYTES = 160
HEADER_BITS = 32
MAGIC = b"ISNPU\0"
VERSION = 2                 # 2: the AP row count is 24 bits (HBM tables of more than 255 rows)
_HEAD = struct.Struct("<6sHHHIIIQ")
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")

# -- validation shared by encoder, decoder and assembler --------------------------------------------------


def ap_problem(a) -> str | None:
    """Why `a` cannot be encoded as an access pattern, or None."""
    if not isinstance(a, AP):
        return f"expected an access pattern, got {a!r}"
    if a.space not in SPACES[1:]:
        return f"unknown memory space {a.space!r}"
    if a.dtype not in DTYPES:
        return f"unknown dtype {a.dtype!r}"
    if not 1 <= len(a.dims) <= MAX_DIMS:
        return f"an access pattern has 1 to {MAX_DIMS} free dims, not {len(a.dims)}"
    rows = 2**24 - 1 if a.space == "hbm" else 255          # HBM rows (a gather table) vs partitions
    checks = [("count", a.count, 1, rows), ("offset", a.offset, 0, 2**32 - 1), ("pstride", a.pstride, 0, 2**32 - 1),
              ("start", a.start, 0, 255)]
    for i, (n, s) in enumerate(a.dims):
        checks += [(f"dim {i} size", n, 1, 2**16 - 1), (f"dim {i} stride", s, 0, 2**24 - 1)]
    for what, v, lo, hi in checks:
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not lo <= v <= hi:
            return f"{what} {v!r} is outside the encodable range [{lo}, {hi}]"
    if a.space == "hbm" and a.start:
        return "an HBM access pattern has no partition start (use the offset)"
    if a.space != "hbm" and a.pstride:
        return f"a {a.space} access pattern has no row stride (partitions are physical)"
    return None


def field_problem(f, v) -> str | None:
    if f.kind == "ap" or (f.kind == "opt_ap" and v is not None):
        p = ap_problem(v)
        return p and f"{f.name}: {p}"
    if f.kind == "opt_ap":
        return None
    if f.kind == "scalar":
        if isinstance(v, AP):
            p = ap_problem(v)
            return p and f"{f.name}: {p}"
        ok = isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool)
        return None if ok else f"{f.name}: expected a number or an access pattern, got {v!r}"
    if f.kind in ("enum", "engine"):
        return None if v in f.choices else f"{f.name}: {v!r} is not one of {', '.join(f.choices[:16])}"
    if f.kind == "f32":
        ok = isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool)
        return None if ok else f"{f.name}: expected a number, got {v!r}"
    lo, hi = {"uint": (0, 2**f.bits - 1), "int": (-2**31, 2**31 - 1), "flag": (0, 1)}[f.kind]
    if isinstance(v, bool):
        v = int(v)
    if not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        return f"{f.name}: {v!r} is outside [{lo}, {hi}]"
    return None


def check_instruction(ins: Instruction) -> None:
    """Raise NpuError unless `ins` names a known op with every field present and encodable."""
    op = OPS.get(ins.op)
    if op is None:
        raise NpuError(f"unknown instruction {ins.op!r}")
    if ins.label is not None:
        try:
            ins.label.encode()
        except (AttributeError, UnicodeEncodeError):
            raise NpuError(f"{ins.op}: label {ins.label!r} is not a UTF-8 encodable string") from None
    names = {f.name for f in op.fields}
    extra = sorted(set(ins.args) - names)
    if extra:
        raise NpuError(f"{ins.op}: unknown field(s) {', '.join(extra)}")
    for f in op.fields:
        if f.name not in ins.args and f.kind != "opt_ap":
            raise NpuError(f"{ins.op}: missing field {f.name}")
        p = field_problem(f, ins.args.get(f.name))
        if p:
            raise NpuError(f"{ins.op}: {p}")


# -- bit packing ----------------------------------------------------------------------------------------------

def _f32_bits(x) -> int:
    return int(np.array(x, dtype=np.float32).view(np.uint32))


def _bits_f32(b: int) -> float:
    return float(np.array(b, dtype=np.uint32).view(np.float32))


def _pack_ap(a: AP | None) -> int:
    if a is None:
        return 0
    vals = {"space": SPACES.index(a.space), "dtype": DTYPES[a.dtype].code, "start": a.start, "count": a.count,
            "offset": a.offset, "pstride": a.pstride, "ndims": len(a.dims) - 1}
    for i, (n, s) in enumerate(a.dims):
        vals[f"size{i}"], vals[f"stride{i}"] = n, s
    word, shift = 0, 0
    for name, w in AP_LAYOUT:
        word |= vals.get(name, 0) << shift
        shift += w
    return word


def _unpack_ap(word: int, optional: bool) -> AP | None:
    v, shift = {}, 0
    for name, w in AP_LAYOUT:
        v[name] = (word >> shift) & ((1 << w) - 1)
        shift += w
    if v["space"] == 0:
        if not optional:
            raise NpuDecodeError("a required access pattern has memory space 0 (none)")
        if word:
            raise NpuDecodeError("an absent access pattern has nonzero bits")
        return None
    if v["dtype"] not in DTYPE_BY_CODE:
        raise NpuDecodeError(f"dtype code {v['dtype']} is not defined")
    nd = v["ndims"] + 1
    if nd > MAX_DIMS:
        raise NpuDecodeError(f"an access pattern claims {nd} free dims (at most {MAX_DIMS})")
    if any(v[f"size{i}"] or v[f"stride{i}"] for i in range(nd, MAX_DIMS)):
        raise NpuDecodeError("an unused access-pattern dim has nonzero bits")
    a = AP(SPACES[v["space"]], DTYPE_BY_CODE[v["dtype"]].name, v["start"], v["count"], v["offset"],
           tuple((v[f"size{i}"], v[f"stride{i}"]) for i in range(nd)), v["pstride"])
    p = ap_problem(a)
    if p:
        raise NpuDecodeError(p)
    return a


def encode_instruction(ins: Instruction, label_id: int = 0) -> bytes:
    check_instruction(ins)
    op = OPS[ins.op]
    word, shift = op.opcode | (label_id << 8), HEADER_BITS
    for f in op.fields:
        v = ins.args.get(f.name)
        if f.kind in ("ap", "opt_ap"):
            bits = _pack_ap(v)
        elif f.kind == "scalar":
            bits = _pack_ap(v) if isinstance(v, AP) else _f32_bits(v) << AP_BITS
        elif f.kind in ("enum", "engine"):
            bits = f.choices.index(v)
        elif f.kind == "f32":
            bits = _f32_bits(v)
        elif f.kind == "int":
            bits = int(v) & 0xFFFFFFFF
        else:
            bits = int(v)
        word |= bits << shift
        shift += f.bits
    return word.to_bytes(WORD_BYTES, "little")


def decode_instruction(data: bytes, labels: list[str] | tuple = ()) -> Instruction:
    """One instruction word back to an Instruction; NpuDecodeError for any malformed word."""
    if len(data) != WORD_BYTES:
        raise NpuDecodeError(f"an instruction word is {WORD_BYTES} bytes, got {len(data)}")
    word = int.from_bytes(data, "little")
    op = OP_BY_CODE.get(word & 0xFF)
    if op is None:
        raise NpuDecodeError(f"opcode {word & 0xFF:#04x} is not defined")
    label_id = (word >> 8) & 0xFFFFFF
    if label_id > len(labels):
        raise NpuDecodeError(f"{op.name}: label id {label_id} is past the label table ({len(labels)} labels)")
    args, shift = {}, HEADER_BITS
    for f in op.fields:
        bits = (word >> shift) & ((1 << f.bits) - 1)
        shift += f.bits
        if f.kind in ("ap", "opt_ap"):
            v = _unpack_ap(bits, f.kind == "opt_ap")
            if v is None:
                continue
        elif f.kind == "scalar":
            ap_bits, imm = bits & ((1 << AP_BITS) - 1), bits >> AP_BITS
            v = _unpack_ap(ap_bits, True)
            if v is not None and imm:
                raise NpuDecodeError(f"{op.name}: {f.name} has both an access pattern and an immediate")
            if v is None:
                v = _bits_f32(imm)
        elif f.kind in ("enum", "engine"):
            if bits >= len(f.choices):
                raise NpuDecodeError(f"{op.name}: {f.name} code {bits} is not defined")
            v = f.choices[bits]
        elif f.kind == "f32":
            v = _bits_f32(bits)
        elif f.kind == "int":
            v = bits - (1 << 32) if bits >> 31 else bits
        else:
            v = bits
        args[f.name] = v
    if word >> shift:
        raise NpuDecodeError(f"{op.name}: bits past its last field are not zero")
    return Instruction(op.name, args, labels[label_id - 1] if label_id else None)


# -- program files --------------------------------------------------------------------------------------------

def encode_program(prog: Program) -> bytes:
    labels = prog.labels
    ids = {s: i + 1 for i, s in enumerate(labels)}
    if len(labels) >= 1 << 24:
        raise NpuError(f"{len(labels)} labels do not fit the 24-bit label id")
    out = [_HEAD.pack(MAGIC, VERSION, WORD_BYTES, 0, len(prog.instructions), len(labels), len(prog.tensors),
                      prog.hbm_bytes)]
    for n, ins in enumerate(prog.instructions):
        try:
            out.append(encode_instruction(ins, ids.get(ins.label, 0)))
        except NpuError as e:
            raise NpuError(f"instruction #{n}: {e}") from None
    for s in labels:
        b = s.encode()
        out.append(struct.pack("<I", len(b)) + b)
    for t in prog.tensors:
        check_tensor(t)
        b = t.name.encode()
        out.append(struct.pack("<H", len(b)) + b +
                   struct.pack("<BBBQ", DTYPES[t.dtype].code, TENSOR_KINDS.index(t.kind), len(t.shape), t.offset) +
                   struct.pack(f"<{len(t.shape)}I", *t.shape))
    return b"".join(out)


def check_tensor(t: TensorDecl, error=NpuError) -> None:
    if not NAME_RE.match(t.name or ""):
        raise error(f"tensor name {t.name!r} is not an identifier ([A-Za-z_][A-Za-z0-9_.]*)")
    if t.dtype not in DTYPES:
        raise error(f"tensor {t.name}: unknown dtype {t.dtype!r}")
    if t.kind not in TENSOR_KINDS:
        raise error(f"tensor {t.name}: kind {t.kind!r} is not one of {', '.join(TENSOR_KINDS)}")
    if not 0 <= len(t.shape) <= 8 or any(not isinstance(d, (int, np.integer)) or not 1 <= d < 2**32 for d in t.shape):
        raise error(f"tensor {t.name}: bad shape {t.shape!r}")
    if not 0 <= t.offset < 2**64 or t.offset % DTYPES[t.dtype].size:
        raise error(f"tensor {t.name}: offset {t.offset:#x} is not aligned to its {t.dtype} elements")


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise NpuDecodeError(f"truncated program: {what} at byte {self.pos} needs {n} bytes, "
                                 f"{len(self.data) - self.pos} left")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def text(self, n: int, what: str) -> str:
        try:
            return self.take(n, what).decode()
        except UnicodeDecodeError:
            raise NpuDecodeError(f"{what} is not valid UTF-8") from None


def decode_program(data: bytes) -> Program:
    """A program file back to a Program; NpuDecodeError (and nothing else) for malformed bytes."""
    data = bytes(data)
    if not data.startswith(MAGIC):
        raise NpuDecodeError("not an isthmus NPU program (bad magic)")
    r = _Reader(data)
    _, version, word, reserved, n_ins, n_labels, n_tensors, hbm = r.unpack(_HEAD.format, "the header")
    if version != VERSION or word != WORD_BYTES or reserved:
        raise NpuDecodeError(f"unsupported program format (version {version}, {word}-byte words); "
                             f"this build reads version {VERSION} with {WORD_BYTES}-byte words")
    if n_ins * WORD_BYTES > len(data):
        raise NpuDecodeError(f"truncated program: {n_ins} instructions do not fit in {len(data)} bytes")
    words = [r.take(WORD_BYTES, f"instruction #{i}") for i in range(n_ins)]
    labels = []
    for i in range(n_labels):
        (n,) = r.unpack("<I", f"label #{i}")
        labels.append(r.text(n, f"label #{i}"))
    tensors, names = [], set()
    for i in range(n_tensors):
        (n,) = r.unpack("<H", f"tensor #{i}")
        name = r.text(n, f"tensor #{i} name")
        code, kind, rank, offset = r.unpack("<BBBQ", f"tensor {name!r}")
        shape = r.unpack(f"<{rank}I", f"tensor {name!r} shape")
        if code not in DTYPE_BY_CODE or kind >= len(TENSOR_KINDS) or rank > 8:
            raise NpuDecodeError(f"tensor {name!r}: bad dtype, kind or rank code")
        t = TensorDecl(name, DTYPE_BY_CODE[code].name, tuple(shape), offset, TENSOR_KINDS[kind])
        check_tensor(t, NpuDecodeError)
        if name in names:
            raise NpuDecodeError(f"tensor {name!r} is declared twice")
        if t.offset + t.nbytes > hbm:
            raise NpuDecodeError(f"tensor {name!r} ends past the program's {hbm} HBM bytes")
        names.add(name)
        tensors.append(t)
    if r.pos != len(data):
        raise NpuDecodeError(f"{len(data) - r.pos} trailing bytes after the program")
    instructions = []
    for i, w in enumerate(words):
        try:
            instructions.append(decode_instruction(w, labels))
        except NpuDecodeError as e:
            raise NpuDecodeError(f"instruction #{i}: {e}") from None
    return Program(instructions, tensors, hbm)
