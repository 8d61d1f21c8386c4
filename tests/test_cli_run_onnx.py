"""`isthmus run` on an arbitrary ONNX graph, checked against onnxruntime as polygraphy would."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def isthmus(*args):
    r = subprocess.run([sys.executable, "-m", "isthmus.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=120)
    return r.returncode, r.stdout, r.stderr


def _save(tmp_path, nodes, inits, name="g.onnx"):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 7])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.fixture
def mlp_onnx(tmp_path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((7, 5)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["a"], name="bias"),
             helper.make_node("Erf", ["a"], ["e"], name="erf"),
             helper.make_node("Softmax", ["e"], ["y"], name="sm", axis=-1)]
    path = _save(tmp_path, nodes, [w, b])
    np.savez(tmp_path / "in.npz", x=rng.standard_normal((3, 7)).astype(np.float32))
    return path, tmp_path / "in.npz"


def test_run_writes_outputs_and_passes_the_onnxruntime_check(mlp_onnx, tmp_path):
    import onnxruntime as ort

    path, inputs = mlp_onnx
    rc, out, err = isthmus("run", path, "--inputs", inputs, "-o", tmp_path / "out.npz", "--check", "onnxruntime")
    assert rc == 0, out + err
    assert "PASS" in out and "max abs err" in out
    x = np.load(inputs)["x"]
    expected = ort.InferenceSession(str(path)).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["y"], expected, atol=1e-6)


def test_check_fails_past_the_tolerance(mlp_onnx):
    path, inputs = mlp_onnx
    rc, out, err = isthmus("run", path, "--inputs", inputs, "--check", "onnxruntime", "--tolerance", "1e-30")
    assert rc == 1 and "FAIL" in out


def test_unsupported_ops_are_all_listed_in_one_line(tmp_path):
    nodes = [helper.make_node("Mod", ["x", "x"], ["m"], name="my_mod", fmod=1),
             helper.make_node("Hardmax", ["m"], ["y"], name="my_hardmax")]
    path = _save(tmp_path, nodes, [], "bad.onnx")
    rc, out, err = isthmus("info", path)
    assert rc == 2 and "Traceback" not in err
    line, = err.strip().splitlines()
    for needle in ("Mod", "my_mod", "Hardmax", "my_hardmax"):
        assert needle in line


def test_wrong_input_names_are_a_clear_error(mlp_onnx, tmp_path):
    path, _ = mlp_onnx
    np.savez(tmp_path / "wrong.npz", z=np.zeros((3, 7), np.float32))
    rc, out, err = isthmus("run", path, "--inputs", tmp_path / "wrong.npz")
    assert rc == 2 and "missing ['x']" in err and len(err.strip().splitlines()) == 1
