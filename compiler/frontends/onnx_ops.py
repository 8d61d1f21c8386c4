"""The ONNX op table: one handler per ONNX op, mapping it onto IR ops (compiler/ops).

A handler takes a `NodeContext` and returns the IR value(s) for the node's outputs. Shape
operands (Reshape's target, Slice's bounds, axes given as inputs) must be known while
importing: as constants, or as dims tracked through Shape/Gather/Concat (see onnx.py).
"""

from __future__ import annotations

import numpy as np

from isthmus.compiler.frontends.onnx import DIM_OPS, DTYPES, all_ints, dim_div, dim_sub, dims_product
from isthmus.compiler.ir import Value, dtype_name, numpy_dtype
from isthmus.compiler.ops import get_op
from isthmus.compiler.ops.registry import norm_axis
from isthmus.compiler.ops.shape import INT64_MAX
from isthmus.errors import UnsupportedError

FLOATS = ("f32", "f16", "f64")
HANDLERS: dict[tuple[str, str], object] = {}


def on(*op_types: str, domains=("", "ai.onnx")):
    def register(fn):
        for op in op_types:
            for d in domains:
                HANDLERS[(d, op)] = fn
        return fn
    return register


class NodeContext:
    """One ONNX node being imported: its inputs as IR values, its attributes, emit helpers."""

    def __init__(self, imp, node, where: str):
        from onnx import helper

        self.imp, self.node, self.where, self.op = imp, node, where, node.op_type
        self.ins: list[Value | None] = [imp.env[n] if n else None for n in node.input]
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.name = next((o for o in node.output if o), where)

    def attr(self, key, default=None):
        v = self.attrs.get(key, default)
        return v.decode() if isinstance(v, bytes) else v

    def input(self, i: int) -> Value | None:
        return self.ins[i] if i < len(self.ins) else None

    def unsupported(self, msg: str):
        raise UnsupportedError(f"{self.imp.path.name}: node {self.where} ({self.op}): {msg}")

    def emit(self, op: str, inputs, attrs=None, *, known=None, suffix: str = ""):
        name = f"{self.name}/{suffix}" if suffix else self.name
        out = self.imp.add(op, list(inputs), attrs or {}, name=name, source=self.where, known=known)
        if isinstance(out, list) and not suffix:      # several outputs: give each its ONNX name
            for v, onnx_name in zip(out, self.node.output):
                if onnx_name and v.name != onnx_name and onnx_name not in self.imp.g._names:
                    self.imp.g._names.discard(v.name)
                    v.name = onnx_name
                    self.imp.g._names.add(onnx_name)
        return out

    def const(self, array, suffix: str) -> Value:
        return self.imp.g.add_constant(f"{self.name}/{suffix}", np.asarray(array))

    def dims(self, i: int, what: str) -> list:
        """Input i's value as a list of dims (ints or symbols); it must be known."""
        val = self.imp.value_of(self.input(i))
        if val is None or any(d is None for d in val.flat):
            self.unsupported(f"the {what} must be a constant or computed from shapes")
        return [int(d) if isinstance(d, (int, np.integer)) else d for d in val.reshape(-1)]

    def ints(self, i: int, what: str) -> list[int]:
        val = self.dims(i, what)
        if not all_ints(val):
            self.unsupported(f"the {what} depends on a dynamic dim ({val})")
        return [int(d) for d in val]

    def axes(self, what="axes", attr="axes"):
        """Axes given as an attribute (older opsets) or as input 1 (newer ones); None if absent."""
        if attr in self.attrs:
            return list(self.attrs[attr])
        return self.ints(1, what) if self.input(1) is not None else None


# -- elementwise -----------------------------------------------------------------------------

_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow",
           "Equal": "equal", "Less": "less", "Greater": "greater", "And": "and", "Or": "or"}


def _dims_fn(op_type):
    fn = DIM_OPS.get(op_type)
    return (lambda a, b: np.frompyfunc(fn, 2, 1)(a, b)) if fn else None


