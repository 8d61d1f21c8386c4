"""Every op the NPU lowers, against the reference interpreter, over shapes with 1, 127, 129 and 300
rows/columns (not multiples of the 128 partitions) plus seeded random ones, in three precisions.

Tolerances, as max |npu - reference| <= TOL * max(1, max |reference|):
  f32     1e-5   fp32 everywhere; only the summation order differs (K tiles of 128, PSUM in fp32)
  bf16    2e-2   every stored value rounds to bf16 (8 significant bits: 2^-9 relative), arithmetic
                 and accumulation in fp32; a product of two rounded operands, or a sum of rounded
                 terms, stays within a few 2^-9 of its magnitude
  bf16x3  1e-4   matmuls as three bf16 products of hi/lo parts (~16 significant bits), else fp32
"""

import math

import numpy as np
import pytest

from isthmus.compiler.executable import Executable
from isthmus.compiler.ir import Graph
from isthmus.compiler.lower.npu.target import lower_npu
from isthmus.compiler.quant import quantize

TOL = {"f32": 1e-5, "bf16": 2e-2, "bf16x3": 1e-4}
EDGE = [(1, 129), (127, 300), (300, 1), (129, 127)]
_rng = np.random.default_rng(20240)
RANDOM = [tuple(int(x) for x in _rng.integers(1, 260, 2)) for _ in range(2)]
SHAPES = EDGE + RANDOM


def run_both(g: Graph, feeds: dict, precision: str):
    ref = Executable(g, "reference").run(feeds)
    exe = lower_npu(g, precision=precision, check_races=True)
    return ref, exe.run(feeds), exe


def assert_close(ref: dict, got: dict, precision: str, what: str = ""):
    for name, r in ref.items():
        o = got[name]
        assert o.shape == r.shape, (name, o.shape, r.shape)
        assert o.dtype == r.dtype, (name, o.dtype, r.dtype)
        r64, o64 = np.asarray(r, np.float64), np.asarray(o, np.float64)
        err = float(np.abs(r64 - o64).max()) if r.size else 0.0
        scale = max(1.0, float(np.abs(r64).max()) if r.size else 1.0)
        assert err <= TOL[precision] * scale, f"{what} {name}: error {err:.3g} > {TOL[precision]} x {scale:.3g}"


