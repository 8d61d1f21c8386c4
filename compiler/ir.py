"""The graph IR: an ordered list of nodes in SSA form over typed values.

A `Graph` owns its `Value`s. Every value is defined once: as a graph input, as a constant
(which points at an array, possibly GGUF-quantized), or as an output of exactly one `Node`.
Shapes may hold symbolic dims (strings such as "batch", "seq", "past+seq").

Ops are not classes: a node names an op registered in `isthmus.compiler.ops`, which holds
the op's shape rule and numpy reference. `Graph.add` runs the shape rule, so every value
built through it is typed; `verify` re-runs the rules and checks SSA order.

The text form (`print_graph` / `parse_graph` in `isthmus.compiler.ir_text`) round-trips.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from isthmus.errors import IRError, UnsupportedError

Dim = int | str

# Element types, named as in the text form. Quantized types only appear on constants.
FLOAT_DTYPES = {"f32": np.float32, "f16": np.float16, "f64": np.float64}
INT_DTYPES = {"i64": np.int64, "i32": np.int32, "i8": np.int8, "u8": np.uint8, "bool": np.bool_}
QUANT_DTYPES = ("q4_0", "q4_1", "q8_0", "bf16", "q5_0", "q5_1", "iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
NUMPY_DTYPES = {**FLOAT_DTYPES, **INT_DTYPES}
SMALL_LITERAL = 16   # a plain numpy constant of at most this many elements is a literal (inline in text, merged by cse)


def eval_dim(d: Dim, dims: dict) -> int:
    """A dim's value for one run: an int, or a symbol / sum / product of symbols bound in `dims`."""
    if isinstance(d, int):
        return d
    if "+" in d:
        return sum(eval_dim(int(p) if p.lstrip("-").isdigit() else p, dims) for p in d.split("+"))
    if "*" in d:
        out = 1
        for p in d.split("*"):
            out *= eval_dim(int(p) if p.isdigit() else p, dims)
        return out
    if d not in dims:
        from isthmus.errors import InputError
        raise InputError(f"dim {d!r} is not bound by the inputs")
    return dims[d]


def dtype_name(np_dtype) -> str:
    """The IR name of a numpy dtype (raises IRError for one the IR lacks)."""
    np_dtype = np.dtype(np_dtype)
    for name, t in NUMPY_DTYPES.items():
        if np.dtype(t) == np_dtype:
            return name
    raise IRError(f"numpy dtype {np_dtype} has no IR element type")


