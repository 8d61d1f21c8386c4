"""Per-op lowering: any graph, one NPU program per set of input shapes, each node its own kernel.

`GenericRunner(exe).run(inputs)` binds the symbolic dims from the inputs, gives every value a
concrete shape (the ops' shape rules), folds what the shapes alone determine (`shape`, `range`,
`constant_of_shape` and anything computed only from those), and cuts the node list into segments:
runs of nodes the NPU lowers become one program each; the few ops it has no instructions for
(comparisons, boolean logic, `where`, `erf`, `cos`/`sin`, `pow` with a tensor exponent) run on the
host with the numpy reference in between. Programs are cached per input shapes.

Inside a program every value lives in HBM, row-major, as the IR shape says (reshape, squeeze and
unsqueeze are views of the same bytes); each node's kernel tiles its iteration space onto the
partitions (op_kernels / op_kernels_tensor), loads tiles with DMA access patterns that do the
strides, broadcasts and transposes, computes on VECTOR/ACT/TENSOR and stores. Kernels of
independent nodes overlap: the emitter orders only what touches the same memory. Floats are
stored in the compute dtype (bf16 with precision "bf16", else f32), integers as i32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from isthmus.compiler.ir import Graph, TensorType, Value, eval_dim, numpy_dtype
from isthmus.compiler.lower.npu.emitter import Emitter, Hbm
from isthmus.errors import UnsupportedError

FOLD_MAX = 1 << 16            # values the shape folding may compute on the host (elements)
HOST_OPS = frozenset({"equal", "less", "greater", "and", "or", "not", "where", "erf", "cos", "sin"})
SHAPE_OPS = frozenset({"shape", "range", "constant_of_shape"})


def concrete_types(graph: Graph, inputs: dict) -> tuple[dict, dict]:
    """Every value's TensorType for these inputs, and the bound dims."""
    from isthmus.compiler.ops import get_op
    dims: dict[str, int] = {}
    types: dict[Value, TensorType] = {}
    for v in graph.inputs:
        a = inputs[v.name]
        for d, n in zip(v.shape, a.shape):
            if isinstance(d, str):
                dims.setdefault(d, int(n))
        types[v] = TensorType(tuple(int(n) for n in a.shape), v.dtype)
    for c in graph.constants:
        types[c] = c.type
    for node in graph.nodes:
        attrs = dict(node.attrs)
        for key in ("length", "dims"):
            if key in attrs and attrs[key] is not None:
                val = attrs[key]
                attrs[key] = [eval_dim(d, dims) for d in val] if isinstance(val, (list, tuple)) else eval_dim(val, dims)
        out = get_op(node.op).infer([types[i] for i in node.inputs], attrs, where=node.source or node.op)
        for o, t in zip(node.outputs, out):
            if not t.is_static:
                t = TensorType(tuple(eval_dim(d, dims) for d in t.shape), t.dtype)
            types[o] = t
    return types, dims


@dataclass
class HV:
    """A value in HBM: a tensor, viewed row-major with `shape` from element `offset`."""

    hbm: Hbm
    shape: tuple
    offset: int = 0

    @property
    def dtype(self) -> str:
        return self.hbm.dtype

    @property
    def strides(self) -> list[int]:
        out, s = [], 1
        for n in reversed(self.shape):
            out.append(s)
            s *= n
        return out[::-1]

    def ap(self, off: int, rows: int, pstride: int, dims):
        return self.hbm.ap(self.offset + off, rows, pstride, dims)


@dataclass
class Ctx:
    """What a node kernel needs: the emitter, HBM values, packed weights, precision."""

    em: Emitter
    exe: object
    types: dict
    store: dict = field(default_factory=dict)        # Value -> HV
    consts: dict = field(default_factory=dict)       # constant name -> host array to bind
    stream: object = None
    sdt: str = "f32"                                 # float storage / tile dtype
    wdt: str = "f32"                                 # weight matmul dtype
    adt: str = "f32"                                 # other matmul operands
    split: bool = False
    n_tensors: int = 0
    keep_f32: frozenset = frozenset()                # values stored in f32 whatever the precision (masks)

    def shape(self, v: Value) -> tuple:
        return self.types[v].shape

    def dev_dtype(self, v: Value) -> str:
        t = self.types[v].dtype
        if t == "f16":
            return "f16"
        if v in self.keep_f32 and t == "f32":
            return "f32"
        if t in ("f32", "f64", "q4_0", "q4_1", "q8_0", "bf16"):
            return self.sdt
        if t in ("i64", "i32", "i8", "u8"):
            return "i32"
        raise UnsupportedError(f"{t} values have no NPU storage")

    def new(self, v: Value, kind: str = "scratch", dtype: str | None = None) -> HV:
        shape = self.shape(v)
        self.n_tensors += 1
        t = self.em.tensor(f"v{self.n_tensors}.{v.name}"[:120], (max(1, math.prod(shape)),), dtype or self.dev_dtype(v),
                           kind)
        hv = self.store[v] = HV(t, shape)
        return hv

    def constant(self, v: Value, dtype: str | None = None) -> HV:
        """A constant as a resident HBM tensor (dequantized)."""
        hv = self.store.get(v)
        if hv is None:
            from isthmus.kernels.numba.weight_pack import dequantize
            data = v.data
            arr = dequantize(data) if hasattr(data, "qtype") else np.asarray(data)
            if arr.dtype.kind == "f" or hasattr(data, "qtype"):
                arr = arr.astype(np.float32)
                dt = dtype or "f32"
            else:
                arr = arr.astype(np.int32)
                dt = "i32"
            self.n_tensors += 1
            name = f"c{self.n_tensors}.{v.name}"[:120]
            t = self.em.tensor(name, (max(1, arr.size),), dt, "input")
            self.consts[name] = arr.reshape(-1) if arr.size else np.zeros(1, arr.dtype)
            hv = self.store[v] = HV(t, tuple(arr.shape))
        return hv

    def hv(self, v: Value) -> HV:
        if v in self.store:
            return self.store[v]
        if v.is_constant:
            return self.constant(v)
        raise KeyError(v.name)


