"""Rotary position embedding, and the fused Q/K/V epilogue of the attention input projection.

Angles are computed as the reference does (f32 position * f32 inverse frequency, then cos/sin,
here with the vectorisable `simd.sincos_f32`, as accurate as numpy's f32 sin/cos for positions
below 8192), once per token and reused for every head. `layout` is "interleaved" (pairs 2i, 2i+1: GGUF/Meta)
or "half" (pairs i, i + dim/2: HF); features past `dim` pass through.
Dispatch rule: fewer than `PARALLEL_MIN` elements run serially, more split tokens across threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from isthmus.kernels.numba import JIT, PJIT
from isthmus.kernels.numba.kv_rows import cache_at

# No fast-math anywhere in this file: rotation has no reductions to reassociate, and under a
# function's fast-math flags LLVM rewrites the inlined three-part range reduction of sincos_f32.
JIT = dict(JIT, fastmath=False)
PJIT = dict(PJIT, fastmath=False)
from isthmus.kernels.numba.simd import sincos_f32

PARALLEL_MIN = 1 << 15


def inv_freq(dim: int, theta: float, factors=()) -> np.ndarray:
    """theta^(-2i/dim) in f32 (as the op's reference), divided by the per-pair `factors` if any."""
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    return (inv / np.asarray(factors, np.float32)).astype(np.float32) if len(factors) else inv


@njit(inline="always", **JIT)
def _angles(pos, inv, cs, sn):
    p = np.float32(pos)
    for i in range(inv.shape[0]):
        sn[i], cs[i] = sincos_f32(p * inv[i])


@njit(inline="always", **JIT)
def _rotate(src, dst, cs, sn, interleaved):
    """dst = rope(src) for one head vector (src and dst 1-D, may be the same array)."""
    half = cs.shape[0]
    if interleaved:
        for i in range(half):
            a, b = src[2 * i], src[2 * i + 1]
            dst[2 * i] = a * cs[i] - b * sn[i]
            dst[2 * i + 1] = a * sn[i] + b * cs[i]
    else:
        for i in range(half):
            a, b = src[i], src[i + half]
            dst[i] = a * cs[i] - b * sn[i]
            dst[i + half] = a * sn[i] + b * cs[i]
    for j in range(2 * half, src.shape[0]):
        dst[j] = src[j]


@njit(inline="always", **JIT)
def _rope_token(x, pos, inv, interleaved, out, bs, cs, sn):
    b, s = bs
    _angles(pos[b, s], inv, cs, sn)
    for h in range(x.shape[1]):
        _rotate(x[b, h, s], out[b, h, s], cs, sn, interleaved)


@njit(**JIT)
def rope_serial(x, pos, inv, interleaved, out):
    """x, out [batch, heads, seq, head_dim]; pos [batch, seq]."""
    cs = np.empty(inv.shape[0], np.float32)
    sn = np.empty(inv.shape[0], np.float32)
    for b in range(x.shape[0]):
        for s in range(x.shape[2]):
            _rope_token(x, pos, inv, interleaved, out, (b, s), cs, sn)


@njit(**PJIT)
def rope_par(x, pos, inv, interleaved, out):
    nb, ns = x.shape[0], x.shape[2]
    for job in prange(nb * ns):
        cs = np.empty(inv.shape[0], np.float32)
        sn = np.empty(inv.shape[0], np.float32)
        _rope_token(x, pos, inv, interleaved, out, (job // ns, job % ns), cs, sn)


_INV = {}


def rope(x, positions, theta=10000.0, layout="half", dim=0, out=None, factors=()):
    x4 = np.ascontiguousarray(x, np.float32)
    d = dim or x4.shape[-1]
    pos = np.asarray(positions, np.int64)
    if pos.shape != (x4.shape[0], x4.shape[2]):
        pos = np.ascontiguousarray(np.broadcast_to(pos if pos.ndim == 2 else pos[None], (x4.shape[0], x4.shape[2])))
    out = np.empty_like(x4) if out is None else out
    key = (d, float(theta), tuple(factors))
    if key not in _INV:
        _INV[key] = inv_freq(d, theta, factors)
    fn = rope_serial if x4.size < PARALLEL_MIN else rope_par
    fn(x4, pos, _INV[key], layout == "interleaved", out)
    return out


@njit(inline="always", **JIT)
def _head_norm(x, w, eps):
    """x = rmsnorm(x) * w in place, over one head vector (as the rmsnorm op: f32, mean of squares)."""
    ss = np.float32(0.0)
    for j in range(x.shape[0]):
        ss += x[j] * x[j]
    r = np.float32(1.0) / np.sqrt(ss / np.float32(x.shape[0]) + eps)
    for j in range(x.shape[0]):
        x[j] = x[j] * r * w[j]


@njit(**JIT)
def qkv_epilogue(qkv, pos, inv, interleaved, n_q, n_kv, rope_k, q_out, k_out, v_out, past,
                 q_norm, k_norm, eps):
    """Split the fused projection qkv [batch * seq, (n_q + 2 n_kv) * hd] into heads:

    q_out [batch, n_q, seq, hd] rotated; k (rotated when rope_k) and v written into the caches
    k_out, v_out [batch, n_kv, capacity, hd] at rows past .. past + seq (the in-place KV append).
    With q_norm / k_norm [hd] (empty: none), each Q and K head is RMS-normalised first, in qkv.
    """
    nb, seq = q_out.shape[0], q_out.shape[2]
    cs = np.empty(inv.shape[0], np.float32)
    sn = np.empty(inv.shape[0], np.float32)
    for b in range(nb):
        for s in range(seq):
            _qkv_token(qkv[b * seq + s], pos[b, s], inv, interleaved, n_q, n_kv, rope_k, q_out[b], s,
                       k_out[b], v_out[b], past + s, q_norm, k_norm, eps, cs, sn)


@njit(**PJIT)
def qkv_epilogue_rows(qkv, pos, inv, interleaved, n_q, n_kv, rope_k, q_out, k_addr, v_addr, capacity, pasts,
                      q_norm, k_norm, eps):
    """`qkv_epilogue` for a batched decode step: sequence b's caches are at addresses k_addr[b],
    v_addr[b] ([n_kv, capacity, hd] each, kv_rows.py) and its rows go to pasts[b] onwards. One
    work item per sequence (a token's angles and rotations take ~3 us)."""
    nb, seq, hd = q_out.shape[0], q_out.shape[2], q_out.shape[3]
    css = np.empty((nb, 2, inv.shape[0]), np.float32)      # each sequence's angles: one allocation a call
    for b in prange(nb):
        cs, sn = css[b, 0], css[b, 1]
        k_out = cache_at(k_addr[b], n_kv, capacity, hd)
        v_out = cache_at(v_addr[b], n_kv, capacity, hd)
        for s in range(seq):
            _qkv_token(qkv[b * seq + s], pos[b, s], inv, interleaved, n_q, n_kv, rope_k, q_out[b], s,
                       k_out, v_out, pasts[b] + s, q_norm, k_norm, eps, cs, sn)


@njit(inline="always", **JIT)
def _qkv_token(row, p, inv, interleaved, n_q, n_kv, rope_k, q_out, s, k_out, v_out, at, q_norm, k_norm, eps, cs, sn):
    """One token's fused projection row: its Q heads into q_out [n_q, seq, hd] at s, its K and V
    heads into the caches [n_kv, capacity, hd] at row `at`."""
    hd = q_out.shape[2]
    _angles(p, inv, cs, sn)
    for h in range(n_q):
        if q_norm.shape[0]:
            _head_norm(row[h * hd:(h + 1) * hd], q_norm, eps)
        _rotate(row[h * hd:(h + 1) * hd], q_out[h, s], cs, sn, interleaved)
    for h in range(n_kv):
        src = row[(n_q + h) * hd:(n_q + h + 1) * hd]
        if k_norm.shape[0]:
            _head_norm(src, k_norm, eps)
        if rope_k:
            _rotate(src, k_out[h, at], cs, sn, interleaved)
        else:
            k_out[h, at] = src
        v_out[h, at] = row[(n_q + n_kv + h) * hd:(n_q + n_kv + h + 1) * hd]
