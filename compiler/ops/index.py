"""Gathers by several indices at once: gather_nd.

`gather_nd(data, indices)` reads data[indices[..., 0], ..., indices[..., K-1]] (ONNX GatherND
with batch_dims = 0): indices [..., K] picks one element (K = rank) or one slice (K < rank) of
data per index tuple. The ONNX frontend reads a flattened tensor through it when the flat dim is
a product the dim language cannot spell (a padding mask [batch, past+seq] flattened and indexed
with b * (past+seq) + j).
"""

import numpy as np

from isthmus.compiler.ir import TensorType
from isthmus.compiler.ops.registry import define, fail


def _gather_nd_rule(types, attrs):
    data, idx = types
    if idx.dtype not in ("i64", "i32"):
        fail(f"gather_nd indices must be integers, got {idx.dtype}")
    if idx.rank < 1 or not isinstance(idx.shape[-1], int):
        fail(f"gather_nd indices must end in a static dim (the index depth), got {idx}")
    k = idx.shape[-1]
    if not 1 <= k <= data.rank:
        fail(f"gather_nd index depth {k} must be between 1 and the data rank {data.rank}")
    return TensorType(idx.shape[:-1] + data.shape[k:], data.dtype)


def gather_nd(data, indices):
    indices = np.asarray(indices)
    k = indices.shape[-1]
    cols = []
    for j in range(k):
        i, n = indices[..., j], data.shape[j]
        if i.size and (i.min() < -n or i.max() >= n):
            from isthmus.errors import InputError
            raise InputError(f"gather_nd index out of range for dim {j} of size {n}")
        cols.append(np.where(i < 0, i + n, i))
    return np.asarray(data[tuple(cols)])


define("gather_nd", infer=_gather_nd_rule, reference=gather_nd, inputs=2,
       doc="data[indices[..., 0], ..., indices[..., K-1]]: one element or slice of data per index tuple")
