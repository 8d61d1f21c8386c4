"""Common subexpression elimination: one node per (op, inputs, attributes); one copy per small literal.

Operands of a COMMUTATIVE op are keyed as a set, so add(a, b) and add(b, a) are one expression.
"""

import numpy as np

from isthmus.compiler.ir import Graph
from isthmus.compiler.ops import COMMUTATIVE, get_op


def _freeze(x):
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(e) for e in x)
    if isinstance(x, float) and x != x:
        return "nan"
    return x


def cse(g: Graph) -> Graph:
    replace: dict[int, object] = {}
    literals: dict[tuple, object] = {}
    # A graph output is the interface (its name is the key `run` returns): it may absorb
    # duplicates but is never itself replaced by a twin under another name.
    interface = {id(v) for v in g.outputs}
    for v in g.constants:
        if v.is_small_literal and id(v) not in interface:
            key = (v.dtype, v.shape, np.ascontiguousarray(v.data).tobytes())
            keeper = literals.setdefault(key, v)
            if keeper is not v:
                replace[id(v)] = keeper
    seen: dict[tuple, object] = {}
    kept = []
    for node in g.nodes:
        node.inputs = [replace.get(id(v), v) for v in node.inputs]
        operands = tuple(id(v) for v in node.inputs)
        if COMMUTATIVE in get_op(node.op).traits:
            # Swapped operands may broadcast two symbolic dims to different names: merge only
            # twins whose result types agree.
            operands = (tuple(sorted(operands)), tuple(v.type for v in node.outputs))
        key = (node.op, operands,
               tuple(sorted((k, _freeze(a)) for k, a in node.attrs.items())))
        twin = seen.setdefault(key, node)
        if twin is node or any(id(v) in interface for v in node.outputs):
            kept.append(node)
        else:
            for old, new in zip(node.outputs, twin.outputs):
                replace[id(old)] = new
    g.nodes = kept
    g.outputs = [replace.get(id(v), v) for v in g.outputs]
    g.constants = [v for v in g.constants if id(v) not in replace]
    g.rebuild_names()
    return g