@on(*_BINARY)
def _binary(n: NodeContext):
    a, b = n.ins[:2]
    if n.op == "Pow" and b.dtype != a.dtype:     # ONNX lets the exponent have its own type
        b = n.emit("cast", [b], {"to": a.dtype}, suffix="exponent")
    return n.emit(_BINARY[n.op], [a, b], known=_dims_fn(n.op))


@on("Max", "Min")
def _variadic(n: NodeContext):
    out = n.ins[0]
    for i, v in enumerate(n.ins[1:]):
        last = i == len(n.ins) - 2
        out = n.emit(n.op.lower(), [out, v], known=_dims_fn(n.op), suffix="" if last else f"{i}")
    return out


@on("LessOrEqual", "GreaterOrEqual")
def _compare_or_equal(n: NodeContext):
    a, b = n.ins
    if a.dtype in FLOATS:   # not(a > b) differs from a <= b on NaN
        n.unsupported("comparison of floats")
    strict = n.emit("greater" if n.op == "LessOrEqual" else "less", [a, b], suffix="strict")
    return n.emit("not", [strict])


@on("IsNaN")
def _isnan(n: NodeContext):
    x = n.ins[0]
    return n.emit("not", [n.emit("equal", [x, x], suffix="self_equal")])   # only NaN differs from itself


_UNARY = {"Neg": "neg", "Abs": "abs", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Reciprocal": "reciprocal",
          "Erf": "erf", "Tanh": "tanh", "Sigmoid": "sigmoid", "Cos": "cos", "Sin": "sin", "Not": "not"}


@on(*_UNARY)
def _unary(n: NodeContext):
    return n.emit(_UNARY[n.op], [n.ins[0]])


@on("Relu")
def _relu(n: NodeContext):
    x = n.ins[0]
    return n.emit("max", [x, n.const(np.zeros((), numpy_dtype(x.dtype)), "zero")])


@on("Gelu")
def _gelu(n: NodeContext):
    return n.emit("gelu", [n.ins[0]], {"approximate": n.attr("approximate", "none")})


def _where_known(c, a, b):
    if any(x is None for x in np.asarray(c, dtype=object).flat):
        return None
    return np.where(np.asarray(c, dtype=bool), a, b)


@on("Where")
def _where(n: NodeContext):
    return n.emit("where", n.ins[:3], known=_where_known)


def _ir_dtype(n: NodeContext, onnx_type: int) -> str:
    if onnx_type not in DTYPES:
        n.unsupported(f"cast to ONNX element type {onnx_type}")
    return DTYPES[onnx_type]


@on("Cast", "CastLike")
def _cast(n: NodeContext):
    x = n.ins[0]
    to = n.ins[1].dtype if n.op == "CastLike" else _ir_dtype(n, n.attr("to"))
    if to == x.dtype:
        return x
    keep = to in ("i64", "i32") and x.dtype in ("i64", "i32")
    return n.emit("cast", [x], {"to": to}, known=(lambda v: v) if keep else None)


@on("Identity")
def _identity(n: NodeContext):
    return n.ins[0]


@on("Dropout")
def _dropout(n: NodeContext):
    if len(n.node.output) > 1 and n.node.output[1]:
        n.unsupported("the mask output of Dropout")
    return n.ins[0]


# -- matrix products, normalisation, softmax, reductions -------------------------------------

def _rows_source(a: Value) -> Value | None:
    """src when a = reshape(src) merges src's leading dims into one ([b, s, d] -> [b*s, d])."""
    p = a.producer
    if p is None or p.op != "reshape" or a.type.rank != 2:
        return None
    src = p.inputs[0]
    return src if src.type.rank > 2 and dims_product(src.shape[:-1]) == a.shape[0] \
        and src.shape[-1] == a.shape[-1] else None


