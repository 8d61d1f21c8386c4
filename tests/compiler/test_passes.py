"""The core passes (constant folding, CSE, DCE) and the pipeline that runs them.

The oracle for "the pass changed nothing it should not" is the reference interpreter: the
graph before and after a pass must give bit-identical outputs on the same inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

from isthmus.compiler.executable import Executable
from isthmus.compiler.ir import Graph, clone, verify
from isthmus.compiler.ir_text import parse_graph, print_graph
from isthmus.compiler.passes.constant_fold import GROWTH_LIMIT, SMALL, constant_fold
from isthmus.compiler.passes.cse import cse
from isthmus.compiler.passes.dce import dce
from isthmus.compiler.passes.pipeline import PIPELINE, run_pipeline
from isthmus.compiler.quant import quantize
from isthmus.compiler.targets import compile_model


def run_graph(g: Graph, inputs: dict) -> dict:
    return Executable(g, "reference").run(inputs)


def assert_same_outputs(before: Graph, after: Graph, inputs: dict):
    want, got = run_graph(before, inputs), run_graph(after, inputs)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def ops(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


# -- constant folding ------------------------------------------------------------------------------

def foldable_graph() -> Graph:
    g = Graph("fold")
    x = g.add_input("x", ("n", 3), "f32")
    a = g.add_constant("a", np.array([1.0, 2.0, 3.0], np.float32))
    s = g.add("mul", [a, g.const(2.0)], name="scaled")            # foldable
    s = g.add("neg", [s], name="negated")                          # foldable once its input is
    k = g.add("add", [g.const(1.5), g.const(2.5)], name="k")       # a 0-d result
    parts = g.add("split", [a], {"sizes": [1, 2]}, name="parts")   # two outputs at once
    lo = g.add("expand", [parts[0]], {"shape": [3]}, name="lo")
    y = g.add("add", [x, s], name="y")                             # depends on the input: stays
    y = g.add("mul", [y, k], name="z")
    g.set_outputs([y, lo, parts[1]])
    verify(g)
    return g


def test_constant_fold_folds_constant_subgraphs():
    g = foldable_graph()
    before = clone(g)
    g = constant_fold(g)
    verify(g)
    assert ops(g) == ["add", "mul"]
    consts = {v.name: v.data for v in g.constants}
    np.testing.assert_array_equal(consts["negated"], np.array([-2.0, -4.0, -6.0], np.float32))
    assert consts["k"].shape == () and consts["k"].dtype == np.float32 and consts["k"] == 4.0
    np.testing.assert_array_equal(consts["lo"], np.ones(3, np.float32))
    assert [v.name for v in g.outputs] == ["z", "lo", "parts.1"]
    assert g.outputs[1].is_constant and g.outputs[2].is_constant
    assert_same_outputs(before, g, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})


def test_constant_fold_respects_the_size_limit():
    def expand(shape_in, target):
        g = Graph()
        c = g.add_constant("c", np.ones(shape_in, np.float32))
        g.set_outputs([g.add("expand", [c], {"shape": target})])
        return constant_fold(g)

    assert ops(expand((), [100, 100])) == ["expand"]                 # 10000 values from 1: kept
    assert ops(expand((), [SMALL])) == []                            # small in absolute terms: folded
    assert ops(expand((), [SMALL + 1])) == ["expand"]
    n = SMALL // 2                                                   # growth by at most GROWTH_LIMIT: folded
    assert ops(expand((n, 1), [n, GROWTH_LIMIT])) == []
    assert ops(expand((n, 1), [n, GROWTH_LIMIT + 1])) == ["expand"]


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "bf16"])
def test_constant_fold_never_folds_quantized_constants(qtype):
    g = Graph()
    w = g.add_constant("w", quantize(np.ones((4, 32), np.float32), qtype))
    x = g.add_constant("x", np.ones((2, 32), np.float32))
    ids = g.add_constant("ids", np.array([0, 3], np.int64))
    y = g.add("linear", [x, w])
    e = g.add("embedding", [w, ids])
    g.set_outputs([y, e])
    g = constant_fold(g)
    verify(g)
    assert ops(g) == ["linear", "embedding"]
    assert g.constants[0].dtype == qtype


def test_constant_fold_leaves_nodes_on_inputs_alone():
    g = Graph()
    x = g.add_input("x", (3,), "f32")
    g.set_outputs([g.add("neg", [x])])
    assert ops(constant_fold(g)) == ["neg"]


# -- CSE -------------------------------------------------------------------------------------------

def test_cse_merges_duplicate_nodes_and_their_users():
    g = Graph()
    x = g.add_input("x", (3,), "f32")
    a1, a2 = g.add("gelu", [x]), g.add("gelu", [x])
    b1, b2 = g.add("add", [a1, x]), g.add("add", [a2, x])             # duplicates once a1 == a2
    p1, p2 = g.add("split", [b1], {"sizes": [1, 2]}), g.add("split", [b2], {"sizes": [1, 2]})
    y = g.add("concat", [p1[0], p2[0], p2[1]], name="y")
    g.set_outputs([y, g.add("neg", [b2], name="n")])
    before = clone(g)
    g = cse(g)
    verify(g)
    assert ops(g) == ["gelu", "add", "split", "concat", "neg"]
    assert g.nodes[3].inputs == [p1[0], p1[0], p1[1]] and g.nodes[4].inputs == [b1]
    assert_same_outputs(before, g, {"x": np.array([-1.0, 0.0, 2.0], np.float32)})


def test_cse_keeps_the_names_of_graph_outputs():
    """Two outputs computed alike stay two outputs: `run` returns them by name."""
    g = Graph()
    x = g.add_input("x", (3,), "f32")
    one, two = g.const(1.0, name="one"), g.const(1.0, name="two")
    first, second = g.add("exp", [x], name="first"), g.add("exp", [x], name="second")
    inner = g.add("exp", [x], name="inner")                # not an output: merges into `first`
    g.set_outputs([first, second, one, two, g.add("neg", [inner], name="n")])
    before = clone(g)
    g = cse(g)
    verify(g)
    assert [v.name for v in g.outputs] == ["first", "second", "one", "two", "n"]
    assert ops(g) == ["exp", "exp", "neg"] and g.nodes[2].inputs == [first]
    assert_same_outputs(before, g, {"x": np.zeros(3, np.float32)})


def test_cse_merges_duplicate_small_literals():
    g = Graph()
    x = g.add_input("x", (3,), "f32")
    y1 = g.add("mul", [x, g.const(2.0)])
    y2 = g.add("mul", [x, g.const(2.0)])
    n1 = g.add("add", [x, g.const([np.nan, 1, 2])])
    n2 = g.add("add", [x, g.const([np.nan, 1, 2])])
    g.set_outputs([g.add("concat", [y1, y2, n1, n2])])
    g = cse(g)
    verify(g)
    assert len(g.constants) == 2 and ops(g) == ["mul", "add", "concat"]
    assert g.nodes[2].inputs == [y1, y1, n1, n1]


def test_cse_merges_commuted_operands_of_commutative_ops_only():
    """add/mul/max/min carry COMMUTATIVE in the op registry; sub/div/pow do not."""
    g = Graph()
    x, y = g.add_input("x", (3,), "f32"), g.add_input("y", (3,), "f32")
    pairs = {op: (g.add(op, [x, y]), g.add(op, [y, x])) for op in ("add", "mul", "max", "min", "sub", "div", "pow")}
    g.set_outputs([g.add("concat", [v for pair in pairs.values() for v in pair])])
    before = clone(g)
    g = cse(g)
    verify(g)
    assert ops(g) == ["add", "mul", "max", "min", "sub", "sub", "div", "div", "pow", "pow", "concat"]
    assert g.nodes[-1].inputs[:8] == [pairs[op][0] for op in ("add", "mul", "max", "min") for _ in range(2)]
    assert_same_outputs(before, g, {"x": np.array([-1.0, 0.5, 2.0], np.float32),
                                    "y": np.array([3.0, 0.25, np.nan], np.float32)})


def test_cse_keeps_commuted_twins_whose_symbolic_shapes_differ():
    g = Graph()
    x, y = g.add_input("x", ("n",), "f32"), g.add_input("y", ("m",), "f32")
    g.set_outputs([g.add("concat", [g.add("add", [x, y]), g.add("add", [y, x])])])
    assert len(cse(g).nodes) == 3


@pytest.mark.parametrize("first,second", [
    (("gelu", {"approximate": "none"}), ("gelu", {"approximate": "tanh"})),
    (("reduce_sum", {"axes": [0]}), ("reduce_sum", {"axes": [1]})),
    (("reduce_sum", {"axes": [0], "keepdims": True}), ("reduce_sum", {"axes": [0], "keepdims": False})),
    (("reduce_sum", {"axes": [0]}), ("reduce_mean", {"axes": [0]})),
    (("softmax", {"axis": 0}), ("softmax", {"axis": -1})),
])
def test_cse_keeps_nodes_with_different_attributes(first, second):
    g = Graph()
    x = g.add_input("x", (2, 2), "f32")
    g.set_outputs([g.add(first[0], [x], first[1]), g.add(second[0], [x], second[1])])
    assert len(cse(g).nodes) == 2


def test_cse_keeps_literals_that_differ_in_bits_type_or_shape():
    g = Graph()
    x = g.add_input("x", (), "f32")
    lits = [g.const(0.0), g.const(-0.0), g.const([0.0]), g.const(0.0, "f64"), g.const(0, "i64")]
    g.set_outputs(lits + [g.add("add", [x, lits[0]]), g.add("add", [x, lits[1]])])
    g = cse(g)
    assert len(g.constants) == 5 and len(g.nodes) == 2


def test_cse_leaves_large_constants_alone():
    g = Graph()
    x = g.add_input("x", (17,), "f32")
    w1, w2 = (g.add_constant("w", np.ones(17, np.float32)) for _ in range(2))   # past ir.SMALL_LITERAL
    g.set_outputs([g.add("add", [x, w1]), g.add("add", [x, w2])])
    g = cse(g)
    assert len(g.constants) == 2 and len(g.nodes) == 2


# -- DCE -------------------------------------------------------------------------------------------

def test_dce_drops_what_the_outputs_do_not_reach():
    g = Graph()
    x = g.add_input("x", (4,), "f32")
    unused = g.add_input("unused", (1,), "f32")
    dead_c = g.add_constant("dead_c", np.ones(4, np.float32))
    live_c = g.add_constant("live_c", np.ones(4, np.float32))
    dead = g.add("exp", [g.add("add", [x, dead_c])])
    a, b = g.add("split", [x], {"sizes": [2, 2]})                     # only one output used: kept
    y = g.add("mul", [g.add("add", [x, live_c]), g.add("concat", [b, a])])
    g.set_outputs([y])
    g = dce(g)
    verify(g)
    assert ops(g) == ["split", "add", "concat", "mul"]
    assert [v.name for v in g.constants] == ["live_c"]
    assert [v.name for v in g.inputs] == ["x", "unused"]           # the graph's interface is kept
    assert dead.name not in g._names and g.fresh_name(dead.name) == dead.name
    assert unused.name in g._names


# -- the pipeline ----------------------------------------------------------------------------------

def decoder_inputs(seed=0, batch=2, seq=5, past=3):
    rng = np.random.default_rng(seed)
    inputs = {"input_ids": rng.integers(0, 61, size=(batch, seq)),
              "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq)).copy()}
    for i in range(2):
        for kind in ("key", "value"):
            inputs[f"past_{kind}.{i}"] = rng.standard_normal((batch, 2, past, 8)).astype(np.float32)
    return inputs


def test_pipeline_leaves_the_input_graph_untouched(tiny_llama_graph):
    g = tiny_llama_graph
    text, nodes = print_graph(g), list(g.nodes)
    node_state = [(n.op, list(n.inputs), list(n.outputs), repr(n.attrs)) for n in g.nodes]
    values = [(v, v.name, v.type, v.producer) for v in g.values()]
    out = run_pipeline(g)
    verify(out)
    assert out is not g and not set(map(id, out.nodes)) & set(map(id, nodes))
    assert print_graph(g) == text and g.nodes == nodes
    assert [(n.op, list(n.inputs), list(n.outputs), repr(n.attrs)) for n in g.nodes] == node_state
    assert [(v, v.name, v.type, v.producer) for v in g.values()] == values
    verify(g)


def test_pipeline_is_numerically_identical_on_the_reference_target(tiny_llama_graph):
    unoptimized = compile_model(tiny_llama_graph, "reference", passes=[])
    optimized = compile_model(tiny_llama_graph, "reference")
    for seed, (seq, past) in enumerate([(5, 3), (1, 0), (1, 7)]):
        inputs = decoder_inputs(seed, seq=seq, past=past)
        want, got = unoptimized.run(inputs), optimized.run(inputs)
        assert list(got) == list(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_pipeline_changes_a_graph_with_work_to_do_without_changing_its_results():
    g = foldable_graph()
    x = g.inputs[0]
    dup = g.add("add", [x, g.add("mul", [x, g.const(2.0)])])            # duplicates + literal twins
    dup2 = g.add("add", [x, g.add("mul", [x, g.const(2.0)])])
    g.add("exp", [dup2])                                                # dead
    g.set_outputs(g.outputs + [dup, dup2])
    verify(g)
    out = run_pipeline(g)
    assert len(out.nodes) < len(g.nodes) and ops(out).count("mul") == 2 and "exp" not in ops(out)
    assert_same_outputs(g, out, {"x": np.linspace(-2, 2, 12, dtype=np.float32).reshape(4, 3)})


def test_isthmus_dump_writes_one_parseable_file_per_pass(tiny_llama_graph, tmp_path, monkeypatch):
    monkeypatch.setenv("ISTHMUS_DUMP", str(tmp_path / "dump"))
    snapshots = []
    out = run_pipeline(tiny_llama_graph,
                       on_pass=lambda name, g: snapshots.append((name, {v.name: v.data for v in g.constants})))
    files = sorted((tmp_path / "dump").iterdir())
    assert [f.name for f in files] == [f"{i:02d}-{name}.ir" for i, (name, _) in enumerate(PIPELINE)]
    assert [name for name, _ in snapshots] == [name for name, _ in PIPELINE]
    for f, (_, weights) in zip(files, snapshots):
        text = f.read_text()
        assert print_graph(parse_graph(text, weights=weights)) == text, f.name
    assert files[-1].read_text() == print_graph(out)


def test_dump_dir_argument(tiny_llama_graph, tmp_path, monkeypatch):
    monkeypatch.delenv("ISTHMUS_DUMP", raising=False)
    run_pipeline(tiny_llama_graph, passes=[("cse", cse), ("dce", dce)], dump_dir=tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["00-cse.ir", "01-dce.ir"]
