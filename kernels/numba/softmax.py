"""softmax over the last axis (f32), rows of all -inf giving zeros as the reference does.

exp is `simd.exp_f32`, inlined so the loop vectorises (libm's expf would be a call per element).
Dispatch rule: fewer than `PARALLEL_MIN` elements run serially, more split rows across threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from isthmus.kernels.numba import JIT, PJIT
from isthmus.kernels.numba.simd import exp_f32

PARALLEL_MIN = 1 << 14


@njit(inline="always", **JIT)
def softmax_row(x, out, t, n):
    """out[t, :n] = softmax(x[t, :n]); also the attention kernels' inner step."""
    mx = np.float32(-np.inf)
    for j in range(n):
        mx = max(mx, x[t, j])
    if mx == np.float32(-np.inf):
        mx = np.float32(0.0)
    s = np.float32(0.0)
    for j in range(n):
        e = exp_f32(x[t, j] - mx)
        out[t, j] = e
        s += e
    inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
    for j in range(n):
        out[t, j] *= inv


@njit(**JIT)
def softmax_serial(x, out):
    for t in range(x.shape[0]):
        softmax_row(x, out, t, x.shape[1])


@njit(**PJIT)
def softmax_par(x, out):
    for t in prange(x.shape[0]):
        softmax_row(x, out, t, x.shape[1])


def softmax(x, axis=-1, out=None):
    if axis not in (-1, x.ndim - 1):
        return np.moveaxis(softmax(np.moveaxis(x, axis, -1)), -1, axis)
    x2 = x.reshape(-1, x.shape[-1]) if x.dtype == np.float32 and x.flags.c_contiguous else \
        np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    out2 = np.empty_like(x2) if out is None else out.reshape(x2.shape)
    (softmax_serial if x2.size < PARALLEL_MIN else softmax_par)(x2, out2)
    return out2.reshape(x.shape)
