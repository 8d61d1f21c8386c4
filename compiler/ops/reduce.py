"""Reductions along axes, and softmax."""

import numpy as np

from isthmus.compiler.ir import TensorType
from isthmus.compiler.ops.registry import ROW_WISE, define, fail, norm_axis


def _reduce_rule(types, attrs):
    t = types[0]
    axes = attrs["axes"]
    if axes is None:
        axes = list(range(t.rank))
    normed = [norm_axis(a, t.rank) for a in axes]
    if len(set(normed)) != len(normed):
        fail(f"reduction axes {list(axes)} name an axis twice")
    axes = set(normed)
    if attrs["keepdims"]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(t.shape))
    else:
        shape = tuple(d for i, d in enumerate(t.shape) if i not in axes)
    return TensorType(shape, t.dtype)


def _reducer(fn):
    def ref(x, axes, keepdims):
        axis = None if axes is None else tuple(axes)
        return np.asarray(fn(x, axis=axis, keepdims=bool(keepdims))).astype(x.dtype, copy=False)
    return ref


for _name, _fn in {"reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max}.items():
    define(_name, infer=_reduce_rule, reference=_reducer(_fn), attrs={"axes": None, "keepdims": True})


def _softmax_rule(types, attrs):
    t = types[0]
    norm_axis(attrs["axis"], t.rank)
    if t.dtype not in ("f32", "f16", "f64"):
        fail(f"softmax needs a float input, got {t.dtype}")
    return t


def softmax(x, axis=-1):
    x32 = x.astype(np.float32, copy=False)
    m = np.max(x32, axis=axis, keepdims=True)
    # rows that are entirely -inf (fully masked) give zeros, not NaN
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x32 - m)
    s = np.sum(e, axis=axis, keepdims=True)
    return (e / np.where(s == 0, 1.0, s)).astype(x.dtype, copy=False)


define("softmax", infer=_softmax_rule, reference=softmax, attrs={"axis": -1}, traits={ROW_WISE})
