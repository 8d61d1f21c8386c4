"""rmsnorm and layernorm over the last axis, f32, one pass for the statistics and one to write.

Dispatch rule (`rmsnorm`, `layernorm`): fewer than `PARALLEL_MIN` elements run serially (a
parallel launch costs ~10 us, more than normalising a decode step's 576 values); more split the
rows across threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from isthmus.kernels.numba import JIT, PJIT

PARALLEL_MIN = 1 << 15


@njit(inline="always", **JIT)
def _rms_row(x, w, eps, out, t):
    k = x.shape[1]
    ss = np.float32(0.0)
    for j in range(k):
        ss += x[t, j] * x[t, j]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(k) + eps)
    for j in range(k):
        out[t, j] = x[t, j] * inv * w[j]


@njit(**JIT)
def rmsnorm_into(x, w, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * w, rows of x [n, k] (serial: the matvec prologue)."""
    eps = np.float32(eps)
    for t in range(x.shape[0]):
        _rms_row(x, w, eps, out, t)


@njit(**PJIT)
def rmsnorm_par(x, w, eps, out):
    eps = np.float32(eps)
    for t in prange(x.shape[0]):
        _rms_row(x, w, eps, out, t)


@njit(inline="always", **JIT)
def _ln_row(x, w, b, eps, out, t):
    k = x.shape[1]
    s = np.float32(0.0)
    for j in range(k):
        s += x[t, j]
    mu = s / np.float32(k)
    v = np.float32(0.0)
    for j in range(k):
        v += (x[t, j] - mu) * (x[t, j] - mu)
    inv = np.float32(1.0) / np.sqrt(v / np.float32(k) + eps)
    for j in range(k):
        out[t, j] = (x[t, j] - mu) * inv * w[j] + b[j]


@njit(**PJIT)
def layernorm_par(x, w, b, eps, out):
    eps = np.float32(eps)
    for t in prange(x.shape[0]):
        _ln_row(x, w, b, eps, out, t)


@njit(**JIT)
def layernorm_serial(x, w, b, eps, out):
    eps = np.float32(eps)
    for t in range(x.shape[0]):
        _ln_row(x, w, b, eps, out, t)


def _rows(x):
    if x.dtype == np.float32 and x.flags.c_contiguous:
        return x.reshape(-1, x.shape[-1])
    return np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])


def rmsnorm(x, w, eps, out=None):
    """rmsnorm of any-rank f32 x over its last axis (the op's reference semantics)."""
    x2 = _rows(x)
    out2 = np.empty_like(x2) if out is None else out.reshape(x2.shape)
    if w.dtype != np.float32 or not w.flags.c_contiguous:
        w = np.ascontiguousarray(w, np.float32)
    (rmsnorm_into if x2.size < PARALLEL_MIN else rmsnorm_par)(x2, w, np.float32(eps), out2)
    return out2.reshape(x.shape)


def layernorm(x, w, b=None, eps=1e-5, out=None):
    x2 = _rows(x)
    out2 = np.empty_like(x2) if out is None else out.reshape(x2.shape)
    b = np.zeros(x2.shape[1], np.float32) if b is None else np.ascontiguousarray(b, np.float32)
    (layernorm_serial if x2.size < PARALLEL_MIN else layernorm_par)(
        x2, np.ascontiguousarray(w, np.float32), b, np.float32(eps), out2)
    return out2.reshape(x.shape)
