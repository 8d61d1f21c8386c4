"""Tensors made from shapes: shape, range, constant_of_shape, and the triangle select trilu.

These carry the dynamic-shape computations exporters emit (`Shape -> Gather -> Range`,
`ConstantOfShape -> Trilu` for a causal mask). `range` and `constant_of_shape` build a
result whose size is known only at run time, so they also take the result's dims as an
attribute (ints or symbols such as "seq"): the attribute is the result's type, the inputs
give the values. The frontend proves the two agree; the reference checks it where it can.
"""

import numpy as np

from isthmus.compiler.ir import TensorType, numpy_dtype
from isthmus.compiler.ops.registry import REQUIRED, define, fail


def _shape_rule(types, attrs):
    rank = types[0].rank
    return TensorType((len(range(rank)[attrs["start"]:attrs["end"]]),), "i64")


define("shape", infer=_shape_rule, attrs={"start": 0, "end": None},
       reference=lambda x, start, end: np.array(x.shape[start:end], dtype=np.int64),
       doc="the dims of x (x.shape[start:end]) as an i64 vector")


def _check_dims(got, dims, what):
    for g, d in zip(got, dims):
        if isinstance(d, int) and g != d:
            fail(f"{what} has dims {tuple(got)}, its type says {tuple(dims)}")


def _range_rule(types, attrs):
    start, limit, delta = types
    if not start.dtype == limit.dtype == delta.dtype:
        fail(f"range operands differ in type: {start.dtype}, {limit.dtype}, {delta.dtype}")
    if any(t.rank for t in types):
        fail("range operands must be scalars")
    return TensorType((attrs["length"],), start.dtype)


def range_(start, limit, delta, length):
    out = np.arange(start, limit, delta, dtype=start.dtype)
    _check_dims(out.shape, (length,), "range")
    return out


define("range", infer=_range_rule, reference=range_, attrs={"length": REQUIRED}, inputs=3,
       doc="arange(start, limit, delta); `length` is the result's length (an int or a symbol)")


def _constant_of_shape_rule(types, attrs):
    s = types[0]
    dims = tuple(attrs["dims"])
    if s.dtype not in ("i64", "i32") or s.rank != 1:
        fail(f"constant_of_shape takes an integer vector, got {s}")
    if isinstance(s.shape[0], int) and s.shape[0] != len(dims):
        fail(f"constant_of_shape: shape vector {s} does not match dims {list(dims)}")
    return TensorType(dims, attrs["dtype"])


def constant_of_shape(shape, value, dtype, dims):
    out = np.full(tuple(int(d) for d in shape), value, dtype=numpy_dtype(dtype))
    _check_dims(out.shape, dims, "constant_of_shape")
    return out


define("constant_of_shape", infer=_constant_of_shape_rule, reference=constant_of_shape,
       attrs={"value": 0.0, "dtype": "f32", "dims": REQUIRED},
       doc="a tensor of the given shape filled with `value`; `dims` is its type")


def _trilu_rule(types, attrs):
    t = types[0]
    if t.rank < 2:
        fail(f"trilu needs rank >= 2, got {t}")
    return t


def trilu(x, upper, k):
    return np.triu(x, k) if upper else np.tril(x, k)


define("trilu", infer=_trilu_rule, reference=trilu, attrs={"upper": True, "k": 0},
       doc="keep the upper (j - i >= k) or lower (j - i <= k) triangle of the last two axes, zero the rest")
