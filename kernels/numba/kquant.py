"""Row primitives for the GGUF block formats kept as raw blocks: q5_0, q5_1 and the
k-quants q2_k, q3_k, q4_k, q5_k, q6_k (compiler/quant.py documents each layout, after llama.cpp's
ggml-common.h).

linear.py packs such a weight as its blocks, uint8 [rows, blocks per row, bytes per block], a copy
of the file's bytes at the file's size; these functions read the blocks in place, the block's
byte count (unique per format) choosing the format once per row:

    dequant_blocks_row(qs, r, out, t)      out[t] = W[r] in f32
    dot_blocks_row(qs, r, x, t, sx)        dot(W[r], x[t]), x f32; sx[t, b] = sum of x[t]'s 32-block b
    dot_blocks_row_i16(qs, r, xq, xd, xs, t)   the same with x[t] quantized to i16 per 32-block
                                            (simd.quantize_rows_i16: x ~ xd * xq, xs = xd * sum(xq));
                                            AVX2 hosts only: mostly kquant_simd.py's vector IR

The dot products follow llama.cpp's k-quant design: per sub-block an integer (or, for f32
activations, unscaled float) dot product of the small integer weights with x, multiplied by the
sub-block's scale once; a sub-block's min (value = d * sc * q - dmin * mn) is applied once
through the sum of x over the sub-block. Accumulation is in f32 (i32 within a sub-block of the
i16 path: 32 * 63 * 32767 < 2^31).

Numba's cache tracks each kernel's own file: linear.py's kernels inline these functions, so after
editing this file (or kquant_simd.py) delete kernels/numba/__pycache__ (see kernels/numba/__init__.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from isthmus.kernels.numba import JIT
from isthmus.kernels.numba.kquant_simd import (WIDE, row_dot_q2k_i16, row_dot_q3k_i16, row_dot_q4k_i16,
                                               row_dot_q5k_i16, row_dot_q6k_i16, row_dot_q50_i16, row_dot_q51_i16,
                                               rows4_q2k_i16, rows4_q3k_i16, rows4_q4k_i16, rows4_q5k_i16,
                                               rows4_q6k_i16, rows4_q50_i16, rows4_q51_i16, span_q2k_i16,
                                               span_q3k_i16, span_q4k_i16, span_q5k_i16, span_q6k_i16, span_q50_i16,
                                               span_q51_i16)
from isthmus.kernels.numba.simd import f16_to_f32

# bytes per block -> values per block, for every format kept as raw blocks
BLOCK_VALUES = {22: 32, 24: 32, 84: 256, 110: 256, 144: 256, 176: 256, 210: 256}
TYPE_SIZE = {"q5_0": 22, "q5_1": 24, "q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}

# iq4_nl's 16 values (kvalues_iq4nl): linear.py repacks iq4_nl blocks as q8_0 ones, exactly.
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


_INLINE = dict(JIT, inline="always")


@njit(**_INLINE)
def _f16(qs, r, b, i):
    return f16_to_f32(np.uint16(np.uint16(qs[r, b, i]) | (np.uint16(qs[r, b, i + 1]) << np.uint16(8))))


@njit(**_INLINE)
def _u32(qs, r, b, i):
    return (np.uint32(qs[r, b, i]) | (np.uint32(qs[r, b, i + 1]) << np.uint32(8))
            | (np.uint32(qs[r, b, i + 2]) << np.uint32(16)) | (np.uint32(qs[r, b, i + 3]) << np.uint32(24)))


@njit(**_INLINE)
def _scale_min_k4(qs, r, b, j):
    """q4_k / q5_k: the 6-bit scale and min of sub-block j (get_scale_min_k4; scales at byte 4)."""
    if j < 4:
        return np.int32(qs[r, b, 4 + j] & 63), np.int32(qs[r, b, 8 + j] & 63)
    sc = np.int32(qs[r, b, 8 + j] & 15) | (np.int32(qs[r, b, j] >> 6) << 4)
    mn = np.int32(qs[r, b, 8 + j] >> 4) | (np.int32(qs[r, b, 4 + j] >> 6) << 4)
    return sc, mn


@njit(**_INLINE)
def _q3k_scale(qs, r, b, i):
    """q3_k: signed scale i (0..15) from the 12 bytes at 96."""
    low = np.int32(qs[r, b, 96 + i] & 15) if i < 8 else np.int32(qs[r, b, 96 + i - 8] >> 4)
    high = (np.int32(qs[r, b, 104 + (i & 3)]) >> (2 * (i >> 2))) & 3
    return (low | (high << 4)) - 32


# -- the integer value of element l of sub-block pieces, per format ------------------------------------
# Each format's loops below walk a block in runs of 16 or 32 values that share a scale, so the
# inner loops have no branches and vectorise.

@njit(**JIT)
def dequant_blocks_row(qs, r, out, t):
    ts = qs.shape[2]
    nb = qs.shape[1]
    if ts == 144 or ts == 176:          # q4_k, q5_k
        five = ts == 176
        q0 = 48 if five else 16
        for b in range(nb):
            d, dmin = _f16(qs, r, b, 0), _f16(qs, r, b, 2)
            o = 256 * b
            for c in range(4):
                sa, ma = _scale_min_k4(qs, r, b, 2 * c)
                sb, mb = _scale_min_k4(qs, r, b, 2 * c + 1)
                da, db = d * np.float32(sa), d * np.float32(sb)
                na, nbm = dmin * np.float32(ma), dmin * np.float32(mb)
                for l in range(32):
                    v = np.int32(qs[r, b, q0 + 32 * c + l])
                    lo, hi = v & 15, v >> 4
                    if five:
                        h = np.int32(qs[r, b, 16 + l])
                        lo |= ((h >> (2 * c)) & 1) << 4
                        hi |= ((h >> (2 * c + 1)) & 1) << 4
                    out[t, o + 64 * c + l] = da * np.float32(lo) - na
                    out[t, o + 64 * c + 32 + l] = db * np.float32(hi) - nbm
    elif ts == 210:                     # q6_k
        for b in range(nb):
            d = _f16(qs, r, b, 208)
            for h in range(2):
                o = 256 * b + 128 * h
                for k in range(4):
                    for half in range(2):
                        sc = d * np.float32(np.int8(qs[r, b, 192 + 8 * h + 2 * k + half]))
                        for l0 in range(16):
                            l = 16 * half + l0
                            lo = np.int32(qs[r, b, 64 * h + 32 * (k & 1) + l])
                            lo = (lo >> 4) if k >= 2 else (lo & 15)
                            hb = (np.int32(qs[r, b, 128 + 32 * h + l]) >> (2 * k)) & 3
                            out[t, o + 32 * k + l] = sc * np.float32((lo | (hb << 4)) - 32)
    elif ts == 84 or ts == 110:         # q2_k, q3_k
        three = ts == 110
        qoff = 32 if three else 16
        for b in range(nb):
            if three:
                d, dmin = _f16(qs, r, b, 108), np.float32(0.0)
            else:
                d, dmin = _f16(qs, r, b, 80), _f16(qs, r, b, 82)
            for h in range(2):
                for k in range(4):
                    for half in range(2):
                        s = 8 * h + 2 * k + half
                        if three:
                            dl, ml = d * np.float32(_q3k_scale(qs, r, b, s)), np.float32(0.0)
                        else:
                            sc = np.int32(qs[r, b, s])
                            dl, ml = d * np.float32(sc & 15), dmin * np.float32(sc >> 4)
                        o = 256 * b + 128 * h + 32 * k + 16 * half
                        for l0 in range(16):
                            l = 16 * half + l0
                            q = (np.int32(qs[r, b, qoff + 32 * h + l]) >> (2 * k)) & 3
                            if three:
                                q -= 0 if (np.int32(qs[r, b, l]) >> (4 * h + k)) & 1 else 4
                            out[t, o + l0] = dl * np.float32(q) - ml
    else:                               # 32-value blocks: q5_0, q5_1
        one = ts == 24
        at = 4 if one else 2
        for b in range(nb):
            d = _f16(qs, r, b, 0)
            o = 32 * b
            m = _f16(qs, r, b, 2) if one else np.float32(0.0)
            qh = _u32(qs, r, b, at)
            for j in range(16):
                v = np.int32(qs[r, b, at + 4 + j])
                lo = (v & 15) | np.int32(((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
                hi = (v >> 4) | np.int32(((qh >> np.uint32(j + 16)) & np.uint32(1)) << np.uint32(4))
                if one:
                    out[t, o + j] = np.float32(lo) * d + m
                    out[t, o + 16 + j] = np.float32(hi) * d + m
                else:
                    out[t, o + j] = np.float32(lo - 16) * d
                    out[t, o + 16 + j] = np.float32(hi - 16) * d


@njit(**JIT)
def dot_blocks_row(qs, r, x, t, sx):
    ts = qs.shape[2]
    nb = qs.shape[1]
    acc = np.float32(0.0)
    if ts == 144 or ts == 176:          # q4_k, q5_k
        five = ts == 176
        q0 = 48 if five else 16
        for b in range(nb):
            d, dmin = _f16(qs, r, b, 0), _f16(qs, r, b, 2)
            o = 256 * b
            for c in range(4):
                sa, ma = _scale_min_k4(qs, r, b, 2 * c)
                sb, mb = _scale_min_k4(qs, r, b, 2 * c + 1)
                s_lo = np.float32(0.0)
                s_hi = np.float32(0.0)
                if five:
                    for l in range(32):
                        v = np.int32(qs[r, b, q0 + 32 * c + l])
                        h = np.int32(qs[r, b, 16 + l])
                        s_lo += np.float32((v & 15) | (((h >> (2 * c)) & 1) << 4)) * x[t, o + 64 * c + l]
                        s_hi += np.float32((v >> 4) | (((h >> (2 * c + 1)) & 1) << 4)) * x[t, o + 64 * c + 32 + l]
                else:
                    for l in range(32):
                        v = np.int32(qs[r, b, q0 + 32 * c + l])
                        s_lo += np.float32(v & 15) * x[t, o + 64 * c + l]
                        s_hi += np.float32(v >> 4) * x[t, o + 64 * c + 32 + l]
                acc += d * (np.float32(sa) * s_lo + np.float32(sb) * s_hi) \
                    - dmin * (np.float32(ma) * sx[t, 8 * b + 2 * c] + np.float32(mb) * sx[t, 8 * b + 2 * c + 1])
    elif ts == 210:                     # q6_k
        for b in range(nb):
            d = _f16(qs, r, b, 208)
            sacc = np.float32(0.0)
            for h in range(2):
                o = 256 * b + 128 * h
                for k in range(4):
                    s0 = np.float32(0.0)
                    s1 = np.float32(0.0)
                    for l in range(16):
                        lo = np.int32(qs[r, b, 64 * h + 32 * (k & 1) + l])
                        lo = (lo >> 4) if k >= 2 else (lo & 15)
                        hb = (np.int32(qs[r, b, 128 + 32 * h + l]) >> (2 * k)) & 3
                        s0 += np.float32((lo | (hb << 4)) - 32) * x[t, o + 32 * k + l]
                        lo = np.int32(qs[r, b, 64 * h + 32 * (k & 1) + 16 + l])
                        lo = (lo >> 4) if k >= 2 else (lo & 15)
                        hb = (np.int32(qs[r, b, 128 + 32 * h + 16 + l]) >> (2 * k)) & 3
                        s1 += np.float32((lo | (hb << 4)) - 32) * x[t, o + 32 * k + 16 + l]
                    s = 8 * h + 2 * k
                    sacc += np.float32(np.int8(qs[r, b, 192 + s])) * s0 + np.float32(np.int8(qs[r, b, 193 + s])) * s1
            acc += d * sacc
    elif ts == 84 or ts == 110:         # q2_k, q3_k
        three = ts == 110
        qoff = 32 if three else 16
        for b in range(nb):
            sacc = np.float32(0.0)
            macc = np.float32(0.0)
            for h in range(2):
                for k in range(4):
                    o = 256 * b + 128 * h + 32 * k
                    s0 = np.float32(0.0)
                    s1 = np.float32(0.0)
                    x0 = np.float32(0.0)
                    for l in range(16):
                        q0 = (np.int32(qs[r, b, qoff + 32 * h + l]) >> (2 * k)) & 3
                        q1 = (np.int32(qs[r, b, qoff + 32 * h + 16 + l]) >> (2 * k)) & 3
                        if three:
                            q0 -= ((~(np.int32(qs[r, b, l]) >> (4 * h + k))) & 1) << 2
                            q1 -= ((~(np.int32(qs[r, b, 16 + l]) >> (4 * h + k))) & 1) << 2
                        s0 += np.float32(q0) * x[t, o + l]
                        s1 += np.float32(q1) * x[t, o + 16 + l]
                        x0 += x[t, o + l]
                    s = 8 * h + 2 * k
                    if three:
                        sacc += np.float32(_q3k_scale(qs, r, b, s)) * s0 + np.float32(_q3k_scale(qs, r, b, s + 1)) * s1
                    else:
                        c0, c1 = np.int32(qs[r, b, s]), np.int32(qs[r, b, s + 1])
                        sacc += np.float32(c0 & 15) * s0 + np.float32(c1 & 15) * s1
                        # sums of x over the two halves of the 32-block: x0 and sx - x0
                        macc += np.float32(c0 >> 4) * x0 + np.float32(c1 >> 4) * (sx[t, 8 * b + 4 * h + k] - x0)
            if three:
                acc += _f16(qs, r, b, 108) * sacc
            else:
                acc += _f16(qs, r, b, 80) * sacc - _f16(qs, r, b, 82) * macc
    else:                               # 32-value blocks: q5_0, q5_1
        one = ts == 24
        at = 4 if one else 2
        for b in range(nb):
            d = _f16(qs, r, b, 0)
            o = 32 * b
            s = np.float32(0.0)
            qh = _u32(qs, r, b, at)
            for j in range(16):
                v = np.int32(qs[r, b, at + 4 + j])
                lo = (v & 15) | np.int32(((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
                hi = (v >> 4) | np.int32(((qh >> np.uint32(j + 16)) & np.uint32(1)) << np.uint32(4))
                s += np.float32(lo) * x[t, o + j] + np.float32(hi) * x[t, o + 16 + j]
            if one:
                acc += d * s + _f16(qs, r, b, 2) * sx[t, b]
            else:
                acc += d * (s - np.float32(16.0) * sx[t, b])
    return acc


# -- i16 activations: one function per format (constant offsets, no format branch in the loops:
# LLVM vectorises each inner loop into 16-bit multiply-adds), chosen once per row; q4_k and q6_k,
# the bulk of a Q4_K_M file, q5_k and q5_0 / q5_1 use the vector-IR versions in kquant_simd.py
# (1.5-2.5x faster).

@njit(**JIT)
def _i16_q2k(qs, r, xq, xd, xs, t):
    acc = np.float32(0.0)
    for b in range(qs.shape[1]):
        sacc = np.float32(0.0)
        macc = np.float32(0.0)
        for h in range(2):
            for k in range(4):
                o = 256 * b + 128 * h + 32 * k
                i0 = np.int32(0)
                i1 = np.int32(0)
                x0 = np.int32(0)
                x1 = np.int32(0)
                for l in range(16):
                    a0 = np.int32(xq[t, o + l])
                    a1 = np.int32(xq[t, o + 16 + l])
                    i0 = np.int32(i0 + ((np.int32(qs[r, b, 16 + 32 * h + l]) >> (2 * k)) & 3) * a0)
                    i1 = np.int32(i1 + ((np.int32(qs[r, b, 32 + 32 * h + l]) >> (2 * k)) & 3) * a1)
                    x0 = np.int32(x0 + a0)
                    x1 = np.int32(x1 + a1)
                s = 8 * h + 2 * k
                c0, c1 = np.int32(qs[r, b, s]), np.int32(qs[r, b, s + 1])
                xdk = xd[t, 8 * b + 4 * h + k]
                sacc += xdk * (np.float32(c0 & 15) * np.float32(i0) + np.float32(c1 & 15) * np.float32(i1))
                macc += xdk * (np.float32(c0 >> 4) * np.float32(x0) + np.float32(c1 >> 4) * np.float32(x1))
        acc += _f16(qs, r, b, 80) * sacc - _f16(qs, r, b, 82) * macc
    return acc


@njit(**JIT)
def _i16_q3k(qs, r, xq, xd, xs, t):
    acc = np.float32(0.0)
    for b in range(qs.shape[1]):
        sacc = np.float32(0.0)
        for h in range(2):
            for k in range(4):
                o = 256 * b + 128 * h + 32 * k
                i0 = np.int32(0)
                i1 = np.int32(0)
                hs = 4 * h + k
                for l in range(16):
                    q0 = ((np.int32(qs[r, b, 32 + 32 * h + l]) >> (2 * k)) & 3) \
                        - (((~(np.int32(qs[r, b, l]) >> hs)) & 1) << 2)
                    q1 = ((np.int32(qs[r, b, 48 + 32 * h + l]) >> (2 * k)) & 3) \
                        - (((~(np.int32(qs[r, b, 16 + l]) >> hs)) & 1) << 2)
                    i0 = np.int32(i0 + q0 * np.int32(xq[t, o + l]))
                    i1 = np.int32(i1 + q1 * np.int32(xq[t, o + 16 + l]))
                s = 8 * h + 2 * k
                sacc += xd[t, 8 * b + 4 * h + k] * (np.float32(_q3k_scale(qs, r, b, s)) * np.float32(i0)
                                                    + np.float32(_q3k_scale(qs, r, b, s + 1)) * np.float32(i1))
        acc += _f16(qs, r, b, 108) * sacc
    return acc


_DOT_Q2K = row_dot_q2k_i16 if WIDE else _i16_q2k
_DOT_Q3K = row_dot_q3k_i16 if WIDE else _i16_q3k


@njit(**JIT)
def dot_blocks_row_i16(qs, r, xq, xd, xs, t):
    """dot(W[r], x[t]) with x[t] ~ xd * xq per 32-block (xs = xd * sum(xq)): integer dot products
    per run of 16 or 32 values (i32: `np.int32(...)` keeps the vector code in 32-bit lanes), each
    run's scale applied once."""
    ts = qs.shape[2]
    if ts == 144:
        return row_dot_q4k_i16(qs, r, xq, xd, xs, t)
    if ts == 210:
        return row_dot_q6k_i16(qs, r, xq, xd, xs, t)
    if ts == 176:
        return row_dot_q5k_i16(qs, r, xq, xd, xs, t)
    if ts == 22:
        return row_dot_q50_i16(qs, r, xq, xd, xs, t)
    if ts == 24:
        return row_dot_q51_i16(qs, r, xq, xd, xs, t)
    if ts == 110:
        return _DOT_Q3K(qs, r, xq, xd, xs, t)
    return _DOT_Q2K(qs, r, xq, xd, xs, t)


