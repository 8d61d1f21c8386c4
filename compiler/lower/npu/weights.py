"""Weights for the NPU: converted ahead of time, packed for the PE array, streamed through an SBUF ring.

**Storage.** By default (format "bf16") quantized weights are dequantized ahead of time (at compile
time, on the host, by the Numba kernel kernels/numba/weight_pack.py) to the lowering's matmul dtype:
per weight value bf16 2 bytes (3.2x a Q4_1 value's 0.625), "bf16x3" 4 bytes (a bf16 hi and a bf16
lo part, so the product keeps ~16 bits of the dequantized value; see resident_kernels), f32 4 bytes.
A weight may instead be stored quantized (int8, fp8, q4: quant_weights.py) and dequantized on chip
by VECTOR or ACT after its DMA, into the bf16 tile the matmuls read; an int8/fp8 weight's per-output
scale is applied to the matmul's PSUM result (`linear`'s eviction).

Packing: the PE array contracts over partitions, so a linear layer y = x W^T (W [out, in]) runs
with W^T tiles as the *stationary* operand: [K=in rows on partitions, M=out columns]. A weight is
stored in HBM as pieces (ranges of output features sized to the ring), each piece as
`[P, kt_full, cols]` (input feature t*P + p at partition p, K-tile t) followed by the `kp` rows of
the last, partial K-tile, so each piece loads with one or two DMAs and no padding is stored.

Streaming: `WeightStream` owns a ring of SBUF bytes per partition. Pieces are loaded in the order
the program consumes them, as far ahead as the ring holds; a piece that wraps onto bytes still
being read waits for those matmuls (the emitter derives that wait from the footprints).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from isthmus.compiler.lower.npu.emitter import Emitter, Hbm, Tile
from isthmus.compiler.lower.npu.quant_weights import (BLOCK, BLOCKED, STORAGE_DTYPE, STORED_BYTES, pack_nibbles,
                                                      quantize_weight)
from isthmus.npu.isa import DTYPES


def dense_f32(data) -> np.ndarray:
    """A constant's values as f32 (quantized storage dequantized)."""
    a = data.dequantize() if hasattr(data, "dequantize") else np.asarray(data)
    return np.ascontiguousarray(a, dtype=np.float32)


@dataclass
class Piece:
    o0: int              # first output feature (column of W^T)
    o1: int
    offset: int          # element offset in the packed HBM tensor
    tile: Tile | None = None
    loaded: bool = False
    dtile: Tile | None = None    # int8/q4: [parts, chunks, nbp] block scales of the piece's outputs
    mtile: Tile | None = None    # q4: block mins, alike