def _rows_of(n: NodeContext, a: Value) -> Value | None:
    """_rows_source(a), also when a merges trailing dims too ([b, s, h, d] -> [b*s, h*d]: the
    source is first reshaped to [b, s, h*d], which the IR can write)."""
    src = _rows_source(a)
    p = a.producer
    if src is not None or p is None or p.op != "reshape" or a.type.rank != 2 or not isinstance(a.shape[1], int):
        return src
    x = p.inputs[0]
    for j in range(2, x.type.rank - 1):
        if dims_product(x.shape[:j]) == a.shape[0] and dims_product(x.shape[j:]) == a.shape[1]:
            return n.emit("reshape", [x], {"shape": [0] * j + [a.shape[1]]}, suffix="unmerged")
    return None


def _on_rows(n: NodeContext, a: Value, build):
    """build(a, suffix) computes row-wise on a. When a merges the leading dims of some src (HF's
    Conv1D: x.view(-1, d) @ w then .view(b, s, -1)), compute on src and merge afterwards: the
    later reshape back to [b, s, n] then finds the unmerged value, since the IR cannot split a
    dim into two dynamic ones."""
    src = _rows_of(n, a)
    if src is None:
        return build(a, "")
    y = build(src, "rows")
    return n.emit("reshape", [y], {"shape": reshape_attr(n, y.shape, [dims_product(y.shape[:-1]), y.shape[-1]])})


@on("MatMul")
def _matmul(n: NodeContext):
    a, b = n.ins[:2]
    if b.type.rank != 2:
        return n.emit("matmul", [a, b])
    return _on_rows(n, a, lambda x, suffix: n.emit("matmul", [x, b], suffix=suffix))


@on("Gemm")
def _gemm(n: NodeContext):
    a, b, c = n.ins[0], n.ins[1], n.input(2)
    alpha, beta = float(n.attr("alpha", 1.0)), float(n.attr("beta", 1.0))
    if n.attr("transA", 0):
        a = n.emit("transpose", [a], {"perm": [1, 0]}, suffix="a_t")
    if n.attr("transB", 0) and not (alpha == 1.0 and (c is None or (beta == 1.0 and c.type.rank == 1))):
        b = n.emit("transpose", [b], {"perm": [1, 0]}, suffix="b_t")
        as_linear = False
    else:
        as_linear = bool(n.attr("transB", 0))   # b is [out, in], as linear wants it

    def build(x, suffix):
        if as_linear:
            return n.emit("linear", [x, b] + ([c] if c is not None else []), suffix=suffix)
        y = n.emit("matmul", [x, b], suffix=f"{suffix}ab" if (alpha != 1.0 or c is not None) else suffix)
        if alpha != 1.0:
            y = n.emit("mul", [y, n.const(np.asarray(alpha, numpy_dtype(y.dtype)), "alpha")],
                       suffix=f"{suffix}scaled" if c is not None else suffix)
        if c is None:
            return y
        cc = c if beta == 1.0 else n.emit("mul", [c, n.const(np.asarray(beta, numpy_dtype(c.dtype)), "beta")],
                                          suffix="c")
        return n.emit("add", [y, cc], suffix=suffix)

    rowwise = c is None or c.type.rank <= 1 or c.shape[0] == 1
    return _on_rows(n, a, build) if rowwise else build(a, "")


def _last_axis(n: NodeContext, axis: int, rank: int):
    if norm_axis(axis, rank) != rank - 1:
        n.unsupported(f"normalisation over axis {axis} (isthmus normalises the last axis)")


@on("LayerNormalization")
def _layernorm(n: NodeContext):
    x, scale, bias = n.ins[0], n.ins[1], n.input(2)
    _last_axis(n, n.attr("axis", -1), x.type.rank)
    if any(n.node.output[1:]):
        n.unsupported("the Mean / InvStdDev outputs")
    return n.emit("layernorm", [x, scale] + ([bias] if bias is not None else []),
                  {"eps": float(n.attr("epsilon", 1e-5))})


@on("SimplifiedLayerNormalization", domains=("", "ai.onnx", "com.microsoft"))
@on("RMSNormalization")
def _rmsnorm(n: NodeContext):
    x, scale = n.ins[0], n.ins[1]
    _last_axis(n, n.attr("axis", -1), x.type.rank)
    if any(n.node.output[1:]):
        n.unsupported("the InvStdDev output")
    return n.emit("rmsnorm", [x, scale], {"eps": float(n.attr("epsilon", 1e-5))})