def numpy_dtype(name: str):
    if name in NUMPY_DTYPES:
        return np.dtype(NUMPY_DTYPES[name])
    raise IRError(f"element type {name!r} has no numpy equivalent")


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self):
        if self.dtype not in NUMPY_DTYPES and self.dtype not in QUANT_DTYPES:
            raise IRError(f"unknown element type {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclass(eq=False)
class Value:
    """An SSA value. `data` is set for constants (an np.ndarray or a QuantizedArray)."""

    name: str
    type: TensorType
    producer: "Node | None" = None
    data: Any = None

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    @property
    def is_small_literal(self) -> bool:
        """A small plain-dtype numpy constant: printed inline, and equal to any twin by value."""
        return isinstance(self.data, np.ndarray) and self.data.size <= SMALL_LITERAL and (
            self.type.dtype in NUMPY_DTYPES)

    @property
    def shape(self):
        return self.type.shape

    @property
    def dtype(self):
        return self.type.dtype

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


@dataclass(frozen=True)
class KVLayer:
    """One layer's KV cache as the graph's interface names it: read as two inputs, returned one
    step longer as two outputs (all [batch, kv_heads, seq, head_dim], the sequence on axis 2)."""

    past_key: str
    past_value: str
    present_key: str
    present_value: str


@dataclass(frozen=True)
class DecoderInterface:
    """What makes a graph a decoder that generation drives, by the names of its inputs and outputs.

    A frontend that builds a decoder attaches one to `Graph.decoder`; every consumer (the KV cache,
    batched decode, fusion, the NPU and Triton lowerings) reads it instead of matching names or
    patterns, so a new architecture teaches the frontend only. Names, not Values: passes rebuild
    values freely, while the names are the graph's calling convention (feeds and results), which
    `verify` checks they keep. `position_ids` is None for a graph that derives positions itself;
    `kv` is empty for a graph without a cache (generation then feeds the whole sequence each step).
    `attention_mask`, when set, names an integer [batch, past+seq] input (1 = attend, 0 = padding,
    as exporters of Hugging Face models take it) that generation feeds with ones for every
    position so far, cached and new; consumers that cannot feed it decline the graph.
    """

    input_ids: str
    logits: str
    position_ids: str | None = None
    kv: tuple[KVLayer, ...] = ()
    attention_mask: str | None = None

    def resolve(self, graph: "Graph") -> "DecoderValues":
        ins = {v.name: v for v in graph.inputs}
        outs = {v.name: v for v in graph.outputs}

        def get(table, name, what):
            if name not in table:
                raise IRError(f"decoder interface: {what} %{name} is not a graph {what.split()[0]}")
            return table[name]
        kv = tuple((get(ins, c.past_key, "input (past key)"), get(ins, c.past_value, "input (past value)"),
                    get(outs, c.present_key, "output (present key)"), get(outs, c.present_value, "output (present value)"))
                   for c in self.kv)
        return DecoderValues(get(ins, self.input_ids, "input (token ids)"),
                             None if self.position_ids is None else get(ins, self.position_ids, "input (positions)"),
                             get(outs, self.logits, "output (logits)"), kv,
                             None if self.attention_mask is None else get(ins, self.attention_mask,
                                                                          "input (attention mask)"))

    def present_of(self, past: str) -> str:
        """The output name that returns the cache read as input `past`."""
        for c in self.kv:
            if past == c.past_key:
                return c.present_key
            if past == c.past_value:
                return c.present_value
        raise KeyError(past)


@dataclass(frozen=True)
class DecoderValues:
    """A DecoderInterface resolved against one graph: the Values its names stand for."""

    input_ids: "Value"
    position_ids: "Value | None"
    logits: "Value"
    kv: tuple[tuple["Value", "Value", "Value", "Value"], ...]   # (past_k, past_v, present_k, present_v)
    attention_mask: "Value | None" = None

    @property
    def pasts(self) -> list["Value"]:
        return [v for layer in self.kv for v in layer[:2]]

    @property
    def presents(self) -> list["Value"]:
        return [v for layer in self.kv for v in layer[2:]]


@dataclass(eq=False)
class Node:
    op: str
    inputs: list[Value]
    outputs: list[Value]
    attrs: dict[str, Any] = field(default_factory=dict)
    # Where the node came from (an ONNX node name, a GGUF tensor prefix); shown in errors and traces.
    source: str = ""

    def __repr__(self) -> str:
        outs = ", ".join(f"%{v.name}" for v in self.outputs)
        ins = ", ".join(f"%{v.name}" for v in self.inputs)
        return f"{outs} = {self.op}({ins})"


class Graph:
    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.constants: list[Value] = []
        self.nodes: list[Node] = []
        self.decoder: DecoderInterface | None = None   # set by a frontend that builds a decoder
        # The fusion pass's groups (compiler/passes/fusion.py): an analysis of these very nodes,
        # so `clone` and any pass that rebuilds nodes drop it.
        self.fusion: list | None = None
        self._names: set[str] = set()
        self._counter = 0

    # -- construction --------------------------------------------------------------------

    def fresh_name(self, hint: str = "t") -> str:
        hint = hint or "t"
        if hint not in self._names:
            return hint
        while True:
            self._counter += 1
            name = f"{hint}.{self._counter}"
            if name not in self._names:
                return name

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise IRError(f"value %{name} is defined twice")
        self._names.add(name)
        return name

    def add_input(self, name: str, shape: Iterable[Dim], dtype: str) -> Value:
        v = Value(self._claim(name), TensorType(tuple(shape), dtype))
        self.inputs.append(v)
        return v

    def add_constant(self, name: str, data, dtype: str | None = None) -> Value:
        """A constant pointing at `data` (not copied): an np.ndarray or a QuantizedArray."""
        if dtype is None:
            dtype = getattr(data, "qtype", None) or dtype_name(data.dtype)
        v = Value(self._claim(self.fresh_name(name)), TensorType(tuple(data.shape), dtype), data=data)
        self.constants.append(v)
        return v

    def const(self, value, dtype: str = "f32", name: str = "c") -> Value:
        """A small literal constant (a scalar or short list)."""
        return self.add_constant(name, np.asarray(value, dtype=numpy_dtype(dtype)))

    def add(self, op: str, inputs: list[Value], attrs: dict | None = None, *, name: str = "",
            source: str = "", num_outputs: int | None = None) -> Value | list[Value]:
        """Append a node; its output types come from the op's shape rule.

        Returns the single output Value, or a list when the op has several outputs.
        """
        from isthmus.compiler.ops import get_op

        opdef = get_op(op)
        attrs = opdef.complete_attrs(attrs or {}, where=source or name or op)
        types = opdef.infer([v.type for v in inputs], attrs, where=source or name or op)
        node = Node(op, list(inputs), [], attrs, source)
        base = name or op
        for i, t in enumerate(types):
            hint = base if len(types) == 1 else f"{base}.{i}"
            node.outputs.append(Value(self._claim(self.fresh_name(hint)), t, producer=node))
        self.nodes.append(node)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def set_outputs(self, values: list[Value]) -> None:
        self.outputs = list(values)

    # -- queries ---------------------------------------------------------------------------

    def values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.constants
        for n in self.nodes:
            yield from n.outputs

    def users(self) -> dict[Value, list[Node]]:
        uses: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                uses.setdefault(v, []).append(n)
        return uses

    def op_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for n in self.nodes:
            hist[n.op] = hist.get(n.op, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))

    def replace_all_uses(self, old: Value, new: Value) -> None:
        for n in self.nodes:
            n.inputs = [new if v is old else v for v in n.inputs]
        self.outputs = [new if v is old else v for v in self.outputs]

    def rebuild_names(self) -> None:
        """Recompute the name table after passes removed values."""
        self._names = {v.name for v in self.values()}

    def __str__(self) -> str:
        from isthmus.compiler.ir_text import print_graph

        return print_graph(self)


