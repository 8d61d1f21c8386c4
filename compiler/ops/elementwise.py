"""Elementwise ops: arithmetic with numpy broadcasting, unary math, activations, cast."""

import numpy as np
from scipy.special import erf as _erf

from isthmus.compiler.ir import TensorType
from isthmus.compiler.ops.registry import COMMUTATIVE, ELEMENTWISE, ROW_WISE, broadcast_shapes, define, fail


def _binary_rule(types, attrs):
    a, b = types
    if a.dtype != b.dtype:
        fail(f"operand types differ: {a.dtype} vs {b.dtype}")
    return TensorType(broadcast_shapes(a.shape, b.shape), a.dtype)


def _compare_rule(types, attrs):
    a, b = types
    return TensorType(broadcast_shapes(a.shape, b.shape), "bool")


def _same_rule(types, attrs):
    return types[0]


def _float_rule(types, attrs):
    if types[0].dtype not in ("f32", "f16", "f64"):
        fail(f"needs a float operand, got {types[0].dtype}")
    return types[0]


def _keep_dtype(fn):
    """numpy may upcast (f16 -> f32, f32 with Python scalars -> f64); results keep the input dtype."""
    def ref(*xs, **attrs):
        return np.asarray(fn(*xs, **attrs)).astype(xs[0].dtype, copy=False)
    return ref


def _div(a, b):
    # integer division truncates toward zero (ONNX, C); numpy's // floors
    if a.dtype.kind in "iu":
        return np.trunc(np.divide(a, b))
    return np.divide(a, b)


_BINARY = {
    "add": (np.add, True), "sub": (np.subtract, False), "mul": (np.multiply, True),
    "div": (_div, False), "pow": (np.power, False),
    "max": (np.maximum, True), "min": (np.minimum, True),
}
for _name, (_fn, _comm) in _BINARY.items():
    define(_name, infer=_binary_rule, reference=_keep_dtype(_fn), inputs=2,
           traits={ELEMENTWISE} | ({COMMUTATIVE} if _comm else set())
           | ({ROW_WISE} if _name in ("add", "sub", "mul", "div") else set()))

for _name, _fn in {"equal": np.equal, "less": np.less, "greater": np.greater,
                   "and": np.logical_and, "or": np.logical_or}.items():
    define(_name, infer=_compare_rule, reference=_fn, inputs=2, traits={ELEMENTWISE})


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


_UNARY = {
    "neg": np.negative, "abs": np.abs, "exp": np.exp, "log": np.log, "sqrt": np.sqrt,
    "rsqrt": lambda x: 1.0 / np.sqrt(x), "reciprocal": lambda x: 1.0 / x,
    "erf": _erf, "tanh": np.tanh, "sigmoid": _sigmoid, "cos": np.cos, "sin": np.sin,
    "silu": lambda x: x * _sigmoid(x),
}
for _name, _fn in _UNARY.items():
    define(_name, infer=_same_rule if _name in ("neg", "abs") else _float_rule,
           reference=_keep_dtype(_fn), traits={ELEMENTWISE} | ({ROW_WISE} if _name == "silu" else set()))

define("not", infer=_same_rule, reference=np.logical_not, traits={ELEMENTWISE})


def _gelu(x, approximate):
    x32 = x.astype(np.float32)
    if approximate == "tanh":
        y = 0.5 * x32 * (1.0 + np.tanh(0.7978845608028654 * (x32 + 0.044715 * x32 ** 3)))
    elif approximate == "none":
        y = 0.5 * x32 * (1.0 + _erf(x32 * 0.7071067811865476))
    else:
        fail(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return y.astype(x.dtype)


def _gelu_rule(types, attrs):
    if attrs["approximate"] not in ("none", "tanh"):
        fail(f"gelu approximate must be 'none' or 'tanh', got {attrs['approximate']!r}")
    return _float_rule(types, attrs)


define("gelu", infer=_gelu_rule, reference=_gelu, attrs={"approximate": "none"}, traits={ELEMENTWISE, ROW_WISE},
       doc="x * Phi(x); approximate='tanh' is GPT-2's formula")


def _swiglu_rule(types, attrs):
    g, u = types
    if g.shape != u.shape and broadcast_shapes(g.shape, u.shape) != g.shape:
        fail(f"gate {g} and up {u} shapes differ")
    return _binary_rule(types, attrs)


define("swiglu", infer=_swiglu_rule, reference=_keep_dtype(lambda g, u: g * _sigmoid(g) * u), inputs=2,
       traits={ELEMENTWISE, ROW_WISE}, doc="silu(gate) * up, the Llama MLP nonlinearity")


def _where_rule(types, attrs):
    c, a, b = types
    if a.dtype != b.dtype:
        fail(f"where branches differ in type: {a.dtype} vs {b.dtype}")
    return TensorType(broadcast_shapes(c.shape, a.shape, b.shape), a.dtype)


define("where", infer=_where_rule, reference=lambda c, a, b: np.where(c, a, b), inputs=3,
       traits={ELEMENTWISE})


def _cast_rule(types, attrs):
    from isthmus.compiler.ir import numpy_dtype
    numpy_dtype(attrs["to"])     # a plain element type: nothing casts into a quantized format
    return TensorType(types[0].shape, attrs["to"])


def _cast(x, to):
    from isthmus.compiler.ir import numpy_dtype
    return np.asarray(x).astype(numpy_dtype(to))


define("cast", infer=_cast_rule, reference=_cast, attrs={"to": "f32"}, traits={ELEMENTWISE, ROW_WISE})