@njit(**JIT)
def _four_q2k(qs, r, xq, xd, xs, t):
    return (_DOT_Q2K(qs, r, xq, xd, xs, t), _DOT_Q2K(qs, r, xq, xd, xs, t + 1), _DOT_Q2K(qs, r, xq, xd, xs, t + 2),
            _DOT_Q2K(qs, r, xq, xd, xs, t + 3))


@njit(**JIT)
def _four_q3k(qs, r, xq, xd, xs, t):
    return (_DOT_Q3K(qs, r, xq, xd, xs, t), _DOT_Q3K(qs, r, xq, xd, xs, t + 1), _DOT_Q3K(qs, r, xq, xd, xs, t + 2),
            _DOT_Q3K(qs, r, xq, xd, xs, t + 3))


_ROWS4_Q2K = rows4_q2k_i16 if WIDE else _four_q2k
_ROWS4_Q3K = rows4_q3k_i16 if WIDE else _four_q3k


@njit(**JIT)
def dot_blocks_rows4_i16(qs, r, xq, xd, xs, t):
    """`dot_blocks_row_i16` of tokens t .. t + 3 at once (the weight row unpacked once), each
    bitwise equal to its one-token dot."""
    ts = qs.shape[2]
    if ts == 144:
        return rows4_q4k_i16(qs, r, xq, xd, xs, t)
    if ts == 210:
        return rows4_q6k_i16(qs, r, xq, xd, xs, t)
    if ts == 176:
        return rows4_q5k_i16(qs, r, xq, xd, xs, t)
    if ts == 22:
        return rows4_q50_i16(qs, r, xq, xd, xs, t)
    if ts == 24:
        return rows4_q51_i16(qs, r, xq, xd, xs, t)
    if ts == 110:
        return _ROWS4_Q3K(qs, r, xq, xd, xs, t)
    return _ROWS4_Q2K(qs, r, xq, xd, xs, t)


