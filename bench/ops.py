"""Operators on the CPU: isthmus's numba kernels against numpy, and isthmus's whole ONNX path
(import, compile, run) against onnxruntime on one-node models. Each side runs in its own process
(isolated.py: the numba kernels in one, numpy in another; isthmus in one, onnxruntime with its
default session options in another), the two taking turns per case, best of 3 rounds.

numpy is each op's reference in compiler/ops (the oracle the kernels are tested against); for the
quantized matvec it is numpy's fp32 matvec (BLAS sgemv) of the same matrix, dequantized. Shapes are
rows x features: 1x576 is a decode step of the default model, 256x576 a 256-token prefill.
"""

from __future__ import annotations

import importlib
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from isthmus.bench.isolated import Worker, interleave
from isthmus.bench.measure import Row, best

SHAPES = [(1, 576), (256, 576), (4096, 4096)]


def _numba(module: str, fn: str, *args):
    """A kernel's call; its module (and numba) imported only when built."""
    return partial(getattr(importlib.import_module(f"isthmus.kernels.numba.{module}"), fn), *args)


def _numpy(op: str, *args):
    from isthmus.compiler.ops import get_op
    return partial(get_op(op).reference, *args)


def _numba_matvec(wq, xv):
    from isthmus.kernels.numba import linear
    return partial(linear.linear, xv, linear.pack(wq), np.empty((1, wq.shape[0]), np.float32), linear.Workspace())


def _numpy_matvec(wq, xv):
    return partial(np.matmul, wq.dequantize(), xv[0])


def kernel_cases(quick: bool = False):
    """(name, shape, {"numba": build, "numpy": build}) for each op, where build() returns the
    zero-argument call; only the side built is imported (a numpy worker never loads numba). The
    inputs come from one seeded generator, so every process builds the same arrays.
    `benchmarks/bench_ops_numba.py` and `benchmarks/test_bench_numba.py` time the same cases."""
    from isthmus.compiler.quant import quantize

    rng = np.random.default_rng(0)
    for rows, cols in SHAPES[:2] if quick else SHAPES:
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        w = rng.standard_normal(cols).astype(np.float32)
        out = np.empty_like(x)
        yield "rmsnorm", (rows, cols), {"numba": partial(_numba, "norm", "rmsnorm", x, w, 1e-5, out),
                                        "numpy": partial(_numpy, "rmsnorm", x, w, 1e-5)}
        u = rng.standard_normal((rows, cols)).astype(np.float32)
        yield "swiglu", (rows, cols), {"numba": partial(_numba, "activation", "swiglu", x, u, out),
                                       "numpy": partial(_numpy, "swiglu", x, u)}
        yield "softmax", (rows, cols), {"numba": partial(_numba, "softmax", "softmax", x, -1, out),
                                        "numpy": partial(_numpy, "softmax", x, -1)}
        x4 = x.reshape(1, rows, cols // 64, 64).transpose(0, 2, 1, 3).copy()
        pos = np.arange(rows)[None]
        yield "rope", (rows, cols), {"numba": partial(_numba, "rope", "rope", x4, pos, 1e5, "interleaved", 0,
                                                      np.empty_like(x4)),
                                     "numpy": partial(_numpy, "rope", x4, pos, 1e5, "interleaved", 0)}
    mats = [(1536, 576, "q4_1"), (49152, 576, "q8_0")] + ([] if quick else
                                                          [(4096, 4096, q) for q in ("q4_0", "q4_1", "q8_0")])
    for r, c, q in mats:
        wq = quantize(rng.standard_normal((r, c)).astype(np.float32), q)
        xv = rng.standard_normal((1, c)).astype(np.float32)
        yield f"matvec {q}", (r, c), {"numba": partial(_numba_matvec, wq, xv), "numpy": partial(_numpy_matvec, wq, xv)}


class KernelSide:
    """The kernels group's cases on one side ("numba" or "numpy"), built in a worker."""

    def __init__(self, impl: str, quick: bool):
        self.calls = [(name, shape, build[impl]()) for name, shape, build in kernel_cases(quick)]

    def cases(self) -> list:
        return [(name, shape) for name, shape, _ in self.calls]

    def time(self, i: int, budget: float) -> float:
        return best(self.calls[i][2], budget)


def kernel_times(quick: bool = False, rounds: int = 3, log=print) -> list:
    """[(name, shape, numba seconds, numpy seconds)]: the numba kernels in one process, the numpy
    references in another, taking turns per case; each the best of `rounds` rounds."""
    budget = (0.15 if quick else 0.4) / rounds
    with Worker("isthmus.bench.ops:KernelSide", "numba", quick) as numba, \
            Worker("isthmus.bench.ops:KernelSide", "numpy", quick) as numpy_:
        out = []
        for i, (name, shape) in enumerate(numba.call("cases")):
            log(f"  {name} {'x'.join(map(str, shape))}")
            t = interleave({"numba": numba, "numpy": numpy_}, lambda _, w: w.call("time", i, budget), rounds,
                           pause=0.05)
            out.append((name, shape, min(t["numba"]), min(t["numpy"])))
    return out


def kernels(quick: bool = False, log=print) -> list[Row]:
    return [Row("kernels", name, "x".join(map(str, shape)), "numba", ours * 1e6,
                "numpy fp32 sgemv" if name.startswith("matvec") else "numpy reference", theirs * 1e6, "us")
            for name, shape, ours, theirs in kernel_times(quick, log=log)]


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


def onnx_cases():
    """(name, rows, cols, model bytes, input x) of each one-node model, the same in every process."""
    from onnx import TensorProto, helper

    for rows, cols in [(1, 576), (256, 576)]:
        x = np.random.default_rng(2).standard_normal((rows, cols)).astype(np.float32)
        for name, opset, nodes, inits in _onnx_models(rows, cols):
            y_cols = 1536 if name == "MatMul" else cols
            graph = helper.make_graph(nodes, name,
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, cols])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, y_cols])], inits)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
            yield name, rows, cols, model.SerializeToString(), x


