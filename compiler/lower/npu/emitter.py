"""The NPU lowering's code emitter: tiles, on-chip allocation, and a static engine schedule whose
semaphores are derived from the memory every instruction touches.

Lowering code states *what* to compute (`em.matmul(dst, stationary, moving)`, `em.dma(dst, src)`)
and never numbers a semaphore. For each instruction the emitter computes the footprints of its
operands (SBUF/PSUM partitions x bytes, HBM byte ranges; `npu.races` defines them) and compares
them with the accesses still live on *other* engines: a read after a write, a write after a read
or a write after a write makes the new instruction wait for the older one (engines are in-order
queues, so same-engine pairs need nothing). `build()` then inserts one `sem_signal` right after
each instruction something waits for and one `sem_wait` per new dependency (a wait already
implied by an earlier wait of the same engine is dropped), on the engine's own semaphore
(tensor 0, vector 1, act 2, dmaN 3+N, as `ProgramBuilder` tokens do). The program order is a
valid serial order, so FORCE_SERIAL runs it too, and the simulator's race check passes by
construction.

Background work: `filler(engine, ready, start)`, if set, is called before each TENSOR, VECTOR or ACT
instruction is emitted, with when that instruction could start by the estimated schedule; it may emit
instructions first (the weight stream's unpacking, where VECTOR/ACT would otherwise idle: an in-order
queue must not hold a layer's norm behind the next weights' conversion).

Allocation is liveness-based: `alloc` takes bytes per partition from a first-fit free list and
`free` gives them back once the value's last reader has been *emitted* (the reuse then waits for
that reader through the footprint rule above). Every instruction carries the label of the graph
node being lowered (`with em.label(node)`), so disassembly, traces and profiles name it.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from isthmus.compiler.lower.npu.tiles import Allocator, Hbm, Tile  # noqa: F401  (the emitter's vocabulary)
from isthmus.errors import NpuError
from isthmus.npu.builder import declare_tensor
from isthmus.npu.config import NpuConfig, load_config
from isthmus.npu.isa import AP, DTYPES, ENGINES, OPS, Instruction, Program, TensorDecl
from isthmus.npu.races import footprint_box, overlap
from isthmus.npu.timing import COSTS

PAGE = {"sbuf": 256, "psum": 256, "hbm": 1 << 16}     # bucket size of the access index, bytes


class _Access:
    __slots__ = ("box", "write", "engine", "idx")

    def __init__(self, box, write, engine, idx):
        self.box, self.write, self.engine, self.idx = box, write, engine, idx


def _dense(a: AP) -> bool:
    """Whether the AP's elements fill its footprint box with no gaps (so a write covers it)."""
    if a.extent != a.free_elems * DTYPES[a.dtype].size:
        return False
    return a.space != "hbm" or a.count == 1 or a.pstride * DTYPES[a.dtype].size == a.extent


def _covers(x, y) -> bool:
    """Box x contains box y (HBM: x's byte range, for an x without gaps)."""
    if x[0] != y[0]:
        return False
    if x[0] == "hbm":
        return x[3] <= y[3] and y[4] <= x[4]
    return x[1] <= y[1] and y[2] <= x[2] and x[3] <= y[3] and y[4] <= x[4]


def footprints(op: str, args: dict):
    out = []
    for f in OPS[op].fields:
        a = args.get(f.name)
        if isinstance(a, AP):
            write = f.name in ("dst", "accum")
            if op == "dma_core" and write:      # another core's SBUF: ordered by that core's semaphores,
                continue                        # not by this program's (two sends to one slot of two
                                                # peers are no conflict here)
            out.append((a, write))
            if write and op == "matmul" and args.get("acc"):
                out.append((a, False))
    return out