def lowerable(node, types) -> bool:
    from isthmus.compiler.lower.npu.op_kernels import KERNELS
    if node.op in HOST_OPS or node.op in SHAPE_OPS or node.op not in KERNELS:
        return False
    for v in list(node.inputs) + list(node.outputs):
        if types[v].dtype in ("bool", "f64"):
            return False
    if node.op == "pow":
        e = node.inputs[1]
        return e.is_constant and np.asarray(e.data).size == 1 and float(np.asarray(e.data).reshape(-1)[0]) in (
            0.5, 1.0, 2.0, -0.5, -1.0)
    if node.op == "attention" and len(node.inputs) == 4 and types[node.inputs[3]].dtype == "bool":
        return False
    if node.op == "attention" and (node.attrs["softcap"] or node.attrs["window"]):
        return False          # no NPU kernel squashes scores or slides a window: the host runs it
    return True


@dataclass
class Segment:
    kind: str                      # "npu" | "host"
    nodes: list
    program: object = None
    loaded: object = None
    inputs: list = field(default_factory=list)     # Values fed from the host env
    outputs: list = field(default_factory=list)    # Values read back
    store: dict = field(default_factory=dict)


class Compiled:
    def __init__(self, runner: "GenericRunner", inputs: dict, load: bool = True):
        exe = runner.exe
        g = exe.graph
        self.exe = exe
        self.load = load
        self.types, self.dims = concrete_types(g, inputs)
        self.known: dict[Value, np.ndarray] = {}
        self.segments: list[Segment] = []
        users_after: dict[Value, int] = {}
        for i, n in enumerate(g.nodes):
            for v in n.inputs:
                users_after[v] = i
        for v in g.outputs:
            users_after[v] = len(g.nodes)
        self._fold_shapes(g)
        cur: Segment | None = None
        for node in g.nodes:
            if all(o in self.known for o in node.outputs):
                continue
            kind = "npu" if lowerable(node, self.types) else "host"
            if kind == "host" or cur is None or cur.kind != "npu":
                cur = Segment(kind, [node])
                self.segments.append(cur)
                if kind == "host":
                    cur = None
            else:
                cur.nodes.append(node)
        produced_by: dict[Value, int] = {}
        for si, seg in enumerate(self.segments):
            for n in seg.nodes:
                for o in n.outputs:
                    produced_by[o] = si
        for si, seg in enumerate(self.segments):
            if seg.kind != "npu":
                continue
            inside = {o for n in seg.nodes for o in n.outputs}
            last = g.nodes.index(seg.nodes[-1])
            seg.inputs = list(dict.fromkeys(v for n in seg.nodes for v in n.inputs
                                            if v not in inside and not v.is_constant and v not in self.known))
            seg.outputs = [v for v in inside if users_after.get(v, -1) > last]
            self._build(seg)

    def _fold_shapes(self, g: Graph) -> None:
        """Evaluate shape computations on the host: `shape` of any value, and every node whose
        inputs are constants or already folded (small results only)."""
        from isthmus.compiler.ops import get_op
        for node in g.nodes:
            if node.op == "shape":
                self.known[node.outputs[0]] = get_op("shape").reference(
                    np.empty(self.types[node.inputs[0]].shape, np.int8), **node.attrs)
                continue
            ins = []
            for v in node.inputs:
                if v in self.known:
                    ins.append(self.known[v])
                elif v.is_constant and math.prod(v.shape) <= FOLD_MAX and not hasattr(v.data, "qtype"):
                    ins.append(np.asarray(v.data))
                else:
                    break
            else:
                if node.inputs and all(math.prod(self.types[o].shape) <= FOLD_MAX for o in node.outputs) and \
                        any(v in self.known for v in node.inputs):
                    attrs = dict(node.attrs)
                    for key in ("length", "dims"):
                        if key in attrs and attrs[key] is not None:
                            val = attrs[key]
                            attrs[key] = [eval_dim(d, self.dims) for d in val] if isinstance(val, (list, tuple)) \
                                else eval_dim(val, self.dims)
                    out = get_op(node.op).reference(*ins, **attrs)
                    outs = out if len(node.outputs) > 1 else (out,)
                    for o, a in zip(node.outputs, outs):
                        self.known[o] = np.asarray(a)

    def _build(self, seg: Segment) -> None:
        from isthmus.compiler.lower.npu.op_kernels import KERNELS
        from isthmus.compiler.lower.npu.weights import WeightStream
        from isthmus.npu.sim import LoadedProgram
        exe = self.exe
        cfg = exe.config
        em = Emitter(cfg)
        prec = exe.precision
        ctx = Ctx(em, exe, self.types, sdt="bf16" if prec == "bf16" else "f32",
                  wdt="f32" if prec == "f32" else "bf16", adt="bf16" if prec == "bf16" else "f32",
                  split=prec == "bf16x3",
                  keep_f32=frozenset(n.inputs[3] for n in exe.graph.nodes if n.op == "attention" and len(n.inputs) > 3))
        for v in seg.inputs:
            hv = ctx.new(v, "input")
            seg.store[v] = hv
        ring = em.sbuf((cfg.sbuf_bytes_per_partition // 4,), "i8", what="weight ring")
        ctx.stream = WeightStream(em, ring)
        for node in seg.nodes:
            for v in node.inputs:
                if v in self.known and v not in ctx.store:
                    hv = ctx.new(v, "input")
                    seg.store[v] = hv
                    seg.inputs.append(v)
            with em.label(node.outputs[0].name):
                KERNELS[node.op](ctx, node)
        seg.program = em.build()
        seg.program.memory = memory_report(em)
        seg.out_store = {v: ctx.store[v] for v in seg.outputs}
        if self.load:
            seg.loaded = LoadedProgram(seg.program, cfg, check_races=exe.check_races)
            seg.loaded.bind(ctx.consts)

    def run(self, inputs: dict) -> dict:
        from isthmus.compiler.ops import get_op
        g = self.exe.graph
        env: dict[Value, np.ndarray] = dict(self.known)
        for v in g.inputs:
            env[v] = inputs[v.name]
        for seg in self.segments:
            if seg.kind == "host":
                node = seg.nodes[0]
                args = [env[v] if v in env else _const(v) for v in node.inputs]
                out = get_op(node.op).reference(*args, **node.attrs)
                outs = out if len(node.outputs) > 1 else (out,)
                for o, a in zip(node.outputs, outs):
                    env[o] = np.asarray(a)
                continue
            feeds = {}
            for v in seg.inputs:
                a = np.asarray(env[v])
                hv = seg.store[v]
                feeds[hv.hbm.name] = a.reshape(-1).astype(np.float32 if a.dtype.kind == "f" else np.int64) \
                    if a.size else np.zeros(1, np.float32)
            result = seg.loaded.run(feeds)
            self.exe.record(seg.program, seg.loaded.timeline, result.stats)
            m = result.machine
            for v, hv in seg.out_store.items():
                flat = m.tensor_view(hv.hbm.decl)
                n = math.prod(self.types[v].shape)
                arr = np.asarray(flat[hv.offset:hv.offset + n]).reshape(self.types[v].shape)
                env[v] = arr.astype(numpy_dtype(self.types[v].dtype)) if self.types[v].dtype in (
                    "f32", "f16", "f64", "i64", "i32", "i8", "u8") else arr.copy()
        out = {}
        for v in g.outputs:
            out[v.name] = env[v] if v in env else _const(v)
        return out


def memory_report(em: Emitter) -> dict:
    """The memory plan of a program: peak SBUF/PSUM bytes per partition, HBM bytes, spills."""
    return {"sbuf_peak": em.sbuf_alloc.peak, "sbuf_capacity": em.sbuf_alloc.capacity,
            "psum_peak": em.psum_alloc.peak, "psum_capacity": em.psum_alloc.capacity,
            "hbm_bytes": em._hbm_top, "spills": list(em.spills)}


def _const(v: Value) -> np.ndarray:
    return v.data.dequantize() if hasattr(v.data, "dequantize") else np.asarray(v.data)


class GenericRunner:
    def __init__(self, exe):
        self.exe = exe
        self.cache: dict = {}
        self.build_seconds: dict = {}

    def run(self, inputs: dict) -> dict:
        key = tuple((v.name, np.asarray(inputs[v.name]).shape) for v in self.exe.graph.inputs)
        comp = self.cache.get(key)
        if comp is None:
            t0 = time.perf_counter()
            comp = self.cache[key] = Compiled(self, inputs)
            self.build_seconds[key] = time.perf_counter() - t0
        return comp.run(inputs)
