"""Tiles, HBM tensors and on-chip allocation for the NPU lowering (the emitter's vocabulary).

A `Tile` is a block of SBUF or PSUM (partitions x a row-major free shape); `t[p0:p1, i, j0:j1]` is
the access pattern of a slice of it. An `Hbm` is a row-major tensor in HBM; `h.ap(...)` builds a
pattern of rows (one per partition) and free dims. Patterns keep the dims as indexed, because the
compute engines want operands of identical shapes; only DMA operands are merged to fit 3 dims.
`Allocator` hands out bytes per partition (liveness-based: the lowering frees a block after its
last reader is emitted).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from isthmus.errors import NpuError
from isthmus.npu.isa import AP, DTYPES, TensorDecl


@functools.lru_cache(maxsize=4096)
def dims_of(shape) -> tuple[tuple[int, int], ...]:
    """Row-major (size, stride) pairs of a free shape."""
    dims, stride = [], 1
    for n in reversed(shape):
        dims.append((int(n), stride))
        stride *= n
    return tuple(reversed(dims))


def fit_dims(dims) -> tuple[tuple[int, int], ...]:
    """`dims` as given (compute engines want operands of identical shapes), merged only past 3 dims."""
    dims = tuple((int(n), int(s)) for n, s in dims) or ((1, 1),)
    return dims if len(dims) <= 3 else merge_dims(dims)


def merge_dims(dims) -> tuple[tuple[int, int], ...]:
    """Drop size-1 dims and merge dims that walk memory contiguously (at most 3 remain, or NpuError)."""
    out: list[list[int]] = []
    for n, s in dims:
        if n == 1:
            continue
        if out and out[-1][1] == n * s:
            out[-1] = [out[-1][0] * n, s]
        else:
            out.append([n, s])
    if not out:
        return ((1, 1),)
    if len(out) > 3:
        raise NpuError(f"access pattern with dims {dims} needs more than 3 free dims")
    return tuple((n, s) for n, s in out)


def _index(key, shape):
    """(element offset, dims) of a row-major `shape` indexed by ints and unit/positive-step slices."""
    strides = [s for _, s in dims_of(shape)]
    key = tuple(key) + (slice(None),) * (len(shape) - len(key))
    off, dims = 0, []
    for k, n, st in zip(key, shape, strides):
        if isinstance(k, slice):
            a, b, step = k.indices(n)
            cnt = len(range(a, b, step))
            if cnt <= 0:
                raise NpuError(f"empty slice {k} of a dim of {n}")
            off += a * st
            dims.append((cnt, st * step))
        else:
            k = int(k)
            if not 0 <= k < n:
                raise NpuError(f"index {k} out of range for a dim of {n}")
            off += k * st
    return off, dims


_AP_CACHE: dict = {}


@dataclass(frozen=True)
class Tile:
    """A block of SBUF or PSUM: partitions [start, start+parts) x a row-major free `shape` at byte `offset`.
    `t[p0:p1, i, j0:j1]` is an AP (partition slice first, then one index or slice per free dim)."""

    space: str
    dtype: str
    start: int
    parts: int
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return DTYPES[self.dtype].size

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.size

    def ap(self) -> AP:
        return self[:]

    def __getitem__(self, key) -> AP:
        key = key if isinstance(key, tuple) else (key,)
        ck = (self, tuple((k.start, k.stop, k.step) if isinstance(k, slice) else k for k in key))
        got = _AP_CACHE.get(ck)
        if got is None:
            if len(_AP_CACHE) > 200_000:
                _AP_CACHE.clear()
            got = _AP_CACHE[ck] = self._getitem(key)
        return got

    def _getitem(self, key) -> AP:
        ps = key[0] if key else slice(None)
        if isinstance(ps, slice):
            p0, p1, step = ps.indices(self.parts)
            if step != 1 or p1 <= p0:
                raise NpuError(f"partition slice {ps} of {self.parts} partitions")
        else:
            p0, p1 = int(ps), int(ps) + 1
        off, dims = _index(key[1:], self.shape)
        return AP(self.space, self.dtype, self.start + p0, p1 - p0, self.offset + off * self.size,
                  fit_dims(dims))

    def raw(self, p0: int, parts: int, elem_offset: int, dims) -> AP:
        """An AP with explicit (size, stride) free dims from element `elem_offset` of partition p0."""
        return AP(self.space, self.dtype, self.start + p0, parts, self.offset + elem_offset * self.size,
                  fit_dims(dims))

    def at(self, p0: int, parts: int | None = None) -> "Tile":
        """The same block seen from partition p0 (for operands that must start elsewhere)."""
        return Tile(self.space, self.dtype, self.start + p0, self.parts - p0 if parts is None else parts,
                    self.offset, self.shape)

    def cast(self, dtype: str, shape=None) -> "Tile":
        """The same bytes seen as another dtype/shape (sizes must agree)."""
        shape = tuple(shape) if shape is not None else \
            self.shape[:-1] + (self.shape[-1] * self.size // DTYPES[dtype].size,)
        return Tile(self.space, dtype, self.start, self.parts, self.offset, shape)


@dataclass(frozen=True)
class Hbm:
    """A row-major HBM tensor. `t.rows(r0, n, dims)` views rows of its 2-D [rows, cols] flattening."""

    decl: TensorDecl

    @property
    def shape(self):
        return self.decl.shape

    @property
    def dtype(self):
        return self.decl.dtype

    @property
    def name(self):
        return self.decl.name

    def ap(self, elem_offset: int, rows: int, row_stride: int, dims) -> AP:
        d = self.decl
        return AP("hbm", d.dtype, 0, rows, d.offset + elem_offset * DTYPES[d.dtype].size, merge_dims(dims),
                  row_stride if rows > 1 else 0)

    def __getitem__(self, key) -> AP:
        """First index: rows (-> the AP's row count), the rest free dims, as `Tile`."""
        key = key if isinstance(key, tuple) else (key,)
        shape = self.shape
        off0, dims = _index(key, shape)
        first = key[0] if key else slice(None)
        if isinstance(first, slice):
            rows, rstride = dims[0]
            dims = dims[1:]
        else:
            rows, rstride = 1, 0
        return self.ap(off0, rows, rstride, dims or [(1, 1)])


class Allocator:
    """Allocation of bytes per partition, with `free` and a high-water mark. `rotate` makes it
    next-fit: the search starts after the last block handed out, so a block freed and asked for
    again at once lands elsewhere and the next use need not wait for the last reader of the old
    one (double buffering without bookkeeping); PSUM allocates so."""

    def __init__(self, space: str, capacity: int, base: int = 0, rotate: bool = False):
        self.space, self.capacity = space, capacity
        self.holes = [(base, capacity)]            # sorted, disjoint [lo, hi)
        self.used: dict[int, int] = {}
        self.peak = base
        self.rotate, self.cursor = rotate, base

    def alloc(self, nbytes: int, align: int = 64, bank: int = 0) -> int | None:
        """Offset of a free block (None when none fits). `bank`: the block may not cross a multiple of it."""
        nbytes = max(int(nbytes), 1)
        for floor in ([self.cursor, 0] if self.rotate else [0]):
            for i, (lo, hi) in enumerate(self.holes):
                if hi <= floor:
                    continue
                off = -(-max(lo, floor) // align) * align
                if bank and off // bank != (off + nbytes - 1) // bank:
                    off = -(-off // bank) * bank
                if off + nbytes <= hi:
                    self.holes[i:i + 1] = [(x, y) for x, y in ((lo, off), (off + nbytes, hi)) if y > x]
                    self.used[off] = nbytes
                    self.peak = max(self.peak, off + nbytes)
                    self.cursor = off + nbytes
                    return off
        return None

    def free(self, off: int) -> None:
        n = self.used.pop(off)
        holes = self.holes + [(off, off + n)]
        holes.sort()
        merged = [holes[0]]
        for lo, hi in holes[1:]:
            if lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        self.holes = merged

    @property
    def in_use(self) -> int:
        return sum(self.used.values())