@on("Softmax")
def _softmax(n: NodeContext):
    x = n.ins[0]
    axis = n.attr("axis", -1 if n.imp.opset >= 13 else 1)
    if n.imp.opset < 13 and norm_axis(axis, x.type.rank) != x.type.rank - 1:
        n.unsupported(f"opset {n.imp.opset} Softmax flattens from axis {axis}")
    return n.emit("softmax", [x], {"axis": axis})


_REDUCE = {"ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum", "ReduceMax": "reduce_max"}


@on(*_REDUCE)
def _reduce(n: NodeContext):
    axes = n.axes()
    if not axes:
        if n.attr("noop_with_empty_axes", 0):
            return n.ins[0]
        axes = None
    return n.emit(_REDUCE[n.op], [n.ins[0]], {"axes": axes, "keepdims": bool(n.attr("keepdims", 1))})


# -- shapes ------------------------------------------------------------------------------------

@on("Shape")
def _shape(n: NodeContext):
    x = n.ins[0]
    start, end = n.attr("start", 0), n.attr("end", None)
    dims = list(x.shape[start:end])
    if all_ints(dims):
        return n.imp.g.add_constant(n.name, np.array(dims, dtype=np.int64))
    out = n.emit("shape", [x], {"start": start, "end": end})
    n.imp.known[id(out)] = np.array(dims, dtype=object)
    return out


def _ref(op: str, **attrs):
    """The IR op's reference, applied to dims (object arrays) while importing."""
    return lambda *xs: get_op(op).reference(*xs, **attrs)


def reshape_attr(n: NodeContext, in_shape, target, allowzero=False) -> list[int]:
    """An ONNX Reshape target (dims, maybe symbolic) as the IR's static attribute: ints, where
    0 copies the input dim at that index and one -1 is inferred."""
    out = []
    for i, d in enumerate(target):
        if d == 0 and isinstance(d, int) and not allowzero:
            if i >= len(in_shape):
                n.unsupported(f"reshape target {target} copies dim {i} of a rank-{len(in_shape)} input")
            d = in_shape[i]
        elif d == 0:
            n.unsupported("reshape to a zero-size dim")
        out.append(d)
    if -1 in out:
        rest = [d for d in out if not (isinstance(d, int) and d == -1)]
        left = list(in_shape)
        for d in list(rest):      # cancel the dims both sides name: [b, past+seq] -> [b, -1] needs no product
            if isinstance(d, str) and d in left:
                left.remove(d)
                rest.remove(d)
        inferred = dim_div(dims_product(left), dims_product(rest))
        if inferred is None:
            n.unsupported(f"cannot infer the -1 in reshape target {target} from input dims {list(in_shape)}")
        out[out.index(-1)] = inferred
    attr, free = [], 0
    for i, d in enumerate(out):
        if isinstance(d, int):
            attr.append(d)
        elif i < len(in_shape) and in_shape[i] == d:
            attr.append(0)
        else:
            attr.append(-1)
            free += 1
    if free > 1:
        n.unsupported(f"reshape to {out}: more than one dynamic dim that is not the input's")
    return attr


class MergedView:
    """An ONNX tensor the IR cannot type: `value` with its first `k` dims merged into one
    ([batch, heads, seq, d] -> [batch*heads, seq, d], two dynamic dims where the IR's reshape
    can write one). torch.onnx lowers SDPA's k^T so: reshape to merged dims, transpose(0, 2, 1),
    reshape back. Only Transpose (keeping axis 0) and a Reshape that splits the merged dim
    again may read one; the importer reports any other reader as unsupported."""

    def __init__(self, value: Value, k: int):
        self.value, self.k = value, k

    @property
    def shape(self):
        return (dims_product(self.value.shape[:self.k]),) + tuple(self.value.shape[self.k:])


