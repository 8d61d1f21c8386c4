"""The rotary-embedding and linear patterns of the canonicalize pass.

rope: Hugging Face's apply_rotary_pos_emb as exporters write it,

    x * unsqueeze(cos(E), 1) + concat(-x[..., d/2:], x[..., :d/2]) * unsqueeze(sin(E), 1)
    E = concat(F, F, axis=-1),  F = the angles, position * frequency:
        F = cast(positions) * inv_freq                          (torch.onnx dynamo)
        F = transpose(inv_freq[None, :, None] @ cast(positions)[:, None, :])   (HF's rotary_emb, Optimum)

->  rope(x, positions) {layout="half", dim=d, theta, factors}, with cos and sin optionally scaled by
a constant 1 (HF's attention_scaling of the default rotary). The frequencies are the constant
inv_freq, read back as theta (and per-pair factors when they are not theta^(-2i/d)); the
positions are the integer tensor the angles were cast from.

linear: matmul(x, W) with a constant 2-D float W ([in, out], as ONNX stores it) ->
linear(x, W^T), the op whose kernels (packed weights, norm prologue, epilogues) every target has.
"""

from __future__ import annotations

import numpy as np

from isthmus.compiler.ir import Graph, Node, Value
from isthmus.compiler.ops.attention import inv_freq
from isthmus.compiler.ops.registry import norm_axis
from isthmus.compiler.passes.match import close, insert_before, producer, replace, scalar


def rope_attrs(freqs: np.ndarray, dim: int, layout: str = "half") -> dict:
    """rope attributes whose frequencies are `freqs` ([dim / 2]): theta read from the second
    frequency, and per-pair factors when the rest do not follow theta^(-2i/dim) (scaled rotaries)."""
    freqs = np.asarray(freqs, np.float64).reshape(-1)
    theta = float((1.0 / freqs[1]) ** (dim / 2)) if freqs.size > 1 and freqs[1] > 0 else 10000.0
    factors = inv_freq(dim, theta).astype(np.float64) / freqs
    exact = np.allclose(factors, 1.0, rtol=1e-6, atol=0)
    return {"theta": theta, "layout": layout, "dim": dim, "factors": [] if exact else [float(f) for f in factors]}


# -- rope ---------------------------------------------------------------------------------------

def _const_vector(v: Value) -> np.ndarray | None:
    """The values of a float constant that varies along one axis only (also broadcast by an
    expand or by adding a zero fill, as exporters write inv_freq[None, :, None].expand(b, -1, 1))."""
    p = producer(v, "add", "expand")
    if p is not None:
        if p.op == "expand":
            return _const_vector(p.inputs[0])
        for a, z in (p.inputs, p.inputs[::-1]):
            fill = producer(z, "constant_of_shape")
            if fill is not None and fill.attrs["value"] == 0:
                return _const_vector(a)
        return None
    if not v.is_constant or not isinstance(v.data, np.ndarray) or v.dtype != "f32":
        return None
    long = [i for i, d in enumerate(v.shape) if d != 1]
    return np.asarray(v.data).reshape(-1) if len(long) == 1 else None


def _positions(v: Value, axis: int) -> tuple[Value, list[int]] | None:
    """(q, axes) when v = cast(q) to f32 from an integer q whose dims at `axes` (axis, and a
    leading 1 of a batch the positions do not have) are 1: the positions are q without them."""
    c = producer(v, "cast")
    if c is None or c.inputs[0].dtype not in ("i64", "i32"):
        return None
    q = c.inputs[0]
    axis = norm_axis(axis, q.type.rank)
    if q.shape[axis] != 1:
        return None
    axes = [axis] + ([0] if axis != 0 and q.type.rank == 3 and q.shape[0] == 1 else [])
    return q, sorted(axes)


