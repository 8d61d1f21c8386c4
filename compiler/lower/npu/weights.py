"""Weights for the NPU: converted ahead of time, packed for the PE array, streamed through an SBUF ring.

**Quantized weights are dequantized ahead of time** (at compile time, on the host, by the Numba
kernel kernels/numba/weight_pack.py) to the lowering's matmul dtype. The NPU has no 4-bit type
and its matmul takes float operands of one dtype, so on-chip dequantisation would cost VECTOR
passes per weight tile (`q * d + m` over 32-element blocks) on every decode step, for HBM bytes
that are not the bottleneck on the datacenter preset (the tensor engine's issue rate is;
docs/npu-performance.md). The cost is memory, per weight value: bf16 2 bytes (3.2x a Q4_1 value's 0.625), "bf16x3" 4 bytes (a bf16 hi
and a bf16 lo part, so the product keeps ~16 bits of the dequantized value; see resident_kernels),
f32 4 bytes.

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

from dataclasses import dataclass, field

import numpy as np

from isthmus.compiler.lower.npu.emitter import Emitter, Hbm, Tile
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


@dataclass
class PackedWeight:
    """W^T [k, n] (k input features, n outputs) packed for the PE array (see the module docstring)."""

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

    @property
    def kt(self) -> int:
        return -(-self.k // self.parts)

    @property
    def kp(self) -> int:
        """Rows of the last K-tile."""
        return self.k - (self.kt - 1) * self.parts

    def piece_bytes(self, pc: Piece) -> int:
        """Bytes per partition a piece takes in SBUF."""
        return self.kt * (pc.o1 - pc.o0) * DTYPES[self.dtype].size

    @property
    def nbytes(self) -> int:
        return self.k * self.n * DTYPES[self.dtype].size

    def stationary(self, pc: Piece, t: int, m0: int, m1: int):
        """The [K-tile t rows, outputs m0:m1] stationary AP of a loaded piece (m in absolute outputs)."""
        rows = self.parts if t < self.kt - 1 else self.kp
        return pc.tile[0:rows, t, m0 - pc.o0:m1 - pc.o0]


def make_weight(name: str, data, dtype: str, parts: int, piece_cols: int, *, rows=None, cols=None,
                transposed: bool = False, split: bool = False, label: str | None = None) -> PackedWeight:
    """W^T packed for the PE array from a weight as stored (see weight_pack.pack for rows/cols/transposed);
    `split` also packs the bf16 remainder as `.lo`."""
    from isthmus.kernels.numba.weight_pack import pack
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


def piece_cols_for(k: int, n: int, parts: int, dtype: str, budget: int) -> int:
    """Outputs per piece: as many as fit `budget` bytes per partition, a multiple of `parts`."""
    kt = -(-k // parts)
    per_col = kt * DTYPES[dtype].size
    cols = max(parts, (budget // per_col) // parts * parts)
    return min(cols, -(-n // parts) * parts)


# A weight piece loads in DMAs of at most this many bytes (whole K tiles), so a piece's first matmuls
# wait for its first K tiles only. Measured on `core`: 1 MB loads leave the 1024x4096x4096 matmul at
# 90.7 % of peak and the SmolLM2 decode step at 1.12x its roofline; 128 KB ones give 95.1 % and
# 1.04x (64 KB: 95.3 %, 1.05x: more DMA latencies in flight; docs/npu-performance.md).
LOAD_BYTES = 128 * 1024


@dataclass
class WeightStream:
    """Loads weight pieces into an SBUF ring in the order they are `add`ed (the program's consumption
    order), as far ahead as the ring holds; `release` frees a piece's bytes once every matmul reading
    it has been emitted (a piece used again later is added again)."""

    em: Emitter
    ring: Tile                       # a byte tile [parts, capacity]
    order: list[tuple[PackedWeight, Piece]] = field(default_factory=list)
    _next: int = 0                   # next entry of `order` to load
    _pos: int = 0                    # ring byte offset of the next load
    _live: dict = field(default_factory=dict)    # order index -> (lo, hi) ring bytes
    _where: dict = field(default_factory=dict)   # id(piece) -> order index it was loaded as

    @property
    def capacity(self) -> int:
        return self.ring.shape[0] * DTYPES[self.ring.dtype].size

    def add(self, *ws: PackedWeight) -> None:
        """Weights consumed together (gate and up) interleave piece by piece; lo parts follow their hi."""
        for pcs in zip(*(w.pieces for w in ws)):
            for w, pc in zip(ws, pcs):
                self.order.append((w, pc))
                if w.lo is not None:
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
        kf = (w.kt - 1) * w.parts
        # in K groups of at most LOAD_TILES tiles: the first matmuls of a piece wait for its first group,
        # not for the whole piece (which may be ~1 MB, 4k cycles at a core's bandwidth)
        group = max(1, LOAD_BYTES // (w.parts * cols * DTYPES[w.dtype].size))
        with self.em.label(w.label):
            for t0 in range(0, w.kt - 1, group):
                t1 = min(w.kt - 1, t0 + group)
                src = w.hbm.ap(pc.offset + t0 * cols, w.parts, (w.kt - 1) * cols, [((t1 - t0) * cols, 1)])
                self.em.dma(pc.tile[:, t0:t1, :], src)
            src = w.hbm.ap(pc.offset + kf * cols, w.kp, cols, [(cols, 1)])
            self.em.dma(pc.tile[0:w.kp, w.kt - 1, :], src)
        pc.loaded = True
        self._live[self._next] = (lo, hi)
        self._where[id(pc)] = self._next
        self._pos = hi
        self._next += 1

    def acquire(self, w: PackedWeight, pc: Piece) -> Tile:
        """Make sure `pc` is loaded (and as many later pieces as the ring holds); its tile."""
        while not pc.loaded:
            if self._next >= len(self.order):
                raise ValueError(f"weight piece of {w.name} was never added to the stream")
            if not self._fits_next():
                raise ValueError("weight ring deadlock: a piece is needed before older ones are released")
            self._load_next()
        while self._fits_next():
            self._load_next()
        return pc.tile

    def release(self, w: PackedWeight, pc: Piece) -> None:
        """Every matmul reading `pc` has been emitted: its ring bytes may be reused."""
        self._live.pop(self._where.pop(id(pc)))
        pc.loaded = False
        while self._fits_next():
            self._load_next()
