"""The attention pattern of the canonicalize pass.

    softmax(q @ k^T * scale [+ mask], axis=-1) @ v   ->   attention(q, k, v [, mask]) {causal, scale}

as written by hand (HF eager attention) and as torch.onnx lowers scaled_dot_product_attention:
- the scale may be split between q and k^T (SDPA multiplies each by sqrt(scale)) or be a division;
- k^T may be a transpose of the last two axes, or reshape -> transpose(0, 2, 1) -> reshape, which
  is the same thing written over merged leading dims;
- k and v may be repeated for grouped-query attention (unsqueeze(2) -> expand -> reshape), which
  is what `attention` does itself with fewer kv heads;
- softmax may run in f32 between two casts, and be followed by SDPA's where(isnan(p), 0, p).
The mask becomes `causal=True` only when it is provably the causal mask of a square score
matrix: a constant with that pattern, or a triangle built from trilu (through where/equal/
cast/unsqueeze/expand/arithmetic with scalar constants) that is 0 on and below the diagonal
and at most half the dtype's lowest value above it, so adding it zeroes those probabilities
exactly as -inf does. Any other mask is kept as attention's fourth input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isthmus.compiler.ir import Graph, Node, Value, numpy_dtype
from isthmus.compiler.ops import ELEMENTWISE, get_op
from isthmus.compiler.ops.registry import norm_axis
from isthmus.compiler.passes.match import insert_before, monomial, producer, replace, scalar


def _single_base(v: Value) -> tuple[float, Value] | None:
    """(c, x) when v = c * x."""
    c, b = monomial(v)
    if len(b) != 1:
        return None
    (x, e), = b.values()
    return (c, x) if e == 1.0 else None


def _scaled_scores(s: Value):
    """(q, kt, scale) when s = (c1 q) @ (c2 kt) * c3."""
    cs = _single_base(s)
    mm = producer(cs[1], "matmul") if cs else None
    if mm is None:
        return None
    ca, cb = _single_base(mm.inputs[0]), _single_base(mm.inputs[1])
    if ca is None or cb is None:
        return None
    return ca[1], cb[1], cs[0] * ca[0] * cb[0]


def _untranspose(kt: Value) -> tuple[Value, list[int] | None] | None:
    """(x, perm) where k = transpose(x, perm) (perm None: k = x) and kt is k with its last two
    axes swapped. A transpose into kt may carry more than the swap: torch.onnx's optimizer
    folds k.transpose(1, 2).transpose(2, 3) into one transpose(0, 2, 3, 1)."""
    t = producer(kt, "transpose")
    if t is not None and t.inputs[0].type.rank == 4:
        p = t.attrs["perm"] or [3, 2, 1, 0]
        perm = [p[0], p[1], p[3], p[2]]
        return t.inputs[0], (None if perm == [0, 1, 2, 3] else perm)
    r2 = producer(kt, "reshape")
    t = producer(r2.inputs[0], "transpose") if r2 else None
    r1 = producer(t.inputs[0], "reshape") if t else None
    if r1 is None or t.attrs["perm"] != [0, 2, 1]:
        return None
    k = r1.inputs[0]
    merged = r1.outputs[0].shape
    if k.type.rank == 4 and merged[1:] == k.shape[2:] and kt.shape == k.shape[:2] + (k.shape[3], k.shape[2]):
        return k, None
    return None


def _unrepeat(k: Value) -> Value:
    """The kv heads before a grouped-query repeat (unsqueeze(2) -> expand -> reshape), else k."""
    r = producer(k, "reshape")
    e = producer(r.inputs[0], "expand") if r else None
    u = producer(e.inputs[0], "unsqueeze") if e else None
    if u is None or u.attrs["axes"] not in ([2], [-3]) or u.inputs[0].type.rank != 4:
        return k
    k0 = u.inputs[0]
    b, hkv, t, d = k0.shape
    rep = e.outputs[0].shape[2]
    if isinstance(hkv, int) and isinstance(rep, int) and e.outputs[0].shape == (b, hkv, rep, t, d) \
            and k.shape == (b, hkv * rep, t, d):
        return k0
    return k


# -- is the mask causal? ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tri:
    """Over the last two axes [i, j] (n x n): `above` where j - i >= k, `below` elsewhere."""
    k: int
    above: np.ndarray
    below: np.ndarray
    n: object


def _fill_value(x: Value) -> np.ndarray | None:
    if x.is_constant and isinstance(x.data, np.ndarray) and x.data.size:
        flat = x.data.reshape(-1)
        return np.asarray(flat[0]) if np.all(flat == flat[0]) else None
    p = producer(x, "constant_of_shape")
    if p is not None:
        return np.asarray(p.attrs["value"], dtype=numpy_dtype(p.attrs["dtype"]))
    p = producer(x, "expand")
    return _fill_value(p.inputs[0]) if p is not None else None


def _tri(v: Value) -> _Tri | None:
    p = v.producer
    if p is None or v.type.rank < 2:
        return None
    n = v.shape[-1]
    if p.op == "trilu":
        x = p.inputs[0]
        c = _fill_value(x)
        if c is None or x.shape[-2] != n:
            return None
        zero = np.zeros((), c.dtype)
        k = p.attrs["k"]
        return _Tri(k, c, zero, n) if p.attrs["upper"] else _Tri(k + 1, zero, c, n)
    if p.op in ("unsqueeze", "expand", "reshape"):
        t = _tri(p.inputs[0])
        return t if t is not None and v.shape[-2:] == (t.n, t.n) else None
    if ELEMENTWISE in get_op(p.op).traits:
        tris = [_tri(x) for x in p.inputs]
        if sum(t is not None for t in tris) != 1:
            return None
        t = next(t for t in tris if t is not None)
        others = [x for x, tr in zip(p.inputs, tris) if tr is None]
        if v.shape[-2:] != (t.n, t.n) or not all(x.is_constant and x.data.size == 1 for x in others):
            return None
        ref = get_op(p.op).reference

        def at(side):
            args = [getattr(t, side) if tr is not None else np.asarray(x.data).reshape(())
                    for x, tr in zip(p.inputs, tris)]
            return np.asarray(ref(*args, **p.attrs))
        return _Tri(t.k, at("above"), at("below"), t.n)
    return None


def _blocks(value: np.ndarray, dtype: str) -> bool:
    """Adding `value` to a score zeroes its probability as -inf would."""
    return bool(value <= np.finfo(numpy_dtype(dtype)).min / 2)


def _is_causal(mask: Value, s, t) -> bool:
    if s != t or mask.type.rank < 2 or mask.shape[-2:] != (s, t):
        return False
    if mask.is_constant and isinstance(mask.data, np.ndarray) and mask.dtype in ("f32", "f16", "f64"):
        m = mask.data
        allowed = np.tril(np.ones(m.shape[-2:], dtype=bool))
        return bool(np.all(m[..., allowed] == 0) and _blocks(m[..., ~allowed].max(initial=-np.inf), mask.dtype))
    tri = _tri(mask)
    return tri is not None and tri.k == 1 and tri.n == s and tri.below == 0 and _blocks(tri.above, mask.dtype)


# -- the pattern --------------------------------------------------------------------------------

def _without_nan_guard(p: Value) -> Value:
    """sm for where(isnan(sm), 0, sm), isnan written not(sm == sm): torch's SDPA zeroes the NaN rows
    of fully masked queries so; `attention` gives zeros for them already (for finite inputs)."""
    w = producer(p, "where")
    if w is None or scalar(w.inputs[1]) != 0.0:
        return p
    sm = w.inputs[2]
    isnan = producer(w.inputs[0], "not")
    eq = producer(isnan.inputs[0], "equal") if isnan else None
    return sm if eq is not None and eq.inputs[0] is sm and eq.inputs[1] is sm else p


def match_attention(g: Graph, node: Node) -> bool:
    if node.op != "matmul":
        return False
    probs, v = node.inputs
    probs = _without_nan_guard(probs)
    cast_out = producer(probs, "cast")
    sm = producer(cast_out.inputs[0] if cast_out else probs, "softmax")
    if sm is None or norm_axis(sm.attrs["axis"], sm.inputs[0].type.rank) != sm.inputs[0].type.rank - 1:
        return False
    scores = sm.inputs[0]
    if cast_out is not None and (cin := producer(scores, "cast")) is not None:
        scores = cin.inputs[0]
    found, mask = _scaled_scores(scores), None
    if found is None and (add := producer(scores, "add")) is not None:
        for s, m in (add.inputs, add.inputs[::-1]):
            if (found := _scaled_scores(s)) is not None:
                mask = m
                break
    if found is None:
        return False
    q, kt, scale = found
    untransposed = _untranspose(kt)
    if untransposed is None or q.type.rank != 4 or v.type.rank != 4 or scale <= 0:
        return False
    k, perm = untransposed
    k_shape = k.shape if perm is None else tuple(k.shape[i] for i in perm)
    k, v = (_unrepeat(k) if perm is None else k), _unrepeat(v)
    if perm is None:
        k_shape = k.shape
    if q.dtype != k.dtype or k.dtype != v.dtype or (mask is not None and mask.dtype != q.dtype):
        return False
    causal = mask is not None and _is_causal(mask, q.shape[2], k_shape[2])
    if perm is not None:
        k = insert_before(g, node, "transpose", [k], {"perm": perm})
    inputs = [q, k, v] + ([mask] if mask is not None and not causal else [])
    return replace(g, node, "attention", inputs, {"causal": causal, "scale": float(scale)})


