"""linear (y = x @ W.T [+ residual | swiglu]) over GGUF-quantized weights, and embedding lookups.

Weights are repacked once, at load, into a layout whose inner loops vectorise (`pack`):

    4-bit (q4_0, q4_1): qs u8[rows, cols/2]   byte 16*b + j holds value 32*b + j (low nibble)
                                              and 32*b + 16 + j (high nibble), as in the GGUF block
                        d, m f16[rows, cols/32]   value = q * d + m   (q4_0: m = -8 d, exact in f16)
    8-bit (q8_0):       qs i8[rows, cols], d f16[rows, cols/32], m empty     value = q * d
                        (iq4_nl too: its nibbles mapped through the 16-value table, exact)
    dense (f32/f16/bf16): qs f32[rows, cols], d and m empty
    blocks (q5_0, q5_1, q2_k..q6_k): qs u8[rows, blocks, bytes per block], the file's
                        blocks as they are (a copy); d and m empty; kquant.py reads them

(f16 held as u16 bits, converted in registers), so the block scales leave the byte stream, each
block keeps its GGUF size (q4_1: 20 bytes per 32 weights; q4_0 grows from 18 to 20), and no fp32
copy of a quantized matrix is ever kept. Where the integer kernels run (AVX2) and the rows come in
whole groups of 16, q4 and q8 go one step further, into grouped.py's layout: the same bytes, 16 rows
interleaved two weights at a time, so that a vector lane is a weight row (3-4x faster dots).
Sibling linears that read the same input (Q, K and V; gate and up) are packed as one matrix by
stacking rows (`pack([w1, w2, ...])`).

Dispatch rule (`linear`): up to `MATVEC_MAX_ROWS` input rows (decode, batched decode, short
prefills), and any number for grouped weights, use the fused matvec kernels below: one parallel
launch over weight rows, each block multiplied in registers (integer dot products with i16 or i8
activations on AVX2 hosts, f32 elsewhere), four input rows per pass over a weight row where there
are four (`_row_i16`; grouped weights: four or one per pass over a group, `_group_rows`).
More rows (prefill) of the other formats dequantize `GEMM_ROWS` weight rows at a time into a tile
per work item and multiply each tile with BLAS running single-threaded on that item's thread
(`dequant_matmul`: one parallel launch, one thread pool; threads.py says why). Per token, one
thread, CPU time (`python benchmarks/bench_kquant_decode.py --rows`): the integer kernels 0.055 ms
(q4_k 2816x1024), 0.036 (q5_0 1536x576), 0.006-0.007 (q4_1 and q8_0 grouped, 1536x576) from 8
rows on; dequantize + BLAS 0.121 / 0.040 / 0.045 at 16 rows, 0.055 / 0.017 / 0.016 at 256. So a
grouped weight's prompt takes the integer kernels too (2.7x faster than BLAS at 256 rows), and its
products are the same bits however the prompt is split.

The raw-block formats' row primitives live in kquant.py and kquant_simd.py, the grouped ones in
grouped.py, and are compiled into this file's kernels: Numba's cache keys each kernel on its own
file's contents only, so after editing those files delete kernels/numba/__pycache__ (or this
file's cached kernels keep the old code).
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from isthmus.kernels.numba import JIT, PJIT
from isthmus.kernels.numba import grouped, kquant
from isthmus.kernels.numba.kquant_simd import I8_FORMATS
from isthmus.kernels.numba.threads import pool_size, serial_blas
from isthmus.kernels.numba.norm import rmsnorm_into
from isthmus.kernels.numba.simd import (HAVE_AVX2, f16_to_f32, i8_columns, quantize_rows_i16, row_dot_q4,
                                        row_dot_q4_i16, row_dot_q8, row_dot_q8_i16, rows4_q4_i16, rows4_q8_i16,
                                        sigmoid_f32, span_q4_i16, span_q8_i16)

MATVEC_MAX_ROWS = 16      # input rows (tokens) up to which the matvec kernels beat dequantize+BLAS
GEMM_ROWS = 256           # weight rows per BLAS call in the prefill path (one tile per work item)
CHUNK = grouped.GROUP     # weight rows per parallel work item: one group of a grouped weight

EPI_NONE, EPI_ADD, EPI_SWIGLU = 0, 1, 2

# Decode-sized inputs are quantized to i16 per 32-block and dotted with the weights' integers where
# the host has AVX2 (simd.py says why i16 and not llama.cpp's i8); elsewhere, or with
# ISTHMUS_NUMBA_INT_DOT=0, they stay f32 and each block is dequantized in registers.
INT_ACTIVATIONS = HAVE_AVX2 and os.environ.get("ISTHMUS_NUMBA_INT_DOT", "1") != "0"



class Packed:
    """A repacked weight [rows, cols] (several stacked siblings when `splits` has more than one part)."""

    __slots__ = ("kind", "qs", "d", "m", "rows", "cols", "splits", "nbytes")

    def __init__(self, kind, qs, d, m, splits):
        self.kind, self.qs, self.d, self.m = kind, qs, d, m
        self.rows = qs.shape[0]
        if qs.ndim == 4:        # grouped q4 / q8 (grouped.py): [rows / 16, blocks, chunks, 32]
            self.rows, self.cols = qs.shape[0] * grouped.GROUP, qs.shape[1] * 32
        elif qs.ndim == 3:      # raw blocks (kquant.py): [rows, blocks, bytes per block]
            self.cols = qs.shape[1] * kquant.BLOCK_VALUES[qs.shape[2]]
        else:
            self.cols = qs.shape[1] * 2 if kind == "q4" else qs.shape[1]
        self.splits = tuple(splits)
        self.nbytes = qs.nbytes + d.nbytes + m.nbytes

    @property
    def grouped(self) -> bool:
        return self.qs.ndim == 4

    @property
    def arrays(self):
        return self.qs, self.d, self.m

    def dequantize(self) -> np.ndarray:
        tile = np.empty((self.rows, self.cols), np.float32)
        dequant_rows(self.qs, self.d, self.m, 0, self.rows, tile)
        return tile


_EMPTY = np.zeros((0, 0), np.uint16)


def _f16(raw_cols) -> np.ndarray:
    return np.ascontiguousarray(np.ascontiguousarray(raw_cols).view("<u2")[..., 0])


def _pack_one(w):
    qtype = getattr(w, "qtype", None)
    if qtype in ("q4_0", "q4_1"):
        rows = w.raw.shape[0]
        size = 18 if qtype == "q4_0" else 20
        blk = w.raw.reshape(rows, -1, size)
        d = _f16(blk[:, :, 0:2])
        m = _f16(blk[:, :, 2:4]) if qtype == "q4_1" else (np.float16(-8.0) * d.view(np.float16)).view(np.uint16)
        return "q4", np.ascontiguousarray(blk[:, :, size - 16:]).reshape(rows, -1), d, m
    if qtype == "q8_0":
        rows = w.raw.shape[0]
        blk = w.raw.reshape(rows, -1, 34)
        qs = np.ascontiguousarray(blk[:, :, 2:]).view(np.int8).reshape(rows, -1)
        return "q8", qs, _f16(blk[:, :, 0:2]), _EMPTY
    if qtype == "iq4_nl":            # as q8_0, exactly: value = d * IQ4_NL_VALUES[nibble]
        rows = w.raw.shape[0]
        blk = w.raw.reshape(rows, -1, 18)
        nib = blk[:, :, 2:]
        q = kquant.IQ4_NL_VALUES[np.concatenate([nib & 15, nib >> 4], axis=2)]
        return "q8", np.ascontiguousarray(q).reshape(rows, -1), _f16(blk[:, :, 0:2]), _EMPTY
    if qtype in kquant.TYPE_SIZE:   # kept as the file's blocks (a copy: the file's pages are dropped)
        rows = w.raw.shape[0]
        return qtype, np.array(w.raw, copy=True).reshape(rows, -1, kquant.TYPE_SIZE[qtype]), _EMPTY, _EMPTY
    dense = w.dequantize() if qtype else np.asarray(w)
    return "f32", np.ascontiguousarray(dense, np.float32).reshape(dense.shape[0], -1), _EMPTY, _EMPTY


def pack(weights, group: bool = True) -> Packed:
    """Repack one weight, or several with the same column count stacked by rows (fused siblings);
    q4 and q8 in grouped.py's layout where it applies (`group=False`: the row layout, for
    comparison)."""
    if not isinstance(weights, (list, tuple)):
        weights = [weights]
    parts = [_pack_one(w) for w in weights]
    kinds = {p[0] for p in parts}
    if len(kinds) > 1:      # mixed formats: stack as dense would copy; the caller fuses only alike
        raise ValueError(f"cannot stack weights of formats {sorted(kinds)}")
    kind = parts[0][0]
    splits = [p[1].shape[0] for p in parts]
    if len(parts) == 1:
        qs, d, m = parts[0][1:]
    else:
        qs = np.concatenate([p[1] for p in parts])
        d = np.concatenate([p[2] for p in parts]) if kind in ("q4", "q8") else _EMPTY
        m = np.concatenate([p[3] for p in parts]) if kind == "q4" else _EMPTY
    # the integer kernels' 16-rows-a-vector layout where every part's rows fill whole groups (a
    # stacked swiglu finds its up rows' group at an offset of whole groups)
    if group and INT_ACTIVATIONS and kind in ("q4", "q8") and all(r % grouped.GROUP == 0 for r in splits):
        qs, d, m = grouped.group(kind, qs, d, m)
    return Packed(kind, qs, d, m, splits)


# -- per-format row primitives (dispatched on the dtype of qs) -------------------------------------

def row_dot(qs, d, m, r, x, t, sx):
    """dot(W[r], x[t]); sx[t, b] holds the block sums of x (used by the 4-bit formats)."""


def dequant_row(qs, d, m, r, out, t):
    """out[t] = W[r] as f32."""


@overload(row_dot, jit_options=dict(fastmath=JIT["fastmath"]))
def _row_dot(qs, d, m, r, x, t, sx):
    if qs.dtype == types.uint8 and qs.ndim == 3:
        def dot_blocks(qs, d, m, r, x, t, sx):
            return kquant.dot_blocks_row(qs, r, x, t, sx)
        return dot_blocks
    if qs.dtype == types.uint8:
        def dot_q4(qs, d, m, r, x, t, sx):
            return row_dot_q4(qs, d, m, r, x, t, sx)
        return dot_q4
    if qs.dtype == types.int8:
        def dot_q8(qs, d, m, r, x, t, sx):
            return row_dot_q8(qs, d, m, r, x, t, sx)
        return dot_q8

    def dot_f32(qs, d, m, r, x, t, sx):
        acc = np.float32(0.0)
        for j in range(qs.shape[1]):
            acc += qs[r, j] * x[t, j]
        return acc
    return dot_f32


@overload(dequant_row, jit_options=dict(fastmath=JIT["fastmath"]))
def _dequant_row(qs, d, m, r, out, t):
    if qs.ndim == 4:
        def deq_grouped(qs, d, m, r, out, t):
            grouped.dequant_row(qs, d, m, r, out, t)
        return deq_grouped
    if qs.dtype == types.uint8 and qs.ndim == 3:
        def deq_blocks(qs, d, m, r, out, t):
            kquant.dequant_blocks_row(qs, r, out, t)
        return deq_blocks
    if qs.dtype == types.uint8:
        def deq_q4(qs, d, m, r, out, t):
            for b in range(d.shape[1]):
                db, mb = f16_to_f32(d[r, b]), f16_to_f32(m[r, b])
                for j in range(16):
                    v = qs[r, 16 * b + j]
                    out[t, 32 * b + j] = np.float32(v & 15) * db + mb
                    out[t, 32 * b + 16 + j] = np.float32(v >> 4) * db + mb
        return deq_q4
    if qs.dtype == types.int8:
        def deq_q8(qs, d, m, r, out, t):
            for b in range(d.shape[1]):
                db = f16_to_f32(d[r, b])
                for j in range(32):
                    out[t, 32 * b + j] = np.float32(qs[r, 32 * b + j]) * db
        return deq_q8

    def deq_f32(qs, d, m, r, out, t):
        for j in range(qs.shape[1]):
            out[t, j] = qs[r, j]
    return deq_f32


# -- kernels ---------------------------------------------------------------------------------------

@njit(**JIT)
def block_sums(x, sx):
    """sx[t, b] = sum of block b of x[t] (q4 rows add m * sx)."""
    for t in range(x.shape[0]):
        for b in range(sx.shape[1]):
            s = np.float32(0.0)
            for j in range(32):
                s += x[t, 32 * b + j]
            sx[t, b] = s


@njit(**PJIT)
def matvec(x, qs, d, m, sx, res, out, epilogue):
    """out[t, r] = x[t] . W[r] for every input row t (a few), one parallel launch over weight rows.

    epilogue EPI_ADD: out = res + x W^T (res may be out itself); EPI_SWIGLU: W stacks gate and up
    (rows [0, F) and [F, 2F)) and out[t, r] = silu(gate) * up, out being [n, F].
    """
    n = x.shape[0]
    block_sums(x, sx)
    rows = out.shape[1]
    for c in prange((rows + CHUNK - 1) // CHUNK):
        for r in range(c * CHUNK, min(rows, c * CHUNK + CHUNK)):
            for t in range(n):
                y = row_dot(qs, d, m, r, x, t, sx)
                if epilogue == EPI_ADD:
                    y += res[t, r]
                elif epilogue == EPI_SWIGLU:
                    y = y * sigmoid_f32(y) * row_dot(qs, d, m, r + rows, x, t, sx)
                out[t, r] = y


@njit(**PJIT)
def norm_matvec(x, norm_w, eps, h, qs, d, m, sx, res, out, epilogue):
    """rmsnorm(x) into h, then `matvec` of h: the norm is the matvec's prologue (same launch)."""
    rmsnorm_into(x, norm_w, eps, h)
    n = h.shape[0]
    block_sums(h, sx)
    rows = out.shape[1]
    for c in prange((rows + CHUNK - 1) // CHUNK):
        for r in range(c * CHUNK, min(rows, c * CHUNK + CHUNK)):
            for t in range(n):
                y = row_dot(qs, d, m, r, h, t, sx)
                if epilogue == EPI_ADD:
                    y += res[t, r]
                elif epilogue == EPI_SWIGLU:
                    y = y * sigmoid_f32(y) * row_dot(qs, d, m, r + rows, h, t, sx)
                out[t, r] = y


def row_dot_i16(qs, d, m, r, xq, xd, xs, t):
    """dot(W[r], x[t]) with x quantized to i16 per block (`quantize_rows_i16`)."""


@overload(row_dot_i16)
def _row_dot_i16(qs, d, m, r, xq, xd, xs, t):
    if qs.dtype == types.uint8 and qs.ndim == 3:
        return lambda qs, d, m, r, xq, xd, xs, t: kquant.dot_blocks_row_i16(qs, r, xq, xd, xs, t)
    if qs.dtype == types.uint8:
        return lambda qs, d, m, r, xq, xd, xs, t: row_dot_q4_i16(qs, d, m, r, xq, xd, xs, t)
    return lambda qs, d, m, r, xq, xd, xs, t: row_dot_q8_i16(qs, d, m, r, xq, xd, xs, t)


def row_dot4_i16(qs, d, m, r, xq, xd, xs, t):
    """`row_dot_i16` of tokens t .. t + 3 at once (each bitwise its one-token dot)."""


@overload(row_dot4_i16)
def _row_dot4_i16(qs, d, m, r, xq, xd, xs, t):
    if qs.dtype == types.uint8 and qs.ndim == 3:
        return lambda qs, d, m, r, xq, xd, xs, t: kquant.dot_blocks_rows4_i16(qs, r, xq, xd, xs, t)
    if qs.dtype == types.uint8:
        return lambda qs, d, m, r, xq, xd, xs, t: rows4_q4_i16(qs, d, m, r, xq, xd, xs, t)
    return lambda qs, d, m, r, xq, xd, xs, t: rows4_q8_i16(qs, d, m, r, xq, xd, xs, t)


def row_span_i16(qs, d, m, r0, r1, xq, xd, xs, t, dst):
    """dst[i] = `row_dot_i16` of row r0 + i with token t, for i < r1 - r0."""


@overload(row_span_i16)
def _row_span_i16(qs, d, m, r0, r1, xq, xd, xs, t, dst):
    if qs.dtype == types.uint8 and qs.ndim == 3:
        return lambda qs, d, m, r0, r1, xq, xd, xs, t, dst: kquant.dot_blocks_span_i16(qs, r0, r1, xq, xd, xs, t, dst)
    if qs.dtype == types.uint8:
        return lambda qs, d, m, r0, r1, xq, xd, xs, t, dst: span_q4_i16(qs, d, m, r0, xq, xd, xs, t, r1, dst)
    return lambda qs, d, m, r0, r1, xq, xd, xs, t, dst: span_q8_i16(qs, d, m, r0, xq, xd, xs, t, r1, dst)


@njit(inline="always", **JIT)
def _store(y, u, t, r, c, res, out, epilogue):
    """out[t, c] = y after the epilogue (res at [t, r]; u the up row's dot for swiglu)."""
    if epilogue == EPI_ADD:
        y += res[t, r]
    elif epilogue == EPI_SWIGLU:
        y = y * sigmoid_f32(y) * u
    out[t, c] = y


# Tokens per pass over a weight row, told apart by type so that each is its own compilation of the
# kernels: with the four-token code in the same loop, LLVM made the one-token decode path (the
# swiglu's above all: 89 -> 211 us for 5632x1024 q4_k) twice as slow.
ONE_PER_PASS, FOUR_PER_PASS = np.int32(1), np.int64(4)


def _four_per_pass(per_pass):
    """Whether `per_pass` is FOUR_PER_PASS (a constant of its type)."""


@overload(_four_per_pass)
def _four_per_pass_impl(per_pass):
    four = per_pass == types.int64
    return lambda per_pass: four


@njit(inline="always", **JIT)
def _row_i16(qs, d, m, r, up, c, xq, xd, xs, res, out, epilogue, per_pass):
    """Row r of W for every input row (token): out[:, c] (after the epilogue; `up`: the swiglu's up
    row). With FOUR_PER_PASS, four tokens per pass over the row while four remain: the weights
    unpacked once for them."""
    n = out.shape[0]
    t = 0
    zero = np.float32(0.0)
    while _four_per_pass(per_pass) and t + 4 <= n:
        y0, y1, y2, y3 = row_dot4_i16(qs, d, m, r, xq, xd, xs, t)
        u0, u1, u2, u3 = zero, zero, zero, zero
        if epilogue == EPI_SWIGLU:
            u0, u1, u2, u3 = row_dot4_i16(qs, d, m, up, xq, xd, xs, t)
        _store(y0, u0, t, r, c, res, out, epilogue)
        _store(y1, u1, t + 1, r, c, res, out, epilogue)
        _store(y2, u2, t + 2, r, c, res, out, epilogue)
        _store(y3, u3, t + 3, r, c, res, out, epilogue)
        t += 4
    while t < n:
        y = row_dot_i16(qs, d, m, r, xq, xd, xs, t)
        u = row_dot_i16(qs, d, m, up, xq, xd, xs, t) if epilogue == EPI_SWIGLU else zero
        _store(y, u, t, r, c, res, out, epilogue)
        t += 1


def _is_grouped(qs):
    """Whether qs is a grouped weight's (grouped.py; a constant of its type)."""


@overload(_is_grouped)
def _is_grouped_impl(qs):
    four = qs.ndim == 4
    return lambda qs: four


_HALF = grouped.MAX_TOKENS * grouped.GROUP      # where a span's swiglu up dots start


def _rows_of(qs):
    """The weight rows that qs holds (a grouped weight's first axis counts groups of 16)."""


@overload(_rows_of)
def _rows_of_impl(qs):
    per = grouped.GROUP if qs.ndim == 4 else 1
    return lambda qs: qs.shape[0] * per


@njit(inline="always", **JIT)
def _group_rows(qs, d, m, r0, r1, up, c0, xq, xd, xs, res, out, epilogue, per_pass, span):
    """`_rows_i16` of a grouped weight: r0 .. r1 - 1 are one group's rows (r0 a multiple of 16),
    computed for 4 or 1 tokens a pass into `span`, then stored through the epilogue."""
    n = out.shape[0]
    g, gu = r0 // grouped.GROUP, (r0 + up) // grouped.GROUP
    swiglu = epilogue == EPI_SWIGLU
    t = 0
    while t < n:
        if _four_per_pass(per_pass) and t + 4 <= n:
            k = 4
            grouped.dots4(qs, d, m, g, xq, xd, xs, t, span, 0)
            if swiglu:
                grouped.dots4(qs, d, m, gu, xq, xd, xs, t, span, _HALF)
        else:
            k = 1
            grouped.dots1(qs, d, m, g, xq, xd, xs, t, span, 0)
            if swiglu:
                grouped.dots1(qs, d, m, gu, xq, xd, xs, t, span, _HALF)
        for j in range(k):
            for i in range(r1 - r0):
                at = grouped.GROUP * j + i
                _store(span[at], span[_HALF + at], t + j, r0 + i, c0 + i, res, out, epilogue)
        t += k


@njit(inline="always", **JIT)
def _rows_i16(qs, d, m, r0, r1, up, c0, xq, xd, xs, res, out, epilogue, per_pass, span):
    """Rows r0 .. r1 - 1 of W for every token into out's columns c0 + r - r0 (the swiglu's up row of
    r: r + up). One token (a decode step): the rows' dots first into `span` (this work item's
    scratch) in one call per span of rows (`row_span_i16`), then the epilogue."""
    if _is_grouped(qs):
        _group_rows(qs, d, m, r0, r1, up, c0, xq, xd, xs, res, out, epilogue, per_pass, span)
        return
    if not _four_per_pass(per_pass) and out.shape[0] == 1:
        n = r1 - r0
        row_span_i16(qs, d, m, r0, r1, xq, xd, xs, 0, span[:n])
        if epilogue == EPI_SWIGLU:
            row_span_i16(qs, d, m, r0 + up, r1 + up, xq, xd, xs, 0, span[CHUNK:CHUNK + n])
        for i in range(n):
            _store(span[i], span[CHUNK + i], 0, r0 + i, c0 + i, res, out, epilogue)
        return
    for r in range(r0, r1):
        _row_i16(qs, d, m, r, r + up, c0 + r - r0, xq, xd, xs, res, out, epilogue, per_pass)


@njit(**PJIT)
def matvec_i16(x, qs, d, m, xq, xd, xs, res, out, epilogue, span, per_pass):
    """`matvec` with the input rows quantized to i16 first (AVX2 integer dot products); span: a
    [work items, 2 x CHUNK] f32 scratch (`Workspace.span`)."""
    quantize_rows_i16(x, xq, xd, xs)
    rows = out.shape[1]
    for c in prange((rows + CHUNK - 1) // CHUNK):
        _rows_i16(qs, d, m, c * CHUNK, min(rows, c * CHUNK + CHUNK), rows, c * CHUNK, xq, xd, xs, res, out,
                  epilogue, per_pass, span[c])


@njit(**PJIT)
def norm_matvec_i16(x, norm_w, eps, h, qs, d, m, xq, xd, xs, res, out, epilogue, span, per_pass):
    rmsnorm_into(x, norm_w, eps, h)
    quantize_rows_i16(h, xq, xd, xs)
    rows = out.shape[1]
    for c in prange((rows + CHUNK - 1) // CHUNK):
        _rows_i16(qs, d, m, c * CHUNK, min(rows, c * CHUNK + CHUNK), rows, c * CHUNK, xq, xd, xs, res, out,
                  epilogue, per_pass, span[c])


@njit(**JIT)
def _part_chunks(rows):
    return (rows + CHUNK - 1) // CHUNK


@njit(**PJIT)
def siblings_matvec_i16(x, norm_w, eps, h, qa, da, ma, qb, db, mb, qc, dc, mc, xq, xd, xs, out, span, per_pass):
    """[rmsnorm](x) @ [A; B; C].T into out's columns, A, B and C being sibling weights in block
    formats of their own (Q and K in q4_k, V in q6_k): one launch and one quantization of the
    activations for all three, where one product per weight would pay both three times. An empty
    norm_w means no norm (then h is unused); C may have no rows (two siblings)."""
    src = x
    if norm_w.size:
        rmsnorm_into(x, norm_w, eps, h)
        src = h
    quantize_rows_i16(src, xq, xd, xs)
    ra, rb, rc = _rows_of(qa), _rows_of(qb), _rows_of(qc)
    ca, cb = _part_chunks(ra), _part_chunks(rb)
    for c in prange(ca + cb + _part_chunks(rc)):
        if c < ca:
            r0 = c * CHUNK
            _rows_i16(qa, da, ma, r0, min(ra, r0 + CHUNK), 0, r0, xq, xd, xs, out, out, EPI_NONE, per_pass, span[c])
        elif c < ca + cb:
            r0 = (c - ca) * CHUNK
            _rows_i16(qb, db, mb, r0, min(rb, r0 + CHUNK), 0, ra + r0, xq, xd, xs, out, out, EPI_NONE, per_pass,
                      span[c])
        else:
            r0 = (c - ca - cb) * CHUNK
            _rows_i16(qc, dc, mc, r0, min(rc, r0 + CHUNK), 0, ra + rb + r0, xq, xd, xs, out, out, EPI_NONE,
                      per_pass, span[c])


@njit(**PJIT)
def dequant_rows(qs, d, m, r0, r1, tile):
    """tile[i] = W[r0 + i] for i < r1 - r0, in f32."""
    for i in prange(r1 - r0):
        dequant_row(qs, d, m, r0 + i, tile, i)


@njit(**PJIT)
def dequant_matmul(x2, qs, d, m, tiles, out):
    """out = x2 @ W.T for a prefill: work item i dequantizes chunks i, i + items, ... of GEMM_ROWS
    weight rows into its own tile and multiplies each with BLAS on its own thread."""
    rows, items, chunk = _rows_of(qs), tiles.shape[0], tiles.shape[1]
    chunks = (rows + chunk - 1) // chunk
    for it in prange(items):
        tile = tiles[it]
        for c in range(it, chunks, items):
            r0 = c * chunk
            r1 = min(rows, r0 + chunk)
            for i in range(r1 - r0):
                dequant_row(qs, d, m, r0 + i, tile, i)
            out[:, r0:r1] = np.dot(x2, tile[:r1 - r0].T)


@njit(**JIT)
def embedding_rows(qs, d, m, ids, out):
    """out[i] = table[ids[i]]; the caller has checked the ids are in range."""
    for i in range(ids.shape[0]):
        dequant_row(qs, d, m, ids[i], out, i)


@njit(**PJIT)
def swiglu_rows(gu, out):
    """out[t, j] = silu(gu[t, j]) * gu[t, F + j], gu being [n, 2F] (gate and up side by side)."""
    f = out.shape[1]
    for t in prange(out.shape[0]):
        for j in range(f):
            g = gu[t, j]
            out[t, j] = g * sigmoid_f32(g) * gu[t, f + j]


# -- dispatch ------------------------------------------------------------------------------------

class Workspace:
    """Scratch reused across calls: block sums and the dequantized tile of the prefill path."""

    def __init__(self):
        self.tile = np.empty(0, np.float32)
        self.sx = {}

    def act_i16(self, n, cols, i8=False, i16=True):
        """Views of the first n rows of (grown as needed) quantized-activation buffers; with `i8`,
        xq also has the i8 columns the VNNI kernels read (simd.i8_columns), which cost a little
        more to fill, so only the formats that read them get them; without `i16` (every weight of
        the launch reads the i8 ones) xd and xs have no columns and the i16 part is not filled."""
        key = ("i16", cols, i8, i16)
        if key not in self.sx or self.sx[key][0].shape[0] < n:
            nb = max(cols // 32, 1) if i16 else 0
            self.sx[key] = (np.empty((n, i8_columns(cols) if i8 else cols), np.int16),
                            np.empty((n, nb), np.float32), np.empty((n, nb), np.float32))
        xq, xd, xs = self.sx[key]
        return xq[:n], xd[:n], xs[:n]

    def span(self, items):
        """A [items, 2 x 4 x 16] f32 scratch: each work item's row dots (and a swiglu's up rows')
        before their epilogue, for up to 4 tokens of a group (grouped.py)."""
        if self.sx.get("span") is None or self.sx["span"].shape[0] < items:
            self.sx["span"] = np.empty((items, 2 * _HALF), np.float32)
        return self.sx["span"][:items]

    def sums(self, n, cols):
        key = (n, cols)
        if key not in self.sx:
            self.sx[key] = np.empty((n, max(cols // 32, 1)), np.float32)
        return self.sx[key]

    @staticmethod
    def items() -> int:
        return pool_size()

    def tiles(self, items, rows, cols):
        """One [rows, cols] f32 tile per work item of `dequant_matmul`."""
        if self.tile.size < items * rows * cols:
            self.tile = np.empty(items * rows * cols, np.float32)
        return self.tile[: items * rows * cols].reshape(items, rows, cols)


def matvec_call(x2, w: Packed, out, ws: Workspace, *, res=None, epilogue=EPI_NONE, norm=None, h=None,
                row_wise=False):
    """The fused matvec kernel and its arguments for `linear` of up to MATVEC_MAX_ROWS rows (None
    for more): a caller that runs the same shapes again (a decode step) binds this once.

    `row_wise` (a batched decode step): any number of rows, each computed exactly as it would be
    alone (the matvec kernels compute rows independently; dense f32 weights go to BLAS one row at a
    time, since BLAS's result for a row may depend on how many rows it is given)."""
    n = x2.shape[0]
    integer = (INT_ACTIVATIONS and w.kind != "f32") or w.grouped     # grouped: packed where INT_ACTIVATIONS
    if row_wise and n > 1 and w.kind == "f32":
        return _rows_one_by_one, (x2, w, out, ws, res, epilogue, norm, h)
    if (n > MATVEC_MAX_ROWS and not row_wise and not w.grouped) or w.kind == "f32":   # dense f32: BLAS
        return None
    res_arr = out if res is None else res
    if integer:
        i8 = w.kind in I8_FORMATS
        xq, xd, xs = ws.act_i16(n, w.cols, i8=i8, i16=not i8)
        per_pass = FOUR_PER_PASS if n >= 4 else ONE_PER_PASS
        span = ws.span(-(-out.shape[1] // CHUNK))
        if norm is not None:
            return norm_matvec_i16, (x2, norm[0], np.float32(norm[1]), h, w.qs, w.d, w.m, xq, xd, xs, res_arr,
                                    out, epilogue, span, per_pass)
        return matvec_i16, (x2, w.qs, w.d, w.m, xq, xd, xs, res_arr, out, epilogue, span, per_pass)
    sx = ws.sums(n, w.cols)
    if norm is not None:
        return norm_matvec, (x2, norm[0], np.float32(norm[1]), h, w.qs, w.d, w.m, sx, res_arr, out, epilogue)
    return matvec, (x2, w.qs, w.d, w.m, sx, res_arr, out, epilogue)


_NO_NORM = np.zeros(0, np.float32)


def siblings_call(x2, parts: list[Packed], out, ws: Workspace, *, norm=None, h=None, row_wise=False):
    """`siblings_matvec_i16` and its arguments for two or three sibling weights (each its own
    format) read by the same rows, writing their products side by side into out [n, sum of rows];
    None where it does not apply (dense or non-integer weights, more rows than a decode step, more
    siblings), and the caller makes one product per weight."""
    n = x2.shape[0]
    if (not INT_ACTIVATIONS or not 2 <= len(parts) <= 3 or any(p.kind == "f32" for p in parts)
            or (n > MATVEC_MAX_ROWS and not row_wise and not all(p.grouped for p in parts))
            or len({p.cols for p in parts}) != 1):
        return None
    xq, xd, xs = ws.act_i16(n, parts[0].cols, i8=any(p.kind in I8_FORMATS for p in parts),
                            i16=any(p.kind not in I8_FORMATS for p in parts))
    if len(parts) == 2:           # C: B's arrays with no rows (same types: no other compilation)
        b = parts[1]
        parts = [*parts, Packed(b.kind, b.qs[:0], b.d[:0], b.m[:0], (0,))]
    arrays = [a for p in parts for a in p.arrays]
    nw, eps = (_NO_NORM, np.float32(0.0)) if norm is None else (norm[0], np.float32(norm[1]))
    span = ws.span(sum(-(-p.rows // CHUNK) for p in parts))
    return siblings_matvec_i16, (x2, nw, eps, x2 if h is None else h, *arrays, xq, xd, xs, out, span,
                                 FOUR_PER_PASS if n >= 4 else ONE_PER_PASS)


def _rows_one_by_one(x2, w, out, ws, res, epilogue, norm, h):
    for i in range(x2.shape[0]):
        linear(x2[i:i + 1], w, out[i:i + 1], ws, res=None if res is None else res[i:i + 1], epilogue=epilogue,
               norm=norm, h=None if h is None else h[i:i + 1])


def linear(x2, w: Packed, out, ws: Workspace, *, res=None, epilogue=EPI_NONE, norm=None, h=None, row_wise=False):
    """out = [rmsnorm](x2) @ W.T with an epilogue; x2 [n, cols] f32 C-contiguous, out [n, rows'].

    `norm` = (weight, eps) fuses an rmsnorm prologue (h receives the normalised rows); `row_wise`
    as for `matvec_call`.
    """
    call = matvec_call(x2, w, out, ws, res=res, epilogue=epilogue, norm=norm, h=h, row_wise=row_wise)
    if call is not None:
        call[0](*call[1])
        return out
    n = x2.shape[0]
    src = x2
    if norm is not None:
        rmsnorm_into(x2, norm[0], np.float32(norm[1]), h)
        src = h
    if epilogue == EPI_SWIGLU:
        gu = np.empty((n, w.rows), np.float32)
        _dense_matmul(src, w, gu, ws)
        swiglu_rows(gu, out)
    elif epilogue == EPI_ADD:
        y = np.empty((n, w.rows), np.float32)
        _dense_matmul(src, w, y, ws)
        np.add(res, y, out=out)
    else:
        _dense_matmul(src, w, out, ws)
    return out


def _dense_matmul(x2, w: Packed, out, ws: Workspace):
    if w.kind == "f32":
        # dense weights need no dequantizing: one BLAS call on BLAS's own threads (which are idle
        # while the Numba pool waits) beats a product per work item
        np.dot(x2, w.qs.T, out=out)
        return
    items = ws.items()
    # at most GEMM_ROWS rows a chunk, and the same number of near-equal chunks for every item
    per_item = -(-w.rows // items)
    chunk = -(-per_item // -(-per_item // GEMM_ROWS))
    with serial_blas():
        dequant_matmul(x2, w.qs, w.d, w.m, ws.tiles(items, chunk, w.cols), out)


def embedding(table: Packed, ids, out2):
    """out2[i] = table[ids[i]] (ids flat, checked by the caller)."""
    embedding_rows(table.qs, table.d, table.m, ids, out2)
    return out2


def flops_bytes(n: int, w: Packed) -> tuple[float, float]:
    """Cost record of one linear: FLOPs and bytes of weights read."""
    return 2.0 * n * w.rows * w.cols, float(w.nbytes)


__all__ = ["Packed", "pack", "linear", "matvec_call", "embedding", "matvec", "norm_matvec",
           "dequant_rows", "swiglu_rows", "Workspace", "EPI_NONE", "EPI_ADD", "EPI_SWIGLU"]
