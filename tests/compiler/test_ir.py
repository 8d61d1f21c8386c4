"""The graph IR: construction through Graph.add, the verifier, symbolic dims, clone.

Each verifier check is provoked by corrupting an otherwise valid graph the way a buggy pass
would (reordering nodes, retyping a value, editing attributes in place), so the test fails if
the check goes missing.
"""

from __future__ import annotations

import numpy as np
import pytest

from isthmus.compiler.ir import Graph, Node, TensorType, Value, clone, verify
from isthmus.compiler.ir_text import print_graph
from isthmus.compiler.ops import get_op
from isthmus.errors import IRError, IsthmusError, UnsupportedError


def small_graph() -> Graph:
    """x -> linear -> rmsnorm -> split in two -> add: three node kinds, a multi-output node."""
    g = Graph("small")
    x = g.add_input("x", ("batch", 4), "f32")
    w = g.add_constant("w", np.ones((6, 4), np.float32))
    nw = g.add_constant("nw", np.ones(6, np.float32))
    h = g.add("linear", [x, w], name="h")
    n = g.add("rmsnorm", [h, nw], {"eps": 1e-5}, name="n")
    a, b = g.add("split", [n], {"axis": -1, "sizes": [3, 3]}, name="parts")
    y = g.add("add", [a, b], name="y")
    g.set_outputs([y, a])
    verify(g)
    return g


def node(g: Graph, op: str) -> Node:
    return next(n for n in g.nodes if n.op == op)


# -- construction ------------------------------------------------------------------------------

def test_add_infers_types_and_names():
    g = small_graph()
    assert [n.op for n in g.nodes] == ["linear", "rmsnorm", "split", "add"]
    h, n = node(g, "linear").outputs[0], node(g, "rmsnorm").outputs[0]
    assert h.name == "h" and h.type == TensorType(("batch", 6), "f32")
    assert node(g, "rmsnorm").attrs == {"eps": 1e-5}
    parts = node(g, "split").outputs
    assert [v.name for v in parts] == ["parts.0", "parts.1"]
    assert all(v.type == TensorType(("batch", 3), "f32") and v.producer is node(g, "split") for v in parts)
    assert node(g, "add").inputs == parts
    assert g.users()[n] == [node(g, "split")]
    assert g.op_histogram() == {"add": 1, "linear": 1, "rmsnorm": 1, "split": 1}


def test_add_fills_default_attributes_and_fresh_names():
    g = Graph()
    x = g.add_input("x", (3,), "f32")
    a = g.add("gelu", [x])
    b = g.add("gelu", [a])
    c = g.add("gelu", [b], name="x")          # the name is taken by the input: a fresh one is made
    assert a.producer.attrs == {"approximate": "none"}
    assert (a.name, b.name) == ("gelu", "gelu.1") and c.name not in ("x", "gelu", "gelu.1")
    k1, k2 = g.const(1.0), g.const(2.0)
    assert k1.name != k2.name and k1.type == TensorType((), "f32")
    assert len({v.name for v in g.values()}) == len(list(g.values()))


def test_add_rejects_bad_nodes_up_front():
    g = Graph()
    x = g.add_input("x", (2, 3), "f32")
    with pytest.raises(IRError, match="defined twice"):
        g.add_input("x", (1,), "f32")
    with pytest.raises(UnsupportedError, match="frobnicate"):
        g.add("frobnicate", [x])
    with pytest.raises(IRError, match="takes 2 inputs, got 1"):
        g.add("add", [x])
    with pytest.raises(IRError, match="has no attribute"):
        g.add("transpose", [x], {"permutation": [1, 0]})
    with pytest.raises(IRError, match="not a permutation"):
        g.add("transpose", [x], {"perm": [0, 0]})
    with pytest.raises(IRError, match="types differ"):
        g.add("add", [x, g.add_input("i", (2, 3), "i64")])
    with pytest.raises(IRError, match="unknown element type"):
        g.add_input("q", (3,), "f8")
    assert g.nodes == []   # nothing half-added


# -- the verifier ----------------------------------------------------------------------------------

def test_verify_catches_use_before_definition():
    g = small_graph()
    g.nodes[0], g.nodes[1] = g.nodes[1], g.nodes[0]
    with pytest.raises(IRError, match=r"node 0 .*input %h is used before it is defined"):
        verify(g)
    g = small_graph()
    stranger = Graph("other").add_input("z", ("batch", 3), "f32")   # a value from another graph
    node(g, "add").inputs[1] = stranger
    with pytest.raises(IRError, match="%z is used before it is defined"):
        verify(g)


