"""gather_nd (compiler/ops/index.py) against torch's advanced indexing and ONNX GatherND as
onnxruntime runs it; its shape rule against what the reference returns; and the ONNX importer's
use of it for a padding mask flattened over dynamic dims (the transformers 4.x / Optimum idiom),
which imports, runs, and reports the readers it cannot follow in one line."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from isthmus.compiler.frontends.onnx import load_onnx
from isthmus.compiler.ir import Graph, dtype_name, verify
from isthmus.compiler.ops import get_op
from isthmus.compiler.targets import compile_model
from isthmus.errors import InputError, IRError, UnsupportedError

CASES = [((5, 3), [[0, 1], [4, 2], [-1, -3]]),          # one element per tuple
         ((4, 3, 2), [[[3], [0]], [[-4], [1]]]),        # one slice [3, 2] per tuple
         ((2, 7, 1), [[1, 6], [0, 0], [1, -7]]),
         ((3,), np.zeros((0, 1), np.int64))]


def ref(*xs):
    return get_op("gather_nd").reference(*xs)


@pytest.mark.parametrize("shape,idx", CASES, ids=str)
def test_gather_nd_matches_torch_indexing(shape, idx):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    idx = np.asarray(idx, np.int64)
    want = torch.from_numpy(x.copy())[tuple(torch.from_numpy(idx[..., j].copy()) for j in range(idx.shape[-1]))]
    got = ref(x, idx)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("shape,idx", CASES[:3], ids=str)
def test_gather_nd_matches_onnxruntime(shape, idx):
    ort = pytest.importorskip("onnxruntime")
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    idx = np.asarray(idx, np.int64)
    graph = helper.make_graph([helper.make_node("GatherND", ["x", "i"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape)),
                               helper.make_tensor_value_info("i", TensorProto.INT64, list(idx.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "i": idx})[0]
    np.testing.assert_array_equal(ref(x, idx), want)


@pytest.mark.parametrize("shape,idx", CASES, ids=str)
def test_gather_nd_shape_rule_matches_reference(shape, idx):
    x = np.zeros(shape, np.float16)
    idx = np.asarray(idx, np.int32)
    g = Graph("example")
    out = g.add("gather_nd", [g.add_input("x", shape, "f16"), g.add_input("i", idx.shape, "i32")])
    g.set_outputs([out])
    verify(g)
    r = ref(x, idx)
    assert (r.shape, dtype_name(r.dtype)) == (out.shape, out.dtype)


def test_gather_nd_errors():
    g = Graph("bad")
    x = g.add_input("x", (3, 4), "f32")
    for idx_shape, dtype, msg in (((2, 3), "i64", "depth 3"), ((2, "k"), "i64", "static dim"),
                                  ((2, 1), "f32", "integers")):
        with pytest.raises(IRError, match=msg):
            g.add("gather_nd", [x, g.add_input(f"i{len(g.inputs)}", idx_shape, dtype)])
    with pytest.raises(InputError, match="out of range for dim 1"):
        ref(np.zeros((3, 4)), np.array([[0, 4]]))


def _mask_graph(tmp_path, tail_op="Cast"):
    """transformers 4.x's padding mask: flatten mask [b, past+seq] and read it at b * len + j."""
    nodes = [
        helper.make_node("Flatten", ["mask"], ["flat"], axis=2, name="flatten"),
        helper.make_node("Shape", ["mask"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "one"], ["len"], axis=0, name="len"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0, name="batch"),
        helper.make_node("Range", ["zero", "batch", "one"], ["b_ar"], name="b_ar"),
        helper.make_node("Range", ["zero", "len", "one"], ["j_ar"], name="j_ar"),
        helper.make_node("Unsqueeze", ["b_ar", "ax1"], ["b_col"], name="b_col"),
        helper.make_node("Mul", ["b_col", "len"], ["b_off"], name="b_off"),
        helper.make_node("Add", ["b_off", "j_ar"], ["idx"], name="idx"),
        helper.make_node("Gather", ["flat", "idx"], ["picked"], axis=0, name="pick"),
        helper.make_node("Reshape", ["picked", "minus1"], ["flat2"], name="flat2"),
        helper.make_node("Reshape", ["flat2", "shape"], ["back"], name="back"),
        helper.make_node(tail_op, ["back"], ["y"], to=TensorProto.FLOAT, name="tail") if tail_op == "Cast" else
        helper.make_node(tail_op, ["flat2"], ["y"], name="tail"),
    ]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [], [0]), helper.make_tensor("one", TensorProto.INT64, [], [1]),
             helper.make_tensor("ax1", TensorProto.INT64, [1], [1]),
             helper.make_tensor("minus1", TensorProto.INT64, [1], [-1])]
    graph = helper.make_graph(nodes, "mask", [helper.make_tensor_value_info(
        "mask", TensorProto.INT64, ["batch_size", "past_sequence_length + sequence_length"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    path = tmp_path / "mask.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_flattened_mask_over_dynamic_dims_imports_and_runs(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = _mask_graph(tmp_path)
    g = load_onnx(path)
    assert g.inputs[0].shape == ("batch_size", "past_sequence_length+sequence_length")
    assert "gather_nd" in g.op_histogram()
    mask = np.array([[1, 1, 0, 1, 1], [0, 0, 1, 1, 1]], np.int64)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"mask": mask})[0]
    for target in ("reference", "numba"):
        np.testing.assert_array_equal(compile_model(g, target=target).run({"mask": mask})["y"], want)


def test_an_unsupported_reader_of_a_merged_tensor_is_one_line(tmp_path):
    with pytest.raises(UnsupportedError) as e:
        load_onnx(_mask_graph(tmp_path, tail_op="Relu"))
    msg = str(e.value)
    assert "\n" not in msg and "node tail (Relu)" in msg and "merging the leading dims" in msg
