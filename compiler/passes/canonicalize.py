"""Canonicalisation: rewrite decomposed subgraphs into the fused ops backends implement.

Patterns (one function each; attention lives in canonicalize_attention.py):
  rmsnorm    x * (mean(x^2) + eps)^-1/2 [* w]      rsqrt, sqrt+reciprocal, sqrt+div, pow forms;
                                                    cast to f32 and back around it, as HF writes it
  layernorm  (x - mean(x)) * (mean((x - mean(x))^2) + eps)^-1/2 [* w] [+ b]
  gelu       0.5 * x * (1 + erf(x / sqrt 2))      and   0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
  swiglu     a * sigmoid(a) * b, silu(a) * b
  silu       x * sigmoid(x)
  attention  softmax(q @ k^T * scale [+ mask]) @ v  (see canonicalize_attention.py)
  rope       x * cos(pos * f) + rotate_half(x) * sin(pos * f), HF's apply_rotary_pos_emb
             (see canonicalize_rope.py)
  linear     matmul(x, W) with a constant 2-D W

Products are matched as monomials (passes/match.py), so x * rsqrt(s) and x / sqrt(s) are
the same pattern. Constants (eps, 0.5, 1/sqrt 2, scale) are checked, not assumed. A rewrite
happens only if the fused op's type equals the replaced value's type; what it leaves dead
is dropped at once.
"""

from __future__ import annotations

import math

import numpy as np

from isthmus.compiler.ir import Graph, Node, Value, numpy_dtype
from isthmus.compiler.ops.registry import norm_axis
from isthmus.compiler.passes.match import bases, close, is_power, producer, replace, scalar


# -- shared pieces of the norm patterns ------------------------------------------------------

def mean_last(v: Value) -> Value | None:
    """x when v = reduce_mean(x) over the last axis, keeping dims."""
    p = producer(v, "reduce_mean")
    if p is None or not p.attrs["keepdims"] or p.attrs["axes"] is None:
        return None
    rank = p.inputs[0].type.rank
    return p.inputs[0] if [norm_axis(a, rank) for a in p.attrs["axes"]] == [rank - 1] else None


def plus_eps(v: Value) -> tuple[Value, float] | None:
    """(s, eps) when v = s + eps for a positive scalar constant eps."""
    p = producer(v, "add")
    if p is None:
        return None
    for s, c in (p.inputs, p.inputs[::-1]):
        eps = scalar(c)
        if eps is not None and eps > 0 and c.type.rank <= s.type.rank:
            return s, eps
    return None


def _ones_like_last(g: Graph, x: Value) -> Value | None:
    """A unit weight for a norm written without one (needs a static last dim)."""
    d = x.shape[-1] if x.type.rank else None
    return g.add_constant("ones", np.ones(d, dtype=numpy_dtype(x.dtype))) if isinstance(d, int) else None


# -- normalisations --------------------------------------------------------------------------

def _inv_sqrt_eps(bs: dict) -> tuple[Value, float] | None:
    """The (s, eps) of the one base raised to -1/2, s + eps."""
    if len(bs.get(-0.5, [])) != 1 or set(bs) - {1.0, -0.5}:
        return None
    return plus_eps(bs[-0.5][0])


def _weight_of(rest: list[Value], x: Value) -> tuple[bool, Value | None]:
    """rest must be [] or [w] with w a vector over x's last dim."""
    if not rest:
        return True, None
    w = rest[0]
    ok = len(rest) == 1 and w.type.rank == 1 and w.shape[0] == x.shape[-1] and w.dtype == x.dtype
    return ok, w if ok else None


def _rms_core(v: Value):
    """(x, eps, w | None) when v = x * (mean(x^2) + eps)^-1/2 [* w]."""
    bs = bases(v)
    if bs is None or (se := _inv_sqrt_eps(bs)) is None:
        return None
    s, eps = se
    sq = mean_last(s)
    for x in bs.get(1.0, []):
        if sq is not None and is_power(sq, x, 2.0):
            ok, w = _weight_of([b for b in bs[1.0] if b is not x], x)
            if ok:
                return x, eps, w
    return None


def match_rmsnorm(g: Graph, node: Node) -> bool:
    if node.op not in ("mul", "div"):
        return False
    v = node.outputs[0]
    core = _rms_core(v)
    if core is None:    # w * cast(x32 * rsqrt(...)) with x32 = cast(x): HF computes the norm in f32
        bs = bases(v)
        if bs is None or set(bs) != {1.0} or len(bs[1.0]) != 2:
            return False
        for c, w in (bs[1.0], bs[1.0][::-1]):
            inner = producer(c, "cast")
            core = _rms_core(inner.inputs[0]) if inner is not None else None
            if core is not None and core[2] is None and (x0 := producer(core[0], "cast")) is not None \
                    and x0.inputs[0].dtype == v.dtype:
                core = (x0.inputs[0], core[1], w)
                break
        else:
            return False
    x, eps, w = core
    w = w if w is not None else _ones_like_last(g, x)
    return w is not None and replace(g, node, "rmsnorm", [x, w], {"eps": eps})


