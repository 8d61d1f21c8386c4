"""Data movement: reshape, transpose, concat, split, slice, gather, (un)squeeze, expand."""

import math

import numpy as np

from isthmus.compiler.ir import TensorType
from isthmus.compiler.ops.registry import (ROW_WISE, SHAPE_ONLY, add_dims, broadcast_shapes, define, fail,
                                           norm_axis, same_dim)

INT64_MAX = 2**63 - 1


def _reshape_rule(types, attrs):
    """ONNX semantics: 0 copies the input dim at that index, -1 is inferred."""
    t = types[0]
    target = list(attrs["shape"])
    if target.count(-1) > 1:
        fail("reshape has more than one -1")
    if any(d < -1 for d in target):
        fail(f"reshape target {target} has a negative dim other than -1")
    out: list = []
    leftover = []          # input dims not copied through a 0
    for i, d in enumerate(t.shape):
        if not (i < len(target) and target[i] == 0):
            leftover.append(d)
    for i, d in enumerate(target):
        if d == 0:
            if i >= t.rank:
                fail(f"reshape 0 at index {i} beyond input rank {t.rank}")
            out.append(t.shape[i])
        else:
            out.append(d)
    if -1 in out:
        known = math.prod(d for j, d in enumerate(target) if d not in (0, -1))
        ints = math.prod(d for d in leftover if isinstance(d, int))
        syms = [d for d in leftover if isinstance(d, str)]
        if ints % max(known, 1):
            fail(f"cannot reshape {t} to {target}")
        rest = ints // max(known, 1)
        if not syms:
            inferred = rest
        elif len(syms) == 1 and rest == 1:
            inferred = syms[0]
        else:
            inferred = "*".join(syms + ([str(rest)] if rest != 1 else []))
        out[out.index(-1)] = inferred
    elif t.is_static and math.prod(out) != math.prod(t.shape):
        fail(f"cannot reshape {t} to {target}")
    return TensorType(tuple(out), t.dtype)


def reshape(x, shape):
    target = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(target)


define("reshape", infer=_reshape_rule, reference=reshape, attrs={"shape": None}, traits={SHAPE_ONLY, ROW_WISE})


def _transpose_rule(types, attrs):
    t = types[0]
    perm = attrs["perm"] or list(reversed(range(t.rank)))
    if sorted(perm) != list(range(t.rank)):
        fail(f"transpose perm {perm} is not a permutation of rank {t.rank}")
    return TensorType(tuple(t.shape[p] for p in perm), t.dtype)


define("transpose", infer=_transpose_rule, reference=lambda x, perm: np.transpose(x, perm or None),
       attrs={"perm": None}, traits={SHAPE_ONLY, ROW_WISE})


def _concat_rule(types, attrs):
    first = types[0]
    axis = norm_axis(attrs["axis"], first.rank)
    for t in types[1:]:
        if t.rank != first.rank or t.dtype != first.dtype:
            fail(f"concat operands differ: {first} vs {t}")
    shape = list(first.shape)
    shape[axis] = add_dims(*(t.shape[axis] for t in types))
    for t in types[1:]:
        for i in range(first.rank):
            if i != axis and not same_dim(t.shape[i], first.shape[i]):
                fail(f"concat operands differ off the axis: {first} vs {t}")
    return TensorType(tuple(shape), first.dtype)


define("concat", infer=_concat_rule, reference=lambda *xs, axis: np.concatenate(xs, axis=axis),
       attrs={"axis": 0}, inputs=(1, 1 << 16), traits={SHAPE_ONLY, ROW_WISE})


def _split_rule(types, attrs):
    t = types[0]
    axis = norm_axis(attrs["axis"], t.rank)
    sizes = attrs["sizes"]
    if isinstance(t.shape[axis], int) and sum(sizes) != t.shape[axis]:
        fail(f"split sizes {sizes} do not add up to dim {t.shape[axis]}")
    return [TensorType(t.shape[:axis] + (s,) + t.shape[axis + 1:], t.dtype) for s in sizes]