class OnnxSide:
    """The onnx group's models on one side, built in a worker: "isthmus" (import, compile for numba,
    `exe.run`) or "onnxruntime" (an InferenceSession with default options on the CPU provider)."""

    def __init__(self, engine: str):
        if engine == "onnxruntime":
            import onnxruntime as ort
        else:
            import isthmus
        self.calls, self.errors = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for name, rows, cols, blob, x in onnx_cases():
                fn, error = None, ""
                if engine == "onnxruntime":
                    try:
                        sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
                        fn = partial(lambda s, x: s.run(None, {"x": x})[0], sess, x)
                    except Exception as e:     # an older onnxruntime without this opset: say so, go on
                        error = f"onnxruntime cannot run it: {str(e).splitlines()[0][:80]}"
                else:
                    path = Path(tmp) / f"{name}.onnx"
                    path.write_bytes(blob)
                    exe = isthmus.compile(isthmus.load(path), target="numba")
                    fn = partial(lambda e, x: e.run({"x": x})["y"], exe, x)
                self.calls.append((name, f"{rows}x{cols}", fn))
                self.errors.append(error)

    def cases(self) -> list:
        return [(name, shape, error) for (name, shape, _), error in zip(self.calls, self.errors)]

    def output(self, i: int):
        return self.calls[i][2]()

    def time(self, i: int, budget: float) -> float:
        return best(self.calls[i][2], budget)


def onnx(quick: bool = False, log=print) -> list[Row]:
    """Each model imported, compiled for numba and run by isthmus in one process, and run by
    onnxruntime in another; outputs are compared before anything is timed."""
    rounds = 3
    budget = (0.15 if quick else 0.4) / rounds
    try:
        ort = Worker("isthmus.bench.ops:OnnxSide", "onnxruntime")
    except ImportError:
        return [Row("onnx", "all ops", "-", "numba", None, "onnxruntime", None, "us",
                    note="onnxruntime not installed (pip install onnxruntime)")]
    out = []
    with ort, Worker("isthmus.bench.ops:OnnxSide", "isthmus") as ours:
        for i, (name, shape, error) in enumerate(ort.call("cases")):
            log(f"  {name} {shape}")
            if error:
                out.append(Row("onnx", name, shape, "numba", None, "onnxruntime", None, "us", note=error))
                continue
            y, ref = ours.call("output", i), ort.call("output", i)
            err = float(np.max(np.abs(y - ref)) / (np.max(np.abs(ref)) + 1e-30))
            t = interleave({"isthmus": ours, "onnxruntime": ort}, lambda _, w: w.call("time", i, budget), rounds,
                           pause=0.05)
            out.append(Row("onnx", name, shape, "numba", min(t["isthmus"]) * 1e6, "onnxruntime",
                           min(t["onnxruntime"]) * 1e6, "us",
                           note="" if err < 1e-4 else f"OUTPUTS DIFFER: {err:.1e} relative"))
    return out
