"""Operators on the CPU: isthmus's numba kernels against numpy, and isthmus's whole ONNX path
(import, compile, run) against onnxruntime on one-node models.

numpy is each op's reference in compiler/ops (the oracle the kernels are tested against); for the
quantized matvec it is numpy's fp32 matvec (BLAS sgemv) of the same matrix, dequantized. Shapes are
rows x features: 1x576 is a decode step of the default model, 256x576 a 256-token prefill.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from isthmus.bench.measure import Row, timed_pair

SHAPES = [(1, 576), (256, 576), (4096, 4096)]


def kernel_cases(quick: bool = False):
    """(name, shape, numba call, numpy call) for each op; `benchmarks/bench_ops_numba.py` and
    `benchmarks/test_bench_numba.py` time the same cases."""
    from isthmus.compiler.ops import get_op
    from isthmus.compiler.quant import quantize
    from isthmus.kernels.numba import activation, linear, norm, rope, softmax

    rng = np.random.default_rng(0)
    ref = {k: get_op(k).reference for k in ("rmsnorm", "rope", "swiglu", "softmax")}
    # partial, not lambdas: callers may collect every case before timing any (pytest-benchmark),
    # and a lambda would see the loop's last arrays
    for rows, cols in SHAPES[:2] if quick else SHAPES:
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        w = rng.standard_normal(cols).astype(np.float32)
        out = np.empty_like(x)
        yield "rmsnorm", (rows, cols), partial(norm.rmsnorm, x, w, 1e-5, out), partial(ref["rmsnorm"], x, w, 1e-5)
        u = rng.standard_normal((rows, cols)).astype(np.float32)
        yield "swiglu", (rows, cols), partial(activation.swiglu, x, u, out), partial(ref["swiglu"], x, u)
        yield "softmax", (rows, cols), partial(softmax.softmax, x, -1, out), partial(ref["softmax"], x, -1)
        x4 = x.reshape(1, rows, cols // 64, 64).transpose(0, 2, 1, 3).copy()
        pos = np.arange(rows)[None]
        yield "rope", (rows, cols), partial(rope.rope, x4, pos, 1e5, "interleaved", 0, np.empty_like(x4)), \
            partial(ref["rope"], x4, pos, 1e5, "interleaved", 0)
    mats = [(1536, 576, "q4_1"), (49152, 576, "q8_0")] + ([] if quick else
                                                          [(4096, 4096, q) for q in ("q4_0", "q4_1", "q8_0")])
    ws = linear.Workspace()
    for r, c, q in mats:
        wq = quantize(rng.standard_normal((r, c)).astype(np.float32), q)
        p = linear.pack(wq)
        dense = wq.dequantize()
        xv = rng.standard_normal((1, c)).astype(np.float32)
        o = np.empty((1, r), np.float32)
        yield f"matvec {q}", (r, c), partial(linear.linear, xv, p, o, ws), partial(np.matmul, dense, xv[0])


def kernels(quick: bool = False, log=print) -> list[Row]:
    rows = []
    budget = 0.15 if quick else 0.4
    for name, shape, mine, theirs in kernel_cases(quick):
        log(f"  {name} {'x'.join(map(str, shape))}")
        peer = "numpy fp32 sgemv" if name.startswith("matvec") else "numpy reference"
        rows.append(timed_pair("kernels", name, "x".join(map(str, shape)), "numba", mine, peer, theirs, budget))
    return rows


def _onnx_models(rows: int, cols: int):
    """(name, opset, nodes, initializers) of one-node models over x[rows, cols]."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(1)

    def init(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    return [
        ("Softmax", 13, [helper.make_node("Softmax", ["x"], ["y"], axis=-1)], []),
        ("LayerNormalization", 17, [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], epsilon=1e-5)],
         [init("s", (cols,)), init("b", (cols,))]),
        ("RMSNormalization", 23, [helper.make_node("RMSNormalization", ["x", "s"], ["y"], epsilon=1e-5)],
         [init("s", (cols,))]),
        ("Gelu", 20, [helper.make_node("Gelu", ["x"], ["y"])], []),
        ("MatMul", 13, [helper.make_node("MatMul", ["x", "w"], ["y"])], [init("w", (cols, 1536))]),
    ]


def onnx(quick: bool = False, log=print) -> list[Row]:
    """Each model imported, compiled for numba and run by isthmus, and run by onnxruntime (one
    thread pool, default options); outputs are compared before anything is timed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return [Row("onnx", "all ops", "-", "numba", None, "onnxruntime", None, "us",
                    note="onnxruntime not installed (pip install onnxruntime)")]
    import isthmus
    from onnx import TensorProto, helper

    out = []
    budget = 0.15 if quick else 0.4
    with tempfile.TemporaryDirectory() as tmp:
        for rows, cols in [(1, 576), (256, 576)]:
            x = np.random.default_rng(2).standard_normal((rows, cols)).astype(np.float32)
            for name, opset, nodes, inits in _onnx_models(rows, cols):
                log(f"  {name} {rows}x{cols}")
                y_cols = 1536 if name == "MatMul" else cols
                graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, cols])],
                                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, y_cols])], inits)
                path = Path(tmp) / f"{name}.onnx"
                path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                                   ir_version=10).SerializeToString())
                try:
                    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                except Exception as e:     # an older onnxruntime without this opset: say so, go on
                    out.append(Row("onnx", name, f"{rows}x{cols}", "numba", None, "onnxruntime", None, "us",
                                   note=f"onnxruntime cannot run it: {str(e).splitlines()[0][:80]}"))
                    continue
                exe = isthmus.compile(isthmus.load(path), target="numba")
                ours = exe.run({"x": x})["y"]
                theirs = sess.run(None, {"x": x})[0]
                err = float(np.max(np.abs(ours - theirs)) / (np.max(np.abs(theirs)) + 1e-30))
                out.append(timed_pair("onnx", name, f"{rows}x{cols}", "numba", lambda: exe.run({"x": x}),
                                      "onnxruntime", lambda: sess.run(None, {"x": x}), budget,
                                      note="" if err < 1e-4 else f"OUTPUTS DIFFER: {err:.1e} relative"))
    return out
