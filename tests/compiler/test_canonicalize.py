"""Canonicalisation: each decomposed pattern, built in the IR, becomes its fused op with the same numbers.

Every case checks the op histogram after the full pipeline AND the numerics against the
unrewritten graph on the reference target; negative cases check that near-misses (a wrong
constant, a different axis, a different operand) are left alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from isthmus.compiler.ir import Graph
from isthmus.compiler.ir_text import parse_graph, print_graph
from isthmus.compiler.targets import compile_model

RNG = np.random.default_rng(0)


def _compare(g: Graph, feeds: list[dict], *, fused: dict[str, int], gone: tuple[str, ...] = ()):
    """Run g unrewritten and through the pipeline; same outputs, and the histogram as stated."""
    plain = compile_model(g, passes=[])
    exe = compile_model(g)
    hist = exe.graph.op_histogram()
    for op, count in fused.items():
        assert hist.get(op, 0) == count, f"expected {count} x {op}, got {hist}"
    for op in gone:
        assert op not in hist, f"{op} survived canonicalisation: {hist}"
    for feed in feeds:
        want, got = plain.run(feed), exe.run(feed)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=2e-6)
    # the rewritten graph still prints and parses
    weights = {v.name: v.data for v in exe.graph.constants}
    parse_graph(print_graph(exe.graph), weights)
    return exe


def _x(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def _feeds(name="x", last=24, seqs=(3, 7), dtype=np.float32):
    return [{name: _x(2, s, last, dtype=dtype)} for s in seqs]


# -- rmsnorm -------------------------------------------------------------------------------------

def _rms_graph(form: str, eps=1e-6, dtype="f32"):
    g = Graph("rms")
    x0 = g.add_input("x", (2, "seq", 24), dtype)
    w = g.add_constant("w", (1 + 0.1 * RNG.standard_normal(24)).astype(np.float16 if dtype == "f16" else np.float32))
    x = g.add("cast", [x0], {"to": "f32"}) if dtype == "f16" else x0
    if form == "mul-rsqrt":
        ms = g.add("reduce_mean", [g.add("mul", [x, x])], {"axes": [-1]})
        y = g.add("mul", [g.add("mul", [x, g.add("rsqrt", [g.add("add", [ms, g.const(eps)])])]), w])
    elif form == "pow-sqrt-div":
        ms = g.add("reduce_mean", [g.add("pow", [x, g.const(2.0)])], {"axes": [2]})
        y = g.add("mul", [w, g.add("div", [x, g.add("sqrt", [g.add("add", [g.const([eps]), ms])])])])
    elif form == "pow-sqrt-reciprocal":        # what torch.onnx emits for torch.rsqrt
        ms = g.add("reduce_mean", [g.add("pow", [x, g.const(2.0)])], {"axes": [-1]})
        r = g.add("reciprocal", [g.add("sqrt", [g.add("add", [ms, g.const(eps)])])])
        y = g.add("mul", [w, g.add("mul", [x, r])])
    elif form == "no-weight":
        ms = g.add("reduce_mean", [g.add("pow", [x, g.const(2.0)])], {"axes": [-1]})
        y = g.add("div", [x, g.add("sqrt", [g.add("add", [ms, g.const(eps)])])])
    elif form == "cast-f16":                  # HF: weight * (x.float() * rsqrt(...)).to(f16)
        ms = g.add("reduce_mean", [g.add("pow", [x, g.const(2.0)])], {"axes": [-1]})
        n = g.add("mul", [x, g.add("rsqrt", [g.add("add", [ms, g.const(eps)])])])
        y = g.add("mul", [w, g.add("cast", [n], {"to": "f16"})], name="y")
    g.set_outputs([y])
    return g


@pytest.mark.parametrize("form", ["mul-rsqrt", "pow-sqrt-div", "pow-sqrt-reciprocal", "no-weight"])
def test_rmsnorm(form):
    exe = _compare(_rms_graph(form, eps=1e-5), _feeds(), fused={"rmsnorm": 1},
                   gone=("reduce_mean", "sqrt", "rsqrt", "pow", "div", "reciprocal"))
    node = next(n for n in exe.graph.nodes if n.op == "rmsnorm")
    assert node.attrs["eps"] == pytest.approx(1e-5, rel=1e-6)
    assert exe.graph.op_histogram() == {"rmsnorm": 1}


def test_rmsnorm_with_casts_around_it():
    g = _rms_graph("cast-f16", dtype="f16")
    plain, exe = compile_model(g, passes=[]), compile_model(g)
    assert exe.graph.op_histogram() == {"rmsnorm": 1}
    assert exe.graph.nodes[0].inputs[0].dtype == "f16"
    for feed in _feeds(dtype=np.float16):
        # HF rounds to f16 before the weight multiply, rmsnorm after it: one f16 ulp apart at most
        np.testing.assert_allclose(exe.run(feed)["y"].astype(np.float32),
                                   plain.run(feed)["y"].astype(np.float32), rtol=2e-3, atol=2e-3)


def _rms_near_miss(kind):
    g = Graph("rms")
    x = g.add_input("x", (2, "seq", 24), "f32")
    y_in = g.add_input("y", (2, "seq", 24), "f32")
    sq = g.add("pow", [x, g.const(4.0 if kind == "fourth-power" else 2.0)])
    ms = g.add("reduce_mean", [sq], {"axes": [1] if kind == "axis" else [-1], "keepdims": True})
    s = g.add("add", [ms, g.const(1e-6)])
    g.set_outputs([g.add("mul", [y_in if kind == "other-x" else x, g.add("rsqrt", [s])])])
    return g


@pytest.mark.parametrize("kind", ["axis", "fourth-power", "other-x"])
def test_rmsnorm_near_misses_are_left_alone(kind):
    g = _rms_near_miss(kind)
    feeds = [{"x": _x(2, 5, 24), "y": _x(2, 5, 24)}]
    _compare(g, feeds, fused={"rmsnorm": 0})


# -- layernorm ---------------------------------------------------------------------------------

def _ln_graph(form: str):
    g = Graph("ln")
    x = g.add_input("x", (2, "seq", 24), "f32")
    w = g.add_constant("w", (1 + 0.1 * RNG.standard_normal(24)).astype(np.float32))
    b = g.add_constant("b", (0.1 * RNG.standard_normal(24)).astype(np.float32))
    d = g.add("sub", [x, g.add("reduce_mean", [x], {"axes": [-1]})])
    sq = g.add("mul", [d, d]) if form == "mul" else g.add("pow", [d, g.const(2.0)])
    s = g.add("add", [g.add("reduce_mean", [sq], {"axes": [-1]}), g.const(1e-5)])
    if form == "var-of-x":    # not a layernorm: the variance is of x, not of x - mean
        s = g.add("add", [g.add("reduce_mean", [g.add("mul", [x, x])], {"axes": [-1]}), g.const(1e-5)])
    n = g.add("mul", [d, g.add("rsqrt", [s])]) if form == "mul" else g.add("div", [d, g.add("sqrt", [s])])
    y = n if form == "bare" else g.add("mul", [n, w])
    if form not in ("bare", "no-bias"):
        y = g.add("add", [y, b])
    g.set_outputs([y])
    return g


@pytest.mark.parametrize("form,inputs", [("div", 3), ("mul", 3), ("no-bias", 2), ("bare", 2)])
def test_layernorm(form, inputs):
    exe = _compare(_ln_graph(form), _feeds(), fused={"layernorm": 1})
    assert exe.graph.op_histogram() == {"layernorm": 1}
    node = exe.graph.nodes[0]
    assert len(node.inputs) == inputs and node.attrs["eps"] == pytest.approx(1e-5, rel=1e-6)


def test_layernorm_near_miss_is_left_alone():
    _compare(_ln_graph("var-of-x"), _feeds(), fused={"layernorm": 0})


# -- gelu, silu, swiglu ---------------------------------------------------------------------------

def _gelu_graph(form: str, half=0.5, inner=0.044715):
    g = Graph("gelu")
    x = g.add_input("x", (2, "seq", 24), "f32")
    if form == "erf-div":
        a = g.add("add", [g.const(1.0), g.add("erf", [g.add("div", [x, g.const(math.sqrt(2.0))])])])
        y = g.add("mul", [g.add("mul", [g.const(half), x]), a])
    elif form == "erf-mul":
        a = g.add("add", [g.add("erf", [g.add("mul", [x, g.const(0.7071067811865476)])]), g.const(1.0)])
        y = g.add("mul", [x, g.add("mul", [a, g.const(half)])])
    else:  # tanh, as HF's NewGELUActivation writes it
        cube = g.add("pow", [x, g.const(3.0)]) if form == "tanh-pow" else g.add("mul", [g.add("mul", [x, x]), x])
        u = g.add("add", [x, g.add("mul", [g.const(inner), cube])])
        t = g.add("tanh", [g.add("mul", [g.const(math.sqrt(2.0 / math.pi)), u])])
        y = g.add("mul", [g.add("mul", [g.const(half), x]), g.add("add", [g.const(1.0), t])])
    g.set_outputs([y])
    return g


@pytest.mark.parametrize("form,approx", [("erf-div", "none"), ("erf-mul", "none"),
                                         ("tanh-pow", "tanh"), ("tanh-mul", "tanh")])
def test_gelu(form, approx):
    exe = _compare(_gelu_graph(form), _feeds(), fused={"gelu": 1})
    assert exe.graph.op_histogram() == {"gelu": 1}
    assert exe.graph.nodes[0].attrs["approximate"] == approx


@pytest.mark.parametrize("form,kw", [("erf-div", {"half": 0.6}), ("tanh-pow", {"inner": 0.05}),
                                     ("tanh-mul", {"half": 0.25})])
def test_gelu_wrong_constants_are_left_alone(form, kw):
    _compare(_gelu_graph(form, **kw), _feeds(), fused={"gelu": 0})


def _act_graph(form: str):
    g = Graph("act")
    a = g.add_input("x", (2, "seq", 24), "f32")
    b = g.add_input("y", (2, "seq", 24), "f32")
    if form == "silu":
        y = g.add("mul", [g.add("sigmoid", [a]), a])
    elif form == "not-silu":
        y = g.add("mul", [g.add("sigmoid", [b]), a])
    elif form == "swiglu":
        y = g.add("mul", [g.add("mul", [a, g.add("sigmoid", [a])]), b])
    else:  # swiglu of a fused silu
        y = g.add("mul", [b, g.add("silu", [a])])
    g.set_outputs([y])
    return g


@pytest.mark.parametrize("form,want", [("silu", {"silu": 1}), ("not-silu", {"sigmoid": 1, "mul": 1}),
                                       ("swiglu", {"swiglu": 1}), ("swiglu-of-silu", {"swiglu": 1})])
def test_silu_and_swiglu(form, want):
    feeds = [{"x": _x(2, s, 24), "y": _x(2, s, 24)} for s in (3, 6)]
    exe = _compare(_act_graph(form), feeds, fused=want)
    assert exe.graph.op_histogram() == want
    if form.startswith("swiglu"):
        gate = exe.graph.nodes[0].inputs[0]
        assert gate.name == "x"


# -- attention ---------------------------------------------------------------------------------

def _causal_additive_mask(g, q, kind: str):
    """[1, 1, seq, seq] masks built from the query's run-time shape, as exporters do."""
    n = g.add("shape", [q], {"start": 2, "end": 3})
    nn = g.add("concat", [n, n], {"axis": 0})
    if kind == "trilu-inf":           # torch.full((s, s), -inf).triu(1)
        full = g.add("constant_of_shape", [nn], {"value": -math.inf, "dtype": "f32", "dims": ["seq", "seq"]})
        m = g.add("trilu", [full], {"upper": True, "k": 1})
    elif kind in ("sdpa", "not-causal"):   # SDPA's lowering: where(tril(ones) == 0, -FLT_MAX, 0)
        ones = g.add("constant_of_shape", [nn], {"value": 1.0, "dtype": "f32", "dims": ["seq", "seq"]})
        lower = g.add("trilu", [ones], {"upper": False, "k": 1 if kind == "not-causal" else 0})
        m = g.add("where", [g.add("equal", [lower, g.const(0.0)]), g.const(-3.4028234663852886e38), g.const(0.0)])
    return g.add("unsqueeze", [m], {"axes": [0, 1]})


