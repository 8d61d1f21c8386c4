"""Each LLM op on the CPU, three ways side by side: the isthmus numba kernel, the op's numpy
reference (compiler/ops, the numerics oracle) and onnxruntime (a one-node ONNX model, the op's
parameters as initializers). Shapes are SmolLM2-135M's: `rows` x 576 activations (9 query heads,
3 KV heads of 64; the linear is its 1536x576 gate projection, q4_1 for the kernel, the same weight
dequantized to f32 for numpy and onnxruntime). 1 row is a decode step, 64 and 256 a prefill.
Attention takes `rows` queries over a 256-token window (past = 256 - rows), causal.
Where onnxruntime has no such op (swiglu) the cell is n/a. asv runs each (op, shape, impl) in a
process of its own, which builds and imports only that impl: numba, numpy and onnxruntime (a session
with default options) each run with their own thread settings.
"""

from __future__ import annotations

import importlib
from functools import cache, partial

import numpy as np

SHAPES = ["1x576", "64x576", "256x576"]
IMPLS = ["isthmus-numba", "numpy", "onnxruntime"]
OPS = ["rmsnorm", "layernorm", "softmax", "gelu", "swiglu", "rope", "attention", "linear"]
D, HEADS, KV_HEADS, HEAD_DIM, FFN, WINDOW = 576, 9, 3, 64, 1536, 256
EPS, THETA = 1e-5, 100000.0


def _ref(op):
    from isthmus.compiler.ops import get_op
    return get_op(op).reference


def _ort(op_type, args: dict, consts: set, opset: int, **attrs):
    """A session running one `op_type` node on `args` (in the node's input order); names in `consts`
    become initializers, the rest are fed on every call."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    feeds = {k: v for k, v in args.items() if k not in consts}
    graph = helper.make_graph(
        [helper.make_node(op_type, list(args), ["y"], **attrs)], op_type,
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(args[k], k) for k in consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, feeds)


def _nb(module: str):
    return importlib.import_module(f"isthmus.kernels.numba.{module}")


def _builders(op: str, rows: int, rng) -> dict:
    """{impl: build} for one op on `rows` rows; build() returns the zero-argument call. Only the
    chosen impl is built, so a process imports numba or onnxruntime only when it measures it."""
    def act(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    x, w, b = act(rows, D), 1 + 0.1 * act(D), 0.1 * act(D)
    out = np.empty_like(x)
    if op == "rmsnorm":
        return {"isthmus-numba": lambda: partial(_nb("norm").rmsnorm, x, w, EPS, out),
                "numpy": lambda: partial(_ref(op), x, w, EPS),
                "onnxruntime": lambda: _ort("RMSNormalization", {"x": x, "w": w}, {"w"}, 23, axis=-1, epsilon=EPS)}
    if op == "layernorm":
        return {"isthmus-numba": lambda: partial(_nb("norm").layernorm, x, w, b, EPS, out),
                "numpy": lambda: partial(_ref(op), x, w, b, EPS),
                "onnxruntime": lambda: _ort("LayerNormalization", {"x": x, "w": w, "b": b}, {"w", "b"}, 17, axis=-1,
                                            epsilon=EPS)}
    if op == "softmax":
        return {"isthmus-numba": lambda: partial(_nb("softmax").softmax, x, -1, out),
                "numpy": lambda: partial(_ref(op), x, -1),
                "onnxruntime": lambda: _ort("Softmax", {"x": x}, set(), 13, axis=-1)}
    if op == "gelu":
        return {"isthmus-numba": lambda: partial(_nb("activation").gelu, x),
                "numpy": lambda: partial(_ref(op), x, "none"),
                "onnxruntime": lambda: _ort("Gelu", {"x": x}, set(), 20)}
    if op == "swiglu":
        u = act(rows, D)
        return {"isthmus-numba": lambda: partial(_nb("activation").swiglu, x, u, out),
                "numpy": lambda: partial(_ref(op), x, u)}
    if op == "rope":
        x4 = x.reshape(1, rows, HEADS, HEAD_DIM).transpose(0, 2, 1, 3).copy()
        pos = np.arange(WINDOW - rows, WINDOW)[None]

        def onnx_rope():
            from isthmus.compiler.ops.attention import rope_angles
            cos, sin = rope_angles(np.arange(WINDOW), HEAD_DIM, THETA)
            return _ort("RotaryEmbedding", {"x": x4, "cos": cos, "sin": sin, "pos": pos}, {"cos", "sin"}, 23,
                        interleaved=1)

        return {"isthmus-numba": lambda: partial(_nb("rope").rope, x4, pos, THETA, "interleaved", 0, np.empty_like(x4)),
                "numpy": lambda: partial(_ref(op), x4, pos, THETA, "interleaved", 0),
                "onnxruntime": onnx_rope}
    if op == "attention":
        q = x.reshape(1, rows, HEADS, HEAD_DIM).transpose(0, 2, 1, 3).copy()
        k, v = act(1, KV_HEADS, WINDOW, HEAD_DIM), act(1, KV_HEADS, WINDOW, HEAD_DIM)
        past = WINDOW - rows
        # onnxruntime's is_causal aligns the mask top-left; a KV cache needs it bottom-right
        mask = np.where(np.arange(WINDOW)[None] <= np.arange(rows)[:, None] + past, 0, -np.inf).astype(np.float32)
        return {"isthmus-numba": lambda: partial(_nb("attention").attention, q, k, v, past, True, 0.0,
                                                 np.empty((1, rows, D), np.float32),
                                                 np.empty((HEADS * rows, WINDOW), np.float32)),
                "numpy": lambda: partial(_ref(op), q, k, v, None, True, 0.0),
                "onnxruntime": lambda: _ort("Attention", {"q": q, "k": k, "v": v, "mask": mask}, {"mask"}, 23)}
    if op == "linear":
        from isthmus.compiler.quant import quantize
        wq = quantize(act(FFN, D) / np.float32(np.sqrt(D)), "q4_1")
        dense = wq.dequantize()

        def numba_linear():
            lin = _nb("linear")
            return partial(lin.linear, x, lin.pack(wq), np.empty((rows, FFN), np.float32), lin.Workspace())

        return {"isthmus-numba": numba_linear, "numpy": lambda: partial(_ref(op), x, dense),
                "onnxruntime": lambda: _ort("MatMul", {"x": x, "wt": np.ascontiguousarray(dense.T)}, {"wt"}, 13)}
    raise ValueError(op)


@cache
def call(op: str, shape: str, impl: str):
    """The warmed-up call (numba kernels loaded, sessions built), cached: asv re-runs setup
    between timed samples."""
    builders = _builders(op, int(shape.split("x")[0]), np.random.default_rng(0))
    if impl not in builders:
        raise NotImplementedError(f"{impl} has no {op}")
    fn = builders[impl]()
    fn()
    return fn


class Ops:
    params = [OPS, SHAPES, IMPLS]
    param_names = ["op", "shape", "impl"]
    timeout = 120

    def setup(self, op, shape, impl):
        self.fn = call(op, shape, impl)

    def time_op(self, op, shape, impl):
        self.fn()


class OpsMemory:
    """Peak resident memory of a process that built the inputs and ran the op at 256x576 (the
    process's baseline included: the differences between peers are the figure)."""
    params = [OPS, IMPLS]
    param_names = ["op", "impl"]

    def setup(self, op, impl):
        self.fn = call(op, "256x576", impl)

    def peakmem_op(self, op, impl):
        self.fn()