def _angles(f: Value):
    """(positions value, squeeze axes, frequencies) when f = position * frequency as above."""
    m = producer(f, "mul")
    if m is not None:
        for a, b in (m.inputs, m.inputs[::-1]):
            freqs = _const_vector(b)
            pos = _positions(a, -1) if freqs is not None and b.shape[-1] == f.shape[-1] else None
            if pos is not None:
                return (*pos, freqs)
        return None
    t = producer(f, "transpose")
    mm = producer(t.inputs[0], "matmul") if t is not None and t.attrs["perm"] == [0, 2, 1] else None
    if mm is None:
        return None
    freqs = _const_vector(mm.inputs[0])
    pos = _positions(mm.inputs[1], 1)
    return (*pos, freqs) if freqs is not None and pos is not None and mm.inputs[0].shape[-1] == 1 else None


def _table(v: Value, fn: str) -> Value | None:
    """E when v = unsqueeze(fn(E) [* 1], 1)."""
    u = producer(v, "unsqueeze")
    if u is None or u.attrs["axes"] != [1]:
        return None
    x = u.inputs[0]
    m = producer(x, "mul")
    if m is not None:
        for a, b in (m.inputs, m.inputs[::-1]):
            if close(scalar(b), 1.0):
                x = a
                break
        else:
            return None
    p = producer(x, fn)
    return p.inputs[0] if p is not None else None


def _half_slice(v: Value, x: Value, half: int, upper: bool) -> bool:
    s = producer(v, "slice")
    if s is None or s.inputs[0] is not x or s.attrs["steps"] not in ([1], None):
        return False
    if [norm_axis(a, x.type.rank) for a in s.attrs["axes"]] != [x.type.rank - 1]:
        return False
    start, end = s.attrs["starts"][0], s.attrs["ends"][0]
    return (start, end >= 2 * half) == (half, True) if upper else (start, end) == (0, half)


def _rotated(r: Value) -> Value | None:
    """x when r = concat(-x[..., d/2:], x[..., :d/2], axis=-1)."""
    c = producer(r, "concat")
    if c is None or len(c.inputs) != 2 or norm_axis(c.attrs["axis"], r.type.rank) != r.type.rank - 1:
        return None
    neg = producer(c.inputs[0], "neg")
    if neg is None:
        return None
    hi = neg.inputs[0]
    x = producer(hi, "slice").inputs[0] if producer(hi, "slice") else None
    d = x.shape[-1] if x is not None else None
    if not isinstance(d, int) or d % 2:
        return None
    ok = _half_slice(hi, x, d // 2, True) and _half_slice(c.inputs[1], x, d // 2, False)
    return x if ok else None


def _mul_parts(v: Value):
    m = producer(v, "mul")
    return [m.inputs, m.inputs[::-1]] if m is not None else []


def match_rope(g: Graph, node: Node) -> bool:
    if node.op != "add" or node.outputs[0].type.rank != 4:
        return False
    for a, b in (node.inputs, node.inputs[::-1]):
        for x, c in _mul_parts(a):
            e = _table(c, "cos")
            if e is None or x.type != node.outputs[0].type:
                continue
            for r, s in _mul_parts(b):
                if _rotated(r) is not x or _table(s, "sin") is not e:
                    continue
                cat = producer(e, "concat")
                if cat is None or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1] \
                        or norm_axis(cat.attrs["axis"], e.type.rank) != e.type.rank - 1:
                    continue
                found = _angles(cat.inputs[0])
                d = x.shape[-1]
                if found is None or found[2].size != d // 2:
                    continue
                q, axes, freqs = found
                pos = insert_before(g, node, "squeeze", [q], {"axes": axes})
                if pos.type.rank not in (1, 2):
                    continue
                return replace(g, node, "rope", [x, pos], rope_attrs(freqs, d))
    return False


# -- linear ---------------------------------------------------------------------------------------

def match_linear(g: Graph, node: Node) -> bool:
    if node.op != "matmul":
        return False
    x, w = node.inputs
    if not (w.is_constant and isinstance(w.data, np.ndarray) and w.type.rank == 2 and x.type.rank >= 2
            and w.dtype in ("f32", "f16") and w.dtype == x.dtype):
        return False
    cache = g.__dict__.setdefault("_transposed", {})    # one transposed copy per weight (tied ones share)
    wt = cache.get(id(w))
    if wt is None:
        wt = cache[id(w)] = g.add_constant(f"{w.name}.T", np.ascontiguousarray(np.asarray(w.data).T))
    return replace(g, node, "linear", [x, wt], {})
