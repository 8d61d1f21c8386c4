"""The op table against independent oracles.

Every op defined in compiler/ops/{elementwise,reduce,norm,matmul,attention,shape}.py is checked
against torch CPU (torch.nn.functional where torch has the op; HF's rotate_half and Meta's
complex-multiply rope written out in torch; causal masks with a KV-cache offset built by hand),
and quantized weights against the `gguf` package's dequantizer. Separately, every op's shape
rule is checked against what its numpy reference actually returns (`EXAMPLES`).

Tolerances, from the dtype and the magnitude of the values, never from one machine's rounding
(numpy's and torch's sin, cos, exp and reductions differ by a few ulp between CPUs and builds).
Each is a relative part and an absolute floor. Where results are sums (acc), the floor scales with
the output's range R = max(1, max |oracle|): an element near zero inherits the error of the large
terms it was computed from (x cos a - y sin a, a sum that cancels). An elementwise result's error
is relative to itself, so f32 and f16 keep a fixed floor.
  exact  integer, boolean and data-movement ops, casts, max/min, embedding lookups.
  f32    rtol 1e-5, atol 1e-6: one elementwise op, a few ulp apart from torch.
  acc    rtol 1e-4, atol 4e-5 R (~340 ulp of R): f32 results accumulated over up to ~300 terms
         (reductions, norms, matmul, attention) in a different order than torch, each term
         off by half an ulp; and rope, whose angle p * f is off by up to p ulp at positions
         p <= ~400 (R eps p = 4.8e-5 R at most), as are the sin and cos taken of it.
  f16    rtol 2e-3, atol 2e-3 (~2 f16 ulp): the oracle computes in f32 from the same f16 inputs
         and rounds once; the references compute in f32 and round once, or (sigmoid, silu, swiglu,
         rsqrt) evaluate a few f16 steps, which stays within the same bound.
"""

from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from isthmus.compiler.ir import Graph, dtype_name, verify
from isthmus.compiler.ops import OPS, get_op
from isthmus.compiler.quant import QuantizedArray, quantize
from isthmus.errors import InputError, IRError

TOL = {
    "f32": dict(rtol=1e-5, atol=1e-6),
    "acc": dict(rtol=1e-4, atol=4e-5),
    "f16": dict(rtol=2e-3, atol=2e-3),
}
GGUF_TYPES = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "bf16": T.BF16}
ODD = (1, 3, 127, 129)

# The ops these files define. An op defined elsewhere (compiler/ops/tensor.py, ...) is not listed
# and is skipped by the coverage checks below; an op added to one of these files fails
# `test_every_op_in_these_files_is_listed` until it is listed, given an example and an oracle.
KNOWN_OPS = frozenset("""
    add sub mul div pow max min equal less greater and or
    neg abs exp log sqrt rsqrt reciprocal erf tanh sigmoid cos sin silu not gelu swiglu where cast
    reduce_sum reduce_mean reduce_max softmax
    rmsnorm layernorm
    matmul linear embedding
    rope attention
    reshape transpose concat split slice gather unsqueeze squeeze expand
""".split())
OP_MODULES = {f"isthmus.compiler.ops.{m}" for m in ("elementwise", "reduce", "norm", "matmul", "attention", "shape")}

COVERED: set[str] = set()   # ops some torch/gguf oracle test below checks


def covers(*ops):
    COVERED.update(ops)
    return lambda fn: fn


# -- helpers -------------------------------------------------------------------------------------

def rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def randn(shape, dtype="f32", *key, scale=1.0, lo=None, hi=None):
    r = rng(shape, dtype, *key)
    if lo is not None:
        x = r.uniform(lo, hi, size=shape)
    else:
        x = r.standard_normal(shape) * scale
    return np.asarray(x).astype({"f32": np.float32, "f16": np.float16, "f64": np.float64}[dtype])


def ref(op, *xs, **attrs):
    """Run the op's numpy reference with its attributes completed, as the reference target does."""
    opdef = get_op(op)
    return opdef.reference(*xs, **opdef.complete_attrs(attrs))


def tt(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a))   # a copy: torch must not share memory with our inputs


def torch_f32(fn, *xs, out_dtype=None):
    """fn on the inputs, floats upcast to f32; the result rounded once to `out_dtype`."""
    args = [tt(x).float() if isinstance(x, np.ndarray) and x.dtype.kind == "f" else
            (tt(x) if isinstance(x, np.ndarray) else x) for x in xs]
    out = fn(*args)
    if out_dtype is not None:
        out = out.to({np.float16: torch.float16, np.float32: torch.float32}[np.dtype(out_dtype).type])
    return out.numpy()


