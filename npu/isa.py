"""The NPU instruction set: ONE table (`OPS`) from which everything else is derived.

The binary encoding (`encoding.py`), the assembler and disassembler (`asm.py`), the simulator's
dispatch (`semantics.py`, keyed by op name), the timing model (`timing.py`, keyed by each op's
`cost` class) and docs/npu-isa.md (`docs.py`) all read this table. Adding an instruction is one
`Op` row here plus its semantics function; tests check that every row has both.

Operands are access patterns (`AP`): a memory space, an element type, a partition range (or, in
HBM, a row count and row stride), a byte offset and up to three free dims of (size, stride),
strides counted in elements. See docs/npu-isa.md for the text syntax and the bit layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

# -- element types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DType:
    name: str
    code: int
    np: np.dtype
    doc: str

    @property
    def size(self) -> int:
        return self.np.itemsize

    @property
    def is_float(self) -> bool:
        return self.np.kind == "f" or self.name in ("bf16", "f8e4m3")


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("f32", 0, np.dtype(np.float32), "IEEE binary32"),
    DType("bf16", 1, np.dtype(ml_dtypes.bfloat16), "bfloat16 (8-bit exponent, 7-bit mantissa)"),
    DType("f16", 2, np.dtype(np.float16), "IEEE binary16"),
    DType("f8e4m3", 3, np.dtype(ml_dtypes.float8_e4m3fn), "OCP FP8 E4M3 (finite, max 448)"),
    DType("i8", 4, np.dtype(np.int8), "signed 8-bit integer"),
    DType("i32", 5, np.dtype(np.int32), "signed 32-bit integer (int8 matmul accumulator)"),
    DType("u8", 6, np.dtype(np.uint8), "unsigned 8-bit integer; `dequant packed=1` reads each byte as two "
                                       "4-bit values (low nibble first)"),
)}
DTYPE_BY_CODE = {d.code: d for d in DTYPES.values()}

# Memory spaces; code 0 marks an absent optional operand.
SPACES = ("none", "hbm", "sbuf", "psum")
MAX_DIMS = 3
MAX_DMA_QUEUES = 64
ENGINES = ("tensor", "vector", "act") + tuple(f"dma{q}" for q in range(MAX_DMA_QUEUES))

# -- enums used by fields -------------------------------------------------------------------------
ALU_OPS = ("add", "sub", "mul", "div", "max", "min")
REDUCE_OPS = ("sum", "max", "min")
ACT_FUNCS = ("identity", "exp", "log", "silu", "gelu", "gelu_erf", "tanh", "sigmoid", "relu", "sqrt",
             "rsqrt", "reciprocal", "square")
CMP_OPS = ("ge", "gt", "le", "lt", "eq", "ne")


# -- access patterns ------------------------------------------------------------------------------

@dataclass(frozen=True)
class AP:
    """An access pattern: element (p, i0, i1, i2) lives at byte
    `offset + (p * pstride + i0*s0 + i1*s1 + i2*s2) * size` of partition `start + p` (SBUF/PSUM),
    or of HBM (where `start` is 0 and `pstride` is the row stride in elements)."""

    space: str
    dtype: str
    start: int = 0
    count: int = 1
    offset: int = 0
    dims: tuple[tuple[int, int], ...] = ((1, 1),)
    pstride: int = 0

    def __post_init__(self):
        # Derived figures, computed once: the simulator and timing model ask for them often.
        sizes = tuple(n for n, _ in self.dims)
        size = DTYPES[self.dtype].np.itemsize if self.dtype in DTYPES else 1
        free = math.prod(sizes)
        for name, v in (("sizes", sizes), ("shape", (self.count, *sizes)), ("free_elems", free),
                        ("nbytes", self.count * free * size),
                        ("extent", (sum((n - 1) * s for n, s in self.dims) + 1) * size),
                        ("_key", (self.space, self.dtype, self.start, self.count, self.offset, self.dims,
                                  self.pstride))):
            object.__setattr__(self, name, v)
        object.__setattr__(self, "_hash", hash(self._key))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if other.__class__ is not AP:
            return NotImplemented
        return self._hash == other._hash and self._key == other._key

    # (declared for readers and type checkers; set in __post_init__)
    sizes: ClassVar[tuple[int, ...]]        # free dim sizes
    shape: ClassVar[tuple[int, ...]]        # (count, *sizes)
    free_elems: ClassVar[int]               # elements per partition (or HBM row)
    nbytes: ClassVar[int]
    extent: ClassVar[int]                   # bytes from offset to the end of the last element of a partition

    def __str__(self) -> str:
        parts = f"{self.count}*{self.pstride}" if self.space == "hbm" else f"{self.start}:{self.start + self.count}"
        off = f"+{self.offset:#x}" if self.offset else ""
        return f"{self.space}.{self.dtype}[{parts}]{off}{{{','.join(f'{n}:{s}' for n, s in self.dims)}}}"


# -- fields and the op table -------------------------------------------------------------------------
# Bit widths of one encoded access pattern, in packing order (low bits first).
# `count` is wide enough for an HBM table of many rows (dma_gather over a vocabulary); SBUF/PSUM
# access patterns still name at most 255 partitions (encoding.ap_problem).
AP_LAYOUT = (("space", 2), ("dtype", 3), ("start", 8), ("count", 24), ("offset", 32), ("pstride", 32),
             ("ndims", 2)) + tuple((f"{k}{i}", w) for i in range(MAX_DIMS) for k, w in (("size", 16), ("stride", 24)))
AP_BITS = sum(w for _, w in AP_LAYOUT)

# kind -> (bits, doc). Kinds "ap" are positional in the text form; all others are `name=value`.
FIELD_KINDS = {
    "ap": (AP_BITS, "access pattern (positional)"),
    "opt_ap": (AP_BITS, "optional access pattern (`name=AP`, omitted when absent)"),
    "scalar": (AP_BITS + 32, "fp32 immediate, or a per-partition AP of one element per partition"),
    "enum": (8, "one of the listed names"),
    "engine": (8, "tensor, vector, act, dma0 .. dma63"),
    "uint": (None, "unsigned integer"),
    "int": (32, "signed 32-bit integer"),
    "f32": (32, "fp32 immediate"),
    "flag": (1, "0 or 1"),
}


REQUIRED = object()


@dataclass(frozen=True)
class Field:
    name: str
    kind: str
    bits: int
    choices: tuple[str, ...] = ()
    doc: str = ""
    default: Any = REQUIRED      # what the assembler and builder use when the field is left out



def ap(name, doc=""):
    return Field(name, "ap", AP_BITS, doc=doc)


def opt_ap(name, doc=""):
    return Field(name, "opt_ap", AP_BITS, doc=doc, default=None)


def scalar(name, doc="", default=0.0):
    return Field(name, "scalar", AP_BITS + 32, doc=doc, default=default)


def enum(name, choices, doc=""):
    return Field(name, "enum", 8, tuple(choices), doc)


def uint(name, bits, doc=""):
    return Field(name, "uint", bits, doc=doc)


def sint(name, doc=""):
    return Field(name, "int", 32, doc=doc, default=0)


def f32(name, doc="", default=REQUIRED):
    return Field(name, "f32", 32, doc=doc, default=default)


def flag(name, doc=""):
    return Field(name, "flag", 1, doc=doc, default=0)


def engine(doc="the engine queue this instruction is placed in"):
    return Field("engine", "engine", 8, ENGINES, doc)


@dataclass(frozen=True)
class Op:
    name: str
    opcode: int
    engine: str          # "tensor" | "vector" | "act" | "dma" (queue field) | "any" (engine field) | "none"
    cost: str            # cost class in timing.COSTS
    fields: tuple[Field, ...]
    doc: str

    @property
    def positional(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.kind == "ap")

    @property
    def field_map(self) -> dict[str, Field]:
        return {f.name: f for f in self.fields}


_AFFINE = (sint("base"), sint("pcoef", "multiplies the partition index (0-based within dst)"),
           sint("c0", "multiplies free index 0"), sint("c1", "multiplies free index 1"),
           sint("c2", "multiplies free index 2"))

OPS: dict[str, Op] = {op.name: op for op in (
    Op("nop", 0x00, "any", "sync", (engine(),), "Does nothing for `sync_cycles` on its engine."),
    Op("halt", 0x01, "none", "sync", (),
       "Ends the program: instructions after it are not executed. Every engine drains its queue."),
    Op("sem_wait", 0x02, "any", "sync",
       (engine(), uint("sem", 8), uint("value", 32, "wait until the semaphore is >= this")),
       "Blocks its engine's queue until semaphore `sem` >= `value`. Semaphores start at 0 and only "
       "grow; `sem_signal` adds 1. Waiting for a value no signal can reach is a deadlock (an error)."),
    Op("sem_signal", 0x03, "any", "sync", (engine(), uint("sem", 8)),
       "Adds 1 to semaphore `sem` once every earlier instruction of its engine has finished."),
    Op("sem_signal_core", 0x04, "any", "sync", (engine(), uint("core", 8), uint("sem", 8)),
       "Adds 1 to semaphore `sem` of core `core` once every earlier instruction of its engine has "
       "finished; the other core sees it `link_latency_cycles` later. Chip programs only (npu.chip)."),
    Op("dma_copy", 0x10, "dma", "dma", (ap("dst"), ap("src"), uint("queue", 6)),
       "Copies `src` to `dst` (HBM<->SBUF or SBUF->SBUF; never PSUM) on DMA queue `queue`: a load when "
       "`src` is in HBM, a store when `dst` is. Both sides have the same partition (row) count and "
       "the same number of elements per partition, walked in row-major order. Different dtypes "
       "convert (the optional cast), rounding to nearest even."),
    Op("dma_gather", 0x11, "dma", "dma", (ap("dst"), ap("table"), ap("index"), uint("queue", 6)),
       "Indirect DMA (embedding lookup): `dst` partition p <- `table` row `index[p]`. `table` is an "
       "HBM AP whose rows are the gatherable rows; `index` is i32, one element per dst partition. "
       "An index outside [0, rows) is an error."),
    Op("dma_core", 0x12, "dma", "link",
       (ap("dst"), ap("src"), uint("core", 8), uint("queue", 6),
        flag("signal", "1: when the data has landed, add 1 to semaphore `sem` of core `core`"),
        Field("sem", "uint", 8, doc="the receiver's semaphore `signal` counts on", default=0)),
       "Copies `src` (this core's SBUF or HBM) into `dst` in core `core`'s SBUF over the core-to-core "
       "link (the building block of collectives: all-reduce, all-gather); same partitions and elements "
       "per partition on both sides, dtypes convert as dma_copy's. With `signal`, the receiver's "
       "semaphore `sem` counts the arrival when the last byte lands (as a remote copy's receive "
       "semaphore does on TPUs and Trainium2's send/recv): no separate `sem_signal_core`, whose hop "
       "would follow the data's. Chip programs only (npu.chip)."),
    Op("matmul", 0x20, "tensor", "matmul",
       (ap("dst", "PSUM [M, N], fp32 (i32 for i8 operands)"), ap("stationary", "SBUF [K, M]"),
        ap("moving", "SBUF [K, N]"), flag("acc", "0: start (overwrite dst); 1: accumulate (add into dst)")),
       "dst[M, N] (+)= stationary[K, M]^T @ moving[K, N], contracting over the K partitions. "
       "K <= pe_rows, M <= pe_cols, N <= one PSUM bank of fp32; dst lies inside one PSUM bank; "
       "operand partition starts are multiples of `pe_partition_align`. Float operands multiply "
       "exactly and accumulate in fp32; i8 operands accumulate in i32."),
    Op("transpose", 0x21, "vector", "transpose", (ap("dst"), ap("src")),
       "dst[F, P] = src[P, F]^T for one free dim, P and F at most the partition count."),
    Op("tensor_tensor", 0x30, "vector", "vector", (ap("dst"), ap("src0"), ap("src1"), enum("op", ALU_OPS)),
       "dst = src0 <op> src1 elementwise, computed in fp32; all three have the same shape."),
    Op("tensor_scalar", 0x31, "vector", "vector", (ap("dst"), ap("src"), enum("op", ALU_OPS), scalar("scalar")),
       "dst = src <op> scalar: an fp32 immediate, or a per-partition value broadcast along the free dims."),
    Op("tensor_reduce", 0x32, "vector", "vector", (ap("dst"), ap("src"), enum("op", REDUCE_OPS)),
       "dst = reduction of src over its innermost free dim, in fp32; dst holds the remaining elements "
       "(one per partition for a one-dim src)."),
    Op("activate", 0x40, "act", "act",
       (ap("dst"), ap("src"), enum("func", ACT_FUNCS), scalar("scale", default=1.0), scalar("bias"),
        opt_ap("accum", "if present: one fp32 per partition, the sum of f(...) over the free elements")),
       "dst = func(src * scale + bias), in fp32; `scale` and `bias` are immediates or per-partition "
       "values. gelu is the tanh approximation, gelu_erf the exact one."),
    Op("select", 0x50, "vector", "vector",
       (ap("dst"), ap("src"), enum("cmp", CMP_OPS)) + _AFFINE + (f32("fill"),),
       "dst = src where (base + pcoef*p + c0*i0 + c1*i1 + c2*i2) <cmp> 0, else fill: the affine "
       "predicate of a causal mask (p is the partition index within dst, i0.. the free indices)."),
    Op("iota", 0x51, "vector", "vector", (ap("dst"),) + _AFFINE,
       "dst = base + pcoef*p + c0*i0 + c1*i1 + c2*i2, computed in i32 and converted to dst's dtype."),
    Op("copy", 0x52, "vector", "vector", (ap("dst"), ap("src")),
       "dst = src, converting the dtype (PSUM -> SBUF evacuation, casts)."),
    Op("memset", 0x53, "vector", "vector", (ap("dst"), f32("value")), "dst = value."),
    Op("dequant", 0x54, "any", "dequant",
       (engine("vector or act: the engine that runs it"), ap("dst"), ap("src"), ap("scale"), ap("zero"),
        uint("group", 16, "consecutive dst elements sharing one scale and zero"),
        flag("packed", "1: src is u8, each byte two 4-bit values 0..15, low nibble first")),
       "Weight dequantisation after a DMA: dst[p, i] = q[p, i] * scale[p, i // group] + zero[p, i // group], "
       "in fp32, over each partition's elements in row-major order; q is src's value (i8, f8e4m3, ...) or, "
       "with `packed`, the i-th 4-bit value of src. dst has group x as many elements per partition as "
       "scale and zero, and as src (twice as many with `packed`)."),
)}
OP_BY_CODE = {op.opcode: op for op in OPS.values()}
COMPUTE_SPACES = ("sbuf", "psum")    # what the tensor/vector/act engines may touch


# -- instructions and programs -----------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    op: str
    args: dict[str, Any]
    label: str | None = None

    def __getitem__(self, name):
        return self.args[name]

    @property
    def engine(self) -> str:
        """The queue this instruction runs in: tensor, vector, act or dmaN (halt: none)."""
        kind = OPS[self.op].engine
        if kind == "dma":
            return f"dma{self.args['queue']}"
        if kind == "any":
            return self.args["engine"]
        return kind

    def __str__(self) -> str:
        from isthmus.npu.asm import format_instruction
        return format_instruction(self)


TENSOR_KINDS = ("input", "output", "inout", "scratch")


@dataclass(frozen=True)
class TensorDecl:
    """A named, row-major HBM tensor: how a program's caller binds inputs and reads outputs."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    kind: str = "input"

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].size
        for d in self.shape:
            n *= d
        return n


@dataclass
class Program:
    instructions: list[Instruction]
    tensors: list[TensorDecl] = field(default_factory=list)
    hbm_bytes: int = 0

    def __post_init__(self):
        end = max((t.offset + t.nbytes for t in self.tensors), default=0)
        self.hbm_bytes = max(self.hbm_bytes, end)

    @property
    def labels(self) -> list[str]:
        """Distinct labels in first-use order (the binary's label table)."""
        return list(dict.fromkeys(i.label for i in self.instructions if i.label is not None))

    def tensor(self, name: str) -> TensorDecl:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.instructions)


def instruction_error(index: int, ins: Instruction, message: str):
    """The NpuError for a rule broken by instruction `index` (named by its index and text)."""
    from isthmus.errors import NpuError
    return NpuError(f"instruction #{index} `{ins}`: {message}")