def test_verify_catches_undefined_graph_output():
    g = small_graph()
    g.outputs.append(Value("ghost", TensorType((1,), "f32")))
    with pytest.raises(IRError, match="graph output %ghost is not defined"):
        verify(g)


def test_verify_catches_duplicate_definitions():
    g = small_graph()
    node(g, "add").outputs[0].name = "h"           # two values named %h
    with pytest.raises(IRError, match="%h is defined twice"):
        verify(g)
    g = small_graph()
    g.constants.append(g.constants[0])             # one value defined twice
    with pytest.raises(IRError, match="defined twice"):
        verify(g)
    g = small_graph()
    g.nodes.append(g.nodes[-1])                    # one node listed twice
    with pytest.raises(IRError, match="defined twice"):
        verify(g)


def test_verify_catches_wrong_declared_output_type():
    for new_type in (TensorType(("batch", 7), "f32"), TensorType(("batch", 6), "f16"), TensorType(("seq", 6), "f32")):
        g = small_graph()
        node(g, "linear").outputs[0].type = new_type
        with pytest.raises(IRError, match=rf"output %h has type .*, shape rule says f32\[batch, 6\]"):
            verify(g)


def test_verify_catches_wrong_output_count_and_producer():
    g = small_graph()
    split = node(g, "split")
    split.outputs.pop()
    with pytest.raises(IRError, match="op gives 2 outputs, node has 1"):
        verify(g)
    g = small_graph()
    node(g, "add").outputs[0].producer = node(g, "linear")
    with pytest.raises(IRError, match="does not point back"):
        verify(g)


def test_verify_catches_unknown_op():
    g = small_graph()
    node(g, "add").op = "frobnicate"
    with pytest.raises(IRError, match=r"node 3 .*unknown op 'frobnicate'"):
        verify(g)


@pytest.mark.parametrize("op,edit,message", [
    ("rmsnorm", {"epsilon": 1e-6}, "no attribute"),                 # unknown name
    ("split", {"sizes": [3, 4]}, "do not add up"),                  # wrong value
    ("split", {"axis": 2}, "out of range"),
    ("split", {"axis": "last"}, "invalid attributes"),              # wrong kind of value
    ("split", {"sizes": 6}, "invalid attributes"),
    ("split", {"sizes": [3, "3"]}, "invalid attributes"),
    ("rmsnorm", {"eps": None}, None),                               # None is a value, shape rule ignores eps
])
def test_verify_catches_bad_attributes(op, edit, message):
    g = small_graph()
    node(g, op).attrs.update(edit)
    if message is None:
        verify(g)
        return
    with pytest.raises(IRError, match=message):
        verify(g)


def test_verify_catches_missing_attributes():
    g = small_graph()
    del node(g, "rmsnorm").attrs["eps"]
    with pytest.raises(IRError, match=r"attribute\(s\) \['eps'\] of op rmsnorm are missing"):
        verify(g)


BAD_ATTRS = [  # op, input shape, attributes, message
    ("transpose", (2, 3), {"perm": [0, "a"]}, "invalid attributes"),
    ("transpose", (2, 3), {"perm": [1.0, 0]}, "invalid attributes"),
    ("reduce_sum", (2, 3), {"axes": 1}, "invalid attributes"),
    ("reduce_sum", (2, 3), {"axes": [1, -1]}, "twice"),
    ("softmax", (2, 3), {"axis": 2}, "out of range"),
    ("reshape", (2, 3), {"shape": None}, "invalid attributes"),
    ("reshape", (2, 3), {"shape": [-1, -2]}, "negative"),
    ("squeeze", (2, 3), {"axes": [0]}, "cannot squeeze"),
    ("gelu", (2, 3), {"approximate": "fast"}, "approximate"),
    ("cast", (2, 3), {"to": "q4_0"}, "no numpy equivalent"),
    ("cast", (2, 3), {"to": "f8"}, "element type 'f8'"),
    ("rope", (1, 1, 2, 6), {"layout": "neox"}, "layout"),
    ("rope", (1, 1, 2, 6), {"dim": 3}, "even"),
    ("concat", (), {"axis": 0}, "invalid attributes"),
]
GOOD_ATTRS = {"transpose": {}, "reduce_sum": {}, "softmax": {}, "reshape": {"shape": [-1]}, "squeeze": {"axes": []},
              "gelu": {}, "cast": {}, "rope": {}, "concat": {}}