def check(got, want, tol: str | None, ctx=""):
    """Same shape and dtype; values within `tol` (None: exactly equal, nan == nan)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{ctx}: shape {got.shape} != oracle {want.shape}"
    assert got.dtype == want.dtype, f"{ctx}: dtype {got.dtype} != oracle {want.dtype}"
    if tol is None:
        np.testing.assert_array_equal(got, want, err_msg=str(ctx))
    else:
        finite = np.abs(want[np.isfinite(want)].astype(np.float64))
        scale = max(1.0, float(finite.max())) if tol == "acc" and finite.size else 1.0
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), equal_nan=True,
                                   err_msg=str(ctx), rtol=TOL[tol]["rtol"], atol=TOL[tol]["atol"] * scale)


def float_oracle(fn, *xs, dtype, tol32="f32", tol16="f16"):
    """(oracle, tolerance): f32 inputs run in f32 directly; f16 ones in f32 with one final rounding."""
    if dtype == "f32":
        return fn(*(tt(x) if isinstance(x, np.ndarray) else x for x in xs)).numpy(), tol32
    return torch_f32(fn, *xs, out_dtype=np.float16), tol16


# -- elementwise ---------------------------------------------------------------------------------

UNARY = {  # op -> (torch function, input range)
    "neg": (torch.neg, (-5, 5)), "abs": (torch.abs, (-5, 5)), "exp": (torch.exp, (-8, 8)),
    "log": (torch.log, (0.01, 50)), "sqrt": (torch.sqrt, (0, 50)), "rsqrt": (torch.rsqrt, (0.01, 50)),
    "reciprocal": (torch.reciprocal, (0.05, 20)), "erf": (torch.erf, (-4, 4)), "tanh": (torch.tanh, (-6, 6)),
    "sigmoid": (torch.sigmoid, (-12, 12)), "cos": (torch.cos, (-10, 10)), "sin": (torch.sin, (-10, 10)),
    "silu": (F.silu, (-12, 12)),
}


@covers(*UNARY)
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary_float(op, dtype):
    fn, (lo, hi) = UNARY[op]
    for shape in [(1,), (3,), (127,), (3, 129)]:
        x = randn(shape, dtype, op, lo=lo, hi=hi)
        want, tol = float_oracle(fn, x, dtype=dtype)
        with np.errstate(over="ignore"):   # f16 sigmoid: exp(12) overflows to inf, giving the right 0
            got = ref(op, x)
        check(got, want, tol, shape)


@covers("neg", "abs")
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_neg_abs_integers(dtype):
    x = rng("int").integers(-1000, 1000, size=(3, 129)).astype(dtype)
    check(ref("neg", x), torch.neg(tt(x)).numpy(), None)
    check(ref("abs", x), torch.abs(tt(x)).numpy(), None)


BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
          "max": torch.maximum, "min": torch.minimum}
BROADCAST_PAIRS = [((1,), (1,)), ((3,), (3,)), ((127,), (1,)), ((3, 129), (129,)), ((2, 1, 127), (3, 1)),
                   ((1, 129), (3, 1)), ((), (3, 127))]


@covers(*BINARY)
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("op", sorted(BINARY))
def test_binary_float(op, dtype):
    for shapes in BROADCAST_PAIRS:
        a = randn(shapes[0], dtype, op, "a", lo=0.1 if op == "pow" else -4, hi=4)
        b = randn(shapes[1], dtype, op, "b", lo=-3 if op == "pow" else 0.25, hi=3)
        if op != "pow":   # a divisor away from zero; other ops get both signs
            b = (b * np.where(rng(op, shapes).random(b.shape) < 0.5, -1, 1)).astype(b.dtype)
        want, tol = float_oracle(BINARY[op], a, b, dtype=dtype)
        check(ref(op, a, b), want, None if op in ("max", "min") else tol, shapes)


@covers(*BINARY)
@pytest.mark.parametrize("op", sorted(BINARY))
def test_binary_integers(op):
    r = rng(op, "int")
    for dtype in (np.int64, np.int32):
        a = r.integers(-50, 50, size=(3, 129)).astype(dtype)
        if op == "pow":
            b = r.integers(0, 4, size=(129,)).astype(dtype)
        else:   # nonzero divisors of both signs
            b = (r.integers(1, 9, size=(129,)) * r.choice([-1, 1], size=129)).astype(dtype)
        if op == "div":   # integer division truncates toward zero, as ONNX and C do (not numpy's floor)
            want = torch.div(tt(a), tt(b), rounding_mode="trunc").numpy()
        else:
            want = BINARY[op](tt(a), tt(b)).numpy()
        check(ref(op, a, b), want, None, dtype)


COMPARE = {"equal": torch.eq, "less": torch.lt, "greater": torch.gt}


@covers(*COMPARE, "and", "or", "not")
def test_compare_and_logic():
    for shapes in BROADCAST_PAIRS:
        r = rng("cmp", shapes)
        for dtype in (np.float32, np.int64):   # few distinct values, so ties happen
            a, b = (r.integers(-2, 3, size=s).astype(dtype) for s in shapes)
            for op, fn in COMPARE.items():
                check(ref(op, a, b), fn(tt(a), tt(b)).numpy(), None, (op, shapes, dtype))
        p, q = (r.random(s) < 0.5 for s in shapes)
        check(ref("and", p, q), torch.logical_and(tt(p), tt(q)).numpy(), None, shapes)
        check(ref("or", p, q), torch.logical_or(tt(p), tt(q)).numpy(), None, shapes)
        check(ref("not", p), torch.logical_not(tt(p)).numpy(), None, shapes)


@covers("gelu")
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate, dtype):
    for shape in [(1,), (3,), (127,), (2, 129)]:
        x = randn(shape, dtype, "gelu", scale=3)
        want, tol = float_oracle(lambda t: F.gelu(t, approximate=approximate), x, dtype=dtype)
        check(ref("gelu", x, approximate=approximate), want, tol, shape)


def test_gelu_rejects_unknown_approximation():
    g = Graph()
    x = g.add_input("x", (3,), "f32")
    with pytest.raises(IRError, match="approximate"):
        g.add("gelu", [x], {"approximate": "erf"})


@covers("swiglu")
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_swiglu(dtype):
    for shape in [(1,), (3,), (127,), (2, 129)]:
        gate, up = randn(shape, dtype, "g", scale=3), randn(shape, dtype, "u", scale=3)
        want, tol = float_oracle(lambda g, u: F.silu(g) * u, gate, up, dtype=dtype)
        check(ref("swiglu", gate, up), want, tol, shape)


@covers("where")
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_where(dtype):
    c = rng("where").random((3, 1, 129)) < 0.5
    a, b = randn((1, 2, 129), dtype, "a"), randn((129,), dtype, "b")
    check(ref("where", c, a, b), torch.where(tt(c), tt(a), tt(b)).numpy(), None)


CASTS = [("f32", "f16"), ("f32", "i64"), ("f32", "i32"), ("f32", "bool"), ("f32", "f64"), ("f16", "f32"),
         ("i64", "f32"), ("i32", "i64"), ("bool", "f32"), ("i64", "u8"), ("f32", "i8")]
TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "f64": torch.float64, "i64": torch.int64,
                "i32": torch.int32, "i8": torch.int8, "u8": torch.uint8, "bool": torch.bool}


@covers("cast")
@pytest.mark.parametrize("src,dst", CASTS)
def test_cast(src, dst):
    r = rng("cast", src, dst)
    if src == "bool":
        x = r.random((3, 129)) < 0.5
    elif src in ("i64", "i32"):
        x = r.integers(0, 255 if dst == "u8" else 10**6, size=(3, 129)).astype(src.replace("i", "int"))
    else:   # floats within every target's range, fractions included (casts truncate toward zero)
        x = (r.uniform(-120, 120, size=(3, 129)) * (r.random((3, 129)) < 0.9)).astype(
            {"f32": np.float32, "f16": np.float16}[src])
    check(ref("cast", x, to=dst), tt(x).to(TORCH_DTYPES[dst]).numpy(), None)


# -- reductions and softmax ------------------------------------------------------------------------

REDUCE = {"reduce_sum": torch.sum, "reduce_mean": torch.mean, "reduce_max": torch.amax}
REDUCE_SHAPES = [(1,), (3,), (127,), (129,), (3, 129), (2, 3, 127)]


@covers(*REDUCE)
@pytest.mark.parametrize("op,dtype", [(op, dt) for op in sorted(REDUCE) for dt in ("f32", "f16", "i64")
                                      if (op, dt) != ("reduce_mean", "i64")])   # torch has no integer mean
def test_reductions(op, dtype):
    for shape in REDUCE_SHAPES:
        rank = len(shape)
        x = (rng(op, shape).integers(-100, 100, size=shape) if dtype == "i64" else randn(shape, dtype, op))
        for axes in (None, [0], [-1], sorted({0, rank - 1}), list(range(rank))):
            dim = tuple(range(rank)) if axes is None else tuple(axes)
            for keepdims in (True, False):
                fn = lambda t: REDUCE[op](t, dim=dim, keepdim=keepdims)   # noqa: E731
                if dtype == "i64":
                    want, tol = fn(tt(x)).numpy(), None
                else:
                    want, tol = float_oracle(fn, x, dtype=dtype, tol32="acc")
                got = ref(op, x, axes=axes, keepdims=keepdims)
                check(got, want, None if op == "reduce_max" else tol, (shape, axes, keepdims))


def test_reduce_rejects_repeated_axes():
    g = Graph()
    x = g.add_input("x", (3,), "f32")
    with pytest.raises(IRError, match="axes"):
        g.add("reduce_sum", [x], {"axes": [0, -1]})   # the same axis twice: numpy would refuse it


@covers("softmax")
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_softmax(dtype):
    for shape in [(1,), (3,), (127,), (129,), (3, 129), (2, 3, 127)]:
        x = randn(shape, dtype, "softmax", scale=4)
        for axis in {-1, 0, len(shape) - 1}:
            want, tol = float_oracle(lambda t: F.softmax(t, dim=axis), x, dtype=dtype, tol32="acc")
            check(ref("softmax", x, axis=axis), want, tol, (shape, axis))


def test_softmax_masked_rows():
    x = randn((4, 129), "f32", "masked", scale=4)
    x[1, ::2] = -np.inf      # partly masked: as torch
    x[2, :] = -np.inf        # fully masked: torch gives nan, the reference gives zeros by design
    got = ref("softmax", x)
    want = F.softmax(tt(x), dim=-1).numpy()
    rows = [0, 1, 3]
    check(got[rows], want[rows], "acc")
    assert np.all(got[1, ::2] == 0)
    assert np.all(got[2] == 0) and np.all(np.isnan(want[2]))


# -- norms -----------------------------------------------------------------------------------------

@covers("rmsnorm")
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_rmsnorm(dtype):
    for dim in ODD:
        for eps in (1e-6, 1e-5):
            x = randn((2, 3, dim), dtype, "x", scale=2)
            w = randn((dim,), dtype, "w", lo=0.5, hi=1.5)
            want, tol = float_oracle(lambda x, w: F.rms_norm(x, (dim,), w, eps), x, w, dtype=dtype, tol32="acc")
            check(ref("rmsnorm", x, w, eps=eps), want, tol, (dim, eps))


@covers("layernorm")
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_layernorm(dtype):
    for dim in ODD:   # dim 1: the variance is 0 and the output is the bias (or 0), in both
        x = randn((3, dim), dtype, "x", scale=2)
        x = (x + 1.5).astype(x.dtype)   # off-centre, so the mean matters
        w = randn((dim,), dtype, "w", lo=0.5, hi=1.5)
        b = randn((dim,), dtype, "b")
        for args in ((x, w, b), (x, w)):
            want, tol = float_oracle(lambda x, w, b=None: F.layer_norm(x, (dim,), w, b, 1e-5), *args, dtype=dtype,
                                     tol32="acc")
            check(ref("layernorm", *args, eps=1e-5), want, tol, (dim, len(args)))


# -- matmul, linear, embedding ---------------------------------------------------------------------

MATMUL_SHAPES = [((3, 127), (127, 129)), ((1, 1), (1, 3)), ((2, 3, 129), (129, 1)), ((2, 1, 3, 5), (4, 5, 7)),
                 ((127,), (127, 3)), ((3, 127), (127,)), ((5,), (5,)), ((129, 3), (2, 3, 127))]


@covers("matmul")
@pytest.mark.parametrize("dtype", ["f32", "f16", "i64"])
def test_matmul(dtype):
    for shapes in MATMUL_SHAPES:
        if dtype == "i64":
            a, b = (rng("mm", s).integers(-20, 20, size=s) for s in shapes)
            check(ref("matmul", a, b), torch.matmul(tt(a), tt(b)).numpy(), None, shapes)
            continue
        a, b = randn(shapes[0], dtype, "a"), randn(shapes[1], dtype, "b")
        want, tol = float_oracle(torch.matmul, a, b, dtype=dtype, tol32="acc")
        check(ref("matmul", a, b), want, tol, shapes)


def test_matmul_mixed_float_types_follow_the_first_operand():
    a, b = randn((3, 5), "f16", "a"), randn((5, 4), "f32", "b")
    check(ref("matmul", a, b), torch_f32(torch.matmul, a, b, out_dtype=np.float16), "f16")
    check(ref("matmul", b.T.copy(), a.T.copy()), torch.matmul(tt(b.T), tt(a.T).float()).numpy(), "acc")


def gguf_dense(q: QuantizedArray) -> np.ndarray:
    """The oracle's view of a quantized matrix: gguf's own dequantizer on the raw blocks."""
    return gguf.quants.dequantize(np.asarray(q.raw), GGUF_TYPES[q.qtype]).reshape(q.shape)


@covers("linear")
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_linear(dtype):
    for in_features in ODD:
        for out_features in ODD:
            x = randn((2, 3, in_features), dtype, "x")
            w = randn((out_features, in_features), dtype, "w", scale=in_features ** -0.5)
            b = randn((out_features,), dtype, "b")
            for args in ((x, w, b), (x, w)):
                want, tol = float_oracle(F.linear, *args, dtype=dtype, tol32="acc")
                check(ref("linear", *args), want, tol, (in_features, out_features, len(args)))
    x = randn((3, 5), "f32", "xw")
    w16 = randn((4, 5), "f16", "w16")       # an f16 weight under an f32 activation computes in f32
    check(ref("linear", x, w16), F.linear(tt(x), tt(w16).float()).numpy(), "acc")


@covers("linear", "matmul", "embedding")
@pytest.mark.parametrize("qtype", sorted(GGUF_TYPES))
def test_quantized_weights_match_gguf_dequantized(qtype):
    cols = 96
    for rows in ODD:
        w = quantize(randn((rows, cols), "f32", "w", qtype), qtype)
        dense = gguf_dense(w)
        np.testing.assert_array_equal(w.dequantize(), dense)   # the values the op must compute with
        x = randn((3, cols), "f32", "x")
        check(ref("linear", x, w), ref("linear", x, dense), None, rows)   # the op on the dense matrix, exactly
        check(ref("linear", x, w), F.linear(tt(x), tt(dense)).numpy(), "acc", rows)
        xh = x.astype(np.float16)
        check(ref("linear", xh, w), torch_f32(F.linear, xh, dense, out_dtype=np.float16), "f16", rows)
        a = randn((5, rows), "f32", "a")
        wt = quantize(randn((rows, cols), "f32", "wt", qtype), qtype)   # matmul's b is [K, N], N blocked
        check(ref("matmul", a, wt), torch.matmul(tt(a), tt(gguf_dense(wt))).numpy(), "acc", rows)
        ids = rng("ids", rows).integers(0, rows, size=(2, 7))
        check(ref("embedding", w, ids), ref("embedding", dense, ids), None, rows)
        check(ref("embedding", w, ids), F.embedding(tt(ids), tt(dense)).numpy(), None, rows)


@covers("embedding")
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_embedding(dtype):
    for vocab in ODD:
        for id_dtype in (np.int64, np.int32):
            table = randn((vocab, 129), dtype, "table")
            ids = rng("ids", vocab).integers(0, vocab, size=(2, 3)).astype(id_dtype)
            check(ref("embedding", table, ids), F.embedding(tt(ids).long(), tt(table)).numpy(), None, vocab)
            scalar = np.asarray(vocab - 1, dtype=id_dtype)
            check(ref("embedding", table, scalar), F.embedding(tt(scalar).long(), tt(table)).numpy(), None, vocab)


@pytest.mark.parametrize("bad", [-1, 61])
def test_embedding_rejects_ids_out_of_range(bad):
    table = randn((61, 4), "f32", "t")
    with pytest.raises(InputError, match="out of range"):
        ref("embedding", table, np.array([[0, bad]]))
    with pytest.raises(InputError, match="out of range"):
        ref("embedding", quantize(randn((61, 32), "f32", "q"), "q8_0"), np.array([bad]))


# -- rope ------------------------------------------------------------------------------------------

def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(x, pos, theta, dim):
    """transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb (partial: GPT-NeoX's rotary_ndims)."""
    d = dim or x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if pos.ndim == 2:             # [batch, seq, d] -> [batch, 1, seq, d]
        cos, sin = cos[:, None], sin[:, None]
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def meta_rope(x, pos, theta, dim):
    """Meta's llama reference: precompute_freqs_cis + apply_rotary_emb (view_as_complex pairs)."""
    d = dim or x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    angles = pos[..., None].float() * freqs
    freqs_cis = torch.polar(torch.ones_like(angles), angles)
    if pos.ndim == 2:
        freqs_cis = freqs_cis[:, None]
    rot = x[..., :d].contiguous()
    xc = torch.view_as_complex(rot.reshape(*rot.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs_cis).flatten(-2)
    return torch.cat((out, x[..., d:]), dim=-1)


ROPE_CASES = [  # (batch, heads, seq, head_dim, dim, past)
    (1, 1, 1, 2, 0, 0), (2, 3, 3, 8, 0, 5), (1, 2, 127, 64, 0, 0), (2, 1, 129, 16, 8, 129),
    (1, 2, 3, 128, 0, 250), (1, 2, 5, 10, 4, 7),
]


@covers("rope")
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope(layout, dtype):
    oracle = hf_rope if layout == "half" else meta_rope
    for case in ROPE_CASES:
        b, h, s, hd, dim, past = case
        x = randn((b, h, s, hd), dtype, "rope", case)
        starts = rng("pos", case).integers(0, past + 1, size=(b, 1))
        pos = (starts + np.arange(s)).astype(np.int64)    # [batch, seq]: each row its own offset
        for theta in (10000.0, 500000.0):
            for p in (pos, pos[0]):                      # and the shared [seq] form
                want, tol = float_oracle(lambda x, p: oracle(x, p, theta, dim), x, p, dtype=dtype, tol32="acc")
                check(ref("rope", x, p, theta=theta, layout=layout, dim=dim), want, tol, (case, theta, p.ndim))


def test_rope_layouts_differ():
    """Guard against both oracles (and both layouts) collapsing into one formula."""
    x = randn((1, 1, 4, 8), "f32", "layouts")
    pos = np.arange(4, dtype=np.int64)[None]
    half, inter = ref("rope", x, pos, layout="half"), ref("rope", x, pos, layout="interleaved")
    assert not np.allclose(half, inter)
    np.testing.assert_array_equal(half[:, :, 0], x[:, :, 0])   # position 0 is the identity


# -- attention -------------------------------------------------------------------------------------

def sdpa_oracle(q, k, v, *, causal, mask=None, scale=None):
    """torch SDPA with kv heads repeated (HF repeat_kv) and the KV-cache causal mask built by hand."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s, t = q.shape[2], k.shape[2]
    if causal and mask is None and s == t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    attn = mask
    if causal:   # query i sits at position (t - s) + i and sees keys 0 .. (t - s) + i
        allowed = torch.ones(s, t, dtype=torch.bool).tril(diagonal=t - s)
        if attn is None:
            attn = allowed
        elif attn.dtype == torch.bool:
            attn = attn & allowed
        else:
            attn = attn.masked_fill(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn, scale=scale)


ATTN_CASES = [  # (batch, q_heads, kv_heads, seq, past, head_dim)
    (1, 1, 1, 1, 0, 3), (1, 4, 4, 3, 0, 8), (2, 4, 2, 3, 5, 8), (1, 6, 2, 1, 129, 64),
    (1, 3, 1, 127, 0, 16), (1, 2, 1, 129, 127, 8), (1, 2, 2, 3, 1, 129),
]


@covers("attention")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_attention(dtype, causal):
    for case in ATTN_CASES:
        b, hq, hkv, s, past, d = case
        q = randn((b, hq, s, d), dtype, "q", case)
        k = randn((b, hkv, past + s, d), dtype, "k", case)
        v = randn((b, hkv, past + s, d), dtype, "v", case)
        want, tol = float_oracle(lambda q, k, v: sdpa_oracle(q, k, v, causal=causal), q, k, v, dtype=dtype,
                                 tol32="acc")
        check(ref("attention", q, k, v, causal=causal), want, tol, case)


@covers("attention")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_attention_with_mask_and_scale(kind, causal):
    b, hq, hkv, s, past, d = 2, 4, 2, 5, 6, 8
    q, k, v = (randn(shape, "f32", name) for name, shape in
               (("q", (b, hq, s, d)), ("k", (b, hkv, past + s, d)), ("v", (b, hkv, past + s, d))))
    r = rng("mask", kind)
    if kind == "bool":   # [batch, 1, seq, total]; key 0 always visible so no row is fully masked
        mask = r.random((b, 1, s, past + s)) < 0.7
        mask[..., 0] = True
    else:                # [1, heads, seq, total] additive bias
        mask = r.standard_normal((1, hq, s, past + s)).astype(np.float32)
    got = ref("attention", q, k, v, mask, causal=causal, scale=0.3)
    want = sdpa_oracle(tt(q), tt(k), tt(v), causal=causal, mask=tt(mask), scale=0.3).numpy()
    check(got, want, "acc")


# -- data movement ---------------------------------------------------------------------------------

def onnx_reshape_target(shape, target):
    return [shape[i] if d == 0 else d for i, d in enumerate(target)]


RESHAPES = [((2, 3, 4), [0, -1]), ((2, 3, 4), [-1]), ((2, 3, 4), [4, 0, 2]), ((2, 3, 4), [1, 0, 0, -1]),
            ((127,), [127, 1]), ((3, 129), [-1, 3]), ((1,), []), ((2, 0, 3), [0, -1, 3])]


@covers("reshape")
@pytest.mark.parametrize("shape,target", RESHAPES, ids=str)
def test_reshape(shape, target):
    x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    check(ref("reshape", x, shape=target), tt(x).reshape(onnx_reshape_target(shape, target)).numpy(), None)


@covers("transpose")
@pytest.mark.parametrize("shape,perm", [((3, 129), None), ((3, 129), [1, 0]), ((2, 3, 127), [0, 2, 1]),
                                        ((1, 2, 3, 4), [0, 2, 1, 3]), ((5,), None), ((2, 3, 4), None)], ids=str)
def test_transpose(shape, perm):
    x = randn(shape, "f32", "tr")
    want = tt(x).permute(*(perm or reversed(range(len(shape))))).numpy()
    check(ref("transpose", x, perm=perm), want, None)


@covers("concat")
@pytest.mark.parametrize("shapes,axis", [([(3,)], 0), ([(1, 4), (127, 4), (3, 4)], 0), ([(2, 1, 5), (2, 129, 5)], -2),
                                         ([(2, 3), (2, 0)], 1)], ids=str)
def test_concat(shapes, axis):
    xs = [randn(s, "f32", "cat", i) for i, s in enumerate(shapes)]
    check(ref("concat", *xs, axis=axis), torch.cat([tt(x) for x in xs], dim=axis).numpy(), None)


@covers("split")
@pytest.mark.parametrize("shape,axis,sizes", [((3, 129), 1, [1, 127, 1]), ((6, 2), 0, [3, 3]), ((4, 5), -1, [5]),
                                              ((3, 4), 1, [0, 4]), ((2, 3, 127), 2, [64, 63])], ids=str)
def test_split(shape, axis, sizes):
    x = randn(shape, "f32", "split")
    got = ref("split", x, axis=axis, sizes=sizes)
    want = [t.numpy() for t in torch.split(tt(x), sizes, dim=axis)]
    if len(sizes) == 1:   # a single output: the array itself, as every one-output reference
        got = (got,)
    assert isinstance(got, tuple) and len(got) == len(want)
    for g, w in zip(got, want):
        check(g, w, None)


def onnx_slice_indices(dim, start, end, step):
    """ONNX Slice's clamping rules, written out; the oracle's indices along one axis."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return list(range(start, end, step))


I64_MAX = 2**63 - 1
SLICES = [  # shape, starts, ends, axes, steps
    ((129,), [1], [-1], None, None), ((3, 127), [0, 2], [I64_MAX, I64_MAX], None, [1, 3]),
    ((3, 127), [-1], [-I64_MAX], [1], [-1]), ((2, 3, 129), [5, 0], [1000, 2], [2, 0], [2, 1]),
    ((4, 5), [3], [0], [0], [-2]), ((4, 5), [10], [20], [-1], None), ((1, 3), [0], [1], [-2], None),
]


@covers("slice")
@pytest.mark.parametrize("shape,starts,ends,axes,steps", SLICES, ids=str)
def test_slice(shape, starts, ends, axes, steps):
    x = randn(shape, "f32", "slice")
    want = tt(x)
    for s, e, a, st in zip(starts, ends, axes or range(len(starts)), steps or [1] * len(starts)):
        a = a % len(shape)
        idx = torch.tensor(onnx_slice_indices(shape[a], s, e, st), dtype=torch.int64)
        want = want.index_select(a, idx)
    check(ref("slice", x, starts=starts, ends=ends, axes=axes, steps=steps), want.numpy(), None)


@covers("gather")
@pytest.mark.parametrize("shape,axis,idx", [((129, 3), 0, [[0, 128], [-1, 5]]), ((3, 127), 1, [126, -127, 0]),
                                            ((2, 3, 4), -1, 2), ((5,), 0, [])], ids=str)
def test_gather(shape, axis, idx):
    x = randn(shape, "f32", "gather")
    idx = np.asarray(idx, dtype=np.int64)
    a = axis % len(shape)
    flat = torch.from_numpy(np.where(idx < 0, idx + shape[a], idx).reshape(-1))
    want = tt(x).index_select(a, flat).reshape(shape[:a] + idx.shape + shape[a + 1:])
    check(ref("gather", x, idx, axis=axis), want.numpy(), None)
    with pytest.raises(InputError, match="out of range"):
        ref("gather", x, np.array([shape[a]]), axis=axis)


@covers("unsqueeze", "squeeze")
@pytest.mark.parametrize("shape,axes", [((3,), [0]), ((3, 127), [-1]), ((129,), [0, 2]), ((2, 3), [1, -1]),
                                        ((), [0])], ids=str)
def test_unsqueeze_squeeze(shape, axes):
    x = randn(shape, "f32", "unsq")
    rank = len(shape) + len(axes)
    want = tt(x)
    for a in sorted(a % rank for a in axes):
        want = want.unsqueeze(a)
    got = ref("unsqueeze", x, axes=axes)
    check(got, want.numpy(), None)
    check(ref("squeeze", got, axes=axes), torch.squeeze(want, dim=tuple(axes)).numpy(), None)


@covers("expand")
@pytest.mark.parametrize("shape,target", [((3, 1), [3, 127]), ((1,), [129]), ((3, 1), [2, 1, 4]),
                                          ((2, 3), [1, 3]), ((), [3, 2])], ids=str)
def test_expand(shape, target):
    x = randn(shape, "f32", "expand")
    rank = max(len(shape), len(target))   # ONNX Expand broadcasts both ways: a 1 in `target` keeps the dim
    a, b = (1,) * (rank - len(shape)) + tuple(shape), (1,) * (rank - len(target)) + tuple(target)
    out_shape = tuple(m if n == 1 else n for m, n in zip(a, b))
    check(ref("expand", x, shape=target), tt(x).expand(out_shape).numpy(), None)


# -- shape rules against references ------------------------------------------------------------------

def _f(shape, dtype="f32", key=0):
    return randn(shape, dtype, "ex", key)


def _i(shape, hi=3, dtype=np.int64):
    return rng("exi", shape).integers(0, hi, size=shape).astype(dtype)


def _b(shape):
    return rng("exb", shape).random(shape) < 0.5


_Q = quantize(_f((5, 64), key="q"), "q4_1")
_UNARY_EXAMPLES = [([_f((3, 129))], {}), ([_f((1,), "f16")], {}), ([_f((), "f64")], {})]
_BINARY_EXAMPLES = [([_f((3, 1)), _f((127,))], {}), ([_f((2,), "f16"), _f((), "f16")], {}),
                    ([_i((3, 4)) + 1, _i((4,)) + 1], {})]

# op -> [(inputs, attrs)]: each is built into a graph (so the rule runs) and run by the reference.
EXAMPLES: dict[str, list] = {
    **{op: _BINARY_EXAMPLES for op in ("add", "sub", "mul", "div", "pow", "max", "min")},
    **{op: [([_f((3, 1)), _f((127,))], {}), ([_i((2, 3)), _i((3,))], {})] for op in ("equal", "less", "greater")},
    **{op: [([_b((3, 1)), _b((4,))], {})] for op in ("and", "or")},
    **{op: _UNARY_EXAMPLES for op in UNARY},
    "neg": _UNARY_EXAMPLES + [([_i((3,), dtype=np.int32)], {})],
    "abs": _UNARY_EXAMPLES + [([_i((3,))], {})],
    "not": [([_b((3, 2))], {}), ([_b(())], {})],
    "gelu": [([_f((3, 129))], {"approximate": "tanh"}), ([_f((3,), "f16")], {})],
    "swiglu": [([_f((2, 127)), _f((2, 127))], {}), ([_f((3,), "f16"), _f((3,), "f16")], {})],
    "where": [([_b((3, 1)), _f((1, 4)), _f((4,))], {}), ([_b(()), _i((2,)), _i(())], {})],
    "cast": [([_f((3,))], {"to": t}) for t in ("f16", "i64", "bool", "u8")] + [([_i((2,))], {"to": "f32"})],
    **{op: [([_f((2, 3, 4))], {"axes": [1], "keepdims": True}),
            ([_f((2, 3, 4), "f16")], {"axes": [0, -1], "keepdims": False}),
            ([_f((3,))], {"axes": None, "keepdims": False}),
            ([_i((3, 2))], {"axes": None, "keepdims": True})]
       for op in ("reduce_sum", "reduce_mean", "reduce_max")},
    "softmax": [([_f((3, 129))], {}), ([_f((2, 3), "f16")], {"axis": 0})],
    "rmsnorm": [([_f((2, 3, 127)), _f((127,))], {}), ([_f((3,), "f16"), _f((3,), "f16")], {"eps": 1e-5})],
    "layernorm": [([_f((2, 129)), _f((129,)), _f((129,))], {}), ([_f((1, 3), "f16"), _f((3,), "f16")], {})],
    "matmul": [([_f((2, 3, 127)), _f((127, 5))], {}), ([_f((3,)), _f((3,))], {}),
               ([_f((4, 3), "f16"), _f((3,), "f16")], {}), ([_f((2, 3), "f16"), _f((3, 2))], {}),
               ([_i((2, 3)), _i((3, 4))], {}), ([_f((3, 5)), _Q], {})],
    "linear": [([_f((2, 3, 64)), _Q], {}), ([_f((3, 64), "f16"), _Q], {}),
               ([_f((1, 3)), _f((4, 3)), _f((4,))], {}), ([_f((3, 2), "f16"), _f((4, 2))], {})],
    "embedding": [([_f((7, 3)), _i((2, 3), hi=7)], {}), ([_Q, _i((4,), hi=5, dtype=np.int32)], {}),
                  ([_f((7, 3), "f16"), _i((), hi=7)], {})],
    "rope": [([_f((2, 3, 5, 8)), _i((2, 5), hi=9)], {}),
             ([_f((1, 2, 3, 8), "f16"), _i((3,))], {"layout": "interleaved", "dim": 4})],
    "attention": [([_f((2, 4, 3, 8)), _f((2, 2, 7, 8)), _f((2, 2, 7, 5))], {}),
                  ([_f((1, 2, 3, 8), "f16"), _f((1, 2, 3, 8), "f16"), _f((1, 2, 3, 8), "f16"), _b((1, 1, 3, 3))],
                   {"causal": False})],
    "reshape": [([_f((2, 3, 4))], {"shape": [0, -1]}), ([_f((6,))], {"shape": [2, 3]}), ([_f((1,))], {"shape": []})],
    "transpose": [([_f((2, 3, 4))], {"perm": [2, 0, 1]}), ([_f((2, 3))], {})],
    "concat": [([_f((2, 3)), _f((2, 1))], {"axis": -1}), ([_i((3,))], {})],
    "split": [([_f((2, 6))], {"axis": 1, "sizes": [1, 5]}), ([_f((4,))], {"sizes": [4]}),
              ([_f((3, 2))], {"sizes": [1, 1, 1]})],
    "slice": [([_f((5, 6))], {"starts": [1, -1], "ends": [I64_MAX, 0], "steps": [2, -1]}),
              ([_f((5,))], {"starts": [7], "ends": [9]})],
    "gather": [([_f((5, 3)), _i((2, 2), hi=5)], {}), ([_f((5, 3)), _i(())], {"axis": 1})],
    "unsqueeze": [([_f((3,))], {"axes": [0, -1]}), ([_f(())], {"axes": [0]})],
    "squeeze": [([_f((1, 3, 1))], {"axes": [0, -1]})],
    "expand": [([_f((3, 1))], {"shape": [2, 1, 4]}), ([_i(())], {"shape": [3]})],
}

@pytest.mark.parametrize("op", sorted(EXAMPLES))
def test_shape_rule_matches_reference(op):
    for i, (inputs, attrs) in enumerate(EXAMPLES[op]):
        where = f"{op} example {i} ({attrs})"
        g = Graph("example")
        vals = [g.add_constant(f"w{j}", a) if isinstance(a, QuantizedArray) else
                g.add_input(f"x{j}", a.shape, dtype_name(a.dtype)) for j, a in enumerate(inputs)]
        out = g.add(op, vals, attrs)
        outs = out if isinstance(out, list) else [out]
        g.set_outputs(outs)
        verify(g)
        with np.errstate(all="ignore"):   # log/sqrt of the random negatives give nan: only types matter
            result = ref(op, *inputs, **attrs)
        if len(outs) == 1:   # what the reference target and constant folding expect
            assert isinstance(result, (np.ndarray, np.generic)), f"{where}: returned {type(result).__name__}"
            result = (result,)
        assert isinstance(result, tuple) and len(result) == len(outs), where
        for v, r in zip(outs, result):
            assert (tuple(np.shape(r)), dtype_name(r.dtype)) == (v.shape, v.dtype), \
                f"{where}: reference gives {dtype_name(r.dtype)}{list(np.shape(r))}, rule says {v.type}"


def test_every_op_in_these_files_is_listed():
    here = {name for name, op in OPS.items() if op.rule.__module__ in OP_MODULES}
    assert not here - KNOWN_OPS, f"ops defined in {sorted(OP_MODULES)} but not in KNOWN_OPS: {sorted(here - KNOWN_OPS)}"
    assert not KNOWN_OPS - set(OPS), f"KNOWN_OPS lists unregistered ops: {sorted(KNOWN_OPS - set(OPS))}"


def test_every_known_op_has_an_example():
    missing = sorted(KNOWN_OPS - set(EXAMPLES))
    assert not missing, f"ops without an example for the shape-rule check: {missing}"


def test_every_known_op_has_an_oracle():
    missing = sorted(KNOWN_OPS - COVERED)
    assert not missing, f"ops without a torch/gguf oracle test: {missing}"
