"""The kernel targets' plan: the fusion pass's groups as steps, with what binding them needs.

Shared by the numba and triton lowerings: each binds the same steps to its own kernels.

  Plan.steps    list[Step] in execution order, one kernel call each: the fusion Group, the Values it
                reads (activations and graph inputs; constants are the backend's to pack) and writes,
                and a cost record for one token (linear: 2 * rows * cols flops, packed weight bytes)
  Plan.caches   list[CachePair]: the KV appends a decoder keeps in place (a `qkv` step writes rows
                past .. past + seq of a preallocated cache; attention reads rows 0 .. past + seq)
  Plan.last_use {Value: index of the last step that reads it}, for buffer reuse

`BufferPool` hands out buffers by shape and dtype, for reuse once a value's last reader has run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from isthmus.compiler.ir import Value
from isthmus.compiler.passes.fusion import Group


@dataclass(eq=False)
class Step:
    kind: str
    group: Group
    ins: list[Value]
    outs: list[Value]
    flops: float = 0.0
    bytes: float = 0.0


@dataclass(eq=False)
class CachePair:
    past_k: Value
    past_v: Value
    present_k: Value
    present_v: Value
    step: Step


@dataclass(eq=False)
class Plan:
    steps: list[Step]
    caches: list[CachePair] = field(default_factory=list)
    last_use: dict = field(default_factory=dict)


def make_plan(groups: list[Group]) -> Plan:
    steps, caches = [], []
    for g in groups:
        ins = [v for v in g.inputs if not v.is_constant]
        st = Step(g.kind, g, ins, list(g.outputs))
        if g.kind == "linear":
            cols = g.attrs["weights"][0].shape[1]
            rows = sum(w.shape[0] for w in g.attrs["weights"])
            st.flops = 2.0 * rows * cols
            st.bytes = float(sum(w.data.nbytes for w in g.attrs["weights"]))
            if g.attrs["epilogue"] == "qkv":
                q = g.attrs["qkv"]
                caches.append(CachePair(q["past"][0], q["past"][1], g.outputs[1], g.outputs[2], st))
        steps.append(st)
    last_use = {}
    for i, st in enumerate(steps):
        for v in st.ins:
            last_use[v] = i
    return Plan(steps, caches, last_use)


class BufferPool:
    def __init__(self):
        self.free: dict[tuple, list[np.ndarray]] = {}

    def take(self, shape, dtype=np.float32) -> np.ndarray:
        key = (tuple(shape), np.dtype(dtype).str)
        bucket = self.free.get(key)
        return bucket.pop() if bucket else np.empty(shape, dtype)

    def give(self, a: np.ndarray) -> None:
        self.free.setdefault((a.shape, a.dtype.str), []).append(a)


def label(st: Step) -> str:
    """The step's name in profiles: "linear+norm+qkv", "attention", or the op of an `op` step."""
    if st.kind == "linear":
        e = st.group.attrs["epilogue"]
        return "linear" + ("+norm" if st.group.attrs["norm"] is not None else "") + (f"+{e}" if e else "")
    if st.kind == "op":
        return st.group.nodes[0].op
    return st.kind