@njit(**JIT)
def _span_by_rows(qs, r0, xq, xd, xs, t, r1, dst):
    """A span one row at a time (q2_k and q3_k without AVX-512: their Numba loops)."""
    for r in range(r0, r1):
        dst[r - r0] = dot_blocks_row_i16(qs, r, xq, xd, xs, t)


_SPAN_Q2K = span_q2k_i16 if WIDE else _span_by_rows
_SPAN_Q3K = span_q3k_i16 if WIDE else _span_by_rows


@njit(**JIT)
def dot_blocks_span_i16(qs, r0, r1, xq, xd, xs, t, dst):
    """dst[i] = `dot_blocks_row_i16` of row r0 + i for i < r1 - r0, each bitwise its one-row dot:
    the format chosen once for the span."""
    ts = qs.shape[2]
    if ts == 144:
        span_q4k_i16(qs, r0, xq, xd, xs, t, r1, dst)
    elif ts == 210:
        span_q6k_i16(qs, r0, xq, xd, xs, t, r1, dst)
    elif ts == 176:
        span_q5k_i16(qs, r0, xq, xd, xs, t, r1, dst)
    elif ts == 22:
        span_q50_i16(qs, r0, xq, xd, xs, t, r1, dst)
    elif ts == 24:
        span_q51_i16(qs, r0, xq, xd, xs, t, r1, dst)
    elif ts == 110:
        _SPAN_Q3K(qs, r0, xq, xd, xs, t, r1, dst)
    else:
        _SPAN_Q2K(qs, r0, xq, xd, xs, t, r1, dst)