@dataclass
class PackedWeight:
    """W^T [k, n] (k input features, n outputs) packed for the PE array (see the module docstring).
    A quantized weight (`fmt` != "bf16") keeps its stored values in `qdata`; int8 and q4 their block
    scales (and q4 mins) in `bscale` (`bzero`), [parts, output chunks, nbp] (output c*parts + p, block
    b of 32 inputs; nbp = kt * parts / 32, the K tiles' blocks, zero past the last), fp8 its per-output
    scales in `chan_scale`; its SBUF tiles are bf16."""

    name: str
    k: int
    n: int
    dtype: str
    parts: int
    pieces: list[Piece]
    data: np.ndarray | None = None      # the packed host array (1-D), bound into HBM
    hbm: Hbm | None = None
    label: str | None = None
    lo: "PackedWeight | None" = None    # bf16x3: the bf16 remainder W - hi, packed alike
    fmt: str = "bf16"
    qdata: np.ndarray | None = None
    bscale: np.ndarray | None = None
    bzero: np.ndarray | None = None
    bdtype: str = "f32"                 # dtype of bscale/bzero in HBM and SBUF (f16 where exact)
    qoffset: int = 0                    # int8: HBM holds q - qoffset; the unpacking adds it back
    rows: np.ndarray | None = None      # the source rows/cols the packing picked (-1: zeros), for checks
    cols: np.ndarray | None = None
    chan_scale: np.ndarray | None = None
    qhbm: Hbm | None = None
    shbm: Hbm | None = None
    zhbm: Hbm | None = None
    scale_chunk0: int = 0               # this weight's first column in the program's per-output scale tile
    scale_tile: Tile | None = None      # [parts, n / parts] f32 per-output scales, set per program

    @property
    def kt(self) -> int:
        return -(-self.k // self.parts)

    @property
    def minned(self) -> bool:
        """int8/q4 with a min per block (the m[o, b] * xs[b] term)."""
        return self.zhbm is not None or self.bzero is not None

    @property
    def nbp(self) -> int:
        """Blocks of 32 inputs per output, counted over whole K tiles (int8, q4)."""
        return self.kt * (self.parts // BLOCK)

    @property
    def kp(self) -> int:
        """Rows of the last K-tile."""
        return self.k - (self.kt - 1) * self.parts

    def piece_bytes(self, pc: Piece) -> int:
        """Bytes per partition a piece takes in SBUF (a quantized one: its bf16 tile and its staging)."""
        return self.kt * (pc.o1 - pc.o0) * DTYPES[self.dtype].size + self._staging(pc.o1 - pc.o0)[-1]

    def _staging(self, cols: int) -> tuple[int, int, int]:
        """Bytes per partition of a piece's staging: (values, q4 scales, q4 zeros, ...) offsets; last: total."""
        if self.fmt == "bf16":
            return (0,)
        qb = -(-int(self.kt * cols * STORED_BYTES[self.fmt]) // 4) * 4     # 4-byte aligned parts
        if self.fmt not in BLOCKED:
            return 0, qb
        gb = -(-cols // self.parts) * self.nbp * DTYPES[self.bdtype].size
        gb = -(-gb // 4) * 4
        return 0, qb, qb + gb, qb + gb * (1 + self.minned)

    @property
    def nbytes(self) -> int:
        """HBM bytes the weight streams per token (a quantized one: values and scales)."""
        if self.fmt == "bf16":
            return self.k * self.n * DTYPES[self.dtype].size
        vals = int(self.k * self.n * STORED_BYTES[self.fmt])
        if self.fmt not in BLOCKED:
            return vals + 4 * self.n
        tables = 2 if self.minned else 1
        return vals + tables * self.parts * -(-self.n // self.parts) * self.nbp * DTYPES[self.bdtype].size

    @property
    def parts_in_hbm(self) -> list[tuple[str, str, np.ndarray | None]]:
        """(name suffix, dtype, host array) of each HBM tensor the weight is stored as."""
        if self.fmt == "bf16":
            return [("", self.dtype, self.data)]
        out = [(".q", STORAGE_DTYPE[self.fmt], self.qdata)]
        if self.fmt in BLOCKED:
            out.append((".s", self.bdtype, self.bscale))
        if self.minned:
            out.append((".z", self.bdtype, self.bzero))
        return out

    def stationary(self, pc: Piece, t: int, m0: int, m1: int):
        """The [K-tile t rows, outputs m0:m1] stationary AP of a loaded piece (m in absolute outputs)."""
        rows = self.parts if t < self.kt - 1 else self.kp
        return pc.tile[0:rows, t, m0 - pc.o0:m1 - pc.o0]


def make_weight(name: str, data, dtype: str, parts: int, piece_cols: int, *, rows=None, cols=None,
                transposed: bool = False, split: bool = False, label: str | None = None,
                fmt: str = "bf16") -> PackedWeight:
    """W^T packed for the PE array from a weight as stored (see weight_pack.pack for rows/cols/transposed);
    `split` also packs the bf16 remainder as `.lo`; `fmt` stores it quantized (quant_weights.py)."""
    from isthmus.kernels.numba.weight_pack import pack
    if fmt != "bf16":
        return _make_quantized(name, data, parts, piece_cols, rows, cols, label, fmt)
    hi, lo = pack(data, dtype, parts, piece_cols, rows=rows, cols=cols, transposed=transposed, split=split)
    src_rows, src_cols = (data.shape[::-1] if transposed else data.shape)
    n = src_rows if rows is None else len(rows)
    k = src_cols if cols is None else len(cols)
    pieces = [Piece(o0, min(n, o0 + piece_cols), o0 * k) for o0 in range(0, n, piece_cols)]
    w = PackedWeight(name, k, n, dtype, parts, pieces, hi, label=label)
    if lo is not None:
        w.lo = PackedWeight(name + ".lo", k, n, dtype, parts,
                            [Piece(p.o0, p.o1, p.offset) for p in pieces], lo, label=label)
    return w


def _make_quantized(name, data, parts, piece_cols, rows, cols, label, fmt) -> PackedWeight:
    from isthmus.kernels.numba.weight_pack import pack
    qz = quantize_weight(data, fmt, rows, cols)
    n, k = qz.values.shape
    vals, _ = pack(qz.values, "f32", parts, piece_cols)
    pieces = [Piece(o0, min(n, o0 + piece_cols), o0 * k) for o0 in range(0, n, piece_cols)]
    pw = PackedWeight(name, k, n, "bf16", parts, pieces, None, label=label, fmt=fmt,
                      rows=None if rows is None else np.asarray(rows), cols=None if cols is None else np.asarray(cols))
    if qz.offset:
        vals = vals - qz.offset
    pw.qdata = pack_nibbles(vals) if fmt == "q4" else vals.astype(DTYPES[STORAGE_DTYPE[fmt]].np)
    pw.qoffset = qz.offset
    if fmt in BLOCKED:
        if parts % BLOCK:
            raise ValueError(f"{fmt} weights need a multiple of {BLOCK} partitions, not {parts}")
        pw.bdtype = qz.scale_dtype
        pw.bscale = block_table(qz.scale, parts, pw.nbp, pw.bdtype)
        if qz.zero is not None:
            pw.bzero = block_table(qz.zero, parts, pw.nbp, pw.bdtype)
    else:
        pw.chan_scale = qz.scale
    return pw


def block_table(t: np.ndarray, parts: int, nbp: int, dtype: str) -> np.ndarray:
    """Block scales [n, nb] laid out [parts, chunks, nbp] (output c*parts + p at partition p), zero-padded."""
    n, nb = t.shape
    nch = -(-n // parts)
    out = np.zeros((nch * parts, nbp), np.float32)
    out[:n, :nb] = t
    return out.reshape(nch, parts, nbp).transpose(1, 0, 2).astype(DTYPES[dtype].np).ravel()


def piece_cols_for(k: int, n: int, parts: int, dtype: str, budget: int, fmt: str = "bf16") -> int:
    """Outputs per piece: as many as fit `budget` bytes per partition, a multiple of `parts`."""
    kt = -(-k // parts)
    per_col = kt * (DTYPES[dtype].size + STORED_BYTES[fmt] * (fmt != "bf16"))
    if fmt in BLOCKED:                     # block scales and mins, at most f32, per output chunk; alignment
        per_col += 2 * 4 * kt * (parts // BLOCK) / parts
        budget -= 16
    cols = max(parts, int(budget // per_col) // parts * parts)
    return min(cols, -(-n // parts) * parts)


# A weight piece loads in DMAs of at most this many bytes (whole K tiles), so a piece's first matmuls
# wait for its first K tiles only. Measured on `core`: 1 MB loads leave the 1024x4096x4096 matmul at
# 90.7 % of peak and the SmolLM2 decode step at 1.12x its roofline; 128 KB ones give 95.1 % and
# 1.04x (64 KB: 95.3 %, 1.05x: more DMA latencies in flight; docs/npu-performance.md).
LOAD_BYTES = 128 * 1024
# A quantized piece is converted to bf16 in units of about this many PE-array widths of values a
# partition (whole K tiles of the piece, or one K tile by some of its outputs), in the order its matmuls
# read them. Measured (decode steps, bf16; docs/npu-performance.md): on `core` units of 512 values give
# int8 923k / q4 939k cycles, 256 ones 924k / 941k with VECTOR busier than the tensor engine, one K tile
# by the piece's whole width 940k / 979k; on `edge` (32 wide) 128 give int8 10.38M, 512 10.97M.
UNIT_WIDTHS = 4


@dataclass
class _Unit:
    """The conversion of K tiles t:t1, outputs a:b (of the piece) of a quantized piece into its bf16 tile
    (several K tiles only with every output of the piece)."""
    key: tuple                   # consumption order: (pieces added together, K tile, which of them, a)
    w: PackedWeight
    pc: Piece
    t: int
    t1: int
    a: int
    b: int
    ready: float                 # when its inputs are loaded and its bytes free, by the emitter's estimate
    qt: Tile                     # the staging tile of the piece's stored values


@dataclass
class WeightStream:
    """Loads weight pieces into an SBUF ring in the order they are `add`ed (the program's consumption
    order), as far ahead as the ring holds; `release` frees a piece's bytes once every matmul reading
    it has been emitted (a piece used again later is added again).

    A quantized piece's conversion to bf16 (VECTOR or ACT: int8/fp8 a converting copy, q4 an unpacking
    `dequant`; both exact, the scales apply to the products) is split into units (UNIT_WIDTHS). The
    emitter calls `_fill` before each compute instruction: units go, in consumption order, onto VECTOR
    or ACT wherever they end before that instruction could start, so they never delay it (the engines
    are in-order queues: a layer's norms and epilogues must not wait behind the next weights'
    unpacking), and run as far ahead as the ring holds pieces; `need` emits, on the engine to finish it
    first, a unit a matmul reads that is still pending; `acquire` (by default) a whole piece's."""

    em: Emitter
    ring: Tile                       # a byte tile [parts, capacity]
    order: list[tuple[PackedWeight, Piece]] = field(default_factory=list)
    _next: int = 0                   # next entry of `order` to load
    _pos: int = 0                    # ring byte offset of the next load
    _live: dict = field(default_factory=dict)    # order index -> (lo, hi) ring bytes
    _where: dict = field(default_factory=dict)   # id(piece) -> order index it was loaded as
    _group: list = field(default_factory=list)   # per order entry: (first entry added with it, position)
    _units: list = field(default_factory=list)   # pending conversion units, by key
    _of: dict = field(default_factory=dict)      # id(piece) -> its pending units
    _unit_tile: Tile | None = None   # q4 unpacking's constants (`_unit`)
    queues: list[int] | None = None  # the DMA queues its loads take (default: the emitter's choice of all)

    def __post_init__(self):
        self.em.filler = self._fill

    def _queue(self) -> int | None:
        if self.queues is None:
            return None
        return min(self.queues, key=lambda q: self.em.busy.get(f"dma{q}", 0.0))

    @property
    def capacity(self) -> int:
        return self.ring.shape[0] * DTYPES[self.ring.dtype].size

    def add(self, *ws: PackedWeight) -> None:
        """Weights consumed together (gate and up) interleave piece by piece; lo parts follow their hi."""
        for pcs in zip(*(w.pieces for w in ws)):
            first = len(self.order)
            for w, pc in zip(ws, pcs):
                self._group.append((first, len(self.order) - first))
                self.order.append((w, pc))
                if w.lo is not None:
                    self._group.append((first, len(self.order) - first))
                    self.order.append((w.lo, w.lo.pieces[w.pieces.index(pc)]))

    def _slot(self) -> tuple[int, int]:
        w, pc = self.order[self._next]
        nbytes = w.piece_bytes(pc)
        if nbytes > self.capacity:
            raise ValueError(f"a weight piece of {nbytes} bytes per partition exceeds the ring of {self.capacity}")
        pos = self._pos if self._pos + nbytes <= self.capacity else 0
        return pos, pos + nbytes

    def _fits_next(self) -> bool:
        if self._next >= len(self.order) or self.order[self._next][1].loaded:
            return False                     # (a piece used again loads again only once released)
        lo, hi = self._slot()
        return not any(a < hi and lo < b for a, b in self._live.values())

    def _load_next(self) -> None:
        w, pc = self.order[self._next]
        lo, hi = self._slot()
        pc.tile = Tile("sbuf", w.dtype, 0, w.parts, self.ring.offset + lo, (w.kt, pc.o1 - pc.o0))
        cols = pc.o1 - pc.o0
        if w.fmt != "bf16":
            self._load_quantized(w, pc, self.ring.offset + lo + pc.tile.nbytes, self._group[self._next])
        else:
            self._load_plain(w, pc, cols)
        pc.loaded = True
        self._live[self._next] = (lo, hi)
        self._where[id(pc)] = self._next
        self._pos = hi
        self._next += 1

    def _load_plain(self, w: PackedWeight, pc: Piece, cols: int) -> None:
        kf = (w.kt - 1) * w.parts
        # in K groups of at most LOAD_TILES tiles: the first matmuls of a piece wait for its first group,
        # not for the whole piece (which may be ~1 MB, 4k cycles at a core's bandwidth)
        group = max(1, LOAD_BYTES // (w.parts * cols * DTYPES[w.dtype].size))
        with self.em.label(w.label):
            for t0 in range(0, w.kt - 1, group):
                t1 = min(w.kt - 1, t0 + group)
                src = w.hbm.ap(pc.offset + t0 * cols, w.parts, (w.kt - 1) * cols, [((t1 - t0) * cols, 1)])
                self.em.dma(pc.tile[:, t0:t1, :], src, queue=self._queue())
            src = w.hbm.ap(pc.offset + kf * cols, w.kp, cols, [(cols, 1)])
            self.em.dma(pc.tile[0:w.kp, w.kt - 1, :], src, queue=self._queue())

    def _unit(self) -> Tile:
        """[parts, 3] f32 constants 1.0, 0.0 and 128.0: the scale and zero of an unpacking `dequant`."""
        if self._unit_tile is None:
            self._unit_tile = self.em.sbuf((3,), "f32", what="dequant constants")
            for i, v in enumerate((1.0, 0.0, 128.0)):
                self.em.memset(self._unit_tile[:, i:i + 1], v)
        return self._unit_tile

    def _load_quantized(self, w: PackedWeight, pc: Piece, stage: int, group_pos: tuple[int, int]) -> None:
        """DMA the stored values (and int8/q4's block scales) into staging behind the piece's bf16 tile
        now; queue the conversion units (see the class docstring)."""
        cols, parts, kt = pc.o1 - pc.o0, w.parts, w.kt
        em = self.em
        offs = w._staging(cols)
        q4 = w.fmt == "q4"
        qcols = cols // 2 if q4 else int(cols * STORED_BYTES[w.fmt])
        qt = Tile("sbuf", STORAGE_DTYPE[w.fmt], 0, parts, stage + offs[0], (kt, qcols))
        qoff = pc.offset // 2 if q4 else pc.offset
        group = max(1, LOAD_BYTES // (parts * qcols * DTYPES[qt.dtype].size))
        if q4 or w.qoffset:
            self._unit()

        def load(rows: int, t0: int, t1: int, qsrc: int, row_stride: int):
            em.dma(qt[0:rows, t0:t1, :], w.qhbm.ap(qsrc, rows, row_stride * qcols // cols, [((t1 - t0) * qcols, 1)]), queue=self._queue())

        with em.label(w.label):
            if w.fmt in BLOCKED:          # the piece's block scales (and mins): [parts, chunks, nbp]
                nch, nbp, c0 = -(-cols // parts), w.nbp, pc.o0 // parts
                tot = -(-w.n // parts) * nbp
                for attr, hbm, off in (("dtile", w.shbm, offs[1]), ("mtile", w.zhbm, offs[2])):
                    if hbm is None:
                        continue
                    t = Tile("sbuf", w.bdtype, 0, parts, stage + off, (nch, nbp))
                    em.dma(t[:, :, :], hbm.ap(c0 * nbp, parts, tot, [(nch * nbp, 1)]), queue=self._queue())
                    setattr(pc, attr, t)
            for t0 in range(0, kt - 1, group):
                t1 = min(kt - 1, t0 + group)
                load(parts, t0, t1, qoff + t0 * qcols, (kt - 1) * cols)
            kf = (kt - 1) * parts       # the last, partial K tile is stored after the full ones
            load(w.kp, kt - 1, kt, qoff + kf * qcols, cols)
        first, pos = group_pos
        elems = UNIT_WIDTHS * em.cfg.pe_cols
        per = max(1, elems // cols)                  # whole K tiles a unit (the last, partial one alone)
        spans = [(t0, min(kt - 1, t0 + per)) for t0 in range(0, kt - 1, per)] + [(kt - 1, kt)]
        for t0, t1 in spans:
            step = cols if t1 - t0 > 1 else max(2, elems // 2 * 2)
            for a in range(0, cols, step):
                u = _Unit((first, t0, pos, a), w, pc, t0, t1, a, min(cols, a + step), 0.0, qt)
                dst, src = self._aps(u)
                u.ready = em.ready_for(reads=[src], writes=[dst])
                bisect.insort(self._units, u, key=lambda v: v.key)
                self._of.setdefault(id(pc), []).append(u)

    def _aps(self, u: _Unit):
        rows = u.w.parts if u.t < u.w.kt - 1 else u.w.kp
        qa, qb = (u.a // 2, u.b // 2) if u.w.fmt == "q4" else (u.a, u.b)
        return u.pc.tile[0:rows, u.t:u.t1, u.a:u.b], u.qt[0:rows, u.t:u.t1, qa:qb]

    def _ends(self, u: _Unit) -> dict[str, float]:
        """When VECTOR and ACT would finish unit `u`, by the emitter's estimate."""
        em = self.em
        n = (u.b - u.a) * (u.t1 - u.t)
        return {e: max(em.free_at.get(e, 0.0), u.ready) + em.cost(e, n) for e in ("vector", "act")}

    def _convert(self, u: _Unit, engine: str) -> None:
        w, em = u.w, self.em
        dst, src = self._aps(u)
        with em.label(w.label):
            if w.fmt == "q4" or w.qoffset:          # q4: unpack; int8 with a zero point: q + 128
                unit = self._unit()
                rows = dst.count
                zcol = 2 if w.qoffset == 128 else 1
                em.dequant(dst, src, unit[0:rows, 0:1], unit[0:rows, zcol:zcol + 1], group=dst.free_elems,
                           packed=int(w.fmt == "q4"), engine=engine)
            else:
                em.copy(dst, src, engine=engine)
        self._units.remove(u)
        self._of[id(u.pc)].remove(u)

    def _force(self, units) -> None:
        """Emit `units` now, each on the engine that would finish it first (no filling meanwhile)."""
        filler, self.em.filler = self.em.filler, None
        try:
            for u in units:
                ends = self._ends(u)
                self._convert(u, min(ends, key=lambda e: (ends[e], self.em.busy.get(e, 0.0))))
        finally:
            self.em.filler = filler

    def need(self, w: PackedWeight, pc: Piece, t: int, a: int, b: int) -> None:
        """A matmul is about to read outputs a:b (of the piece) of K tile t: emit what is still pending."""
        self._force([u for u in self._of.get(id(pc), ()) if u.t <= t < u.t1 and u.a < b and a < u.b])

    def _fill(self, engine: str, ready: float, start: float) -> bool:
        """Before an instruction on `engine` that could start at `start` (its inputs ready at `ready`):
        emit pending units, in order, on VECTOR/ACT wherever they end by then (on its own engine: by
        `ready`, so it is not delayed)."""
        done = False
        while self._units:
            u = self._units[0]
            ends = self._ends(u)
            fits = [e for e in ends if ends[e] <= (ready if e == engine else start)]
            if not fits:
                break
            self._convert(u, min(fits, key=ends.get))
            done = True
        return done

    def acquire(self, w: PackedWeight, pc: Piece, convert: bool = True) -> Tile:
        """Make sure `pc` is loaded (and as many later pieces as the ring holds); its tile. With
        `convert`, a quantized piece's conversion is emitted now (else: by `need`, per K tile and outputs)."""
        while not pc.loaded:
            if self._next >= len(self.order):
                raise ValueError(f"weight piece of {w.name} was never added to the stream")
            if not self._fits_next():
                raise ValueError("weight ring deadlock: a piece is needed before older ones are released")
            self._load_next()
        while self._fits_next():
            self._load_next()
        if convert:
            self._force(list(self._of.get(id(pc), ())))
        return pc.tile

    def release(self, w: PackedWeight, pc: Piece) -> None:
        """Every matmul reading `pc` has been emitted: its ring bytes may be reused."""
        self._force(list(self._of.get(id(pc), ())))
        self._live.pop(self._where.pop(id(pc)))
        pc.loaded = False
        while self._fits_next():
            self._load_next()
