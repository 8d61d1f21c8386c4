"""Elementwise activations: swiglu (silu(gate) * up), silu, gelu; f32, flat over all elements.

Dispatch rule: fewer than `PARALLEL_MIN` elements run serially, more in parallel chunks.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from isthmus.kernels.numba import JIT, PJIT
from isthmus.kernels.numba.simd import erf_f32, exp_f32, sigmoid_f32

PARALLEL_MIN = 1 << 15
CHUNK = 4096


@njit(**JIT)
def swiglu_serial(g, u, out):
    for i in range(g.shape[0]):
        out[i] = g[i] * sigmoid_f32(g[i]) * u[i]


@njit(**JIT)
def swiglu_serial2(g, u, out):
    for t in range(g.shape[0]):
        for i in range(g.shape[1]):
            out[t, i] = g[t, i] * sigmoid_f32(g[t, i]) * u[t, i]


@njit(**PJIT)
def swiglu_par(g, u, out):
    n = g.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        for i in range(c * CHUNK, min(n, c * CHUNK + CHUNK)):
            out[i] = g[i] * sigmoid_f32(g[i]) * u[i]


@njit(inline="always", **JIT)
def _gelu_one(v, tanh_approx):
    if tanh_approx:
        z = np.float32(0.7978845608028654) * (v + np.float32(0.044715) * v * v * v)
        # tanh(z) = 2 sigmoid(2z) - 1
        return np.float32(0.5) * v * (np.float32(2.0) * sigmoid_f32(np.float32(2.0) * z))
    return np.float32(0.5) * v * (np.float32(1.0) + erf_f32(v * np.float32(0.7071067811865476)))


@njit(**JIT)
def silu_serial(x, out):
    for i in range(x.shape[0]):
        out[i] = x[i] * sigmoid_f32(x[i])


@njit(**PJIT)
def silu_par(x, out):
    n = x.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        for i in range(c * CHUNK, min(n, c * CHUNK + CHUNK)):
            out[i] = x[i] * sigmoid_f32(x[i])


@njit(**JIT)
def gelu_serial(x, out, tanh_approx):
    for i in range(x.shape[0]):
        out[i] = _gelu_one(x[i], tanh_approx)


@njit(**PJIT)
def gelu_par(x, out, tanh_approx):
    n = x.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        for i in range(c * CHUNK, min(n, c * CHUNK + CHUNK)):
            out[i] = _gelu_one(x[i], tanh_approx)


def _flat(x):
    if x.dtype == np.float32 and x.flags.c_contiguous:
        return x.reshape(-1)
    return np.ascontiguousarray(x, np.float32).reshape(-1)


def swiglu(g, u, out=None):
    if (out is not None and g.size < PARALLEL_MIN and g.shape == u.shape == out.shape and g.dtype == u.dtype
            == np.float32 and g.flags.c_contiguous and u.flags.c_contiguous and g.ndim == 2):
        swiglu_serial2(g, u, out)          # a decode step: no reshaping on the way in
        return out
    g1, u1 = _flat(g), _flat(u if u.shape == g.shape else np.broadcast_to(u, g.shape))
    out1 = np.empty_like(g1) if out is None else out.reshape(-1)
    (swiglu_serial if g1.size < PARALLEL_MIN else swiglu_par)(g1, u1, out1)
    return out1.reshape(g.shape)


def silu(x):
    x1 = _flat(x)
    out = np.empty_like(x1)
    (silu_serial if x1.size < PARALLEL_MIN else silu_par)(x1, out)
    return out.reshape(x.shape)


def gelu(x, approximate="none"):
    x1 = _flat(x)
    out = np.empty_like(x1)
    (gelu_serial if x1.size < PARALLEL_MIN else gelu_par)(x1, out, approximate == "tanh")
    return out.reshape(x.shape)


__all__ = ["swiglu", "silu", "gelu", "swiglu_serial", "swiglu_par", "exp_f32"]