def _merged(n: NodeContext, x: Value, target: list):
    """A MergedView when `target` merges x's leading dims (k >= 2) and keeps the rest, else None."""
    for k in range(2, x.type.rank + 1):
        if len(target) == x.type.rank - k + 1 and list(target[1:]) == list(x.shape[k:]) \
                and target[0] in (dims_product(x.shape[:k]), -1):
            return MergedView(x, k)
    return None


def _gather_merged(n: NodeContext, data: MergedView, idx: Value) -> Value:
    """Gather along the merged dim of a MergedView: each flat index i splits into one index per
    merged dim (i = ((i0 * d1) + i1) * d2 + ..., negative ones counted from the end), read with
    gather_nd. transformers 4.x indexes a flattened padding mask so: mask.flatten()[b * len + j]."""
    v, k = data.value, data.k
    if idx.dtype not in ("i64", "i32"):
        n.unsupported(f"indices of type {idx.dtype}")
    dims = [_dim_scalar(n, v, j, idx.dtype) for j in range(k)]
    total = dims[0]
    for j in range(1, k):
        total = n.emit("mul", [total, dims[j]], suffix=f"total{j}")
    zero = n.const(np.zeros((), numpy_dtype(idx.dtype)), "zero")
    rest = n.emit("where", [n.emit("less", [idx, zero], suffix="neg"), n.emit("add", [idx, total], suffix="wrapped"),
                            idx], suffix="idx")
    parts = []
    for j in range(k - 1, 0, -1):
        q = n.emit("div", [rest, dims[j]], suffix=f"q{j}")
        parts.append(n.emit("sub", [rest, n.emit("mul", [q, dims[j]], suffix=f"qd{j}")], suffix=f"i{j}"))
        rest = q
    parts.append(rest)
    cols = [n.emit("unsqueeze", [p], {"axes": [-1]}, suffix=f"col{i}") for i, p in enumerate(reversed(parts))]
    stacked = n.emit("concat", cols, {"axis": -1}, suffix="nd")
    return n.emit("gather_nd", [v, stacked])


@on("Reshape")
def _reshape(n: NodeContext):
    x = n.ins[0]
    target = n.dims(1, "target shape")
    if isinstance(x, MergedView):     # split the merged dim again: reshape the unmerged value
        x = x.value
        if list(target) == list(x.shape):
            return x
        attr = reshape_attr(n, x.shape, target)
        return n.emit("reshape", [x], {"shape": attr}, known=_ref("reshape", shape=attr))
    try:
        attr = reshape_attr(n, x.shape, target, bool(n.attr("allowzero", 0)))
    except UnsupportedError:
        # [batch*seq] -> [batch, 1, 1, seq] needs two dynamic dims, but if x is itself a reshape
        # of a [batch, 1, 1, seq] value, reshaping that value instead is the same thing
        src = x.producer.inputs[0] if x.producer is not None and x.producer.op == "reshape" else None
        try:
            if src is None:
                raise
            x, attr = src, reshape_attr(n, src.shape, target, bool(n.attr("allowzero", 0)))
        except UnsupportedError:
            merged = _merged(n, x, target)
            if merged is None:
                raise
            return merged
    return n.emit("reshape", [x], {"shape": attr}, known=_ref("reshape", shape=attr))


@on("Flatten")
def _flatten(n: NodeContext):
    x = n.ins[0]
    axis = norm_axis(n.attr("axis", 1), x.type.rank + 1)
    target = [dims_product(x.shape[:axis]), dims_product(x.shape[axis:])]
    if target[0] is None and axis >= 2 and target[1] is not None:
        # [batch, past+seq] -> [batch*(past+seq), 1]: a product the dim language cannot spell
        tail = x.shape[axis:]
        v = n.emit("unsqueeze", [x], {"axes": [-1]}, suffix="tail") if not tail else x if len(tail) == 1 else \
            n.emit("reshape", [x], {"shape": [0] * axis + [-1]}, suffix="tail")
        return MergedView(v, axis)
    if None in target:
        n.unsupported(f"flatten of {x.type}")
    attr = reshape_attr(n, x.shape, target)
    return n.emit("reshape", [x], {"shape": attr}, known=_ref("reshape", shape=attr))


