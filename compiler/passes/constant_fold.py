"""Constant folding: evaluate nodes whose inputs are all constants, with the op's reference.

`shape` of a statically shaped value folds too, whatever computes the value. Quantized
constants are never folded (that would dequantize a weight into f32), and nor is anything
whose result would be much larger than its inputs (an `expand` of a scalar).
"""

import numpy as np

from isthmus.compiler.ir import Graph, dtype_name
from isthmus.compiler.ops import get_op

GROWTH_LIMIT = 4          # fold only if the result is at most this many times the inputs' size...
SMALL = 1 << 12           # ...or small in absolute terms


def _foldable(node) -> bool:
    if not node.inputs or not all(v.is_constant and isinstance(v.data, np.ndarray) for v in node.inputs):
        return False
    out_size = sum(int(np.prod(v.shape)) if v.type.is_static else SMALL + 1 for v in node.outputs)
    in_size = sum(v.data.size for v in node.inputs)
    return out_size <= SMALL or out_size <= GROWTH_LIMIT * in_size


def constant_fold(g: Graph) -> Graph:
    replace: dict[int, object] = {}
    kept = []
    for node in g.nodes:
        node.inputs = [replace.get(id(v), v) for v in node.inputs]
        if node.op == "shape" and node.inputs[0].type.is_static:   # needs only the input's type
            dims = node.inputs[0].shape[node.attrs["start"]:node.attrs["end"]]
            out = node.outputs[0]
            g._names.discard(out.name)
            replace[id(out)] = g.add_constant(out.name, np.array(dims, dtype=np.int64))
            continue
        if not _foldable(node):
            kept.append(node)
            continue
        result = get_op(node.op).reference(*(v.data for v in node.inputs), **node.attrs)
        # np.asarray(order="C"), not np.ascontiguousarray: the latter turns a 0-d result into shape (1,)
        results = [np.asarray(r, order="C") for r in (result if len(node.outputs) > 1 else (result,))]
        if any(r.shape != out.shape or dtype_name(r.dtype) != out.dtype for r, out in zip(results, node.outputs)):
            kept.append(node)   # the rule and the reference disagree: leave it for the verifier to report
            continue
        for out, r in zip(node.outputs, results):
            g._names.discard(out.name)
            replace[id(out)] = g.add_constant(out.name, r)
    g.nodes = kept
    g.outputs = [replace.get(id(v), v) for v in g.outputs]
    return g
