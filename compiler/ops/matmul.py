"""Matrix products and table lookups, including GGUF-quantized weights.

`linear` takes its weight as [out_features, in_features] (the GGUF and HF layout), so a
quantized weight is used as stored, one quantization block run per output row.
"""

import numpy as np

from isthmus.compiler.ir import TensorType
from isthmus.compiler.ops.registry import ROW_WISE, broadcast_shapes, define, fail, float_result, same_dim


def dense(w) -> np.ndarray:
    """A weight as a float array: quantized storage is dequantized to f32."""
    return w.dequantize() if hasattr(w, "dequantize") else w


def _matmul_rule(types, attrs):
    a, b = types
    if a.rank < 1 or b.rank < 1:
        fail("matmul operands must have rank >= 1")
    a_shape = (1,) + a.shape if a.rank == 1 else a.shape
    b_shape = b.shape + (1,) if b.rank == 1 else b.shape
    if not same_dim(a_shape[-1], b_shape[-2]):
        fail(f"matmul contraction dims differ: {a} @ {b}")
    batch = broadcast_shapes(a_shape[:-2], b_shape[:-2])
    shape = batch + ((a_shape[-2],) if a.rank > 1 else ()) + ((b_shape[-1],) if b.rank > 1 else ())
    same_int = a.dtype == b.dtype and a.dtype in ("i64", "i32", "i8", "u8")
    return TensorType(shape, a.dtype if same_int else float_result(a, b))


def matmul(a, b):
    out = np.matmul(a, dense(b))
    if a.dtype.kind in "iu" and getattr(b, "dtype", None) == a.dtype:
        return out
    # as the rule says: the first float operand's type (numpy would promote f16 @ f32 to f32)
    floats = [x.dtype for x in (a, b) if isinstance(x, np.ndarray) and x.dtype.kind == "f"]
    return out.astype(floats[0] if floats else np.float32, copy=False)


define("matmul", infer=_matmul_rule, reference=matmul, inputs=2, traits={ROW_WISE}, doc="numpy matmul semantics")


def _linear_rule(types, attrs):
    x, w = types[0], types[1]
    if w.rank != 2:
        fail(f"linear weight must be [out, in], got {w}")
    if not same_dim(x.shape[-1], w.shape[1]):
        fail(f"linear input {x} does not match weight {w} (in_features {w.shape[1]})")
    if len(types) == 3 and (types[2].rank != 1 or not same_dim(types[2].shape[0], w.shape[0])):
        fail(f"linear bias {types[2]} does not match weight {w}")
    return TensorType(x.shape[:-1] + (w.shape[0],), float_result(x))


def linear(x, weight, bias=None):
    w = dense(weight)
    # a 2-D product goes to BLAS; numpy's batched matmul of [b, s, k] @ [k, n] does not
    y = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(x.shape[:-1] + (w.shape[0],))
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype, copy=False)


define("linear", infer=_linear_rule, reference=linear, inputs=(2, 3), traits={ROW_WISE},
       doc="x @ weight.T + bias, weight [out, in], possibly quantized (q4_0, q4_1, q8_0, f16, bf16)")


def _embedding_rule(types, attrs):
    table, ids = types
    if table.rank != 2:
        fail(f"embedding table must be [vocab, dim], got {table}")
    if ids.dtype not in ("i64", "i32"):
        fail(f"embedding ids must be integers, got {ids.dtype}")
    return TensorType(ids.shape + (table.shape[1],), "f32" if table.dtype not in ("f16", "f64") else table.dtype)


def embedding(table, ids):
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        from isthmus.errors import InputError
        raise InputError(f"token id out of range [0, {table.shape[0]}): min {ids.min()}, max {ids.max()}")
    flat = ids.reshape(-1)
    rows = table.rows(flat) if hasattr(table, "rows") else table[flat]
    out = np.asarray(rows)
    if out.dtype not in (np.float16, np.float64):
        out = out.astype(np.float32, copy=False)
    return out.reshape(ids.shape + (table.shape[1],))


define("embedding", infer=_embedding_rule, reference=embedding, inputs=2, traits={ROW_WISE}, doc="table[ids]")
