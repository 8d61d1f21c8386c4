"""Pattern-matching helpers for rewrite passes (canonicalize and its attention pattern).

`monomial(v)` reads a product the way algebra does: mul/div/reciprocal/neg/sqrt/rsqrt/pow by
a constant are flattened into coef * prod(base ** exp), so x * rsqrt(s), x / sqrt(s) and
x * reciprocal(sqrt(s)) all read as x * s^-1/2. `replace` swaps a matched root for a fused
op only when the op's type equals the root's, and moves the root's name (a graph output
keeps its name).
"""

from __future__ import annotations

import math

import numpy as np

from isthmus.compiler.ir import Graph, Node, Value
from isthmus.compiler.ops import get_op
from isthmus.errors import IRError

RTOL = 1e-6   # constants must match to float32 precision


def producer(v: Value, *ops: str) -> Node | None:
    p = v.producer
    return p if p is not None and (not ops or p.op in ops) else None


def scalar(v: Value) -> float | None:
    """The value of a one-element float/int constant."""
    if v.is_constant and isinstance(v.data, np.ndarray) and v.data.size == 1 and v.dtype != "bool":
        return float(v.data.reshape(-1)[0])
    return None


def close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=RTOL, abs_tol=0.0)


def monomial(v: Value) -> tuple[float, dict[int, tuple[Value, float]]]:
    """v as coef * prod(base ** exp): {id(base): (base, exp)} over mul/div/reciprocal/neg/sqrt/rsqrt/pow."""
    c = scalar(v)
    if c is not None:
        return c, {}
    p = v.producer
    op = p.op if p is not None else ""
    if op in ("mul", "div"):
        ca, ba = monomial(p.inputs[0])
        cb, bb = monomial(p.inputs[1])
        if op == "div":
            if cb == 0:
                return 1.0, {id(v): (v, 1.0)}
            cb, bb = 1.0 / cb, {k: (b, -e) for k, (b, e) in bb.items()}
        out = dict(ba)
        for k, (b, e) in bb.items():
            e = out.get(k, (b, 0.0))[1] + e
            if e:
                out[k] = (b, e)
            else:
                out.pop(k, None)
        return ca * cb, out
    if op == "neg":
        c, b = monomial(p.inputs[0])
        return -c, b
    if op == "reciprocal":
        c, b = monomial(p.inputs[0])
        if c:
            return 1.0 / c, {k: (x, -e) for k, (x, e) in b.items()}
    if op in ("sqrt", "rsqrt"):
        return 1.0, {id(p.inputs[0]): (p.inputs[0], 0.5 if op == "sqrt" else -0.5)}
    if op == "pow" and scalar(p.inputs[1]) is not None:
        e = scalar(p.inputs[1])
        c, b = monomial(p.inputs[0])
        if c > 0 or float(e).is_integer():
            return c ** e, {k: (x, ex * e) for k, (x, ex) in b.items()}
    return 1.0, {id(v): (v, 1.0)}


def bases(v: Value, coef: float = 1.0) -> dict[float, list[Value]] | None:
    """v's monomial as {exponent: [bases]}, if its coefficient is `coef`."""
    c, b = monomial(v)
    if not close(c, coef):
        return None
    out: dict[float, list[Value]] = {}
    for x, e in b.values():
        out.setdefault(e, []).append(x)
    return out


def is_power(v: Value, x: Value, exp: float, coef: float = 1.0) -> bool:
    c, b = monomial(v)
    return close(c, coef) and list(b) == [id(x)] and b[id(x)][1] == exp


def insert_before(g: Graph, root: Node, op: str, inputs: list[Value], attrs: dict) -> Value:
    """A new node placed just before root (its inputs must be defined there)."""
    v = g.add(op, inputs, attrs, name=f"{root.outputs[0].name}.{op}", source=root.source)
    g.nodes.insert(g.nodes.index(root), g.nodes.pop())
    return v


def replace(g: Graph, root: Node, op: str, inputs: list[Value], attrs: dict) -> bool:
    """Put `op(inputs)` where root's output was, if its type is the same; root's output name moves to it."""
    old = root.outputs[0]
    opdef = get_op(op)
    try:
        attrs = opdef.complete_attrs(attrs)
        if opdef.infer([v.type for v in inputs], attrs) != [old.type]:
            return False
    except IRError:
        return False
    name = old.name
    g._names.discard(name)
    old.name = g.fresh_name(f"{name}.unfused")
    g._names.add(old.name)
    new = g.add(op, inputs, attrs, name=name, source=root.source)
    g.nodes.insert(g.nodes.index(root), g.nodes.pop())
    g.replace_all_uses(old, new)
    return True