def verify(graph: Graph) -> None:
    """Check SSA (defined once, before use), registered ops, attributes and types.

    Raises IRError naming the first offending node.
    """
    from isthmus.compiler.ops import get_op

    defined: set[int] = set()
    names: set[str] = set()

    def define(v: Value, what: str):
        if id(v) in defined or v.name in names:
            raise IRError(f"{what}: value %{v.name} is defined twice")
        defined.add(id(v))
        names.add(v.name)

    for v in graph.inputs:
        if v.is_constant:
            raise IRError(f"graph input %{v.name} carries constant data")
        define(v, "graph input")
    for v in graph.constants:
        if not v.is_constant:
            raise IRError(f"constant %{v.name} has no data")
        if tuple(v.data.shape) != v.type.shape:
            raise IRError(f"constant %{v.name}: data shape {tuple(v.data.shape)} != type {v.type}")
        define(v, "constant")
    for i, node in enumerate(graph.nodes):
        where = f"node {i} ({node!r})"
        for v in node.inputs:
            if id(v) not in defined:
                raise IRError(f"{where}: input %{v.name} is used before it is defined")
        try:
            opdef = get_op(node.op)
        except UnsupportedError as e:
            raise IRError(f"{where}: {e}") from None
        unknown, missing = set(node.attrs) - set(opdef.attrs), set(opdef.attrs) - set(node.attrs)
        if unknown or missing:
            raise IRError(f"{where}: op {node.op} has no attribute(s) {sorted(unknown)}" if unknown
                          else f"{where}: attribute(s) {sorted(missing)} of op {node.op} are missing")
        expected = opdef.infer([v.type for v in node.inputs], node.attrs, where=where)
        if len(expected) != len(node.outputs):
            raise IRError(f"{where}: op gives {len(expected)} outputs, node has {len(node.outputs)}")
        for v, t in zip(node.outputs, expected):
            if v.type != t:
                raise IRError(f"{where}: output %{v.name} has type {v.type}, shape rule says {t}")
            if v.producer is not node:
                raise IRError(f"{where}: output %{v.name} does not point back at its node")
            define(v, where)
    for v in graph.outputs:
        if id(v) not in defined:
            raise IRError(f"graph output %{v.name} is not defined")
    if graph.decoder is not None:
        _verify_decoder(graph)


def _verify_decoder(graph: Graph) -> None:
    d = graph.decoder.resolve(graph)
    if d.input_ids.dtype not in ("i64", "i32") or d.input_ids.type.rank != 2:
        raise IRError(f"decoder interface: token ids %{d.input_ids.name} must be i64/i32[batch, seq], "
                      f"not {d.input_ids.type}")
    m = d.attention_mask
    if m is not None and (m.dtype not in ("i64", "i32", "bool") or m.type.rank != 2):
        raise IRError(f"decoder interface: attention mask %{m.name} must be i64/i32/bool[batch, past+seq], "
                      f"not {m.type}")
    if d.logits.type.rank != 3:
        raise IRError(f"decoder interface: logits %{d.logits.name} must be [batch, seq, vocab], not {d.logits.type}")
    for layer in d.kv:
        if any(v.type.rank != 4 for v in layer):
            raise IRError("decoder interface: cache values " + ", ".join(f"%{v.name}: {v.type}" for v in layer)
                          + " must all be [batch, kv_heads, seq, head_dim]")


def clone(graph: Graph) -> Graph:
    """A structural copy: new nodes and values, constants' data shared (never copied)."""
    g = Graph(graph.name)
    vmap: dict[int, Value] = {}

    def copy(v: Value) -> Value:
        nv = Value(v.name, v.type, data=v.data)
        vmap[id(v)] = nv
        return nv

    g.inputs = [copy(v) for v in graph.inputs]
    g.constants = [copy(v) for v in graph.constants]
    for n in graph.nodes:
        nn = Node(n.op, [vmap[id(v)] for v in n.inputs], [], deepcopy(n.attrs), n.source)
        for v in n.outputs:
            nv = copy(v)
            nv.producer = nn
            nn.outputs.append(nv)
        g.nodes.append(nn)
    g.outputs = [vmap[id(v)] for v in graph.outputs]
    g.decoder = graph.decoder
    g.rebuild_names()
    return g