@on("Transpose")
def _transpose(n: NodeContext):
    x = n.ins[0]
    if isinstance(x, MergedView):
        perm = list(n.attr("perm", reversed(range(len(x.shape)))))
        if perm[0] != 0:
            n.unsupported(f"transpose {perm} of a tensor whose leading dims {list(x.value.shape[:x.k])} "
                          f"are merged (only the merged dim staying first is supported)")
        k = x.k
        full = list(range(k)) + [k - 1 + p for p in perm[1:]]
        return MergedView(n.emit("transpose", [x.value], {"perm": full}), k)
    perm = list(n.attr("perm", reversed(range(x.type.rank))))
    return n.emit("transpose", [x], {"perm": perm}, known=_ref("transpose", perm=perm))


@on("Concat")
def _concat(n: NodeContext):
    axis = n.attr("axis")
    return n.emit("concat", [v for v in n.ins if v is not None], {"axis": axis}, known=_ref("concat", axis=axis))


@on("Split")
def _split(n: NodeContext):
    x = n.ins[0]
    axis = norm_axis(n.attr("axis", 0), x.type.rank)
    if n.input(1) is not None:
        sizes = n.ints(1, "split sizes")
    elif "split" in n.attrs:
        sizes = list(n.attrs["split"])
    else:
        parts, d = n.attr("num_outputs", len(n.node.output)), x.shape[axis]
        if not isinstance(d, int):
            n.unsupported(f"equal split of the dynamic dim {d!r}")
        chunk = -(-d // parts)
        sizes = [chunk] * (parts - 1) + [d - chunk * (parts - 1)]
    out = n.emit("split", [x], {"axis": axis, "sizes": sizes})
    return out if isinstance(out, list) else [out]


@on("Slice")
def _slice(n: NodeContext):
    x = n.ins[0]
    if n.imp.opset < 10:
        starts, ends = list(n.attrs["starts"]), list(n.attrs["ends"])
        axes, steps = list(n.attrs.get("axes", range(len(starts)))), [1] * len(starts)
    else:
        starts, ends = n.dims(1, "slice starts"), n.dims(2, "slice ends")
        axes = n.ints(3, "slice axes") if n.input(3) is not None else list(range(len(starts)))
        steps = n.ints(4, "slice steps") if n.input(4) is not None else [1] * len(starts)
    axes = [norm_axis(a, x.type.rank) for a in axes]

    def bound(d, axis, what):
        if isinstance(d, int):
            return d
        if d == x.shape[axis]:      # x[..., :seq] of a dim that is seq: to the end
            return INT64_MAX
        n.unsupported(f"slice {what} {d!r} is a dynamic dim that differs from the sliced dim {x.shape[axis]!r}")

    attrs = {"starts": [bound(s, a, "start") for s, a in zip(starts, axes)],
             "ends": [bound(e, a, "end") for e, a in zip(ends, axes)], "axes": axes, "steps": steps}
    return n.emit("slice", [x], attrs, known=_ref("slice", **attrs))


@on("SplitToSequence")
def _split_to_sequence(n: NodeContext):
    """A sequence exists only while importing: a Python list of IR values (SequenceAt picks one)."""
    x = n.ins[0]
    axis = norm_axis(n.attr("axis", 0), x.type.rank)
    d = x.shape[axis]
    split = n.input(1)
    if split is not None and split.type.rank == 1:
        sizes = n.ints(1, "split sizes")
    else:
        chunk = n.ints(1, "split size")[0] if split is not None else 1
        if not isinstance(d, int):
            n.unsupported(f"splitting the dynamic dim {d!r} into a sequence")
        sizes = [chunk] * (d // chunk) + ([d % chunk] if d % chunk else [])
    parts = n.emit("split", [x], {"axis": axis, "sizes": sizes}, suffix="part")
    parts = parts if isinstance(parts, list) else [parts]
    if split is None and not n.attr("keepdims", 1):
        parts = [n.emit("squeeze", [p], {"axes": [axis]}, suffix=f"{i}") for i, p in enumerate(parts)]
    return [parts]


@on("SequenceAt")
def _sequence_at(n: NodeContext):
    seq, i = n.ins[0], n.ints(1, "position")[0]
    if not isinstance(seq, list) or not -len(seq) <= i < len(seq):
        n.unsupported(f"position {i} of a sequence of {len(seq) if isinstance(seq, list) else '?'} tensors")
    return seq[i]


@on("Gather")
def _gather(n: NodeContext):
    data, idx = n.ins
    axis = n.attr("axis", 0)
    if isinstance(idx, MergedView):
        n.unsupported("indices from a reshape merging dynamic dims")
    if isinstance(data, MergedView):
        if norm_axis(axis, len(data.shape)) != 0:
            n.unsupported(f"gather along axis {axis} of a tensor whose leading dims are merged")
        return _gather_merged(n, data, idx)
    if data.is_constant and data.type.rank == 2 and norm_axis(axis, 2) == 0 and data.dtype in FLOATS \
            and not idx.is_constant:
        return n.emit("embedding", [data, idx])

    def known(d, i):
        return np.take(d, np.asarray(i, dtype=np.int64), axis=axis) if all_ints(i) else None
    return n.emit("gather", [data, idx], {"axis": axis}, known=known)


@on("GatherND")
def _gather_nd(n: NodeContext):
    """data[idx[..., 0], ..., idx[..., K-1]] as a gather from data with its first K dims merged
    (HF builds padding masks this way): the index is linearised as ((i0 * d1) + i1) * d2 + ..."""
    data, idx = n.ins
    k = idx.shape[-1]
    if n.attr("batch_dims", 0) or not isinstance(k, int) or k > data.type.rank:
        n.unsupported("GatherND with batch_dims or a dynamic index depth")
    zero = n.const(np.zeros((), numpy_dtype(idx.dtype)), "zero")
    lin = None
    for j in range(k):
        ij = n.emit("squeeze", [n.emit("slice", [idx], {"starts": [j], "ends": [j + 1], "axes": [-1]}, suffix=f"i{j}")],
                    {"axes": [-1]}, suffix=f"i{j}.sq")
        dim = _dim_scalar(n, data, j, idx.dtype)
        ij = n.emit("where", [n.emit("less", [ij, zero], suffix=f"i{j}.neg"),
                              n.emit("add", [ij, dim], suffix=f"i{j}.wrapped"), ij], suffix=f"i{j}.idx")
        lin = ij if lin is None else n.emit("add", [n.emit("mul", [lin, dim], suffix=f"lin{j}.mul"), ij],
                                            suffix=f"lin{j}")
    target = [dims_product(data.shape[:k])] + list(data.shape[k:])
    if None in target:
        n.unsupported(f"GatherND from {data.type}")
    flat = n.emit("reshape", [data], {"shape": reshape_attr(n, data.shape, target)}, suffix="flat")
    return n.emit("gather", [flat, lin], {"axis": 0})


def _dim_scalar(n: NodeContext, x: Value, axis: int, dtype: str) -> Value:
    """x.shape[axis] as a 0-d tensor: a constant, or read at run time."""
    d = x.shape[axis]
    if isinstance(d, int):
        return n.const(np.asarray(d, numpy_dtype(dtype)), f"d{axis}")
    s = n.emit("squeeze", [n.emit("shape", [x], {"start": axis, "end": axis + 1}, suffix=f"d{axis}.shape")],
               {"axes": [0]}, suffix=f"d{axis}")
    return s if dtype == "i64" else n.emit("cast", [s], {"to": dtype}, suffix=f"d{axis}.cast")


@on("Unsqueeze")
def _unsqueeze(n: NodeContext):
    axes = n.axes()
    return n.emit("unsqueeze", [n.ins[0]], {"axes": axes}, known=_ref("unsqueeze", axes=axes))


@on("Squeeze")
def _squeeze(n: NodeContext):
    x = n.ins[0]
    axes = n.axes()
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
        if any(isinstance(d, str) for d in x.shape):
            n.unsupported(f"Squeeze without axes of {x.type}: which dims are 1 is known only at run time")
    return n.emit("squeeze", [x], {"axes": axes}, known=_ref("squeeze", axes=axes))


@on("Expand")
def _expand(n: NodeContext):
    x, shape_v = n.ins
    target = n.dims(1, "expand shape")
    rank = max(len(target), x.type.rank)
    xs = (1,) * (rank - x.type.rank) + tuple(x.shape)
    ts = [1] * (rank - len(target)) + list(target)
    attr, dynamic = [], False
    for xd, td in zip(xs, ts):
        if isinstance(td, int):
            attr.append(td)
        elif td == xd:
            attr.append(1)          # broadcasting keeps x's (same) dim
        else:
            dynamic = True
    if not dynamic:
        return n.emit("expand", [x], {"shape": attr}, known=_ref("expand", shape=attr))
    # The target names a dim x lacks: build a tensor of that shape at run time and broadcast.
    if x.is_constant and isinstance(x.data, np.ndarray) and x.data.size == 1 and x.type.rank <= len(target):
        return _fill(n, shape_v, target, x.data.reshape(()).item(), x.dtype)
    zero = _fill(n, shape_v, target, False if x.dtype == "bool" else 0, x.dtype, suffix="zeros")
    return n.emit("or" if x.dtype == "bool" else "add", [x, zero])


def _fill(n: NodeContext, shape_v: Value, dims, value, dtype: str, suffix: str = ""):
    dims = [d if d is not None else f"{n.name}_d{i}" for i, d in enumerate(dims)]
    value = bool(value) if dtype == "bool" else (float(value) if dtype in FLOATS else int(value))

    def known(s):
        return np.full(tuple(int(d) for d in s), value, dtype=object) if all_ints(s) else None
    return n.emit("constant_of_shape", [shape_v], {"value": value, "dtype": dtype, "dims": dims}, suffix=suffix,
                  known=known)


@on("ConstantOfShape")
def _constant_of_shape(n: NodeContext):
    shape_v = n.ins[0]
    if "value" in n.attrs:
        arr = n.imp.tensor(n.attrs["value"])
        value, dtype = arr.reshape(-1)[0].item(), dtype_name(arr.dtype)
    else:
        value, dtype = 0.0, "f32"
    if not isinstance(shape_v.shape[0], int):
        n.unsupported("ConstantOfShape of a shape vector whose length is dynamic")
    val = n.imp.value_of(shape_v)
    dims = list(val) if val is not None else [None] * shape_v.shape[0]
    return _fill(n, shape_v, dims, value, dtype)


@on("Range")
def _range(n: NodeContext):
    start, limit, delta = n.ins
    s, l, d = (n.imp.value_of(v) for v in n.ins)
    s, l, d = (x.reshape(()).item() if x is not None and x.size == 1 else None for x in (s, l, d))
    if all_ints([s, l, d]) and d != 0:
        length = max(0, -(-(l - s) // d))
    elif d == 1 and dim_sub(l, s) is not None:
        length = dim_sub(l, s)
    else:
        length = f"{n.name}_len"
    return n.emit("range", [start, limit, delta], {"length": length})


@on("Trilu")
def _trilu(n: NodeContext):
    k = n.ints(1, "diagonal offset k")[0] if n.input(1) is not None else 0
    return n.emit("trilu", [n.ins[0]], {"upper": bool(n.attr("upper", 1)), "k": k})


@on("Constant")
def _constant(n: NodeContext):
    a = n.attrs
    if "value" in a:
        arr = n.imp.tensor(a["value"])
    elif "value_float" in a or "value_floats" in a:
        arr = np.asarray(a.get("value_float", a.get("value_floats")), dtype=np.float32)
    elif "value_int" in a or "value_ints" in a:
        arr = np.asarray(a.get("value_int", a.get("value_ints")), dtype=np.int64)
    else:
        n.unsupported(f"Constant with {sorted(a)}")
    return n.imp.g.add_constant(n.name, arr)


from isthmus.compiler.frontends import onnx_ms  # noqa: E402,F401  (registers the com.microsoft ops)