@pytest.mark.parametrize("op,shape,attrs,message", BAD_ATTRS)
def test_bad_attribute_values_are_ir_errors(op, shape, attrs, message):
    """Wrong kinds of attribute values fail as IRError, never as TypeError/KeyError from a rule."""
    def build():
        g = Graph()
        ins = [g.add_input("x", shape, "f32")] + ([g.add_input("pos", (2,), "i64")] if op == "rope" else [])
        return g, ins

    g, ins = build()
    with pytest.raises(IRError, match=message):
        g.add(op, ins, attrs)
    if shape:   # the same attributes slipped into an existing node are caught by verify
        g, ins = build()
        out = g.add(op, ins, GOOD_ATTRS[op])
        g.set_outputs([out])
        verify(g)
        out.producer.attrs.update(attrs)
        with pytest.raises(IRError, match=message):
            verify(g)


def test_verify_catches_wrong_input_count():
    g = small_graph()
    add = node(g, "add")
    add.inputs.append(add.inputs[0])
    with pytest.raises(IRError, match="op add takes 2 inputs, got 3"):
        verify(g)
    g = small_graph()
    node(g, "rmsnorm").inputs.pop()
    with pytest.raises(IRError, match="op rmsnorm takes 2 inputs, got 1"):
        verify(g)


def test_verify_checks_constants_and_inputs():
    g = small_graph()
    g.constants[0].data = np.ones((4, 6), np.float32)
    with pytest.raises(IRError, match="data shape"):
        verify(g)
    g = small_graph()
    g.constants[0].data = None
    with pytest.raises(IRError, match="has no data"):
        verify(g)
    g = small_graph()
    g.inputs[0].data = np.zeros((1, 4), np.float32)
    with pytest.raises(IRError, match="carries constant data"):
        verify(g)


def test_errors_are_user_facing():
    assert issubclass(IRError, IsthmusError)


# -- symbolic dims ---------------------------------------------------------------------------------

def out_type(op, in_types, attrs=None) -> TensorType | list[TensorType]:
    g = Graph()
    ins = [g.add_input(f"x{i}", shape, dtype) for i, (shape, dtype) in enumerate(in_types)]
    out = g.add(op, ins, attrs)
    g.set_outputs(out if isinstance(out, list) else [out])
    verify(g)
    return [v.type for v in out] if isinstance(out, list) else out.type


@pytest.mark.parametrize("a,b,want", [
    (("batch", 1, 4), (3, 1), ("batch", 3, 4)),
    (("seq",), (1,), ("seq",)),
    ((1,), ("seq",), ("seq",)),
    (("seq",), ("seq",), ("seq",)),
    (("seq",), (5,), (5,)),                 # a concrete dim wins: seq must be 5 (or 1) at run time
    ((5,), ("seq",), (5,)),
    (("batch", "seq", 1), ("seq", 8), ("batch", "seq", 8)),
    ((), ("b", 2), ("b", 2)),
])
def test_broadcast_with_symbolic_dims(a, b, want):
    assert out_type("add", [(a, "f32"), (b, "f32")]) == TensorType(want, "f32")


def test_broadcast_rejects_provably_different_dims():
    with pytest.raises(IRError, match="cannot broadcast dims 2 and 3"):
        out_type("mul", [((2,), "f32"), ((3,), "f32")])


@pytest.mark.parametrize("dims,want", [
    (["past", "seq"], "past+seq"),
    (["seq", "past"], "past+seq"),            # one canonical spelling, whichever comes first
    (["past+seq", 1], "past+seq+1"),
    (["past", 2, "seq", 3], "past+seq+5"),
    ([3, 4], 7),
    ([0, "seq"], "seq"),
])
def test_concat_adds_symbolic_dims(dims, want):
    t = out_type("concat", [((1, 2, d, 8), "f32") for d in dims], {"axis": 2})
    assert t == TensorType((1, 2, want, 8), "f32")


def test_concat_rejects_mismatch_off_the_axis():
    with pytest.raises(IRError, match="off the axis"):
        out_type("concat", [(("b", 2, "past", 8), "f32"), (("b", 3, "seq", 8), "f32")], {"axis": 2})
    with pytest.raises(IRError, match="differ"):
        out_type("concat", [((2, 3), "f32"), ((2, 3), "f16")], {"axis": 0})
    assert out_type("concat", [(("b", 3), "f32"), (("c", 3), "f32")], {"axis": 1}) == TensorType(("b", 6), "f32")