def normal(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


UNARY = ["exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "sigmoid", "silu", "neg", "abs"]


@pytest.mark.parametrize("precision", ["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_unary(shape, precision):
    g = Graph("unary")
    x = g.add_input("x", shape, "f32")
    pos = g.add("abs", [x])          # log/sqrt/rsqrt/reciprocal need positive inputs
    pos = g.add("add", [pos, g.const(0.5)])
    outs = [g.add(op, [pos if op in ("log", "sqrt", "rsqrt", "reciprocal") else x], name=op) for op in UNARY]
    outs += [g.add("gelu", [x], {"approximate": a}, name=f"gelu_{a}") for a in ("tanh", "none")]
    outs.append(g.add("pow", [pos, g.const(2.0)], name="pow2"))
    g.set_outputs(outs)
    ref, got, _ = run_both(g, {"x": normal(shape, 1)}, precision)
    assert_close(ref, got, precision)


@pytest.mark.parametrize("precision", ["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_binary_broadcasting(shape, precision):
    g = Graph("binary")
    R, C = shape
    x = g.add_input("x", (R, C), "f32")
    row = g.add_input("row", (1, C), "f32")
    col = g.add_input("col", (R, 1), "f32")
    outs = [g.add(op, [x, row], name=f"{op}_row") for op in ("add", "sub", "mul", "max", "min")]
    outs += [g.add(op, [col, x], name=f"{op}_col") for op in ("add", "mul", "sub")]
    outs.append(g.add("div", [x, g.add("add", [g.add("abs", [row]), g.const(1.0)])], name="div"))
    outs.append(g.add("swiglu", [x, row], name="swiglu"))
    g.set_outputs(outs)
    feeds = {"x": normal((R, C), 2), "row": normal((1, C), 3), "col": normal((R, 1), 4)}
    ref, got, _ = run_both(g, feeds, precision)
    assert_close(ref, got, precision)


@pytest.mark.parametrize("precision", ["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_norms_softmax_reductions(shape, precision):
    R, C = shape
    g = Graph("norms")
    x = g.add_input("x", (2, R, C), "f32")
    w = g.add_constant("w", 1 + normal(C, 5, 0.1))
    b = g.add_constant("b", normal(C, 6))
    g.set_outputs([
        g.add("rmsnorm", [x, w], {"eps": 1e-5}, name="rmsnorm"),
        g.add("layernorm", [x, w, b], {"eps": 1e-5}, name="layernorm"),
        g.add("softmax", [x], {"axis": -1}, name="softmax_last"),
        g.add("softmax", [x], {"axis": 1}, name="softmax_mid"),
        g.add("reduce_sum", [x], {"axes": [2], "keepdims": True}, name="sum"),
        g.add("reduce_mean", [x], {"axes": [1], "keepdims": False}, name="mean"),
        g.add("reduce_max", [x], {"axes": [0, 2], "keepdims": False}, name="max"),
    ])
    ref, got, _ = run_both(g, {"x": normal((2, R, C), 7, 3.0)}, precision)
    assert_close(ref, got, precision)


@pytest.mark.parametrize("precision", ["f32", "bf16", "bf16x3"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant", [None, "q4_1", "q8_0"])
def test_linear(shape, precision, quant):
    rows, k = shape
    k = k if quant is None else max(32, k // 32 * 32)
    n = 300 if rows < 200 else 129
    g = Graph("linear")
    x = g.add_input("x", (1, rows, k), "f32")
    w = normal((n, k), 8) / np.sqrt(k)
    w = g.add_constant("w", quantize(w, quant) if quant else w)
    b = g.add_constant("b", normal(n, 9))
    g.set_outputs([g.add("linear", [x, w, b], name="linear"), g.add("linear", [x, w], name="nobias")])
    ref, got, _ = run_both(g, {"x": normal((1, rows, k), 10)}, precision)
    assert_close(ref, got, precision)


@pytest.mark.parametrize("precision", ["f32", "bf16"])
@pytest.mark.parametrize("shape", EDGE)
def test_matmul(shape, precision):
    m, k = shape
    g = Graph("matmul")
    a = g.add_input("a", (2, m, k), "f32")
    bt = g.add_input("b", (2, k, 129), "f32")
    c = g.add_constant("c", normal((k, 127), 11))
    g.set_outputs([g.add("matmul", [a, bt], name="batched"), g.add("matmul", [a, c], name="constant")])
    ref, got, _ = run_both(g, {"a": normal((2, m, k), 12), "b": normal((2, k, 129), 13)}, precision)
    assert_close(ref, got, precision)


@pytest.mark.parametrize("precision", ["f32", "bf16"])
@pytest.mark.parametrize("seq,past", [(1, 0), (1, 127), (129, 0), (5, 300), (300, 1)])
def test_attention(seq, past, precision):
    g = Graph("attention")
    q = g.add_input("q", (1, 6, seq, 64), "f32")
    k = g.add_input("k", (1, 2, past + seq, 64), "f32")
    v = g.add_input("v", (1, 2, past + seq, 64), "f32")
    mask = g.add_input("mask", (1, 1, seq, past + seq), "f32")
    g.set_outputs([g.add("attention", [q, k, v], {"causal": True}, name="causal"),
                   g.add("attention", [q, k, v, mask], {"causal": False, "scale": 0.2}, name="masked")])
    m = np.where(np.random.default_rng(14).random((1, 1, seq, past + seq)) < 0.2, -np.inf, 0.0).astype(np.float32)
    m[..., 0] = 0.0
    m[..., -1, :] = -np.inf                          # a fully masked row: zeros, as the reference's softmax
    if seq > 2:
        m[..., 1, :] = np.finfo(np.float32).min      # masked by a finite minimum: the average of the values
    feeds = {"q": normal((1, 6, seq, 64), 15), "k": normal((1, 2, past + seq, 64), 16),
             "v": normal((1, 2, past + seq, 64), 17), "mask": m}
    ref, got, _ = run_both(g, feeds, precision)
    assert_close(ref, got, precision)


@pytest.mark.parametrize("precision", ["f32", "bf16"])
@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("seq", [1, 127, 300])
def test_rope(seq, layout, precision):
    g = Graph("rope")
    x = g.add_input("x", (1, 3, seq, 64), "f32")
    pos = g.add_input("pos", (1, seq), "i64")
    g.set_outputs([g.add("rope", [x, pos], {"layout": layout, "theta": 100000.0}, name="full"),
                   g.add("rope", [x, pos], {"layout": layout, "dim": 32}, name="partial")])
    feeds = {"x": normal((1, 3, seq, 64), 18), "pos": np.arange(7, 7 + seq)[None] * 13}
    ref, got, _ = run_both(g, feeds, precision)
    assert_close(ref, got, precision)


@pytest.mark.parametrize("precision", ["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_data_movement(shape, precision):
    R, C = shape
    g = Graph("movement")
    x = g.add_input("x", (R, C), "f32")
    y = g.add_input("y", (R, 3), "f32")
    t = g.add("transpose", [g.add("reshape", [x], {"shape": [1, R, C]})], {"perm": [2, 0, 1]}, name="transpose")
    parts = g.add("split", [g.add("concat", [x, y], {"axis": 1})], {"axis": 1, "sizes": [1, C + 2]}, name="split")
    g.set_outputs([
        t, g.add("concat", [y, x, y], {"axis": 1}, name="concat"), *parts,
        g.add("slice", [x], {"starts": [R // 3, 0], "ends": [R, C], "axes": [0, 1], "steps": [1, 2]}, name="slice"),
        g.add("expand", [g.add("unsqueeze", [y], {"axes": [0]})], {"shape": [2, R, 3]}, name="expand"),
        g.add("squeeze", [g.add("unsqueeze", [x], {"axes": [1]})], {"axes": [1]}, name="squeeze"),
        g.add("trilu", [x], {"upper": False, "k": 1}, name="tril"),
        g.add("trilu", [x], {"upper": True, "k": -2}, name="triu"),
        g.add("cast", [g.add("cast", [x], {"to": "f16"})], {"to": "f32"}, name="cast"),
    ])
    ref, got, _ = run_both(g, {"x": normal((R, C), 19), "y": normal((R, 3), 20)}, precision)
    assert_close(ref, got, precision)


@pytest.mark.parametrize("precision", ["f32", "bf16"])
@pytest.mark.parametrize("n", [1, 127, 129, 300])
def test_embedding_and_gather(n, precision):
    g = Graph("gather")
    ids = g.add_input("ids", (1, n), "i64")
    table = g.add_constant("table", quantize(normal((301, 64), 21), "q8_0"))
    x = g.add_input("x", (3, 301, 5), "f32")
    g.set_outputs([g.add("embedding", [table, ids], name="embedding"),
                   g.add("gather", [x, ids], {"axis": 1}, name="gather"),
                   g.add("gather", [x, g.add("neg", [ids])], {"axis": 1}, name="negative")])
    ids_v = np.random.default_rng(22).integers(1, 301, (1, n))
    ref, got, _ = run_both(g, {"ids": ids_v, "x": normal((3, 301, 5), 23)}, precision)
    assert_close(ref, got, precision)


def test_host_fallback_and_shape_folding():
    """Ops without NPU instructions (comparisons, where) run on the host between programs; shape
    computations of symbolic dims fold once the inputs bind them."""
    g = Graph("mixed")
    x = g.add_input("x", ("n", 40), "f32")
    n = g.add("shape", [x], {"start": 0, "end": 1})
    ramp = g.add("cast", [g.add("range", [g.const(0, "i64"), g.add("squeeze", [n], {"axes": [0]}),
                                          g.const(1, "i64")], {"length": "n"})], {"to": "f32"})
    y = g.add("exp", [x])
    big = g.add("greater", [y, g.const(1.0)])
    z = g.add("where", [big, y, g.add("neg", [y])])
    g.set_outputs([g.add("add", [z, g.add("unsqueeze", [ramp], {"axes": [1]})], name="out")])
    for rows in (3, 130):
        feeds = {"x": normal((rows, 40), 24)}
        ref = Executable(g, "reference").run(feeds)
        exe = lower_npu(g, precision="f32", check_races=True)
        assert_close(ref, exe.run(feeds), "f32")
    kinds = [s.kind for s in exe._generic.cache[next(iter(exe._generic.cache))].segments]
    assert kinds == ["npu", "host", "npu", "host", "npu"], kinds      # exp | greater | neg | where | add


def test_every_instruction_names_its_node():
    g = Graph("labels")
    x = g.add_input("x", (4, 96), "f32")
    w = g.add_constant("w", normal((64, 96), 25))
    h = g.add("rmsnorm", [x, g.add_constant("g", np.ones(96, np.float32))], name="norm")
    g.set_outputs([g.add("silu", [g.add("linear", [h, w], name="proj")], name="act")])
    exe = lower_npu(g, precision="bf16")
    exe.run({"x": normal((4, 96), 26)})
    prog = next(iter(exe._generic.cache.values())).segments[0].program
    names = {n.outputs[0].name for n in g.nodes}
    assert {i.label for i in prog.instructions} <= names
    assert {i.label for i in prog.instructions} >= {"norm", "proj", "act"}
    assert all('@"' in str(i) for i in prog.instructions)       # disassembly shows them
    assert math.isfinite(exe.run({"x": normal((4, 96), 27)})["act"].sum())