def match_layernorm(g: Graph, node: Node) -> bool:
    if node.op not in ("mul", "div", "add"):
        return False
    candidates = [(node.outputs[0], None)]
    if node.op == "add":
        a, b = node.inputs
        candidates = [(a, b), (b, a)]
    for v, bias in candidates:
        bs = bases(v)
        if bs is None or (se := _inv_sqrt_eps(bs)) is None:
            continue
        s, eps = se
        var = mean_last(s)
        for d in bs.get(1.0, []):
            sub = producer(d, "sub")
            if sub is None or var is None or not is_power(var, d, 2.0) or mean_last(sub.inputs[1]) is not sub.inputs[0]:
                continue
            x = sub.inputs[0]
            ok, w = _weight_of([b for b in bs[1.0] if b is not d], x)
            if not ok or (bias is not None and not _weight_of([bias], x)[0]):
                continue
            w = w if w is not None else _ones_like_last(g, x)
            if w is not None and replace(g, node, "layernorm", [x, w] + ([bias] if bias is not None else []),
                                         {"eps": eps}):
                return True
    return False


# -- activations -----------------------------------------------------------------------------

def _one_plus(v: Value, op: str) -> Value | None:
    """The argument y when v = 1 + op(y)."""
    p = producer(v, "add")
    if p is None:
        return None
    for one, t in (p.inputs, p.inputs[::-1]):
        f = producer(t, op)
        if f is not None and close(scalar(one), 1.0):
            return f.inputs[0]
    return None


def match_gelu(g: Graph, node: Node) -> bool:
    if node.op != "mul":
        return False
    bs = bases(node.outputs[0], 0.5)
    if bs is None or set(bs) != {1.0} or len(bs[1.0]) != 2:
        return False
    for x, a in (bs[1.0], bs[1.0][::-1]):
        y = _one_plus(a, "erf")
        if y is not None and is_power(y, x, 1.0, coef=math.sqrt(0.5)):
            return replace(g, node, "gelu", [x], {"approximate": "none"})
        z = _one_plus(a, "tanh")
        zb = bases(z, math.sqrt(2.0 / math.pi)) if z is not None else None
        if zb and set(zb) == {1.0} and len(zb[1.0]) == 1 and (u := producer(zb[1.0][0], "add")) is not None:
            for x1, cube in (u.inputs, u.inputs[::-1]):
                if x1 is x and is_power(cube, x, 3.0, coef=0.044715):
                    return replace(g, node, "gelu", [x], {"approximate": "tanh"})
    return False


def _silu_parts(vals: list[Value]) -> Value | None:
    """a when vals is [a, sigmoid(a)] in either order."""
    for a, s in (vals, vals[::-1]):
        p = producer(s, "sigmoid")
        if p is not None and p.inputs[0] is a:
            return a
    return None


def match_swiglu(g: Graph, node: Node) -> bool:
    if node.op != "mul":
        return False
    bs = bases(node.outputs[0])
    if bs is None or set(bs) != {1.0}:
        return False
    vals = bs[1.0]
    for i, b in enumerate(vals):
        rest = vals[:i] + vals[i + 1:]
        if len(rest) == 2:
            a = _silu_parts(rest)
        elif len(rest) == 1 and (p := producer(rest[0], "silu")) is not None:
            a = p.inputs[0]
        else:
            continue
        if a is not None and a.type == b.type and replace(g, node, "swiglu", [a, b], {}):
            return True
    return False


def match_silu(g: Graph, node: Node) -> bool:
    if node.op != "mul":
        return False
    bs = bases(node.outputs[0])
    a = _silu_parts(bs[1.0]) if bs is not None and set(bs) == {1.0} and len(bs[1.0]) == 2 else None
    return a is not None and replace(g, node, "silu", [a], {})


# -- the pass --------------------------------------------------------------------------------

def patterns():
    from isthmus.compiler.passes.canonicalize_attention import match_attention
    from isthmus.compiler.passes.canonicalize_rope import match_linear, match_rope

    # layernorm before rmsnorm: a layernorm without bias is also an rmsnorm of x - mean(x)
    return [match_attention, match_layernorm, match_rmsnorm, match_gelu, match_swiglu, match_silu, match_rope,
            match_linear]


def canonicalize(g: Graph, max_rounds: int = 4) -> Graph:
    """Rewrite to a fixpoint. Nodes are visited last to first, so the largest match (rmsnorm
    with its weight) is tried before the subexpressions it contains; what a rewrite leaves
    dead is dropped at once so it is not matched again."""
    from isthmus.compiler.passes.dce import dce

    pats = patterns()
    for _ in range(max_rounds):
        changed = False
        alive = {id(n) for n in g.nodes}
        for node in reversed(list(g.nodes)):
            if id(node) in alive and any(match(g, node) for match in pats):
                changed = True
                dce(g)
                alive = {id(n) for n in g.nodes}
        if not changed:
            break
    return g