class Emitter:
    def __init__(self, config: NpuConfig | str | None = None, sbuf_base: int = 0):
        self.cfg = load_config(config)
        cfg = self.cfg
        self.records: list[tuple[str, dict, str | None, dict]] = []   # op, args, label, waits {engine: idx}
        self.tensors: list[TensorDecl] = []
        self._hbm_top = 0
        self.sbuf_alloc = Allocator("sbuf", cfg.sbuf_bytes_per_partition, sbuf_base, rotate=True)
        self.psum_alloc = Allocator("psum", cfg.psum_bytes_per_partition, rotate=True)
        self._labels: list[str] = []
        self._pages: dict[str, dict[int, list[_Access]]] = {"sbuf": {}, "psum": {}, "hbm": {}}
        self._boxes: dict = {}                      # AP -> (footprint box, index pages, page dict, may cover)
        n_eng = 3 + cfg.dma_queues
        self._vc = [(-1,) * n_eng for _ in range(n_eng)]   # per engine: last instruction known done, per engine
        self._snap: list[tuple] = []                # per instruction: its engine's clock after it
        self.busy: dict[str, float] = {}            # engine -> estimated busy cycles (engine choice)
        self.free_at: dict[str, float] = {}         # engine -> when it would be done, by `_end` (engine choice)
        self._end: list[float] = []                 # per instruction: its estimated end (dependencies, queue, HBM share)
        self.spills: list[tuple[str, int]] = []      # (what, bytes) reported by the memory planner
        self.dma_queues = list(range(cfg.dma_queues))
        # filler(engine, ready, start) -> bool: called before each TENSOR/VECTOR/ACT instruction is
        # emitted, with when it could start; may emit background work first (WeightStream's unpacking)
        self.filler = None

    # -- HBM --------------------------------------------------------------------------------------------
    def tensor(self, name: str, shape, dtype: str, kind: str = "input", align: int = 64) -> Hbm:
        t = declare_tensor(self.tensors, self._hbm_top, name, shape, dtype, kind, align)
        self._hbm_top = t.offset + t.nbytes
        return Hbm(t)

    # -- SBUF / PSUM ------------------------------------------------------------------------------------
    def sbuf(self, shape, dtype: str, parts: int | None = None, what: str = "") -> Tile:
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * DTYPES[dtype].size
        off = self.sbuf_alloc.alloc(nbytes)
        if off is None:
            raise NpuError(f"SBUF is full: no room for {what or 'a tile'} of {nbytes} bytes per partition "
                           f"({self.sbuf_alloc.in_use} of {self.sbuf_alloc.capacity} in use)")
        return Tile("sbuf", dtype, 0, parts or self.cfg.partitions, off, shape)

    def psum(self, shape, parts: int | None = None, dtype: str = "f32") -> Tile:
        """PSUM inside one bank (a matmul's output never crosses one)."""
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * DTYPES[dtype].size
        bank = self.cfg.psum_bank_bytes
        if nbytes > bank:
            raise NpuError(f"a PSUM tile of {nbytes} bytes per partition does not fit one {bank}-byte bank")
        off = self.psum_alloc.alloc(nbytes, align=64, bank=bank)
        if off is None:
            raise NpuError("PSUM is full")
        return Tile("psum", dtype, 0, parts or self.cfg.partitions, off, shape)

    def free(self, *tiles: Tile | None) -> None:
        for t in tiles:
            if t is not None:
                (self.sbuf_alloc if t.space == "sbuf" else self.psum_alloc).free(t.offset)

    # -- labels -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def label(self, text: str | None):
        self._labels.append(text)
        try:
            yield
        finally:
            self._labels.pop()

    @property
    def current_label(self) -> str | None:
        return self._labels[-1] if self._labels else None

    # -- instructions -----------------------------------------------------------------------------------
    def emit(self, name: str, /, *aps: AP, **fields) -> int:
        spec = OPS[name]
        args = {f.name: a for f, a in zip(spec.positional, aps)}
        for f in spec.fields:
            if f.name in fields:
                v = fields.pop(f.name)
            elif f.name in args:
                continue
            else:
                v = f.default
            if v is None:
                continue
            if f.kind in ("scalar", "f32") and not isinstance(v, AP):
                v = float(np.float32(v))           # what the encoding holds
            args[f.name] = int(v) if f.kind == "flag" else v
        if fields:
            raise NpuError(f"{name}: unknown field(s) {', '.join(fields)}")
        ins = Instruction(name, args, self.current_label)
        engine = ins.engine
        fps = footprints(name, args)
        waits = self._conflicts(engine, fps)
        if self.filler is not None and engine in ("tensor", "vector", "act"):
            ready = max((self._end[j] for j in waits.values()), default=0.0)
            start = max(ready, self.free_at.get(engine, 0.0))
            filler, self.filler = self.filler, None      # (no filling from inside the filler)
            try:
                filled = filler(engine, ready, start)
            finally:
                self.filler = filler
            if filled:
                waits = self._conflicts(engine, fps)
        idx = len(self.records)
        boxes = self._boxes
        for a, write in fps:
            box, keys, pages, can_cover = boxes[a]
            new = _Access(box, write, engine, idx)
            for k in keys:
                lst = pages.get(k)
                if lst is None:
                    pages[k] = [new]
                    continue
                if can_cover and len(lst) >= 8:
                    # An older access whose box lies inside this one is implied by it: a later conflict
                    # with the older one is a conflict with this one, which is ordered after the older
                    # (a write waited for it; a read follows same-engine reads in queue order).
                    if write:
                        lst[:] = [o for o in lst if not _covers(box, o.box)]
                    else:
                        lst[:] = [o for o in lst if o.write or o.engine != engine or not _covers(box, o.box)]
                lst.append(new)
        ready = max((self._end[j] for j in waits.values()), default=0.0)
        waits = self._reduce(engine, idx, waits)
        self.records.append((name, args, ins.label, waits, ins))
        cost = COSTS[spec.cost][0](ins, self.cfg)[0]
        start = max(ready, self.free_at.get(engine, 0.0))
        if name in ("dma_copy", "dma_gather"):
            # as the timing model charges it: the queues busy when it starts share the bandwidth
            transfer = args["dst"].nbytes / self.cfg.hbm_bytes_per_cycle
            active = 1 + sum(1 for q in self.dma_queues
                             if f"dma{q}" != engine and self.free_at.get(f"dma{q}", 0.0) > start)
            self.busy[engine] = self.busy.get(engine, 0.0) + cost + transfer
            end = start + cost + transfer * active
        else:
            self.busy[engine] = self.busy.get(engine, 0.0) + cost
            end = start + cost
        self._end.append(end)
        self.free_at[engine] = end
        return idx

    def _box(self, a: AP):
        info = self._boxes.get(a)
        if info is None:
            box = footprint_box(a)
            psz = PAGE[a.space]
            info = self._boxes[a] = (box, range(box[3] // psz, (box[4] - 1) // psz + 1), self._pages[a.space],
                                     a.space != "hbm" or _dense(a))
        return info

    def _conflicts(self, engine: str, fps) -> dict[str, int]:
        """Per other engine, the last emitted instruction whose access conflicts with `fps`."""
        waits: dict[str, int] = {}
        for a, write in fps:
            box, keys, pages, _ = self._box(a)
            for k in keys:
                lst = pages.get(k)
                if lst:
                    for acc in lst:
                        if acc.engine != engine and (write or acc.write) and overlap(box, acc.box):
                            if waits.get(acc.engine, -1) < acc.idx:
                                waits[acc.engine] = acc.idx
        return waits

    def ready_for(self, reads=(), writes=()) -> float:
        """When an instruction reading `reads` and writing `writes` could start by the estimate `_end` (a
        static list schedule: each instruction starts when its engine is free and what it touches is no
        longer used by an earlier conflicting access, on any engine)."""
        t = 0.0
        for a, write in [(a, False) for a in reads] + [(a, True) for a in writes]:
            box, keys, pages, _ = self._box(a)
            for k in keys:
                for acc in pages.get(k, ()):
                    if (write or acc.write) and self._end[acc.idx] > t and overlap(box, acc.box):
                        t = self._end[acc.idx]
        return t

    def _pick(self, elems: int, *srcs: AP) -> str:
        """VECTOR or ACT for an instruction either may run (`elems` per partition): the one that would
        finish it first by the estimated schedule, unless the two finishes lie within a quarter of the
        instruction's length, closer than the estimate can tell apart (both engines idle, waiting for
        its inputs, say): then the one with the fewer busy cycles so far, which keeps the two balanced."""
        cfg = self.cfg
        ready = self.ready_for(reads=srcs)
        ev = max(ready, self.free_at.get("vector", 0.0)) + self.cost("vector", elems)
        ea = max(ready, self.free_at.get("act", 0.0)) + self.cost("act", elems)
        if abs(ev - ea) <= elems / 4:
            ev = self.busy.get("vector", 0.0) + cfg.vector_fixed_cycles
            ea = self.busy.get("act", 0.0) + cfg.act_fixed_cycles
        return "vector" if ev <= ea else "act"

    def _reduce(self, engine: str, idx: int, waits: dict) -> dict:
        """Drop waits already implied through earlier ones (vector clocks: waiting for instruction j of
        engine E also waits for everything j's engine had waited for), and record this engine's clock."""
        slot = ENGINES.index(engine)
        vc = self._vc[slot]
        kept = {}
        for e, j in sorted(waits.items(), key=lambda kv: -kv[1]):
            if vc[ENGINES.index(e)] >= j:
                continue
            kept[e] = j
            other = self._snap[j]
            vc = tuple(a if a >= b else b for a, b in zip(vc, other))
        vc = vc[:slot] + (idx,) + vc[slot + 1:]
        self._vc[slot] = vc
        self._snap.append(vc)
        return kept

    # convenience wrappers ---------------------------------------------------------------------------
    def pick_queue(self) -> int:
        return min(self.dma_queues, key=lambda q: self.busy.get(f"dma{q}", 0.0))

    def dma(self, dst: AP, src: AP, queue: int | None = None) -> int:
        return self.emit("dma_copy", dst, src, queue=self.pick_queue() if queue is None else queue)

    def gather(self, dst: AP, table: AP, index: AP, queue: int | None = None) -> int:
        return self.emit("dma_gather", dst, table, index, queue=self.pick_queue() if queue is None else queue)

    def matmul(self, dst: AP, stationary: AP, moving: AP, acc: bool = False) -> int:
        return self.emit("matmul", dst, stationary, moving, acc=int(acc))

    def act(self, dst: AP, src: AP, func: str = "identity", scale=1.0, bias=0.0, accum: AP | None = None) -> int:
        return self.emit("activate", dst, src, func=func, scale=scale, bias=bias, accum=accum)

    def tt(self, dst: AP, a: AP, b: AP, op: str) -> int:
        return self.emit("tensor_tensor", dst, a, b, op=op)

    def ts(self, dst: AP, src: AP, op: str, scalar) -> int:
        return self.emit("tensor_scalar", dst, src, op=op, scalar=scalar)

    def reduce(self, dst: AP, src: AP, op: str = "sum") -> int:
        return self.emit("tensor_reduce", dst, src, op=op)

    def transpose(self, dst: AP, src: AP) -> int:
        return self.emit("transpose", dst, src)

    def memset(self, dst: AP, value: float) -> int:
        return self.emit("memset", dst, value=value)

    def iota(self, dst: AP, base=0, pcoef=0, c0=0, c1=0, c2=0) -> int:
        return self.emit("iota", dst, base=base, pcoef=pcoef, c0=c0, c1=c1, c2=c2)

    def select(self, dst: AP, src: AP, cmp: str, fill: float, base=0, pcoef=0, c0=0, c1=0, c2=0) -> int:
        return self.emit("select", dst, src, cmp=cmp, fill=fill, base=base, pcoef=pcoef, c0=c0, c1=c1, c2=c2)

    def copy(self, dst: AP, src: AP, engine: str | None = None) -> int:
        """dst = src (casting) on VECTOR (`copy`) or ACT (`activate identity`), whichever is less busy
        unless `engine` says; ACT cannot read... both engines read SBUF and PSUM."""
        if engine is None:
            engine = self._pick(max(dst.free_elems, src.free_elems), src)
        if engine == "act":
            return self.act(dst, src)
        return self.emit("copy", dst, src)

    def dequant(self, dst: AP, src: AP, scale: AP, zero: AP, group: int, packed: int, engine: str | None = None) -> int:
        """Weight dequantisation on VECTOR or ACT, whichever would finish it first unless `engine` says."""
        return self.emit("dequant", dst, src, scale, zero, group=group, packed=packed,
                         engine=engine or self._pick(dst.free_elems, src, scale, zero))

    def cost(self, engine: str, elems: int) -> float:
        """Estimated cycles of a VECTOR or ACT instruction streaming `elems` per partition."""
        cfg = self.cfg
        if engine == "act":
            return elems / cfg.act_elems_per_cycle + cfg.act_fixed_cycles
        return elems / cfg.vector_elems_per_cycle + cfg.vector_fixed_cycles

    # -- the program --------------------------------------------------------------------------------------
    def build(self) -> Program:
        """Instructions with the semaphores their dependencies need (see the module docstring)."""
        waited_on: set[int] = set()
        for _, _, _, waits, _ in self.records:
            waited_on.update(waits.values())
        records = self.records
        engine_of = [r[4].engine for r in records]
        sem_of = {e: ENGINES.index(e) for e in set(engine_of)}
        for e, s in sem_of.items():
            if s >= self.cfg.semaphores:
                raise NpuError(f"engine {e} has no semaphore on config {self.cfg.name}")
        count = {e: 0 for e in sem_of}
        value: dict[int, int] = {}
        seen: dict[tuple[str, str], int] = {}
        out: list[Instruction] = []
        for i, (op, args, label, waits, ins) in enumerate(records):
            e = engine_of[i]
            for we, widx in sorted(waits.items()):
                v = value[widx]
                if seen.get((e, we), 0) >= v:
                    continue
                seen[e, we] = v
                out.append(Instruction("sem_wait", {"engine": e, "sem": sem_of[we], "value": v}, label))
            out.append(ins)
            if i in waited_on:
                count[e] += 1
                value[i] = count[e]
                out.append(Instruction("sem_signal", {"engine": e, "sem": sem_of[e]}, label))
        return Program(out, list(self.tensors), self._hbm_top)
