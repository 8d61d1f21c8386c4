"""Ahead-of-time weight conversion for the NPU, in one pass per weight (Numba): dequantize, permute
and pack a weight into the PE-array layout the NPU lowering streams (compiler/lower/npu/weights.py).

`pack(data, ...)` reads a weight as the model file stores it (Q4_0 / Q4_1 / Q8_0 / bf16 blocks, or
a float array; other block formats, q5_* and the k-quants, are dequantized first by their own
`dequantize`), dequantizes each row, optionally permutes rows (output features) and columns
(input features), rounds to the matmul dtype and writes the PE-array layout of compiler/lower/npu/weights.py: pieces
of `[P, kt-1, cols]` plus the last partial K-tile. With `split`, the bf16 value and the bf16
rounding of its remainder are written as two arrays (hi + lo carries about 16 significant bits,
enough for a Q4_1 value d*q + m). Doing this row by row in compiled code keeps a 135M-parameter
model's conversion near a second instead of several numpy passes over 0.5 GB each.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_QCODE = {"f32": 0, "q8_0": 1, "q4_0": 2, "q4_1": 3, "bf16": 4}


@njit(cache=True, inline="always")
def _f16(lo, hi):
    bits = np.int32(lo) | (np.int32(hi) << 8)
    sign = -1.0 if bits & 0x8000 else 1.0
    exp = (bits >> 10) & 0x1F
    man = bits & 0x3FF
    if exp == 0:
        return sign * man * 5.960464477539063e-08          # 2^-24
    if exp == 31:
        return sign * np.inf if man == 0 else np.nan
    return sign * (1.0 + man / 1024.0) * 2.0 ** (exp - 15)


@njit(cache=True)
def _row(raw, dense, qcode, r, out):
    """Dequantize source row r into out (f32)."""
    n = out.shape[0]
    if qcode == 0:
        for i in range(n):
            out[i] = dense[r, i]
    elif qcode == 4:
        ob = out.view(np.uint32)
        for i in range(n):
            ob[i] = (np.uint32(raw[r, 2 * i]) | (np.uint32(raw[r, 2 * i + 1]) << np.uint32(8))) << np.uint32(16)
    elif qcode == 1:
        for b in range(n // 32):
            o = b * 34
            d = _f16(raw[r, o], raw[r, o + 1])
            for j in range(32):
                q = np.int32(raw[r, o + 2 + j])
                if q >= 128:
                    q -= 256
                out[b * 32 + j] = np.float32(np.float32(q) * np.float32(d))
    else:
        size = 18 if qcode == 2 else 20
        for b in range(n // 32):
            o = b * size
            d = np.float32(_f16(raw[r, o], raw[r, o + 1]))
            m = np.float32(_f16(raw[r, o + 2], raw[r, o + 3])) if qcode == 3 else np.float32(0.0)
            base = o + (4 if qcode == 3 else 2)
            for j in range(16):
                byte = np.int32(raw[r, base + j])
                lo, hi = byte & 0x0F, byte >> 4
                if qcode == 2:
                    out[b * 32 + j] = np.float32(lo - 8) * d
                    out[b * 32 + j + 16] = np.float32(hi - 8) * d
                else:
                    out[b * 32 + j] = np.float32(np.float32(lo) * d) + m
                    out[b * 32 + j + 16] = np.float32(np.float32(hi) * d) + m


@njit(cache=True)
def _round_bf16(vals, hi):
    """hi[i] = bf16 bits of vals[i] (round to nearest even); vals becomes the remainder vals - hi."""
    bits = vals.view(np.uint32)
    for i in range(vals.shape[0]):
        b = bits[i]
        h = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        hi[i] = np.uint16(h)
    back = np.empty(vals.shape[0], np.uint32)
    for i in range(vals.shape[0]):
        back[i] = np.uint32(hi[i]) << np.uint32(16)
    hv = back.view(np.float32)
    for i in range(vals.shape[0]):
        vals[i] = vals[i] - hv[i]


@njit(cache=True)
def _pack(raw, dense, qcode, src_cols, rmap, cmap, k, n, parts, piece_cols, hi16, lo16, f32out, mode):
    """mode 0: f32 into f32out; 1: bf16 into hi16; 2: bf16 hi + lo. Columns go in blocks of 32, so
    the transposed writes of a block land next to each other."""
    kt = (k + parts - 1) // parts
    kf = (kt - 1) * parts
    B = 32
    for blk in range((n + B - 1) // B):
        j0 = blk * B
        nb = min(B, n - j0)
        buf = np.zeros(src_cols, np.float32)
        vals = np.zeros((nb, k), np.float32)
        for jj in range(nb):
            r = rmap[j0 + jj]
            if r >= 0:
                _row(raw, dense, qcode, r, buf)
                for i in range(k):
                    if cmap[i] >= 0:
                        vals[jj, i] = buf[cmap[i]]
        o0 = (j0 // piece_cols) * piece_cols          # blocks never straddle pieces (piece_cols % 32 == 0)
        cols = min(n, o0 + piece_cols) - o0
        base = o0 * k
        c0 = j0 - o0
        hs = np.empty((nb, k), np.uint16)
        ls = np.empty((nb, k), np.uint16)
        if mode != 0:
            for jj in range(nb):
                _round_bf16(vals[jj], hs[jj])
                if mode == 2:
                    _round_bf16(vals[jj], ls[jj])
        for i in range(k):
            if i < kf:
                pos = base + ((i % parts) * (kt - 1) + i // parts) * cols + c0
            else:
                pos = base + kf * cols + (i - kf) * cols + c0
            for jj in range(nb):
                if mode == 0:
                    f32out[pos + jj] = vals[jj, i]
                else:
                    hi16[pos + jj] = hs[jj, i]
                    if mode == 2:
                        lo16[pos + jj] = ls[jj, i]


@njit(cache=True)
def _dequant_all(raw, dense, qcode, out):
    for r in range(out.shape[0]):
        _row(raw, dense, qcode, r, out[r])


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view: Numba compiles (and caches) one specialisation for read-only arrays only."""
    v = np.ascontiguousarray(a).view()
    v.flags.writeable = False
    return v


