"""A small Python API for emitting NPU programs (what compiler/lower/npu/ writes against).

    b = ProgramBuilder(load_config("datacenter"))
    A = b.tensor("A", (512, 512), "bf16", "input")            # HBM, row-major
    t = b.sbuf(512, "bf16")                                    # an SBUF tile: 128 partitions x 512
    with b.label("blk.0.attn_q"):                              # source label for traces/disasm
        b.dma_copy(t.ap(), A[0:128, :], queue=0)
        loaded = b.signal("dma0")                              # a dependency token
        b.wait("act", loaded)                                  # sem_wait on ACT until the load is done
        b.activate(t.ap(), t.ap(), func="silu")
    prog = b.build()

`b.<op>(*aps, **fields)` emits any instruction of the table (`b.emit(op, ...)` is the same);
left-out fields take the table's defaults (scale=1, other numbers 0, optional APs absent).
Allocation is a bump allocator per memory, checked against the config.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from isthmus.errors import NpuError
from isthmus.npu.config import NpuConfig, load_config
from isthmus.npu.encoding import check_instruction
from isthmus.npu.isa import AP, DTYPES, ENGINES, OPS, REQUIRED, Instruction, Program, TensorDecl

def _dims(shape) -> tuple[tuple[int, int], ...]:
    """Row-major (size, stride) pairs of a free shape."""
    dims, stride = [], 1
    for n in reversed(shape):
        dims.append((n, stride))
        stride *= n
    return tuple(reversed(dims))


def _span(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1 or stop <= start:
        raise NpuError(f"slice {s} of a dim of {n}: only non-empty, unit-step slices")
    return start, stop - start


@dataclass(frozen=True)
class Token:
    """The `value`-th signal of `engine` on semaphore `sem` (see `ProgramBuilder.signal`)."""

    engine: str
    sem: int
    value: int


@dataclass(frozen=True)
class HbmTensor:
    """A row-major HBM tensor; `t[r0:r1, c0:c1]` of a 2-D tensor is an AP with one row per partition."""

    decl: TensorDecl

    @property
    def shape(self):
        return self.decl.shape

    def ap(self, elem_offset: int, rows: int, row_stride: int, dims) -> AP:
        """A raw HBM AP: `rows` rows `row_stride` elements apart, free `dims` [(size, stride)]."""
        d = self.decl
        return AP("hbm", d.dtype, 0, rows, d.offset + elem_offset * DTYPES[d.dtype].size, tuple(dims), row_stride)

    def __getitem__(self, key) -> AP:
        if len(self.shape) != 2 or not isinstance(key, tuple) or len(key) != 2:
            raise NpuError(f"{self.decl.name}: [rows, cols] slicing needs a 2-D tensor")
        (r0, nr), (c0, nc) = _span(key[0], self.shape[0]), _span(key[1], self.shape[1])
        return self.ap(r0 * self.shape[1] + c0, nr, self.shape[1], ((nc, 1),))


@dataclass(frozen=True)
class Tile:
    """A block of SBUF or PSUM: `partitions` lanes from `start`, a row-major free shape at byte `offset`."""

    space: str
    dtype: str
    start: int
    partitions: int
    offset: int
    free: tuple[int, ...]

    def ap(self) -> AP:
        return AP(self.space, self.dtype, self.start, self.partitions, self.offset, _dims(self.free))

    def __getitem__(self, key) -> AP:
        """`tile[p0:p1, c0:c1]` of a tile with one free dim."""
        if len(self.free) != 1 or not isinstance(key, tuple) or len(key) != 2:
            raise NpuError("[partitions, cols] slicing needs a tile with one free dim")
        (p0, np_), (c0, nc) = _span(key[0], self.partitions), _span(key[1], self.free[0])
        return AP(self.space, self.dtype, self.start + p0, np_, self.offset + c0 * DTYPES[self.dtype].size,
                  ((nc, 1),))


def declare_tensor(tensors: list[TensorDecl], top: int, name: str, shape, dtype: str, kind: str,
                   align: int) -> TensorDecl:
    """Append a named HBM tensor at the first `align`-byte boundary at or after `top`."""
    if any(o.name == name for o in tensors):
        raise NpuError(f"tensor {name} is declared twice")
    t = TensorDecl(name, dtype, tuple(int(d) for d in shape), -(-top // align) * align, kind)
    tensors.append(t)
    return t


class ProgramBuilder:
    def __init__(self, config: NpuConfig | str | None = None):
        self.config = load_config(config)
        self.instructions: list[Instruction] = []
        self.tensors: list[TensorDecl] = []
        self._hbm_top = 0
        self._top = {"sbuf": 0, "psum": 0}
        self._labels: list[str] = []
        self._signalled: dict[int, int] = {}
        self._waited: dict[tuple[str, int], int] = {}

    # -- memory ---------------------------------------------------------------------------------------------
    def tensor(self, name: str, shape, dtype: str, kind: str = "input", align: int = 64) -> HbmTensor:
        t = declare_tensor(self.tensors, self._hbm_top, name, shape, dtype, kind, align)
        self._hbm_top = t.offset + t.nbytes
        return HbmTensor(t)

    def _alloc(self, space, free, dtype, partitions, align) -> Tile:
        free = (free,) if isinstance(free, int) else tuple(free)
        nbytes = int(np.prod(free)) * DTYPES[dtype].size
        cap = {"sbuf": self.config.sbuf_bytes_per_partition, "psum": self.config.psum_bytes_per_partition}[space]
        offset = -(-self._top[space] // align) * align
        if offset + nbytes > cap:
            raise NpuError(f"{space} is full: a {nbytes}-byte tile at {offset:#x} passes the {cap} bytes per partition")
        if partitions > self.config.partitions:
            raise NpuError(f"a tile of {partitions} partitions exceeds the {self.config.partitions} partitions")
        self._top[space] = offset + nbytes
        return Tile(space, dtype, 0, partitions, offset, free)

    def sbuf(self, free, dtype: str, partitions: int | None = None, align: int = 64) -> Tile:
        """Allocate `free` (an int or a shape) elements per partition on `partitions` lanes (default: all)."""
        return self._alloc("sbuf", free, dtype, partitions or self.config.partitions, align)

    def psum(self, free, dtype: str = "f32", partitions: int | None = None, bank: bool = True) -> Tile:
        """Allocate PSUM; by default bank-aligned, so a matmul's output stays inside one bank."""
        align = self.config.psum_bank_bytes if bank else 4
        return self._alloc("psum", free, dtype, partitions or self.config.partitions, align)

    # -- instructions ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def label(self, text: str):
        """Instructions emitted inside carry `text` as their source label."""
        self._labels.append(text)
        try:
            yield
        finally:
            self._labels.pop()

    def emit(self, op: str, /, *aps: AP, label: str | None = None, **fields) -> Instruction:
        spec = OPS.get(op)
        if spec is None:
            raise NpuError(f"unknown instruction {op!r}")
        if len(aps) > len(spec.positional):
            raise NpuError(f"{op} takes {len(spec.positional)} access patterns, got {len(aps)}")
        args = {f.name: a for f, a in zip(spec.positional, aps)}
        for f in spec.fields:
            v = fields.pop(f.name) if f.name in fields else args.get(f.name, f.default)
            if v is None or v is REQUIRED:
                continue                        # absent optional AP; check_instruction reports required ones
            if f.kind in ("scalar", "f32") and not isinstance(v, AP):
                v = float(np.float32(v))
            args[f.name] = int(v) if f.kind == "flag" else v
        if fields:
            raise NpuError(f"{op}: unknown field(s) {', '.join(fields)}")
        ins = Instruction(op, args, label if label is not None else (self._labels[-1] if self._labels else None))
        check_instruction(ins)
        self.instructions.append(ins)
        return ins

    # -- dependency tokens (VTA-style synchronisation without hand-numbered semaphores) ---------------------
    def signal(self, engine: str) -> Token:
        """`sem_signal` on `engine`; the token stands for "everything `engine` was given so far is done".
        Each engine signals its own semaphore (tensor 0, vector 1, act 2, dmaN 3+N): an in-order queue's
        signals arrive in order, so the count identifies the point. Leave those semaphores to tokens."""
        sem = ENGINES.index(engine)
        if sem >= self.config.semaphores:
            raise NpuError(f"{engine} has no token semaphore: config {self.config.name} has "
                           f"{self.config.semaphores} semaphores")
        self.sem_signal(engine=engine, sem=sem)
        self._signalled[sem] = self._signalled.get(sem, 0) + 1
        return Token(engine, sem, self._signalled[sem])

    def wait(self, engine: str, *tokens: Token) -> None:
        """Make `engine` wait for each token, emitting a `sem_wait` only where it is not already implied
        (a token of `engine` itself, or one no later than a token this engine already waited for)."""
        for t in tokens:
            if t is None or t.engine == engine or t.value <= self._waited.get((engine, t.sem), 0):
                continue
            self.sem_wait(engine=engine, sem=t.sem, value=t.value)
            self._waited[engine, t.sem] = t.value

    def __getattr__(self, name):
        if name in OPS:
            return lambda *aps, **fields: self.emit(name, *aps, **fields)
        raise AttributeError(name)

    def build(self) -> Program:
        return Program(list(self.instructions), list(self.tensors), self._hbm_top)
