"""A batch's KV caches by address: the caches of the sequences in a batched decode step are
separate arrays (each decoder owns its own, preallocated for its context), so a batched kernel
takes a table of their data addresses, one int64 per sequence, and views sequence b's cache as
an array in place (no copy, no pool of slots). The caller keeps the arrays alive for the call.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from isthmus.kernels.numba import JIT


@intrinsic
def _f32_ptr(typingctx, addr):
    sig = types.CPointer(types.float32)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.FloatType()))
    return sig, codegen


@njit(inline="always", **JIT)
def cache_at(addr, heads, capacity, head_dim):
    """The [heads, capacity, head_dim] f32 cache whose data starts at `addr`."""
    return carray(_f32_ptr(addr), (heads, capacity, head_dim), np.float32)


def batch_addresses(a: np.ndarray) -> np.ndarray:
    """The data address of each batch row of a C-contiguous f32 [batch, heads, capacity, head_dim]."""
    assert a.flags.c_contiguous and a.dtype == np.float32
    return a.ctypes.data + a.strides[0] * np.arange(a.shape[0], dtype=np.int64)


def address(a: np.ndarray) -> int:
    """The data address of one sequence's cache [1, heads, capacity, head_dim] (C-contiguous)."""
    assert a.flags.c_contiguous and a.dtype == np.float32 and a.shape[0] == 1
    return a.ctypes.data