def split(x, axis, sizes):
    parts = tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))
    return parts if len(parts) > 1 else parts[0]   # a one-output node's reference returns the array


define("split", infer=_split_rule, reference=split, attrs={"axis": 0, "sizes": None}, traits={SHAPE_ONLY})


def _slice_dim(d, start, end, step):
    if isinstance(d, int):
        return len(range(*slice(start, end, step).indices(d)))
    if step == 1 and start == 0 and end >= INT64_MAX // 2:
        return d
    if step == 1 and 0 <= start <= end < INT64_MAX // 2:
        # the result is at most end - start; exact only if the symbol is large enough
        return f"{d}[{start}:{end}]"
    return f"{d}[{start}:{end}:{step}]"


def _slice_rule(types, attrs):
    t = types[0]
    starts, ends = attrs["starts"], attrs["ends"]
    axes = attrs["axes"] or list(range(len(starts)))
    steps = attrs["steps"] or [1] * len(starts)
    shape = list(t.shape)
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st == 0:
            fail("slice step 0")
        a = norm_axis(a, t.rank)
        shape[a] = _slice_dim(shape[a], s, e, st)
    return TensorType(tuple(shape), t.dtype)


def slice_(x, starts, ends, axes=None, steps=None):
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    idx = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        idx[a] = slice(s, e, st)
    return x[tuple(idx)]


define("slice", infer=_slice_rule, reference=slice_, traits={SHAPE_ONLY},
       attrs={"starts": None, "ends": None, "axes": None, "steps": None})


def _gather_rule(types, attrs):
    data, idx = types
    axis = norm_axis(attrs["axis"], data.rank)
    if idx.dtype not in ("i64", "i32"):
        fail(f"gather indices must be integers, got {idx.dtype}")
    return TensorType(data.shape[:axis] + idx.shape + data.shape[axis + 1:], data.dtype)


def gather(data, indices, axis=0):
    indices = np.asarray(indices)
    n = data.shape[axis]
    if indices.size and (indices.min() < -n or indices.max() >= n):
        from isthmus.errors import InputError
        raise InputError(f"gather index out of range for dim {n}")
    return np.take(data, np.where(indices < 0, indices + n, indices), axis=axis)


define("gather", infer=_gather_rule, reference=gather, attrs={"axis": 0}, inputs=2, traits={SHAPE_ONLY})


def _unsqueeze_rule(types, attrs):
    t = types[0]
    rank = t.rank + len(attrs["axes"])
    axes = sorted(norm_axis(a, rank) for a in attrs["axes"])
    shape = list(t.shape)
    for a in axes:
        shape.insert(a, 1)
    return TensorType(tuple(shape), t.dtype)


def unsqueeze(x, axes):
    rank = x.ndim + len(axes)
    return np.expand_dims(x, tuple(sorted(a % rank for a in axes)))


define("unsqueeze", infer=_unsqueeze_rule, reference=unsqueeze, attrs={"axes": None}, traits={SHAPE_ONLY})


def _squeeze_rule(types, attrs):
    t = types[0]
    axes = {norm_axis(a, t.rank) for a in attrs["axes"]}
    for a in axes:
        if isinstance(t.shape[a], int) and t.shape[a] != 1:
            fail(f"cannot squeeze dim {a} of size {t.shape[a]}")
    return TensorType(tuple(d for i, d in enumerate(t.shape) if i not in axes), t.dtype)


define("squeeze", infer=_squeeze_rule, reference=lambda x, axes: np.squeeze(x, tuple(axes)),
       attrs={"axes": None}, traits={SHAPE_ONLY})


def _expand_rule(types, attrs):
    t = types[0]
    return TensorType(broadcast_shapes(t.shape, tuple(attrs["shape"])), t.dtype)


def expand(x, shape):
    return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(shape))).copy()


define("expand", infer=_expand_rule, reference=expand, attrs={"shape": None}, traits={SHAPE_ONLY})