def _source(data):
    """(raw uint8 rows, dense f32 rows, qcode) of a weight's storage."""
    q = getattr(data, "qtype", None)
    if q is not None:
        if q not in _QCODE:     # formats this packer does not decode (q5_*, k-quants): their own dequantizer
            dense = np.asarray(data.dequantize(), np.float32).reshape(data.shape[0], -1)
            return _readonly(np.zeros((1, 1), np.uint8)), _readonly(dense), 0
        return _readonly(data.raw), _readonly(np.zeros((1, 1), np.float32)), _QCODE[q]
    return _readonly(np.zeros((1, 1), np.uint8)), _readonly(np.asarray(data, np.float32)), 0


def dequantize(data) -> np.ndarray:
    """A weight's f32 values, [rows, cols]."""
    raw, dense, qcode = _source(data)
    rows, cols = data.shape
    out = np.empty((rows, cols), np.float32)
    _dequant_all(raw, dense, qcode, out)
    return out


def pack(data, dtype: str, parts: int, piece_cols: int, *, rows=None, cols=None, transposed: bool = False,
         split: bool = False):
    """Packed W^T for W = `data` [out, in] (or W^T itself when `transposed`): returns (hi, lo or None).
    `rows[j]` is the W row feeding packed output j (-1: zeros); `cols[i]` the W column of packed input i."""
    raw, dense, qcode = _source(data)
    if transposed:                    # only plain arrays come transposed (W^T built on the host)
        if qcode:
            raise ValueError("a transposed weight must be a float array")
        dense = _readonly(dense.T)
    src_rows, src_cols = data.shape[::-1] if transposed else data.shape
    rmap = np.arange(src_rows, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    cmap = np.arange(src_cols, dtype=np.int64) if cols is None else np.asarray(cols, np.int64)
    n, k = len(rmap), len(cmap)
    mode = 0 if dtype == "f32" else (2 if split else 1)
    size = k * n
    f32out = np.empty(size if mode == 0 else 0, np.float32)
    hi16 = np.empty(size if mode else 0, np.uint16)
    lo16 = np.empty(size if mode == 2 else 0, np.uint16)
    _pack(raw, dense, qcode, src_cols, rmap, cmap, k, n, parts, piece_cols, hi16, lo16, f32out, mode)
    if mode == 0:
        return f32out, None
    from isthmus.npu.isa import DTYPES
    bf = DTYPES["bf16"].np
    return hi16.view(bf), (lo16.view(bf) if mode == 2 else None)