def _attn_graph(*, hq=4, hkv=2, d=8, mask="trilu-inf", kt_form="transpose", split_scale=False, softmax_f32=False):
    g = Graph("attn")
    q = g.add_input("q", (1, hq, "seq", d), "f32")
    k = g.add_input("k", (1, hkv, "seq", d), "f32")
    v = g.add_input("v", (1, hkv, "seq", d), "f32")
    if mask == "input":
        m = g.add_input("mask", (1, 1, "seq", "seq"), "f32")
    if hq != hkv:        # HF repeat_kv: [b, hkv, s, d] -> [b, hkv, rep, s, d] -> [b, hq, s, d]
        def repeat(t):
            t = g.add("expand", [g.add("unsqueeze", [t], {"axes": [2]})], {"shape": [1, 1, hq // hkv, 1, 1]})
            return g.add("reshape", [t], {"shape": [1, hq, -1, d]})
        k, v = repeat(k), repeat(v)
    if kt_form == "transpose":
        kt = g.add("transpose", [k], {"perm": [0, 1, 3, 2]})
    else:               # torch.onnx's SDPA: reshape -> transpose(0, 2, 1) -> reshape
        merged = g.add("transpose", [g.add("reshape", [k], {"shape": [hq, -1, d]})], {"perm": [0, 2, 1]})
        kt = g.add("reshape", [merged], {"shape": [1, hq, d, -1]})
    scale = 1.0 / math.sqrt(d)
    if split_scale:
        c = g.const(math.sqrt(scale))
        s = g.add("matmul", [g.add("mul", [q, c]), g.add("mul", [kt, c])])
    else:
        s = g.add("div", [g.add("matmul", [q, kt]), g.const(math.sqrt(d))])
    if mask == "input":
        s = g.add("add", [s, m])
    elif mask != "none":
        s = g.add("add", [s, _causal_additive_mask(g, q, mask)])
    if softmax_f32:
        p = g.add("cast", [g.add("softmax", [g.add("cast", [s], {"to": "f32"})], {"axis": -1})], {"to": "f32"})
    else:
        p = g.add("softmax", [s], {"axis": 3})
    g.set_outputs([g.add("matmul", [p, v], name="out")])
    return g


def _attn_feeds(hq=4, hkv=2, d=8, mask=False):
    feeds = []
    for s in (1, 5, 9):
        f = {"q": _x(1, hq, s, d), "k": _x(1, hkv, s, d), "v": _x(1, hkv, s, d)}
        if mask:
            f["mask"] = np.where(RNG.random((1, 1, s, s)) < 0.3, -1e9, 0.0).astype(np.float32)
            f["mask"][..., 0] = 0.0
        feeds.append(f)
    return feeds


@pytest.mark.parametrize("kw", [
    dict(),                                                          # GQA, -inf triu mask
    dict(hq=4, hkv=4),                                               # plain multi-head
    dict(hq=6, hkv=1),                                               # multi-query
    dict(mask="sdpa", kt_form="merged", split_scale=True),           # torch.onnx's SDPA lowering
    dict(mask="sdpa", kt_form="merged", split_scale=True, hq=4, hkv=4, softmax_f32=True),
])
def test_attention_causal(kw):
    hq, hkv = kw.get("hq", 4), kw.get("hkv", 2)
    exe = _compare(_attn_graph(**kw), _attn_feeds(hq, hkv), fused={"attention": 1},
                   gone=("softmax", "matmul", "trilu", "expand", "where"))
    node = next(n for n in exe.graph.nodes if n.op == "attention")
    assert node.attrs["causal"] is True and len(node.inputs) == 3
    assert node.attrs["scale"] == pytest.approx(1 / math.sqrt(8), rel=1e-6)
    assert node.inputs[1].shape[1] == hkv        # the repeat is gone: attention does GQA itself
    assert exe.graph.outputs[0].name == "out"


@pytest.mark.parametrize("mask", ["none", "input", "not-causal"])
def test_attention_keeps_a_mask_it_cannot_prove_causal(mask):
    exe = _compare(_attn_graph(mask=mask), _attn_feeds(mask=mask == "input"), fused={"attention": 1},
                   gone=("softmax",))
    node = next(n for n in exe.graph.nodes if n.op == "attention")
    assert node.attrs["causal"] is False
    assert len(node.inputs) == (3 if mask == "none" else 4)


def test_attention_static_constant_causal_mask():
    g = Graph("attn")
    q, k, v = (g.add_input(n, (1, 2, 6, 8), "f32") for n in "qkv")
    m = g.add_constant("mask", np.triu(np.full((1, 1, 6, 6), -np.inf, np.float32), 1))
    s = g.add("add", [g.add("mul", [g.add("matmul", [q, g.add("transpose", [k], {"perm": [0, 1, 3, 2]})]),
                                    g.const(0.125)]), m])
    g.set_outputs([g.add("matmul", [g.add("softmax", [s]), v])])
    feeds = [{n: _x(1, 2, 6, 8) for n in "qkv"}]
    exe = _compare(g, feeds, fused={"attention": 1})
    node = exe.graph.nodes[0]
    assert exe.graph.op_histogram() == {"attention": 1}
    assert node.attrs == {"causal": True, "scale": 0.125, "softcap": 0.0, "window": 0}


def test_attention_wrong_softmax_axis_is_left_alone():
    g = Graph("attn")
    q, k, v = (g.add_input(n, (1, 2, 6, 6), "f32") for n in "qkv")
    s = g.add("matmul", [q, g.add("transpose", [k], {"perm": [0, 1, 3, 2]})])
    g.set_outputs([g.add("matmul", [g.add("softmax", [s], {"axis": 2}), v])])
    _compare(g, [{n: _x(1, 2, 6, 6) for n in "qkv"}], fused={"attention": 0, "softmax": 1})