@pytest.mark.parametrize("shape,target,want", [
    (("batch", "seq", 32), [0, 0, 4, 8], ("batch", "seq", 4, 8)),
    (("batch", "seq", 4, 8), [0, 0, -1], ("batch", "seq", 32)),
    (("batch", "seq", 4, 8), [0, -1, 8], ("batch", "seq*4", 8)),
    (("batch", "seq", 32), [-1, 32], ("batch*seq", 32)),
    (("batch", 6, 32), [0, -1], ("batch", 192)),
    (("batch", "seq", 4), [-1], ("batch*seq*4",)),
    ((2, 3, 4), [0, -1], (2, 12)),
    ((2, 3, 4), [-1, 0, 2], (4, 3, 2)),
    ((2, 3, 4), [4, 0, 0], None),           # 4*3*4 != 24
    ((2, 3), [4, -1], None),
    ((2, 3), [-1, -1], None),
    ((2, 3), [0, 0, 0], None),              # 0 beyond the input rank
    ((2, 3), [-2, -3], None),
])
def test_reshape_with_zero_and_minus_one(shape, target, want):
    if want is None:
        with pytest.raises(IRError, match="reshape"):
            out_type("reshape", [(shape, "f32")], {"shape": target})
        return
    assert out_type("reshape", [(shape, "f32")], {"shape": target}) == TensorType(want, "f32")
    # the reference agrees once the symbols are bound (batch=2, seq=5)
    bound = {"batch": 2, "seq": 5}
    x = np.zeros(tuple(bound.get(d, d) for d in shape), np.float32)
    got = get_op("reshape").reference(x, shape=target)

    def value(d):
        if isinstance(d, int):
            return d
        return int(np.prod([bound.get(p, None) or int(p) for p in d.split("*")]))
    assert got.shape == tuple(value(d) for d in want)


def test_symbolic_dims_through_a_decoder_layer(tiny_llama_graph):
    """The builder's shapes stay symbolic end to end; the KV cache grows by seq."""
    g = tiny_llama_graph
    types = {v.name: v.type for v in g.values()}
    assert types["logits"] == TensorType(("batch", "seq", 61), "f32")
    assert types["present_key.0"] == TensorType(("batch", 2, "past+seq", 8), "f32")
    assert types["blk.0.attn"] == TensorType(("batch", 6, "seq", 8), "f32")
    verify(g)


# -- clone -----------------------------------------------------------------------------------------

def test_clone_is_independent():
    g = small_graph()
    before = print_graph(g)
    c = clone(g)
    verify(c)
    assert print_graph(c) == before
    # new nodes and values, the same (shared, never copied) constant data
    old_values, new_values = list(g.values()), list(c.values())
    assert not {id(v) for v in old_values} & {id(v) for v in new_values}
    assert not {id(n) for n in g.nodes} & {id(n) for n in c.nodes}
    assert all(a.data is b.data for a, b in zip(g.constants, c.constants))
    assert all(v.producer in c.nodes for n in c.nodes for v in n.outputs)
    assert all(v in new_values for n in c.nodes for v in n.inputs)
    # edit the copy every way a pass might
    node(c, "split").attrs["sizes"][0] = 99          # in place, inside a list attribute
    node(c, "rmsnorm").attrs["eps"] = 0.5
    node(c, "add").inputs.reverse()
    node(c, "linear").outputs[0].name = "renamed"
    c.inputs[0].type = TensorType((1, 4), "f32")
    c.nodes.pop()
    c.outputs.pop()
    c.constants.clear()
    c.add("gelu", [c.inputs[0]])
    assert print_graph(g) == before
    verify(g)


def test_clone_keeps_graph_outputs_that_are_inputs_or_constants():
    g = Graph("passthrough")
    x = g.add_input("x", (2,), "f32")
    k = g.const([1.0, 2.0])
    g.set_outputs([x, k, x])
    c = clone(g)
    assert c.outputs[0] is c.inputs[0] and c.outputs[2] is c.inputs[0] and c.outputs[1] is c.constants[0]
    assert print_graph(c) == print_graph(g)
    assert c.fresh_name("x") != "x"    # the copy's name table knows its values


def test_replace_all_uses():
    g = small_graph()
    a, b = node(g, "split").outputs
    g.replace_all_uses(a, b)
    assert node(g, "add").inputs == [b, b] and g.outputs[1] is b
    verify(g)
